"""The fused backend's one-pass ``"stochastic"``/``"remainder"`` bf16 steps against the eager write-back.

[Note: one-pass float32 masters] in ``optimi/_fused/masters.py``: the compiled kernel builds the
float32 master, steps it and writes it back itself. Its integer forms must give the eager
functions' bits; its float32 arithmetic is the fused backend's. Each configuration compiles once
per pytest process (seconds on 2 cores), so the tests share a few: even lengths take the packed
kernel ([Note: packed bf16 columns]), odd ones the plain kernel.
"""

from __future__ import annotations

import copy

import pytest
import torch

import optimi
from optimi import _torch_internals
from optimi._backends import run_update
from optimi._columns import Columns
from optimi._fused import compilation, dispatch
from optimi._low_precision import (
    FLOAT32_MASTERS,
    MasterRow,
    MasterRows,
    eager_master,
    hash_bits16,
    master_bits,
    master_from_remainder,
    random_bits16,
    split_bits,
    split_master_,
    stochastic_bf16_bits,
    stochastic_round_,
    stream_key,
    write_master_,
)

pytestmark = pytest.mark.skipif(not hasattr(torch, "compile"), reason="the fused backend needs torch.compile")

#: even lengths: the packed kernel; the write-back test adds an odd one for the plain kernel
SHAPES = [(16, 12), (40,)]
#: a shard's offset just below 2**31: its counters wrap within the tensor
NEAR_THE_WRAP = 2**31 - 100


@pytest.fixture(autouse=True)
def restore_tricks(monkeypatch):
    """Skip the packed kernel's once-per-process speed check, as ``tests/test_fused.py`` does."""
    _torch_internals.enabled("direct_calls")
    saved, status = dict(_torch_internals._ENABLED), dict(_torch_internals._STATUS)
    slower = set(_torch_internals._SLOWER_HERE)
    monkeypatch.setattr(compilation, "_PACKED_SPEED_CHECKED", True)
    yield
    _torch_internals._ENABLED.update(saved)
    _torch_internals._STATUS.clear()
    _torch_internals._STATUS.update(status)
    _torch_internals._SLOWER_HERE.clear()
    _torch_internals._SLOWER_HERE.update(slower)


def random_words(count: int, seed: int) -> torch.Tensor:
    """Arbitrary float32 bit patterns (int32), with inf, NaN and a NaN whose payload lies in the low half."""
    words = torch.randint(-(2**31), 2**31, (count,), generator=torch.Generator().manual_seed(seed), dtype=torch.int64)
    words = words.to(torch.int32)
    special = torch.tensor([0x7F800000, -0x800000, 0x7FC00000, 0x7F800001, -0x7FFFFFFF], dtype=torch.int32)
    words[: special.numel()] = special  # +inf, -inf, quiet NaN, NaN (low payload), NaN with every bit set
    return words


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


# -- the out-of-place forms, eagerly ---------------------------------------------------------------


def test_out_of_place_forms_give_the_eager_functions_bits():
    """hash_bits16, split_bits, master_bits, stochastic_bf16_bits: the in-place functions' bits."""
    key, count = stream_key(11, 3), 1000
    counter = torch.arange(count, dtype=torch.int32) + (NEAR_THE_WRAP + key - 2**32)
    assert torch.equal(hash_bits16(counter), random_bits16(key, NEAR_THE_WRAP, count, torch.device("cpu")))

    words = random_words(count, 0)
    param, remainder = torch.empty(count, dtype=torch.bfloat16), torch.empty(count, dtype=torch.int16)
    split_master_(param, remainder, words.clone().view(torch.float32))
    upper, low = split_bits(words)
    assert torch.equal(upper.to(torch.int16), param.view(torch.int16)) and torch.equal(low.to(torch.int16), remainder)
    assert same_bits(master_bits(upper << 16, low), master_from_remainder(param, remainder))

    bits = random_bits16(key, 0, count, torch.device("cpu"))
    stochastic_round_(param, words.clone().view(torch.float32), key=key)
    assert torch.equal(stochastic_bf16_bits(words, bits).to(torch.int16), param.view(torch.int16))


# -- the write-back in the kernel, in isolation ----------------------------------------------------


def _scale_update(ops, param, grad, kahan_comp, *, factor):
    """A rule that only scales the parameter: the master gets arbitrary low bits to write back."""
    ops.mul_(param, factor)


@pytest.mark.parametrize("mode", ["stochastic", "remainder"])
def test_in_kernel_write_back_gives_the_eager_bits(mode, monkeypatch):
    """Arbitrary bits (inf, NaN included) through a compiled rule give the eager write-back's bits, for a
    shard whose element indices cross 2**31, in a packed row (even length) and a plain row (odd) of one
    call; and the eager path a row falls back to gives them too.

    The packed kernels' once-per-process speed check is on: a float32-master kernel must not run it
    (its plain kernel would be compiled for bf16 parameter columns, then called with int16 ones).
    """
    monkeypatch.setattr(compilation, "_PACKED_SPEED_CHECKED", False)
    key, factor = stream_key(7, 5), 1 + 2**-10
    params, remainders, rows, expected = [], [], {}, []
    for count in (300, 301):
        words = random_words(count, count)
        param = torch.empty(count, dtype=torch.bfloat16)
        remainder = torch.empty(count, dtype=torch.int16)
        split_master_(param, remainder, words.clone().view(torch.float32))
        params.append(param)
        remainders.append(remainder)
        rows[id(param)] = MasterRow(remainder if mode == "remainder" else None, key, NEAR_THE_WRAP)
        expected_param, expected_row = param.clone(), rows[id(param)]
        if mode == "remainder":
            expected_row = expected_row._replace(remainder=remainder.clone())
        write_master_(expected_param, eager_master(expected_param, expected_row).mul_(factor), expected_row)
        expected.append((expected_param, expected_row.remainder))
    start = [(p.clone(), r.clone()) for p, r in zip(params, remainders)]
    # the fused kernel, then the eager path a row takes when it falls back to the for-loop
    for backend in ("fused", "for_loop"):
        for (param, remainder), (p0, r0) in zip(zip(params, remainders), start):
            param.copy_(p0)
            remainder.copy_(r0)
        grads = [torch.zeros_like(p) for p in params]
        token = FLOAT32_MASTERS.set(MasterRows(mode, rows))
        try:
            run_update(_scale_update, backend, Columns(params, grads, (), [None, None]), factor=factor)
        finally:
            FLOAT32_MASTERS.reset(token)
        for param, remainder, (expected_param, expected_remainder) in zip(params, remainders, expected):
            assert same_bits(param, expected_param), (backend, param.numel())
            if mode == "remainder":
                assert same_bits(remainder, expected_remainder), (backend, param.numel())
    assert not compilation._PACKED_SPEED_CHECKED
    labels = {step.label for step in dispatch.COMPILED.values()}
    assert {f"_scale_update (cpu, bfloat16, {mode} master{packed})" for packed in ("", ", packed")} <= labels


# -- optimizers ------------------------------------------------------------------------------------

#: (optimi class, kwargs) of the optimizers compared, lr 1e-3
CASES = {
    "adamw": (optimi.AdamW, dict(weight_decay=0.1)),
    "sgd": (optimi.SGD, dict(momentum=0.9)),
    "lion": (optimi.Lion, dict(weight_decay=0.1)),
    "stableadamw": (optimi.StableAdamW, dict(weight_decay=0.1)),
}


def bf16_params(seed: int = 0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator).to(torch.bfloat16)) for shape in SHAPES]


def set_grads(params: list[torch.nn.Parameter], step: int) -> None:
    generator = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator).to(torch.bfloat16)


def eager_write_back_step(optimizer: optimi.OptimiOptimizer, params: list[torch.nn.Parameter]) -> None:
    """``optimizer.step()`` as before the in-kernel path: the fused rule on an eagerly built float32 master,
    written back eagerly (one parameter at a time)."""
    group = optimizer.param_groups[0]
    group["step"] += 1
    for p in params:
        state = optimizer.init_param_state(p, group)
        state["step"] += 1
        row = MasterRow(state.get("remainder"), stream_key(group["rounding_seed"], state["step"]), 0)
        master = eager_master(p.detach(), row)
        optimizer._step_group(group, [master], [p.grad], [state], step=group["step"], accumulate=False, backend="fused")
        write_master_(p.detach(), master, row)


def trained(name: str, mode: str, how: str, steps: int = 3) -> tuple[list[torch.nn.Parameter], optimi.OptimiOptimizer]:
    """``how``: "fused" (the in-kernel master), "eager write-back" (fused rule) or "for_loop"."""
    cls, kwargs = CASES[name]
    params = bf16_params()
    flags = dict(foreach=False) if how == "for_loop" else dict(fused=True)
    optimizer = cls(params, lr=1e-3, low_precision=mode, **kwargs, **flags)
    for step in range(steps):
        set_grads(params, step)
        if how == "eager write-back":
            eager_write_back_step(optimizer, params)
        else:
            optimizer.step()
    return params, optimizer


def state_tensors(optimizer: optimi.OptimiOptimizer, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [v for p in params for v in optimizer.state[p].values() if isinstance(v, torch.Tensor)]


def round_to_nearest_ties_away(master: torch.Tensor) -> torch.Tensor:
    """bf16 nearest to a float32 (ties away from zero), written independently of optimi."""
    bits = master.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return ((bits + 0x8000) >> 16).to(torch.int32).to(torch.int16).view(torch.bfloat16)


@pytest.mark.parametrize("name", ["adamw", "lion", "stableadamw"])
def test_in_kernel_remainder_equals_the_fused_rule_with_eager_write_back(name):
    """Bit for bit: parameters, remainders and moments; the parameter is its master rounded to nearest.

    The for-loop keeps Adam's denominator (and Lion's ``g - m``) in the bf16 gradient buffer where
    the fused kernel keeps it in float32 ([Note: fused numerics]), so against the for-loop the
    masters agree to that rounding only (``test_in_kernel_remainder_tracks_the_for_loop``).
    """
    fused_params, fused = trained(name, "remainder", "fused")
    eager_params, eager = trained(name, "remainder", "eager write-back")
    expected = eager_params + state_tensors(eager, eager_params)
    for a, b in zip(fused_params + state_tensors(fused, fused_params), expected):
        assert same_bits(a, b)
    for p in fused_params:
        assert same_bits(p.detach(), round_to_nearest_ties_away(fused.master_param(p)))


@pytest.mark.parametrize("name", ["adamw", "stableadamw"])
def test_in_kernel_remainder_tracks_the_for_loop(name):
    fused_params, fused = trained(name, "remainder", "fused")
    loop_params, loop = trained(name, "remainder", "for_loop")
    for a, b in zip(fused_params, loop_params):
        master, expected = fused.master_param(a), loop.master_param(b)
        # the for-loop's bf16-rounded denominator moves an update (~lr) by ~2**-8 of itself
        assert ((master - expected).abs() / expected.abs().max()).max() < 1e-4
        assert (a != b).float().mean() < 0.02  # a few masters lie near a bf16 rounding boundary


@pytest.mark.parametrize("mode", ["remainder", "stochastic"])
def test_in_kernel_sgd_is_bit_identical_to_the_for_loop(mode):
    """SGD's update is the same float32 arithmetic on both backends: the same masters, so the same bits,
    random ones included, and the kernel never calls the eager write-back."""
    calls = []
    with pytest.MonkeyPatch.context() as patch:
        for function in ("split_master_", "stochastic_round_", "master_from_remainder"):
            patch.setattr(f"optimi._low_precision.{function}", lambda *_, f=function, **__: calls.append(f))
        fused_params, fused = trained("sgd", mode, "fused")
    assert calls == []
    labels = {step.label for step in dispatch.COMPILED.values()}
    assert f"_sgd_momentum_update (cpu, bfloat16, {mode} master, packed)" in labels
    loop_params, loop = trained("sgd", mode, "for_loop")
    expected = loop_params + state_tensors(loop, loop_params)
    for a, b in zip(fused_params + state_tensors(fused, fused_params), expected):
        assert same_bits(a, b)


def test_master_rows_stay_packed_where_packing_lost_only_the_speed_comparison(monkeypatch):
    """On CPUs where plain bf16 rows run faster unpacked (the once-per-process comparison switches
    packing off), float32-master rows keep their packed kernel: their plain kernel runs the int16
    columns as a scalar loop (measured 5x slower on this machine, docs/backends.md). A failed
    self-check, or a forced switch, still turns them off."""
    _torch_internals.disable_for_speed("packed_pairs", "slower than the plain kernel (test)")
    packed_flags = []
    flat_row = dispatch._flat_row
    monkeypatch.setattr(dispatch, "_flat_row", lambda row, packed, master: packed_flags.append(packed) or
                        flat_row(row, packed, master))  # fmt: skip
    fused_params, fused = trained("sgd", "remainder", "fused")
    assert packed_flags and all(packed_flags)
    loop_params, loop = trained("sgd", "remainder", "for_loop")
    for a, b in zip(fused_params + state_tensors(fused, fused_params), loop_params + state_tensors(loop, loop_params)):
        assert same_bits(a, b)
    packed_flags.clear()
    with _torch_internals.override(packed_pairs=False):
        trained("sgd", "remainder", "fused")
    assert packed_flags and not any(packed_flags)


def test_gradient_release_with_the_in_kernel_remainder_steps_as_step_does():
    torch.manual_seed(0)
    template = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    models = [copy.deepcopy(template).to(torch.bfloat16) for _ in range(2)]
    settings = dict(lr=1e-3, weight_decay=0.1, low_precision="remainder", fused=True)
    optimizers = [optimi.AdamW(m.parameters(), **settings, gradient_release=r) for m, r in zip(models, (False, True))]
    optimi.prepare_for_gradient_release(models[1], optimizers[1])
    for step in range(3):
        inputs = torch.randn(8, 16, generator=torch.Generator().manual_seed(step)).to(torch.bfloat16)
        for model, optimizer in zip(models, optimizers):
            model(inputs).float().pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert same_bits(a.detach(), b.detach())
        assert same_bits(optimizers[0].master_param(a), optimizers[1].master_param(b))
    optimi.remove_gradient_release(models[1])
