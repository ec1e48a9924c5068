"""``low_precision``: stochastic rounding and bf16 + int16 masters, against float32 references.

[Note: low-precision update modes] in ``optimi/_low_precision.py``.
"""

from __future__ import annotations

import io

import pytest
import torch

import optimi
from optimi._low_precision import random_bits16, stochastic_round_, stream_key
from tests.reference import (
    adam_reference,
    adan_reference,
    lion_reference,
    radam_reference,
    ranger_reference,
    sgd_reference,
    stableadamw_reference,
)

SHAPES = [(64, 48), (48,), (7, 5, 3)]
BACKENDS = {"for_loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}


def bf16_values(shape: tuple[int, ...], seed: int, scale: float = 1.0) -> torch.Tensor:
    """float32 values that bf16 represents exactly."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * scale).to(torch.bfloat16).float()


def open_loop_grad(shape: tuple[int, ...], step: int, index: int) -> torch.Tensor:
    """A bf16 gradient that does not depend on the parameters, so every implementation gets the same one."""
    return bf16_values(shape, 1000 * step + index).to(torch.bfloat16)


# -- remainder: an exact float32 master ------------------------------------------------------------


@pytest.mark.parametrize("backend", ["for_loop", "foreach"])
def test_remainder_sgd_is_bit_identical_to_float32_sgd(backend):
    """100 steps at a learning rate whose updates round-to-nearest bf16 would lose, every one of them."""
    lr = 1e-5
    # magnitudes >= 0.5: half a bf16 ulp (>= 2**-9) is far above any update (lr * |g| < 1e-4)
    start = [(v.sign() * (v.abs() + 0.5)).to(torch.bfloat16).float() for v in map(bf16_values, SHAPES, range(3))]
    params = [torch.nn.Parameter(v.to(torch.bfloat16)) for v in start]
    nearest = [torch.nn.Parameter(v.to(torch.bfloat16)) for v in start]
    reference = [torch.nn.Parameter(v.clone()) for v in start]
    optimizer = optimi.SGD(params, lr=lr, low_precision="remainder", **BACKENDS[backend])
    plain = optimi.SGD(nearest, lr=lr, low_precision="nearest", **BACKENDS[backend])
    torch_sgd = torch.optim.SGD(reference, lr=lr)
    for step in range(100):
        for index, (p, q, r) in enumerate(zip(params, nearest, reference)):
            grad = open_loop_grad(p.shape, step, index)
            p.grad, q.grad, r.grad = grad.clone(), grad.clone(), grad.float()
        optimizer.step()
        plain.step()
        torch_sgd.step()
    for p, q, r, v in zip(params, nearest, reference, start):
        master = optimizer.master_param(p)
        assert torch.equal(master.view(torch.int32), r.detach().view(torch.int32))
        assert not torch.equal(r.detach(), v)  # the reference moved
        assert torch.equal(q.detach().float(), v)  # round to nearest lost every update


def round_to_nearest_ties_away(master: torch.Tensor) -> torch.Tensor:
    """bf16 nearest to a float32 (ties away from zero), from its bits: written independently of optimi."""
    bits = master.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    upper = (bits + 0x8000) >> 16
    return upper.to(torch.int32).to(torch.int16).view(torch.bfloat16)


#: (optimi class, kwargs, reference step, reference hyperparameters)
MASTER_CASES = {
    "sgd": (optimi.SGD, dict(momentum=0.9), sgd_reference, dict(momentum=0.9, dampening=False, torch_init=False)),
    "adam": (optimi.Adam, dict(weight_decay=0.1), adam_reference, dict(betas=(0.9, 0.99), eps=1e-6)),
    "adamw": (optimi.AdamW, dict(weight_decay=0.1), adam_reference, dict(betas=(0.9, 0.99), eps=1e-6)),
    "adan": (optimi.Adan, dict(weight_decay=0.1), adan_reference, dict(betas=(0.98, 0.92, 0.99), eps=1e-6)),
    "lion": (optimi.Lion, dict(weight_decay=0.1), lion_reference, dict(betas=(0.9, 0.99))),
    "radam": (optimi.RAdam, dict(weight_decay=0.1), radam_reference, dict(betas=(0.9, 0.99), eps=1e-6)),
    "ranger": (
        optimi.Ranger,
        dict(weight_decay=0.1),
        ranger_reference,
        dict(betas=(0.9, 0.99), eps=1e-6, k=6, alpha=0.5),
    ),
    "stableadamw": (
        optimi.StableAdamW,
        dict(weight_decay=0.1),
        stableadamw_reference,
        dict(betas=(0.9, 0.99), eps=1e-6),
    ),
}
#: weight-decay mode of each optimi configuration above, as the references name it
WD_MODES = {"sgd": "l2", "adam": "l2", "adamw": "decoupled", "adan": "decoupled", "lion": "decoupled",
            "radam": "l2", "ranger": "decoupled", "stableadamw": "decoupled"}  # fmt: skip


#: where the references' moments round differently from optimi's, the masters drift apart by more
#: than 1e-6 in 30 steps: Adan and StableAdamW round their bf16 moments after each of several
#: in-place operations where the reference rounds once per step. The same run with Kahan
#: summation instead of the remainder measures 2.3e-6 and 1.1e-6 against the same reference, so
#: the difference is the moments', not the master's (measured, 2026-12-02).
MASTER_TOLERANCE = {"adan": 4e-6, "stableadamw": 3e-6}


def reference_hyperparameters(name: str) -> dict:
    optimi_cls, kwargs, _, hyperparameters = MASTER_CASES[name]
    weight_decay = kwargs.get("weight_decay", 0.0)
    extra = dict(adam_wd=False) if name == "adan" else {}
    if name == "stableadamw":
        return dict(hyperparameters, weight_decay=weight_decay, wd_mode=WD_MODES[name])
    return dict(hyperparameters, weight_decay=weight_decay, wd_mode=WD_MODES[name], **extra)


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("name", list(MASTER_CASES))
def test_remainder_master_tracks_a_float32_master_with_bf16_moments(name, backend):
    """30 steps: ``master_param`` within 1e-6 of a float32 reference that rounds its moments to bf16.

    The learning rate is far below bf16's resolution, so a mode that lost updates (nearest) would
    be 1e-4 away, and the parameter is always the master rounded to nearest.
    """
    optimi_cls, kwargs, step_fn, _ = MASTER_CASES[name]
    # Ranger's lookahead pulls the weights halfway back every 6 steps: a larger rate moves it as far
    lr, steps = (6e-6 if name == "ranger" else 2e-6), 30
    start = [bf16_values(shape, i) for i, shape in enumerate(SHAPES)]
    params = [torch.nn.Parameter(v.to(torch.bfloat16)) for v in start]
    optimizer = optimi_cls(params, lr=lr, low_precision="remainder", **kwargs, **BACKENDS[backend])
    masters = [v.clone() for v in start]
    states: list[dict] = [{} for _ in masters]
    hyperparameters = reference_hyperparameters(name)
    for step in range(1, steps + 1):
        for index, p in enumerate(params):
            p.grad = open_loop_grad(p.shape, step, index)
        optimizer.step()
        for index, (master, state) in enumerate(zip(masters, states)):
            grad = open_loop_grad(master.shape, step, index).float()
            step_fn(master, grad, state, lr=lr, step=step, max_lr=lr, **hyperparameters)
            for key, value in state.items():  # the moments live in bf16
                if isinstance(value, torch.Tensor):
                    state[key] = value.to(torch.bfloat16).float()
        for p in params:
            assert torch.equal(p.detach(), round_to_nearest_ties_away(optimizer.master_param(p)))
    tolerance = MASTER_TOLERANCE.get(name, 1e-6)
    for p, master, begin in zip(params, masters, start):
        scale = master.abs().max()
        assert ((optimizer.master_param(p) - master).abs().max() / scale).item() < tolerance
        # the reference moved further than the tolerance: a master that lost the updates would fail
        assert ((master - begin).abs().max() / scale).item() > 1.5 * tolerance


def test_to_low_precision_seeds_the_remainder_exactly():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.LayerNorm(16))
    full = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = optimi.AdamW(model.parameters(), lr=1e-3, low_precision="remainder")
    optimi.to_low_precision(model, optimizer=optimizer)
    for name, p in model.named_parameters():
        assert p.dtype == torch.bfloat16
        assert torch.equal(optimizer.master_param(p).view(torch.int32), full[name].view(torch.int32))
        assert torch.equal(p.detach(), round_to_nearest_ties_away(full[name]))


def test_to_low_precision_seeds_the_kahan_buffer():
    torch.manual_seed(0)
    model = torch.nn.Linear(32, 16)
    full = model.weight.detach().clone()
    optimizer = optimi.AdamW(model.parameters(), lr=1e-3)
    optimi.to_low_precision(model, optimizer=optimizer)
    cast_error = ((model.weight.detach().float() - full).abs() / full.abs()).max().item()
    kahan_error = ((optimizer.master_param(model.weight) - full).abs() / full.abs()).max().item()
    assert cast_error > 1e-3 and kahan_error < 2e-5


def test_to_low_precision_refuses_an_optimizer_that_has_stepped():
    model = torch.nn.Linear(4, 4)
    optimizer = optimi.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    with pytest.raises(ValueError, match="before the optimizer's first step"):
        optimi.to_low_precision(model, optimizer=optimizer)


def test_remainder_state_round_trips_through_state_dict():
    params = [torch.nn.Parameter(bf16_values((16, 8), 0).to(torch.bfloat16))]
    optimizer = optimi.AdamW(params, lr=1e-5, low_precision="remainder")
    for step in range(3):
        params[0].grad = open_loop_grad((16, 8), step, 0)
        optimizer.step()
    saved = optimizer.state_dict()
    # carried as bf16-typed bits ([Note: remainders travel as bf16 bits]): the live state stays int16
    assert saved["state"][0]["remainder"].dtype == torch.bfloat16
    assert optimizer.state[params[0]]["remainder"].dtype == torch.int16
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    int16_form = {
        **saved,
        "state": {0: {**saved["state"][0], "remainder": saved["state"][0]["remainder"].view(torch.int16)}},
    }
    for state_dict in (torch.load(buffer), int16_form):
        copy = [torch.nn.Parameter(params[0].detach().clone())]
        restored = optimi.AdamW(copy, lr=1e-5, low_precision="remainder")
        restored.load_state_dict(state_dict)
        assert restored.state[copy[0]]["remainder"].dtype == torch.int16
        assert torch.equal(restored.master_param(copy[0]), optimizer.master_param(params[0]))
    # and the last one restored steps on as the original does
    for opt, param in ((optimizer, params[0]), (restored, copy[0])):
        param.grad = open_loop_grad((16, 8), 9, 0)
        opt.step()
    assert torch.equal(restored.master_param(copy[0]), optimizer.master_param(params[0]))


# -- stochastic rounding ---------------------------------------------------------------------------


def test_stochastic_rounding_is_unbiased():
    """The mean of many stochastically rounded copies of a value converges to the value."""
    for value in (1.0 + 2**-10, -3.0 - 3 * 2**-12, 1e-3 * (1 + 2**-9)):
        master = torch.full((1 << 18,), value)
        rounded = torch.empty(master.shape, dtype=torch.bfloat16)
        stochastic_round_(rounded, master.clone(), key=stream_key(0, 1))
        low, high = rounded.float().unique().tolist()[0], rounded.float().unique().tolist()[-1]
        assert low < value < high  # only the two neighbours occur
        ulp = high - low
        # the mean's standard deviation is below ulp / 2 / sqrt(n): allow 5 of them
        assert abs(rounded.float().mean().item() - value) < 5 * ulp / 2 / (1 << 9)


def test_stochastic_rounding_keeps_inf_and_nan():
    """Random bits added to an inf or NaN never carry into another class (a NaN with a low payload included)."""
    master = torch.tensor([float("inf"), float("-inf"), float("nan"), 1.0] * 1000)
    master.view(torch.int32)[3::4] = 0x7F800001  # a NaN whose payload lies in the dropped bits
    rounded = torch.empty(master.shape, dtype=torch.bfloat16)
    stochastic_round_(rounded, master.clone(), key=stream_key(0, 1))
    assert torch.equal(rounded[0::4].float(), master[0::4]) and torch.equal(rounded[1::4].float(), master[1::4])
    assert rounded[2::4].isnan().all() and rounded[3::4].isnan().all()


def test_stochastic_rounding_of_fp16_is_unbiased():
    value = 1.0 + 2**-13
    master = torch.full((1 << 18,), value)
    rounded = torch.empty(master.shape, dtype=torch.float16)
    stochastic_round_(rounded, master.clone(), key=stream_key(3, 7))
    assert set(rounded.float().unique().tolist()) == {1.0, 1.0 + 2**-10}
    assert abs(rounded.float().mean().item() - value) < 5 * 2**-10 / 2 / (1 << 9)


def test_the_int32_hash_gives_the_bits_of_the_unsigned_hash():
    """The tensor hash (int32, wrapping) against the same hash on Python integers, across the 2**31 wrap."""
    from optimi._low_precision import _mix32

    key = stream_key(5, 9)
    first = 2**31 - 10
    bits = random_bits16(key, first, 100, torch.device("cpu"))
    assert bits.tolist() == [_mix32((first + i + key) & 0xFFFFFFFF) >> 16 for i in range(100)]


def test_random_bits_are_those_of_the_whole_tensor_for_any_shard():
    whole = random_bits16(stream_key(5, 2), 0, 1000, torch.device("cpu"))
    shard = random_bits16(stream_key(5, 2), 600, 400, torch.device("cpu"))
    assert torch.equal(whole[600:], shard)
    assert 0 <= whole.min() and whole.max() < 1 << 16
    assert whole.float().std().item() > 15000  # uniform on [0, 2**16) has 18919


def stochastic_run(seed: int, backend: str, steps: int = 5) -> list[torch.Tensor]:
    params = [torch.nn.Parameter(bf16_values(shape, i).to(torch.bfloat16)) for i, shape in enumerate(SHAPES)]
    optimizer = optimi.AdamW(params, lr=1e-4, low_precision="stochastic", **BACKENDS[backend])
    for group in optimizer.param_groups:
        group["rounding_seed"] = seed
    for step in range(steps):
        for index, p in enumerate(params):
            p.grad = open_loop_grad(p.shape, step, index)
        optimizer.step()
    return [p.detach().clone() for p in params]


def test_stochastic_runs_repeat_with_one_seed_and_differ_with_another():
    first, again, other = stochastic_run(0, "for_loop"), stochastic_run(0, "for_loop"), stochastic_run(1, "for_loop")
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_stochastic_rounding_draws_the_same_bits_on_every_backend():
    for_loop, foreach = stochastic_run(0, "for_loop"), stochastic_run(0, "foreach")
    assert all(torch.equal(a, b) for a, b in zip(for_loop, foreach))
    fused = stochastic_run(0, "fused")
    # the fused kernel may order float32 arithmetic differently, which moves a master across a
    # rounding boundary only where it lies within a float32 ulp of one
    same = sum(torch.eq(a, b).sum().item() for a, b in zip(for_loop, fused)) / sum(a.numel() for a in for_loop)
    assert same > 0.999


def test_stochastic_rounding_keeps_small_updates_on_average():
    """Where round to nearest loses every update, stochastic rounding follows float32 on average."""
    lr, steps = 1e-4, 200
    start = torch.ones(4096)
    results = {}
    for mode in ("stochastic", "nearest"):
        param = torch.nn.Parameter(start.to(torch.bfloat16))
        optimizer = optimi.SGD([param], lr=lr, low_precision=mode)
        for _ in range(steps):
            param.grad = torch.ones(4096, dtype=torch.bfloat16)
            optimizer.step()
        results[mode] = param.detach().float().mean().item()
    expected = 1.0 - lr * steps
    assert results["nearest"] == 1.0
    assert abs(results["stochastic"] - expected) < 0.1 * lr * steps


def test_stochastic_state_dict_keeps_the_seed():
    params = [torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))]
    optimizer = optimi.AdamW([{"params": params, "rounding_seed": 7}], lr=1e-3, low_precision="stochastic")
    assert optimizer.state_dict()["param_groups"][0]["rounding_seed"] == 7


@pytest.mark.parametrize("mode", ["stochastic", "remainder"])
def test_a_resumed_run_continues_bit_identically(mode):
    """6 steps straight through == 3 steps, state_dict through torch.save, a fresh optimizer, 3 more."""
    shape = (16, 8)

    def fresh(values: torch.Tensor, seed: int = 11) -> tuple[torch.nn.Parameter, optimi.AdamW]:
        param = torch.nn.Parameter(values.clone())
        return param, optimi.AdamW([{"params": [param], "rounding_seed": seed}], lr=1e-3, low_precision=mode)

    start = bf16_values(shape, 0).to(torch.bfloat16)
    straight, straight_opt = fresh(start)
    first, first_opt = fresh(start)
    for step in range(3):
        for param, opt in ((straight, straight_opt), (first, first_opt)):
            param.grad = open_loop_grad(shape, step, 0)
            opt.step()
    buffer = io.BytesIO()
    torch.save(first_opt.state_dict(), buffer)
    buffer.seek(0)
    resumed, resumed_opt = fresh(first.detach(), seed=0)  # the state dict brings back the seed and steps
    resumed_opt.load_state_dict(torch.load(buffer))
    for step in range(3, 6):
        for param, opt in ((straight, straight_opt), (resumed, resumed_opt)):
            param.grad = open_loop_grad(shape, step, 0)
            opt.step()
    assert torch.equal(resumed, straight)
    assert torch.equal(resumed_opt.master_param(resumed), straight_opt.master_param(straight))
    assert not torch.equal(straight, start)


# -- arguments -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(low_precision="exact"), "Invalid low_precision: 'exact'"),
        (dict(low_precision="stochastic", kahan_sum=True), "contradicts kahan_sum=True"),
        (dict(low_precision="kahan", kahan_sum=False), "contradicts kahan_sum=False"),
    ],
)
def test_bad_low_precision_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        optimi.AdamW([torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16))], lr=1e-3, **kwargs)


def test_remainder_refuses_fp16_parameters():
    with pytest.raises(ValueError, match="'remainder' needs bf16"):
        optimi.AdamW([torch.nn.Parameter(torch.ones(2, dtype=torch.float16))], lr=1e-3, low_precision="remainder")


@pytest.mark.parametrize("mode, state_keys", [("kahan", {"kahan_comp"}), ("remainder", {"remainder"}),
                                               ("stochastic", set()), ("nearest", set())])  # fmt: skip
def test_each_mode_keeps_its_own_state(mode, state_keys):
    param = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    optimizer = optimi.AdamW([param], lr=1e-3, low_precision=mode)
    param.grad = torch.ones(8, dtype=torch.bfloat16)
    optimizer.step()
    assert set(optimizer.state[param]) - {"exp_avg", "exp_avg_sq", "step"} == state_keys


def test_float32_parameters_ignore_the_mode():
    results = []
    for mode in ("stochastic", "remainder", None):
        param = torch.nn.Parameter(torch.linspace(-1, 1, 16))
        optimizer = optimi.AdamW([param], lr=1e-3, low_precision=mode)
        param.grad = torch.linspace(1, 2, 16)
        optimizer.step()
        results.append(param.detach().clone())
        assert set(optimizer.state[param]) == {"exp_avg", "exp_avg_sq", "step"}
    assert all(torch.equal(results[0], r) for r in results)


# -- gradient release and accumulation --------------------------------------------------------------


@pytest.mark.parametrize("mode", ["stochastic", "remainder"])
def test_gradient_release_steps_as_step_does(mode):
    """Release hooks step each parameter through the same master, with the same random bits."""
    torch.manual_seed(0)
    template = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    models = [copy_model(template) for _ in range(2)]
    optimizers = [optimi.AdamW(m.parameters(), lr=1e-4, low_precision=mode, gradient_release=r) for m, r in
                  zip(models, (False, True))]  # fmt: skip
    optimi.prepare_for_gradient_release(models[1], optimizers[1])
    for step in range(6):
        inputs = torch.randn(8, 16, generator=torch.Generator().manual_seed(step)).to(torch.bfloat16)
        for model, optimizer in zip(models, optimizers):
            optimizer.optimizer_accumulation = step % 3 == 0  # some micro-steps accumulate
            model(inputs).float().pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)
        assert torch.equal(optimizers[0].master_param(a), optimizers[1].master_param(b))


def copy_model(template: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(template).to(torch.bfloat16)
