"""Gradient release and optimizer accumulation, for every optimizer in ``tests/cases.py``.

Each release run is compared with the plain ``step()`` loop on the same data (or with a float64
reference of the accumulation rule); the behaviour tests check the contract of
``prepare_for_gradient_release`` / ``remove_gradient_release``.
"""

from __future__ import annotations

import copy
import datetime
import re
import socket
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.optim import lr_scheduler

import optimi
from optimi import gradient_release, prepare_for_gradient_release, remove_gradient_release
from tests.cases import OPTIMIZERS, max_relative_error

DTYPES = [torch.float32, torch.bfloat16]
STEPS = 8
ACCUMULATION_STEPS = 4


def spec_id(spec) -> str:
    return spec.name


# -- a small deterministic MLP and its data ------------------------------------------------------


def make_mlp(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """Three linear layers of different sizes (so the largest gradient is unambiguous)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 4))
    return model.to(dtype)


def mlp_loss(model: nn.Module, step: int) -> Tensor:
    generator = torch.Generator().manual_seed(step)
    dtype = next(model.parameters()).dtype
    x = torch.randn(16, 8, generator=generator).to(dtype)
    y = torch.randn(16, 4, generator=generator).to(dtype)
    return nn.functional.mse_loss(model(x).float(), y.float())


def snapshot(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_same_training(actual: list[Tensor], expected: list[Tensor], dtype: torch.dtype) -> None:
    """fp32: 1e-6 relative; bf16: bit-identical (both paths run the same for-loop kernels)."""
    if dtype == torch.float32:
        assert max_relative_error(actual, expected) <= 1e-6
    else:
        for a, e in zip(actual, expected):
            torch.testing.assert_close(a, e, rtol=0, atol=0)


def two_groups(model: nn.Module, lr: float) -> list[dict]:
    """The first layer in its own param group at half the learning rate: hooks must find each group."""
    first = list(model[0].parameters())
    rest = [p for p in model.parameters() if all(p is not q for q in first)]
    return [{"params": first, "lr": lr / 2}, {"params": rest}]


def train_with_step(spec, dtype: torch.dtype, steps: int = STEPS, accumulation: bool = False) -> list[Tensor]:
    """The normal loop: backward, ``step()``, ``zero_grad()``."""
    model = make_mlp(dtype)
    optimizer = spec.optimi_cls(two_groups(model, spec.lr), lr=spec.lr, **spec.kwargs)
    for step in range(steps):
        if accumulation:
            optimizer.optimizer_accumulation = (step + 1) % ACCUMULATION_STEPS != 0
        mlp_loss(model, step).backward()
        optimizer.step()
        optimizer.zero_grad()
    return snapshot(model)


def train_with_release(
    spec, dtype: torch.dtype, mode: str = "hooks", steps: int = STEPS, accumulation: bool = False
) -> list[Tensor]:
    """Gradient release; ``mode`` is how a training framework would drive it.

    ``hooks``: backward only. ``noop_calls``: backward, then the no-op ``step()``/``zero_grad()``.
    ``closure``: ``step(closure)`` with the forward and backward in the closure.
    """
    model = make_mlp(dtype)
    optimizer = spec.optimi_cls(two_groups(model, spec.lr), lr=spec.lr, gradient_release=True, **spec.kwargs)
    prepare_for_gradient_release(model, optimizer)
    for step in range(steps):
        if accumulation:
            optimizer.optimizer_accumulation = (step + 1) % ACCUMULATION_STEPS != 0
        if mode == "closure":
            losses = []

            def closure(step=step, losses=losses):
                loss = mlp_loss(model, step)
                loss.backward()
                losses.append(loss)
                return loss

            returned = optimizer.step(closure)
            assert len(losses) == 1 and returned is losses[0]
        else:
            mlp_loss(model, step).backward()
            if mode == "noop_calls":
                optimizer.step()
                optimizer.zero_grad()
        assert all(p.grad is None for p in model.parameters()), "release must free every gradient"
    remove_gradient_release(model)
    return snapshot(model)


# -- equivalence with the normal loop ------------------------------------------------------------


@pytest.mark.parametrize("mode", ["hooks", "noop_calls", "closure"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spec", OPTIMIZERS, ids=spec_id)
def test_release_matches_step_loop(spec, dtype, mode):
    """Stepping during backward gives the parameters of the normal ``step()`` loop.

    The normal loop debiases with the group's step count and release with each parameter's own;
    every parameter steps every iteration here, so the counts agree.
    """
    expected = train_with_step(spec, dtype)
    actual = train_with_release(spec, dtype, mode)
    assert_same_training(actual, expected, dtype)
    # the run moved the parameters, or the comparison would prove nothing
    assert max_relative_error(actual, snapshot(make_mlp(dtype))) > 1e-3


@pytest.mark.parametrize("spec", OPTIMIZERS, ids=spec_id)
def test_state_allocated_before_first_backward(spec):
    """All state exists after prepare: lazily creating it inside backward fragments memory."""
    dtype = torch.bfloat16  # includes the Kahan buffers
    model = make_mlp(dtype)
    optimizer = spec.optimi_cls(model.parameters(), lr=spec.lr, gradient_release=True, **spec.kwargs)
    prepare_for_gradient_release(model, optimizer)
    prepared = {
        p: {k: (v.shape, v.dtype) if isinstance(v, Tensor) else v for k, v in optimizer.state[p].items()}
        for p in model.parameters()
    }

    stepped = make_mlp(dtype)
    reference = spec.optimi_cls(stepped.parameters(), lr=spec.lr, **spec.kwargs)
    mlp_loss(stepped, 0).backward()
    reference.step()
    for param, stepped_param in zip(model.parameters(), stepped.parameters()):
        keys = set(reference.state[stepped_param])
        assert set(prepared[param]) == keys, f"{spec.name}: state keys {set(prepared[param])} != {keys}"
        assert prepared[param]["step"] == 0
        for key in keys - {"step"}:
            value = reference.state[stepped_param][key]
            if isinstance(value, Tensor):
                assert prepared[param][key] == (value.shape, value.dtype), key
    remove_gradient_release(model)


# -- optimizer accumulation ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spec", [s for s in OPTIMIZERS if s.accumulates], ids=spec_id)
def test_release_accumulation_matches_step_accumulation(spec, dtype):
    """Accumulating in the release hooks equals accumulating through ``step()`` (3 of 4 micro-steps)."""
    steps = 3 * ACCUMULATION_STEPS
    expected = train_with_step(spec, dtype, steps, accumulation=True)
    actual = train_with_release(spec, dtype, steps=steps, accumulation=True)
    assert_same_training(actual, expected, dtype)
    assert max_relative_error(actual, snapshot(make_mlp(dtype))) > 1e-4


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spec", [s for s in OPTIMIZERS if s.accumulates], ids=spec_id)
def test_accumulation_leaves_weights_untouched(spec, dtype):
    """Accumulating micro-steps change neither the weights nor apply weight decay; the 4th updates.

    "Weights" include the Kahan buffers: under Kahan summation an update smaller than a bf16 ulp
    lands in the compensation buffer and leaves the bf16 parameter as it was.
    """
    model = make_mlp(dtype)
    optimizer = spec.optimi_cls(model.parameters(), lr=spec.lr, gradient_release=True, **spec.kwargs)
    prepare_for_gradient_release(model, optimizer)

    def weights() -> list[tuple[Tensor, Tensor | None]]:
        return [(p.detach().clone(), _clone(optimizer.state[p].get("kahan_comp"))) for p in model.parameters()]

    before = weights()
    optimizer.optimizer_accumulation = True
    for step in range(ACCUMULATION_STEPS - 1):
        mlp_loss(model, step).backward()
    for (p, kahan), (p0, kahan0) in zip(weights(), before):
        assert torch.equal(p, p0) and _same(kahan, kahan0)
    assert all(optimizer.state[p]["step"] == ACCUMULATION_STEPS - 1 for p in model.parameters())
    optimizer.optimizer_accumulation = False
    mlp_loss(model, ACCUMULATION_STEPS - 1).backward()
    for (p, kahan), (p0, kahan0) in zip(weights(), before):
        assert not (torch.equal(p, p0) and _same(kahan, kahan0)), "the update step must change every parameter"
    remove_gradient_release(model)


def _clone(tensor: Tensor | None) -> Tensor | None:
    return None if tensor is None else tensor.detach().clone()


def _same(a: Tensor | None, b: Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


class Quadratic(nn.Module):
    """Loss ``sum(p**2 / 4 + noise * p)``: the gradient ``p / 2 + noise`` is known in closed form."""

    def __init__(self, shapes: list[tuple[int, ...]]):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.weights = nn.ParameterList([nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes])

    @staticmethod
    def noise(shape: tuple[int, ...], step: int, index: int) -> Tensor:
        return torch.randn(shape, generator=torch.Generator().manual_seed(1000 * step + index), dtype=torch.float64)

    def forward(self, step: int) -> Tensor:
        return sum(
            (0.25 * w * w + self.noise(w.shape, step, i).to(w.dtype) * w).sum() for i, w in enumerate(self.weights)
        )


QUADRATIC_SHAPES = [(24, 16), (16,), (5, 3, 2)]


def adamw_accumulation_reference(p: Tensor, index: int, micro_steps: int, *, lr, betas, eps, weight_decay) -> Tensor:
    """AdamW whose moments absorb every micro-gradient; weights move on every 4th micro-step.

    Debiasing counts micro-steps: the moments have absorbed ``t`` gradients.
    """
    beta1, beta2 = betas
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    for t in range(1, micro_steps + 1):
        g = 0.5 * p + Quadratic.noise(p.shape, t - 1, index)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        if t % ACCUMULATION_STEPS == 0:
            m_hat, v_hat = m / (1 - beta1**t), v / (1 - beta2**t)
            p = p * (1 - lr * weight_decay) - lr * m_hat / (v_hat.sqrt() + eps)
    return p


def sgd_accumulation_reference(p: Tensor, index: int, micro_steps: int, *, lr, momentum, weight_decay) -> Tensor:
    """Heavy-ball SGD whose buffer absorbs every micro-gradient; decoupled decay on the update only."""
    b = torch.zeros_like(p)
    for t in range(1, micro_steps + 1):
        g = 0.5 * p + Quadratic.noise(p.shape, t - 1, index)
        b = momentum * b + g
        if t % ACCUMULATION_STEPS == 0:
            p = p * (1 - lr * weight_decay) - lr * b
    return p


#: name -> (optimizer builder taking extra options, its float64 rule); test_state_bits reuses them
ACCUMULATION_REFERENCES = {
    "adamw": (
        lambda params, **options: optimi.AdamW(
            params, lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=1e-2, gradient_release=True, **options
        ),
        lambda p, i, n: adamw_accumulation_reference(p, i, n, lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=1e-2),
    ),
    "sgd-momentum": (
        lambda params, **options: optimi.SGD(
            params, lr=1e-2, momentum=0.9, weight_decay=1e-2, decouple_wd=True, gradient_release=True, **options
        ),
        lambda p, i, n: sgd_accumulation_reference(p, i, n, lr=1e-2, momentum=0.9, weight_decay=1e-2),
    ),
}


def accumulate_under_release(
    name: str, shapes: list[tuple[int, ...]], **options
) -> tuple[Quadratic, optimi.OptimiOptimizer, list[Tensor], list[Tensor]]:
    """3 optimizer steps of 4 accumulated micro-batches each, under gradient release, with optimizer
    ``name`` of :data:`ACCUMULATION_REFERENCES` (built with ``options``); returns the model, the
    optimizer, the initial weights (float64) and what the float64 rule gives for them."""
    make_optimizer, reference = ACCUMULATION_REFERENCES[name]
    model = Quadratic(shapes)
    initial = [w.detach().double() for w in model.weights]
    optimizer = make_optimizer(model.parameters(), **options)
    prepare_for_gradient_release(model, optimizer)
    micro_steps = 3 * ACCUMULATION_STEPS
    for step in range(micro_steps):
        optimizer.optimizer_accumulation = (step + 1) % ACCUMULATION_STEPS != 0
        model(step).backward()
    remove_gradient_release(model)
    return model, optimizer, initial, [reference(p, i, micro_steps) for i, p in enumerate(initial)]


@pytest.mark.parametrize("name", list(ACCUMULATION_REFERENCES))
def test_accumulation_matches_float64_reference(name):
    """Optimizer accumulation over 4 micro-batches follows the float64 rule written out above."""
    model, _, initial, expected = accumulate_under_release(name, QUADRATIC_SHAPES)
    error = max_relative_error(list(model.weights), expected)
    assert error <= 1e-6, f"{name}: relative error {error:.2e}"
    assert max_relative_error(expected, initial) > 1e-3


def test_sgd_without_momentum_cannot_accumulate():
    model = make_mlp()
    optimizer = optimi.SGD(model.parameters(), lr=1e-2, gradient_release=True)
    prepare_for_gradient_release(model, optimizer)
    optimizer.optimizer_accumulation = True
    with pytest.raises(ValueError, match="momentum"):
        mlp_loss(model, 0).backward()


# -- schedulers after a state_dict round trip ----------------------------------------------------

SCHEDULERS: dict[str, Callable] = {
    "cosine": lambda opt, lr: lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS),
    "lambda": lambda opt, lr: lr_scheduler.LambdaLR(opt, lambda step: 0.8**step),
    "onecycle": lambda opt, lr: lr_scheduler.OneCycleLR(
        opt, max_lr=10 * lr, total_steps=STEPS + 1, cycle_momentum=True
    ),
    "sequential": lambda opt, lr: lr_scheduler.SequentialLR(
        opt,
        [lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=3), lr_scheduler.ExponentialLR(opt, gamma=0.8)],
        milestones=[3],
    ),
}
ROUND_TRIP_STEP = 3


def momentum_of(group: dict) -> float | None:
    if "betas" in group:
        return group["betas"][0]
    return group.get("momentum")


def train_scheduled(spec, scheduler_name: str, round_trip: bool):
    """Release training under a scheduler, recording the (lr, momentum) each step actually used."""
    model = make_mlp()
    optimizer = spec.optimi_cls(model.parameters(), lr=spec.lr, gradient_release=True, **spec.kwargs)
    prepare_for_gradient_release(model, optimizer)
    scheduler = SCHEDULERS[scheduler_name](optimizer, spec.lr)

    used: list[set[tuple[float, float | None]]] = []
    step_group = optimizer._step_group

    def recording_step_group(group, *args, **kwargs):
        used[-1].add((group["lr"], momentum_of(group)))
        return step_group(group, *args, **kwargs)

    optimizer._step_group = recording_step_group
    scheduled, stale_group = [], None
    for step in range(STEPS):
        if round_trip and step == ROUND_TRIP_STEP:
            # what accelerate's prepare does: the group dicts are replaced by new ones
            stale_group = optimizer.param_groups[0]
            optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
            assert optimizer.param_groups[0] is not stale_group
        scheduled.append((optimizer.param_groups[0]["lr"], momentum_of(optimizer.param_groups[0])))
        used.append(set())
        mlp_loss(model, step).backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    remove_gradient_release(model)
    return snapshot(model), used, scheduled, stale_group


@pytest.mark.parametrize("scheduler_name", list(SCHEDULERS))
@pytest.mark.parametrize("spec", OPTIMIZERS, ids=spec_id)
def test_scheduler_drives_release_after_load_state_dict(spec, scheduler_name):
    """The hooks use the scheduler's LR (and momentum) also after ``load_state_dict`` mid-training."""
    params, used, scheduled, stale_group = train_scheduled(spec, scheduler_name, round_trip=True)
    # every release step of an iteration used exactly the scheduled values of that iteration
    assert [s for u in used for s in u] == scheduled
    lrs_after = [lr for lr, _ in scheduled[ROUND_TRIP_STEP:]]
    assert len(set(lrs_after)) == len(lrs_after), "the schedule must keep changing the LR after the round trip"
    if scheduler_name == "onecycle":
        assert len({m for _, m in scheduled[ROUND_TRIP_STEP:]}) > 2
    # a hook holding the replaced group would have used its frozen LR
    assert stale_group["lr"] == scheduled[ROUND_TRIP_STEP][0] != scheduled[-1][0]
    # and the resumed run is bit-identical to the run without the round trip
    expected, expected_used, _, _ = train_scheduled(spec, scheduler_name, round_trip=False)
    assert used == expected_used
    for a, b in zip(params, expected):
        assert torch.equal(a, b)


SCHEDULER_ORDER_WARNING = "Detected call of `lr_scheduler.step()` before `optimizer.step()`"


def test_release_steps_count_as_optimizer_steps_for_schedulers():
    """A release loop that never calls ``optimizer.step()``: the first ``scheduler.step()`` must not warn.

    torch's LRScheduler warns when its wrapper of ``optimizer.step`` has not run; the release steps in
    backward stand for it (the same check runs on FSDP2 and DDP in ``tests/distributed``).
    """
    model = make_mlp()
    optimizer = optimi.AdamW(model.parameters(), lr=1e-2, gradient_release=True)
    prepare_for_gradient_release(model, optimizer)
    scheduler = lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mlp_loss(model, 0).backward()
        scheduler.step()
    assert [str(w.message) for w in caught if SCHEDULER_ORDER_WARNING in str(w.message)] == []
    assert scheduler.get_last_lr() == [5e-3]


# -- memory: live gradients during backward ------------------------------------------------------


def peak_live_grad_bytes(model: nn.Module, optimizer, release: bool, steps: int = 2) -> int:
    """Largest total of ``p.grad`` bytes alive at any post-accumulate event of backward.

    The counting hooks are registered before the release hooks, so they run first and see the
    gradient that was just accumulated together with every other one still alive.
    """
    peak = 0

    def count(_: Tensor) -> None:
        nonlocal peak
        peak = max(peak, sum(p.grad.nbytes for p in model.parameters() if p.grad is not None))

    handles = [p.register_post_accumulate_grad_hook(count) for p in model.parameters()]
    if release:
        prepare_for_gradient_release(model, optimizer, ignore_existing_hooks=True)
    for step in range(steps):
        mlp_loss(model, step).backward()
        optimizer.step()
        optimizer.zero_grad()
    if release:
        remove_gradient_release(model)
    for handle in handles:
        handle.remove()
    return peak


@pytest.mark.parametrize("spec", OPTIMIZERS, ids=spec_id)
def test_release_holds_one_gradient_at_a_time(spec):
    """With release at most the largest parameter's gradient is alive; without, all of them."""
    model = make_mlp()
    sizes = [p.numel() * p.element_size() for p in model.parameters()]
    optimizer = spec.optimi_cls(model.parameters(), lr=spec.lr, gradient_release=True, **spec.kwargs)
    assert peak_live_grad_bytes(model, optimizer, release=True) == max(sizes)
    assert peak_live_grad_bytes(model, optimizer, release=False) == sum(sizes)


# -- errors and the prepare / remove contract ----------------------------------------------------


def test_requires_an_optimi_optimizer():
    model = make_mlp()
    with pytest.raises(TypeError, match="optimi optimizer.*torch.optim.adamw.AdamW"):
        prepare_for_gradient_release(model, torch.optim.AdamW(model.parameters(), lr=1e-3))


@pytest.mark.parametrize("spec", OPTIMIZERS, ids=spec_id)
def test_requires_gradient_release_flag(spec):
    model = make_mlp()
    optimizer = spec.optimi_cls(model.parameters(), lr=spec.lr, **spec.kwargs)
    with pytest.raises(ValueError, match="gradient_release=True"):
        prepare_for_gradient_release(model, optimizer)
    assert not optimizer._gradient_release_active


def test_trainable_parameter_missing_from_optimizer():
    model = make_mlp()
    optimizer = optimi.AdamW(model[0].parameters(), lr=1e-3, gradient_release=True)
    with pytest.raises(ValueError, match=r"not in the optimizer.*2\.weight, 2\.bias, 4\.weight"):
        prepare_for_gradient_release(model, optimizer)
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())


def test_frozen_parameters_are_skipped():
    model = make_mlp()
    model[0].requires_grad_(False)
    frozen = snapshot(model[0])
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimi.AdamW(trainable, lr=1e-2, gradient_release=True)
    prepare_for_gradient_release(model, optimizer)
    assert all(not p._post_accumulate_grad_hooks for p in model[0].parameters())
    before = snapshot(model)
    mlp_loss(model, 0).backward()
    for a, b in zip(model[0].parameters(), frozen):
        assert torch.equal(a, b)
    assert all(p not in optimizer.state for p in model[0].parameters())
    assert all(not torch.equal(a, b) for a, b in zip(snapshot(model)[2:], before[2:]))


def test_existing_hooks_raise_unless_ignored():
    model = make_mlp()
    seen = []
    user_handle = model[2].weight.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad is not None))
    optimizer = optimi.AdamW(model.parameters(), lr=1e-3, gradient_release=True)
    with pytest.raises(ValueError, match=r"2\.weight.*ignore_existing_hooks=True"):
        prepare_for_gradient_release(model, optimizer)
    assert not optimizer._gradient_release_active

    prepare_for_gradient_release(model, optimizer, ignore_existing_hooks=True)
    mlp_loss(model, 0).backward()
    assert seen == [True]  # the earlier user hook ran first and saw the gradient
    assert model[2].weight.grad is None
    # removing gradient release removes exactly its own hooks
    remove_gradient_release(model)
    assert list(model[2].weight._post_accumulate_grad_hooks) == [user_handle.id]
    user_handle.remove()


def test_prepare_twice_raises():
    model = make_mlp()
    optimizer = optimi.AdamW(model.parameters(), lr=1e-3, gradient_release=True)
    prepare_for_gradient_release(model, optimizer)
    with pytest.raises(ValueError, match="already prepared"):
        prepare_for_gradient_release(model, optimizer)


def test_remove_restores_normal_stepping():
    model = make_mlp()
    optimizer = optimi.AdamW(model.parameters(), lr=1e-2, gradient_release=True)
    prepare_for_gradient_release(model, optimizer)
    assert optimizer._gradient_release_active
    mlp_loss(model, 0).backward()
    remove_gradient_release(model)
    assert not optimizer._gradient_release_active
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())

    before = snapshot(model)
    mlp_loss(model, 1).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(snapshot(model), before))  # backward alone no longer steps
    optimizer.step()
    optimizer.zero_grad()
    assert all(not torch.equal(a, b) for a, b in zip(snapshot(model), before))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("spec", OPTIMIZERS, ids=spec_id)
def test_step_after_remove_continues_debiasing(spec):
    """Release for a few steps, remove it, go on with step(): identical to step() throughout.

    Release counts steps per parameter and step() per group; removal must carry the count over, or
    Adam-family debiasing would restart at step 1.
    """
    expected = train_with_step(spec, torch.float32)
    model = make_mlp()
    optimizer = spec.optimi_cls(two_groups(model, spec.lr), lr=spec.lr, gradient_release=True, **spec.kwargs)
    prepare_for_gradient_release(model, optimizer)
    for step in range(STEPS // 2):
        mlp_loss(model, step).backward()
    remove_gradient_release(model)
    for step in range(STEPS // 2, STEPS):
        mlp_loss(model, step).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(group["step"] == STEPS for group in optimizer.param_groups)
    assert_same_training(snapshot(model), expected, torch.float32)


def test_remove_without_hooks_warns():
    with pytest.warns(UserWarning, match="no gradient release hooks"):
        remove_gradient_release(make_mlp())


# -- distributed models are dispatched to optimi.distributed -------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def single_rank_group():
    """A 1-rank gloo process group, destroyed afterwards (a bounded timeout guards against hangs)."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    assert not dist.is_initialized(), "another test left a process group initialized"
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{_free_port()}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def _ddp_model() -> nn.Module:
    return nn.parallel.DistributedDataParallel(make_mlp())


def _fsdp2_model() -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = make_mlp()
    mesh = init_device_mesh("cpu", (1,))
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer, mesh=mesh)
    return model  # the root is a plain Sequential: detection must look at submodules


@pytest.mark.distributed
@pytest.mark.parametrize(
    "make_model, reason", [(_ddp_model, "un-averaged"), (_fsdp2_model, "shard")], ids=["ddp", "fsdp2"]
)
def test_distributed_models_get_their_kinds_installer(single_rank_group, monkeypatch, make_model, reason):
    """DDP / FSDP2 models get optimi.distributed's installer; without it a clear error, never plain hooks."""
    model = make_model()
    optimizer = optimi.AdamW(model.parameters(), lr=1e-3, gradient_release=True)

    # optimi.distributed unavailable (its installers not registered): refuse, naming the reason
    monkeypatch.setitem(sys.modules, "optimi.distributed", None)
    for kind in ("ddp", "fsdp2"):
        monkeypatch.delitem(gradient_release._INSTALLERS, kind, raising=False)
    with pytest.raises(NotImplementedError, match=reason):
        prepare_for_gradient_release(model, optimizer)
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
    assert not optimizer._gradient_release_active
    with pytest.raises(NotImplementedError, match=reason):
        remove_gradient_release(model)
    monkeypatch.undo()

    # available: imported on first use, it installs the kind's hooks, and backward steps every parameter
    prepare_for_gradient_release(model, optimizer)
    assert optimizer._gradient_release_active
    if isinstance(model, nn.parallel.DistributedDataParallel):
        assert model._comm_hooks and all(not p._post_accumulate_grad_hooks for p in model.parameters())
    else:
        assert all(p._post_accumulate_grad_hooks for p in model.parameters())
    before = snapshot(model)
    mlp_loss(model, 0).backward()
    assert all(not torch.equal(a, b) for a, b in zip(snapshot(model), before))
    assert all(p.grad is None for p in model.parameters())
    remove_gradient_release(model)
    assert not optimizer._gradient_release_active
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())


# -- the documented snippets run as written ------------------------------------------------------

DOCS_PAGE = Path(__file__).resolve().parent.parent / "docs" / "gradient_release.md"


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.DOTALL)


@pytest.mark.parametrize("index", range(3))
def test_docs_snippets_run(index):
    blocks = _python_blocks(DOCS_PAGE)
    assert len(blocks) == 3, "update this test when snippets are added to docs/gradient_release.md"
    namespace: dict = {}
    exec(compile(blocks[index], f"{DOCS_PAGE.name}[{index}]", "exec"), namespace)
    if "accumulation_steps" in namespace:
        # the page promises micro-step counting: 16 micro-batches, 16 steps
        opt, model = namespace["opt"], namespace["model"]
        assert all(opt.state[p]["step"] == len(namespace["dataloader"]) for p in model.parameters())


@pytest.mark.filterwarnings("error")  # no scheduler-order warning: the release steps count as opt.step()
def test_seed_readme_snippets():
    """The seed README's two gradient release snippets, with its placeholders filled in."""
    from torch.optim.lr_scheduler import CosineAnnealingLR

    model = nn.Linear(20, 1, dtype=torch.bfloat16)
    before = snapshot(model)
    opt = optimi.AdamW(model.parameters(), lr=1e-3, gradient_release=True)
    prepare_for_gradient_release(model, opt)
    scheduler = CosineAnnealingLR(opt, T_max=10)
    loss = model(torch.randn(20, dtype=torch.bfloat16))
    loss.backward()
    opt.step()
    opt.zero_grad()
    scheduler.step()
    remove_gradient_release(model)
    assert all(not torch.equal(a, b) for a, b in zip(snapshot(model), before))

    model = nn.Linear(20, 1, dtype=torch.bfloat16)
    dataloader = [torch.randn(20, dtype=torch.bfloat16) for _ in range(8)]
    opt = optimi.AdamW(model.parameters(), lr=1e-3, gradient_release=True)
    prepare_for_gradient_release(model, opt)
    accumulation_steps = 4
    scheduler = CosineAnnealingLR(opt, T_max=2)
    updates = 0
    for idx, batch in enumerate(dataloader):
        opt.optimizer_accumulation = (idx + 1) % accumulation_steps != 0
        loss = model(batch)
        loss.backward()
        if not opt.optimizer_accumulation:
            scheduler.step()
            updates += 1
    remove_gradient_release(model)
    assert updates == 2 and scheduler.last_epoch == 2
