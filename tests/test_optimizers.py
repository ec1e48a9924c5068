"""One parametrized suite over every optimi optimizer (cases in ``tests/cases.py``)."""

from __future__ import annotations

import copy

import pytest
import torch

import optimi
from optimi.optimizer import resolve_backend
from tests.cases import (
    OPTIMIZERS,
    REFERENCE_CASES,
    STEPS,
    clone_params,
    make_params,
    max_relative_error,
    synthetic_grad,
    train,
)

BACKENDS = {"for_loop": dict(foreach=False), "foreach": dict(foreach=True)}
FP32_TOLERANCE = 1e-6


def spec_id(spec) -> str:
    return spec.name


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("case", REFERENCE_CASES, ids=lambda c: c.id)
def test_matches_reference_fp32(case, backend):
    """fp32 optimi matches torch.optim (or the float64 paper reference) to 1e-6 relative."""
    params = make_params(torch.float32)
    reference_params = clone_params(params, case.reference_dtype)
    optimizer = case.optimi_cls(params, lr=case.lr, **case.kwargs, **BACKENDS[backend])
    reference = case.reference(reference_params, case.lr)
    train(optimizer, params, case.lr)
    train(reference, reference_params, case.lr)
    error = max_relative_error(params, reference_params)
    assert error <= FP32_TOLERANCE, f"{case.id}/{backend}: relative error {error:.2e}"
    # the run must have moved the parameters, or the comparison proves nothing
    assert max_relative_error(params, make_params(torch.float32)) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", REFERENCE_CASES, ids=lambda c: c.id)
def test_foreach_equals_for_loop(case, dtype):
    """Both backends execute the same update rule: their results are identical."""
    results = []
    for backend in BACKENDS.values():
        params = make_params(dtype)
        optimizer = case.optimi_cls(params, lr=case.lr, **case.kwargs, **backend)
        train(optimizer, params, case.lr)
        results.append(params)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    "spec, dtype",
    [(spec, dtype) for spec in OPTIMIZERS for dtype in spec.low_precision_dtypes],
    ids=lambda x: x.name if hasattr(x, "name") else str(x),
)
def test_kahan_stays_closer_to_fp32(spec, dtype):
    """Low-precision training with Kahan summation tracks the fp32 run far better than without."""
    steps, lr = 60, spec.lr
    fp32 = make_params(torch.float32)
    train(spec.optimi_cls(fp32, lr=lr, **spec.kwargs), fp32, lr, steps)
    distances = {}
    for kahan in (True, False):
        low = clone_params(make_params(torch.float32), dtype)
        optimizer = spec.optimi_cls(low, lr=lr, kahan_sum=kahan, **spec.kwargs)
        train(optimizer, low, lr, steps)
        distances[kahan] = sum((a.float() - b).norm().item() for a, b in zip(low, fp32))
    assert distances[True] < 0.5 * distances[False], distances


@pytest.mark.parametrize("spec", OPTIMIZERS, ids=spec_id)
def test_kahan_buffers_only_for_low_precision(spec):
    fp32, bf16 = make_params(torch.float32), make_params(torch.bfloat16, seed=1)
    optimizer = spec.optimi_cls(fp32 + bf16, lr=spec.lr, **spec.kwargs)
    train(optimizer, fp32 + bf16, spec.lr, steps=2)
    for param in fp32:
        assert "kahan_comp" not in optimizer.state[param]
    for param in bf16:
        assert optimizer.state[param]["kahan_comp"].dtype == torch.bfloat16
        # every state tensor uses the parameter's dtype: that is the memory saving
        for value in optimizer.state[param].values():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                assert value.dtype == torch.bfloat16

    disabled = make_params(torch.bfloat16)
    optimizer = spec.optimi_cls(disabled, lr=spec.lr, kahan_sum=False, **spec.kwargs)
    train(optimizer, disabled, spec.lr, steps=2)
    assert all("kahan_comp" not in optimizer.state[p] for p in disabled)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("spec", OPTIMIZERS, ids=spec_id)
def test_state_dict_round_trip_continues_identically(spec, dtype):
    """Saving mid-training and resuming in a fresh optimizer gives a bit-identical continuation."""
    params = make_params(dtype)
    optimizer = spec.optimi_cls(params, lr=spec.lr, **spec.kwargs)
    train(optimizer, params, spec.lr, steps=STEPS // 2)
    saved_params = clone_params(params)
    saved_state = copy.deepcopy(optimizer.state_dict())
    train(optimizer, params, spec.lr, steps=STEPS // 2, start=STEPS // 2)

    resumed = saved_params
    resumed_optimizer = spec.optimi_cls(resumed, lr=spec.lr, **spec.kwargs)
    resumed_optimizer.load_state_dict(saved_state)
    train(resumed_optimizer, resumed, spec.lr, steps=STEPS // 2, start=STEPS // 2)
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "spec, argument, value",
    [(spec, argument, value) for spec in OPTIMIZERS for argument, value in spec.invalid],
    ids=lambda x: x.name if hasattr(x, "name") else repr(x),
)
def test_invalid_hyperparameter_raises(spec, argument, value):
    kwargs = dict(spec.kwargs, lr=spec.lr)
    kwargs[argument] = value
    with pytest.raises(ValueError, match=argument.split("[")[0]):
        spec.optimi_cls(make_params(), **kwargs)


@pytest.mark.parametrize("spec", OPTIMIZERS, ids=spec_id)
def test_invalid_hyperparameter_in_param_group_raises(spec):
    params = make_params()
    with pytest.raises(ValueError, match="lr"):
        spec.optimi_cls([{"params": params[:1]}, {"params": params[1:], "lr": -1.0}], lr=spec.lr, **spec.kwargs)


@pytest.mark.parametrize("spec", OPTIMIZERS, ids=spec_id)
def test_backend_flags(spec):
    with pytest.raises(ValueError, match="foreach"):
        spec.optimi_cls(make_params(), lr=spec.lr, foreach=True, fused=True, **spec.kwargs)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="triton"):
            spec.optimi_cls(make_params(), lr=spec.lr, triton=True, **spec.kwargs)
    with pytest.raises(ValueError, match="kahan_sum"):
        spec.optimi_cls(make_params(), lr=spec.lr, kahan_sum="yes", **spec.kwargs)


def test_resolve_backend_rules():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend(foreach=None, fused=None, triton=None, device=cpu) == "for_loop"
    assert resolve_backend(foreach=None, fused=None, triton=None, device=cuda) == "foreach"
    assert resolve_backend(foreach=False, fused=None, triton=None, device=cuda) == "for_loop"
    assert resolve_backend(foreach=True, fused=None, triton=None, device=cpu) == "foreach"
    assert resolve_backend(foreach=None, fused=True, triton=None, device=cpu) == "fused"
    assert resolve_backend(foreach=None, fused=None, triton=True, device=cuda) == "fused"
    with pytest.raises(ValueError, match="triton"):
        resolve_backend(foreach=None, fused=None, triton=True, device=cpu)


@pytest.mark.parametrize("spec", OPTIMIZERS, ids=spec_id)
def test_one_cycle_lr_with_momentum_cycling(spec):
    """Param groups expose betas (or momentum) so OneCycleLR can cycle it."""
    params = make_params()
    optimizer = spec.optimi_cls(params, lr=spec.lr, **spec.kwargs)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=spec.lr * 10, total_steps=10)
    key = "betas" if "betas" in optimizer.defaults else "momentum"
    seen = set()
    for step in range(8):
        for index, param in enumerate(params):
            param.grad = synthetic_grad(param, step, index)
        optimizer.step()
        scheduler.step()
        value = optimizer.param_groups[0][key]
        seen.add(value[0] if key == "betas" else value)
    assert len(seen) > 3


def test_steps_only_parameters_with_gradients():
    params = make_params()
    optimizer = optimi.AdamW(params, lr=1e-2)
    untouched = params[1].detach().clone()
    params[0].grad = torch.ones_like(params[0])
    optimizer.step()
    assert torch.equal(params[1], untouched)
    assert params[1] not in optimizer.state


def test_param_groups_weight_decay():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    groups = optimi.param_groups_weight_decay(model, weight_decay=0.1, additional_layers=["0.weight"])
    no_decay, decay = groups
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 4  # embedding (named), linear bias, layernorm weight and bias
    with pytest.raises(ValueError, match="weight_decay"):
        optimi.param_groups_weight_decay(model, weight_decay=-1)


def test_to_low_precision_casts_floating_tensors():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    optimi.to_low_precision(model)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model[1].num_batches_tracked.dtype == torch.int64
    with pytest.raises(ValueError, match="dtype"):
        optimi.to_low_precision(model, torch.float64)


def test_readme_bf16_usage_enables_kahan():
    """The seed README's first example: a bf16 model gets Kahan summation automatically."""
    model = torch.nn.Linear(20, 1, dtype=torch.bfloat16)
    optimizer = optimi.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-5, decouple_lr=True)
    loss = model(torch.randn(20, dtype=torch.bfloat16))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    assert all("kahan_comp" in optimizer.state[p] for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
    assert optimizer.param_groups[0]["max_lr"] == 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("spec", [s for s in OPTIMIZERS if s.accumulates], ids=spec_id)
def test_optimizer_accumulation_changes_state_only(spec, dtype):
    """``optimizer_accumulation`` folds gradients into the moments: no step, no decay, no lookahead."""
    params = make_params(dtype)
    optimizer = spec.optimi_cls(params, lr=spec.lr, **spec.kwargs)
    train(optimizer, params, spec.lr, steps=2)
    before_params = clone_params(params)
    before_state = copy.deepcopy(optimizer.state_dict()["state"])
    optimizer.optimizer_accumulation = True
    train(optimizer, params, spec.lr, steps=2, start=2)
    for a, b in zip(params, before_params):
        assert torch.equal(a, b)
    changed = set()
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                if not torch.equal(value, before_state[index][name]):
                    changed.add(name)
    # the moments absorbed the gradients; Kahan buffers and lookahead's slow weights did not move
    assert changed and not changed & {"kahan_comp", "slow_param"}, changed
