"""``max_grad_norm``: clipping by the global gradient norm, ``grad_norm`` and the non-finite guard.

[Note: gradient clipping and the non-finite guard] in ``optimi/_clipping.py``. The reference is
``torch.nn.utils.clip_grad_norm_`` followed by the same optimizer's unclipped ``step()``.
"""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch

import optimi
from optimi import _clipping

OPTIMIZERS = {
    "adam": (optimi.Adam, {}),
    "adamw": (optimi.AdamW, {"weight_decay": 1e-2}),
    "adan": (optimi.Adan, {}),
    "lion": (optimi.Lion, {}),
    "radam": (optimi.RAdam, {}),
    "ranger": (optimi.Ranger, {}),
    "sgd": (optimi.SGD, {"momentum": 0.9}),
    "stableadamw": (optimi.StableAdamW, {}),
}
SHAPES = [(12, 7), (7,), (5, 3, 2)]
#: gradients of about norm 10: the clip at 1.0 scales every step, at 40.0 only some
GRAD_SCALE = 2.0


def make_params(dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator).to(dtype)) for shape in SHAPES]


def grads_of(step: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    scale = GRAD_SCALE * (1 + step)  # growing: some steps clip, some do not, at max_grad_norm=40
    return [(torch.randn(shape, generator=generator) * scale).to(dtype) for shape in SHAPES]


def build(name: str, params: list[torch.nn.Parameter], **extra):
    cls, kwargs = OPTIMIZERS[name]
    # two param groups: the norm and the clip are global over both
    groups = [{"params": params[:1]}, {"params": params[1:], "lr": 5e-3}]
    return cls(groups, lr=1e-2, **kwargs, **extra)


@pytest.mark.parametrize("max_grad_norm", [1.0, 40.0])
@pytest.mark.parametrize("backend", ["for_loop", "foreach"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_step_with_max_grad_norm_equals_clip_grad_norm_then_step(name, backend, max_grad_norm):
    flags = {"foreach": backend == "foreach", "fused": False}
    clipped_params, reference_params = make_params(), make_params()
    clipped = build(name, clipped_params, max_grad_norm=max_grad_norm, **flags)
    reference = build(name, reference_params, **flags)
    for step in range(5):
        grads = grads_of(step)
        for param, grad in zip(clipped_params + reference_params, grads + grads):
            param.grad = grad.clone()
        expected_norm = torch.nn.utils.clip_grad_norm_(reference_params, max_grad_norm)
        reference.step()
        clipped.step()
        assert clipped.grad_norm is not None
        torch.testing.assert_close(clipped.grad_norm, expected_norm, rtol=1e-6, atol=0)
    for param, expected in zip(clipped_params, reference_params):
        torch.testing.assert_close(param, expected, rtol=1e-6, atol=1e-7)
    assert clipped.skipped_steps == 0
    moved = max((p - q).abs().max().item() for p, q in zip(clipped_params, make_params()))
    assert moved > 1e-3, "the runs must train for the comparison to mean anything"


@pytest.mark.parametrize("max_grad_norm", [1.0, 40.0])
@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_at_both_thresholds_the_clip_changes_the_result(name, max_grad_norm):
    """The same 5 steps without clipping end outside the tolerance of the test above: it can fail."""
    clipped_params, plain_params = make_params(), make_params()
    clipped = build(name, clipped_params, max_grad_norm=max_grad_norm, foreach=False)
    plain = build(name, plain_params, foreach=False)
    for step in range(5):
        for param, grad in zip(clipped_params + plain_params, grads_of(step) + grads_of(step)):
            param.grad = grad
        clipped.step()
        plain.step()
    assert not all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(clipped_params, plain_params))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_norm_is_the_total_norm_of_the_gradients(dtype):
    params = make_params(dtype)
    optimizer = build("adamw", params, max_grad_norm=float("inf"), foreach=False)
    grads = grads_of(3, dtype)
    for param, grad in zip(params, grads):
        param.grad = grad.clone()
    optimizer.step()
    expected = torch.nn.utils.get_total_norm([g.float() for g in grads])
    torch.testing.assert_close(optimizer.grad_norm, expected, rtol=1e-6, atol=0)
    assert optimizer.grad_norm.dtype == torch.float32 and optimizer.grad_norm.dim() == 0


def test_infinite_max_grad_norm_measures_without_clipping():
    guarded, plain = make_params(), make_params()
    guarded_opt = build("adamw", guarded, max_grad_norm=float("inf"), foreach=False)
    plain_opt = build("adamw", plain, foreach=False)
    for step in range(3):
        for param, grad in zip(guarded + plain, grads_of(step) + grads_of(step)):
            param.grad = grad
        guarded_opt.step()
        plain_opt.step()
    assert all(torch.equal(a, b) for a, b in zip(guarded, plain))
    assert guarded_opt.grad_norm.item() > 1.0
    assert plain_opt.grad_norm is None  # without max_grad_norm nothing is measured


def state_snapshot(optimizer) -> list[torch.Tensor]:
    return [v.clone() for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_a_non_finite_gradient_skips_the_whole_step(name, bad, monkeypatch):
    monkeypatch.setattr(_clipping._SkipWarnings, "last", None)
    params = make_params()
    optimizer = build(name, params, max_grad_norm=1.0, foreach=False)
    for param, grad in zip(params, grads_of(0)):
        param.grad = grad
    optimizer.step()
    weights, state = [p.detach().clone() for p in params], state_snapshot(optimizer)
    steps = [g["step"] for g in optimizer.param_groups]
    grads = grads_of(1)
    grads[1][3] = bad  # one element of one parameter's gradient
    for param, grad in zip(params, grads):
        param.grad = grad
    with pytest.warns(RuntimeWarning, match="skipped: the gradient norm is not finite"):
        optimizer.step()
    assert optimizer.skipped_steps == 1
    assert not math.isfinite(optimizer.grad_norm.item())
    assert all(torch.equal(a, b) for a, b in zip(params, weights))
    assert all(torch.equal(a, b) for a, b in zip(state_snapshot(optimizer), state))
    assert [g["step"] for g in optimizer.param_groups] == steps
    # a second skip within the warning interval is counted, not warned about again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.step()
    assert optimizer.skipped_steps == 2
    # and the next finite step trains on
    for param, grad in zip(params, grads_of(2)):
        param.grad = grad
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in params)
    assert not all(torch.equal(a, b) for a, b in zip(params, weights))


def test_skipped_steps_and_max_grad_norm_are_saved_in_the_state_dict():
    params = make_params()
    optimizer = build("adamw", params, max_grad_norm=2.0, foreach=False)
    for param, grad in zip(params, grads_of(0)):
        param.grad = grad.fill_(float("nan"))
    with pytest.warns(RuntimeWarning):
        optimizer.step()
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    restored = build("adamw", make_params(), foreach=False)
    restored.load_state_dict(torch.load(buffer))
    assert restored.skipped_steps == 1
    assert restored.max_grad_norm == 2.0


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), "1.0", True])
def test_bad_max_grad_norm_raises(bad):
    with pytest.raises(ValueError, match="Invalid max_grad_norm"):
        optimi.AdamW(make_params(), lr=1e-3, max_grad_norm=bad)


def test_param_groups_must_share_max_grad_norm():
    params = make_params()
    with pytest.raises(ValueError, match="set max_grad_norm once"):
        optimi.AdamW([{"params": params[:1], "max_grad_norm": 2.0}, {"params": params[1:]}], lr=1e-3)


# -- under gradient release: the previous backward's norm ------------------------------------------


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return torch.randn(8, 6, generator=generator) * (1 + step), torch.randn(8, 3, generator=generator)


def loss_of(model: torch.nn.Module, step: int) -> torch.Tensor:
    x, y = batch(step)
    return torch.nn.functional.mse_loss(model(x), y)


def release_and_reference(name: str, max_norm: float):
    """A model under release with ``max_grad_norm`` and an identical unclipped one stepping normally."""
    cls, kwargs = OPTIMIZERS[name]
    released, reference = small_model(), small_model()
    released_opt = cls(released.parameters(), lr=1e-2, **kwargs, max_grad_norm=max_norm, gradient_release=True)
    reference_opt = cls(reference.parameters(), lr=1e-2, **kwargs, foreach=False)
    optimi.prepare_for_gradient_release(released, released_opt)
    return released, released_opt, reference, reference_opt


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_release_clips_by_the_previous_backwards_norm(name):
    """Release + max_grad_norm equals a loop that scales each backward's gradients by
    min(1, max / (norm + 1e-6)) of the previous backward's norm (none at the first), then steps."""
    max_norm = 0.5
    released, released_opt, reference, reference_opt = release_and_reference(name, max_norm)
    coefficient, clipped = None, 0
    for step in range(6):
        loss_of(reference, step).backward()
        grads = [p.grad for p in reference.parameters()]
        norm = torch.nn.utils.get_total_norm(grads)
        if coefficient is not None:
            torch._foreach_mul_(grads, coefficient)
            clipped += bool(coefficient < 1)
        coefficient = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        reference_opt.step()
        reference_opt.zero_grad()
        loss_of(released, step).backward()
        torch.testing.assert_close(released_opt.grad_norm, norm, rtol=1e-6, atol=0)
    assert clipped >= 3
    for a, b in zip(released.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    optimi.remove_gradient_release(released)


def test_release_without_max_grad_norm_does_not_clip_or_measure():
    released, reference = small_model(), small_model()
    released_opt = optimi.AdamW(released.parameters(), lr=1e-2, gradient_release=True)
    reference_opt = optimi.AdamW(reference.parameters(), lr=1e-2, foreach=False)
    optimi.prepare_for_gradient_release(released, released_opt)
    for step in range(3):
        loss_of(reference, step).backward()
        reference_opt.step()
        reference_opt.zero_grad()
        loss_of(released, step).backward()
    assert all(torch.equal(a, b) for a, b in zip(released.parameters(), reference.parameters()))
    assert released_opt.grad_norm is None


def test_release_skips_a_parameter_whose_gradient_is_not_finite(monkeypatch):
    monkeypatch.setattr(_clipping._SkipWarnings, "last", None)
    model = small_model()
    optimizer = optimi.AdamW(model.parameters(), lr=1e-2, max_grad_norm=1.0, gradient_release=True)
    optimi.prepare_for_gradient_release(model, optimizer)
    loss_of(model, 0).backward()
    before = [p.detach().clone() for p in model.parameters()]
    state_before = {id(p): state_snapshot_of(optimizer, p) for p in model.parameters()}
    poisoned = model[0].weight
    handle = poisoned.register_hook(lambda grad: torch.full_like(grad, float("nan")))
    with pytest.warns(RuntimeWarning, match="gradient release step of one parameter skipped"):
        loss_of(model, 1).backward()
    handle.remove()
    assert optimizer.skipped_steps == 1
    assert torch.isnan(optimizer.grad_norm)
    for param, old in zip(model.parameters(), before):
        unchanged = torch.equal(param, old)
        assert unchanged == (param is poisoned)
        assert torch.isfinite(param).all()
        same_state = all(
            torch.equal(a, b) for a, b in zip(state_snapshot_of(optimizer, param), state_before[id(param)])
        )
        assert same_state == (param is poisoned)
    # the coefficient for the next backward comes from the finite gradients: training goes on
    loss_of(model, 2).backward()
    assert torch.isfinite(optimizer.grad_norm)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    optimi.remove_gradient_release(model)


def state_snapshot_of(optimizer, param) -> list[torch.Tensor]:
    return [v.clone() for v in optimizer.state[param].values() if isinstance(v, torch.Tensor)]


# -- release_backward: the exact clip in two passes --------------------------------------------------


@pytest.mark.parametrize("name", ["adamw", "sgd", "lion", "stableadamw"])
def test_release_backward_equals_clip_grad_norm_then_step(name):
    max_norm = 0.5
    released, released_opt, reference, reference_opt = release_and_reference(name, max_norm)
    clipped = 0
    for step in range(5):
        loss_of(reference, step).backward()
        norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)
        clipped += bool(norm > max_norm)
        reference_opt.step()
        reference_opt.zero_grad()
        optimi.release_backward(loss_of(released, step), released_opt)
        torch.testing.assert_close(released_opt.grad_norm, norm, rtol=1e-6, atol=0)
        assert all(p.grad is None for p in released.parameters())
    assert clipped >= 3
    for a, b in zip(released.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    optimi.remove_gradient_release(released)


def test_release_backward_skips_the_whole_step_on_a_non_finite_norm(monkeypatch):
    monkeypatch.setattr(_clipping._SkipWarnings, "last", None)
    model = small_model()
    optimizer = optimi.AdamW(model.parameters(), lr=1e-2, max_grad_norm=1.0, gradient_release=True)
    optimi.prepare_for_gradient_release(model, optimizer)
    optimi.release_backward(loss_of(model, 0), optimizer)
    before = [p.detach().clone() for p in model.parameters()]
    handle = model[2].bias.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    with pytest.warns(RuntimeWarning, match=r"optimizer step \(release_backward\) skipped"):
        optimi.release_backward(loss_of(model, 1), optimizer)
    handle.remove()
    assert optimizer.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    optimi.remove_gradient_release(model)


def test_release_backward_refuses_what_it_cannot_do():
    model = small_model()
    plain = optimi.AdamW(model.parameters(), lr=1e-2, gradient_release=True)
    with pytest.raises(ValueError, match="max_grad_norm"):
        optimi.release_backward(loss_of(model, 0), plain)
    clipped = optimi.AdamW(model.parameters(), lr=1e-2, max_grad_norm=1.0, gradient_release=True)
    with pytest.raises(ValueError, match="prepare_for_gradient_release"):
        optimi.release_backward(loss_of(model, 0), clipped)


def test_with_optimizer_accumulation_each_micro_batch_is_clipped_by_its_own_norm():
    clipped_params, reference_params = make_params(), make_params()
    clipped = build("adamw", clipped_params, max_grad_norm=1.0, foreach=False)
    reference = build("adamw", reference_params, foreach=False)
    for step in range(6):
        accumulate = step % 3 != 2  # two micro-steps fold into the state, the third steps
        clipped.optimizer_accumulation = reference.optimizer_accumulation = accumulate
        for param, grad in zip(clipped_params + reference_params, grads_of(step) + grads_of(step)):
            param.grad = grad.clone()
        norm = torch.nn.utils.clip_grad_norm_(reference_params, 1.0)
        reference.step()
        clipped.step()
        torch.testing.assert_close(clipped.grad_norm, norm, rtol=1e-6, atol=0)
    for a, b in zip(clipped_params, reference_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_a_state_dict_from_before_max_grad_norm_keeps_the_constructors_value():
    """Loading a state dict saved without the newer group keys must not switch clipping off."""
    params = make_params()
    old = build("adamw", params, foreach=False)
    saved = old.state_dict()
    for group in saved["param_groups"]:
        for key in ("max_grad_norm", "skipped_steps", "rounding_seed", "low_precision"):
            group.pop(key)
    optimizer = build("adamw", params, max_grad_norm=1.0, foreach=False)
    optimizer.load_state_dict(saved)
    assert optimizer.max_grad_norm == 1.0 and optimizer.skipped_steps == 0
    assert all(group["rounding_seed"] == 0 for group in optimizer.param_groups)
    for param, grad in zip(params, grads_of(0)):
        param.grad = grad
    optimizer.step()
    assert optimizer.grad_norm is not None
