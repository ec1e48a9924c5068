"""The fused backend (``optimi/_fused/``) against the for-loop backend, for every optimizer.

Both run the same update rule, so the fused step must reproduce the for-loop step: fp32 to 1e-6
relative over a whole training run, bf16 within one ulp on at least 99.9% of the elements of
every step taken from the same state. Each configuration compiles once per pytest process (a few
seconds on a 2-core CPU), so the cases below are one per optimizer and dtype; tensors hold no
single-element shape, which Dynamo would specialize into one more compile.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import optimi
from optimi import _torch_internals
from optimi._columns import Columns
from optimi._fused import compilation, compiled_configurations, dispatch, packing
from tests.cases import (
    OPTIMIZERS,
    SHAPES,
    STEPS,
    clone_params,
    lr_at,
    make_params,
    max_relative_error,
    synthetic_grad,
    train,
)

pytestmark = pytest.mark.skipif(not hasattr(torch, "compile"), reason="the fused backend needs torch.compile")

#: an odd length (5, 7) keeps a bf16 row off the packed int32-pair kernel, so the bf16 cases run
#: both CPU kernels ([Note: packed bf16 columns] in ``optimi/_fused/``)
FUSED_SHAPES = [shape for shape in SHAPES if torch.Size(shape).numel() > 1] + [(5, 7)]
FP32_TOLERANCE = 1e-6
#: rules that round an intermediate in the (bf16) gradient buffer before a state reads it: Adam and
#: RAdam add the L2 term ``g += wd * p``, Lion forms ``g - m`` there. The fused step keeps its
#: gradient copy in float32, so it rounds once where the for-loop rounds twice; 99.7% of elements
#: agree to one ulp (measured), the rest to a few ulps of a value that cancelled to nearly zero
ROUNDS_GRADIENT_INTERMEDIATE = {"adam": 0.995, "radam": 0.995, "lion": 0.995}
#: Kahan compensation buffers and the weight each compensates (``None``: the parameter itself)
COMPENSATIONS = {"kahan_comp": None, "slow_comp": "slow_param"}
MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}


@pytest.fixture(autouse=True)
def restore_tricks(monkeypatch):
    """A test that switches a trick off (or fails one's self-check) leaves the others as they were.

    The packed kernel's once-per-process speed check is skipped: wherever it would keep the plain
    kernel (CPUs where the packed one is slower), the tests still check both kernels' results.
    """
    _torch_internals.enabled("direct_calls")
    saved, status = dict(_torch_internals._ENABLED), dict(_torch_internals._STATUS)
    monkeypatch.setattr(compilation, "_PACKED_SPEED_CHECKED", True)
    yield
    _torch_internals._ENABLED.update(saved)
    _torch_internals._STATUS.clear()
    _torch_internals._STATUS.update(status)


def tricks(monkeypatch, **switches: bool) -> None:
    """Switch fused-backend tricks on or off for this test ([Note: private torch internals])."""
    _torch_internals.enabled("direct_calls")
    for name, on in switches.items():
        monkeypatch.setitem(_torch_internals._ENABLED, name, on)


def spec_id(spec) -> str:
    return spec.name


def ulp_distance(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """|actual - expected| in units in the last place of ``dtype``.

    The ulp is taken at the larger magnitude of the two values, but at no less than 1/8 of the
    tensor's RMS: where an update cancels to nearly zero (``m + (1 - beta) (g - m)`` with
    ``g ~ -m``), a single rounding of an intermediate is judged at the scale of its operands,
    not of the tiny result (see [Note: fused numerics] in ``optimi/_fused/``).
    """
    floor = expected.double().pow(2).mean().sqrt() / 8
    magnitude = torch.maximum(actual.abs(), expected.abs()).clamp_min(floor).clamp_min(torch.finfo(dtype).tiny)
    ulp = torch.exp2(torch.floor(torch.log2(magnitude)) - MANTISSA_BITS[dtype])
    return (actual - expected).abs() / ulp


def params_on(device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    return [p.detach().to(device).requires_grad_() for p in make_params(dtype, seed, shapes=FUSED_SHAPES)]


def grad_for(param: torch.Tensor, step: int, index: int) -> torch.Tensor:
    """``synthetic_grad`` (computed on the CPU, deterministic) moved to the parameter's device."""
    return synthetic_grad(param.detach().cpu(), step, index).to(param.device)


def train_on(optimizer, params: list[torch.Tensor], lr: float, steps: int) -> None:
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, lr)
        for index, param in enumerate(params):
            param.grad = grad_for(param, step, index)
        optimizer.step()


def check_fused_fp32_run(spec, device: torch.device | str, fused_flags: dict) -> None:
    """A whole fp32 training run (LR changing mid-run) matches the for-loop to 1e-6 relative."""
    results = []
    for backend in (dict(foreach=False), fused_flags):
        params = params_on(device, torch.float32)
        optimizer = spec.optimi_cls(params, lr=spec.lr, **spec.kwargs, **backend)
        train_on(optimizer, params, spec.lr, STEPS)
        results.append(params)
    error = max_relative_error(*results)
    assert error <= FP32_TOLERANCE, f"{spec.name}: fused vs for-loop relative error {error:.2e}"
    assert max_relative_error(results[1], params_on(device, torch.float32)) > 1e-4


def check_fused_bf16_kahan_steps(spec, device: torch.device | str, fused_flags: dict, steps: int = 8) -> None:
    """Each bf16+Kahan step, taken from the same state, agrees to one ulp on >= 99.9% of elements.

    Whole runs are not compared: a one-ulp difference feeds back through the closed-loop
    gradient and trajectories drift apart, whichever backends are compared.
    """
    loop_params, fused_params = params_on(device, torch.bfloat16), params_on(device, torch.bfloat16)
    loop = spec.optimi_cls(loop_params, lr=spec.lr, foreach=False, **spec.kwargs)
    fused = spec.optimi_cls(fused_params, lr=spec.lr, **fused_flags, **spec.kwargs)
    distances = []
    for step in range(steps):
        copy_state(loop, fused, loop_params, fused_params)
        for optimizer in (loop, fused):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step * 2, spec.lr)  # crosses the LR drop half way
        for index, (a, b) in enumerate(zip(loop_params, fused_params)):
            a.grad = grad_for(a, step, index)
            b.grad = a.grad.clone()
        loop.step()
        fused.step()
        for a, b in zip(loop_params, fused_params):
            loop_state, fused_state = loop.state[a], fused.state[b]
            for key, value in loop_state.items():
                if key not in COMPENSATIONS and torch.is_tensor(value) and value.is_floating_point():
                    distances.append(ulp_distance(fused_state[key].double(), value.double(), value.dtype).flatten())
            # a Kahan buffer holds what its bf16 weight has not absorbed yet: compare the value
            # the pair represents, p + c, in ulps of the weight
            for compensation, weight in COMPENSATIONS.items():
                if compensation in loop_state:
                    loop_weight = a if weight is None else loop_state[weight]
                    fused_weight = b if weight is None else fused_state[weight]
                    loop_value = loop_weight.detach().double() + loop_state[compensation].double()
                    fused_value = fused_weight.detach().double() + fused_state[compensation].double()
                    distances.append(ulp_distance(fused_value, loop_value, torch.bfloat16).flatten())
    distances = torch.cat(distances)
    within = (distances <= 1).double().mean().item()
    required = ROUNDS_GRADIENT_INTERMEDIATE.get(spec.name, 0.999)
    assert within >= required, f"{spec.name}: only {within:.4%} of elements within one ulp"
    assert max_relative_error(loop_params, params_on(device, torch.bfloat16)) > 1e-3


def copy_state(source: optimi.OptimiOptimizer, target: optimi.OptimiOptimizer, sources, targets) -> None:
    """Give ``target`` exactly ``source``'s parameters and state (backend flags stay as they are)."""
    with torch.no_grad():
        for a, b in zip(sources, targets):
            b.copy_(a)
            target.state[b] = {k: v.clone() if torch.is_tensor(v) else v for k, v in source.state[a].items()}
    for group_a, group_b in zip(source.param_groups, target.param_groups):
        group_b["step"] = group_a["step"]


#: the fused backend with its private-internals tricks, and as plain public ``torch.compile``
#: ([Note: private torch internals] in ``optimi/_torch_internals.py``): both must be right
WITH_AND_WITHOUT_TRICKS = pytest.mark.parametrize("with_tricks", [True, False], ids=["tricks", "public_compile"])


@WITH_AND_WITHOUT_TRICKS
@pytest.mark.parametrize("spec", OPTIMIZERS, ids=spec_id)
def test_fused_equals_for_loop_fp32(spec, with_tricks, monkeypatch):
    tricks(monkeypatch, **dict.fromkeys(_torch_internals.TRICKS, with_tricks))
    check_fused_fp32_run(spec, "cpu", dict(fused=True))


@WITH_AND_WITHOUT_TRICKS
@pytest.mark.parametrize("spec", OPTIMIZERS, ids=spec_id)
def test_fused_equals_for_loop_bf16_kahan(spec, with_tricks, monkeypatch):
    tricks(monkeypatch, **dict.fromkeys(_torch_internals.TRICKS, with_tricks))
    check_fused_bf16_kahan_steps(spec, "cpu", dict(fused=True))


@pytest.mark.parametrize("spec", OPTIMIZERS, ids=spec_id)
def test_fused_kahan_stays_closer_to_fp32(spec):
    """Kahan summation inside the fused kernel still compensates: a bf16 run tracks fp32 far better.

    The kernel must round the new parameter explicitly (Inductor would keep it in float32) for the
    compensation ``c - (p_new - p_old)`` to hold what the bf16 store dropped; without that rounding
    the compensation stays zero and both bf16 runs drift alike.
    """
    steps, lr = 60, spec.lr
    fp32 = make_params(torch.float32, shapes=FUSED_SHAPES)
    train(spec.optimi_cls(fp32, lr=lr, foreach=False, **spec.kwargs), fp32, lr, steps)
    distances = {}
    for kahan in (True, False):
        low = clone_params(make_params(torch.float32, shapes=FUSED_SHAPES), torch.bfloat16)
        train(spec.optimi_cls(low, lr=lr, kahan_sum=kahan, fused=True, **spec.kwargs), low, lr, steps)
        distances[kahan] = sum((a.float() - b).norm().item() for a, b in zip(low, fp32))
    assert distances[True] < 0.5 * distances[False], distances


def test_pack_unpack_round_trip_keeps_every_bit():
    """A word splits into its two bf16 values as float32 and packs back unchanged, NaNs included."""
    generator = torch.Generator().manual_seed(0)
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -3.0e38, 1.0])
    special_words = specials.to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
    words = torch.cat(
        [
            torch.randint(-(2**31), 2**31 - 1, (4096,), dtype=torch.int32, generator=generator),
            special_words | (special_words.roll(1) << 16),
        ]
    )
    even, odd = packing.unpack(words)
    assert torch.equal(packing.pack(even, odd), words)
    as_bf16 = words.view(torch.bfloat16)
    assert torch.equal(even.view(torch.int32), as_bf16[0::2].float().view(torch.int32))
    assert torch.equal(odd.view(torch.int32), as_bf16[1::2].float().view(torch.int32))


def state_tensors(optimizer: optimi.OptimiOptimizer, params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach() for p in params] + [
        value for p in params for value in optimizer.state[p].values() if torch.is_tensor(value) and value.dim() > 0
    ]


@pytest.mark.parametrize("spec", OPTIMIZERS, ids=spec_id)
def test_packed_bf16_pairs_equal_plain_fused_kernel(spec, monkeypatch):
    """The int32-pair kernel gives the plain fused kernel's bits: parameters, states, Kahan buffers."""
    results, word_views, flat = [], [], dispatch._flat
    monkeypatch.setattr(dispatch, "_flat", lambda t, packed=False: word_views.append(packed) or flat(t, packed))
    for packed in (True, False):
        tricks(monkeypatch, packed_pairs=packed)
        word_views.clear()
        params = params_on("cpu", torch.bfloat16)
        optimizer = spec.optimi_cls(params, lr=spec.lr, fused=True, **spec.kwargs)
        train_on(optimizer, params, spec.lr, steps=6)
        results.append(state_tensors(optimizer, params))
        # the even-length rows really ran as int32 pairs, and only when enabled
        assert any(word_views) == packed
    assert len(results[0]) == len(results[1]) > len(FUSED_SHAPES)
    for packed, plain in zip(*results):
        assert torch.equal(packed.view(torch.int16), plain.view(torch.int16))
    assert not torch.equal(results[0][0], params_on("cpu", torch.bfloat16)[0])


def test_packed_kernel_that_fails_to_compile_falls_back_to_the_plain_kernel(monkeypatch):
    """A torch whose Inductor cannot build the packed kernel warns once and gets the same bits."""

    def unsupported(words: torch.Tensor):
        raise NotImplementedError("no int32/float32 bitcasts in this compiler")

    results = []
    for broken in (True, False):
        monkeypatch.setattr(dispatch, "COMPILED", {})
        monkeypatch.setattr(dispatch, "PACKING_FAILED", set())
        tricks(monkeypatch, packed_pairs=broken)
        if broken:
            monkeypatch.setattr(packing, "unpack", unsupported)
        params = params_on("cpu", torch.bfloat16)
        optimizer = optimi.AdamW(params, lr=1e-2, weight_decay=0.1, fused=True)
        if broken:
            with pytest.warns(RuntimeWarning, match="packed bf16 fused kernel failed"):
                train_on(optimizer, params, 1e-2, steps=1)
            assert len(dispatch.PACKING_FAILED) == 1
        else:
            train_on(optimizer, params, 1e-2, steps=1)
        train_on(optimizer, params, 1e-2, steps=3)  # no second warning, same fallback
        results.append(state_tensors(optimizer, params))
    for fallback, plain in zip(*results):
        assert torch.equal(fallback.view(torch.int16), plain.view(torch.int16))


def test_odd_storage_offset_runs_the_plain_kernel_with_the_same_bits():
    """A bf16 parameter at an odd offset in its storage cannot be viewed as int32 pairs."""
    results = []
    for offset in (0, 1):
        storage = torch.zeros(offset + 48 * 32, dtype=torch.bfloat16)
        storage[offset:] = params_on("cpu", torch.bfloat16)[0].detach().flatten()
        param = torch.nn.Parameter(storage[offset:].view(48, 32))
        assert param.storage_offset() == offset
        optimizer = optimi.AdamW([param], lr=1e-2, weight_decay=0.1, fused=True)
        train_on(optimizer, [param], 1e-2, steps=4)
        results.append(state_tensors(optimizer, [param]))
    for even, odd in zip(*results):
        assert torch.equal(even.view(torch.int16), odd.view(torch.int16))


def test_fused_compiles_once_per_configuration():
    """20 steps with a changing LR over 4 shapes compile at most one kernel for the configuration."""
    params = make_params(torch.float32, shapes=FUSED_SHAPES)
    optimizer = optimi.Adam(params, lr=1e-2, weight_decay=0.1, fused=True)
    graphs, configurations = counters["stats"]["unique_graphs"], compiled_configurations()
    for step in range(20):
        for group in optimizer.param_groups:
            group["lr"] = 1e-2 / (1 + step)  # a new value every step, as a scheduler sets it
        for index, param in enumerate(params):
            param.grad = synthetic_grad(param, step, index)
        optimizer.step()
    assert counters["stats"]["unique_graphs"] - graphs <= 1
    assert compiled_configurations() - configurations <= 1

    # and the LR really reached the compiled kernel: the result matches the for-loop
    reference = make_params(torch.float32, shapes=FUSED_SHAPES)
    loop = optimi.Adam(reference, lr=1e-2, weight_decay=0.1, foreach=False)
    for step in range(20):
        for group in loop.param_groups:
            group["lr"] = 1e-2 / (1 + step)
        for index, param in enumerate(reference):
            param.grad = synthetic_grad(param, step, index)
        loop.step()
    assert max_relative_error(params, reference) <= FP32_TOLERANCE


@pytest.mark.parametrize("optimizer_cls", [optimi.Adam, optimi.StableAdamW], ids=lambda cls: cls.__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_leaves_gradients_untouched(dtype, optimizer_cls):
    """Unlike the for-loop and foreach backends, the fused kernel never writes ``p.grad``.

    In bf16 the even-length rows run the packed kernel, whose rule writes its temporaries into the
    gradient's halves: those must not be stored back either. StableAdamW's fused first pass keeps
    its RMS terms in temporaries ([Note: StableAdamW's two passes]).
    """
    params = make_params(dtype, shapes=FUSED_SHAPES)
    optimizer = optimizer_cls(params, lr=1e-2, weight_decay=0.1, fused=True)
    grads = []
    for index, param in enumerate(params):
        param.grad = synthetic_grad(param, 0, index)
        grads.append(param.grad.clone())
    optimizer.step()
    for param, grad in zip(params, grads):
        assert torch.equal(param.grad, grad)


def test_fused_step_param_matches_for_loop():
    """The gradient-release entry point (one parameter per call) runs fused and agrees."""
    results = []
    for backend in (dict(foreach=False), dict(fused=True)):
        params = make_params(torch.float32, shapes=FUSED_SHAPES)
        optimizer = optimi.Adam(params, lr=1e-2, weight_decay=0.1, **backend)
        for step in range(6):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step * 3, 1e-2)
            for index, param in enumerate(params):
                optimizer.step_param(param, synthetic_grad(param, step, index))
        results.append(params)
    assert max_relative_error(*results) <= FP32_TOLERANCE


def test_fused_handles_non_contiguous_parameters():
    """A strided parameter cannot be flattened to a view: it takes the eager rule, same result."""
    results = []
    for backend in (dict(foreach=False), dict(fused=True)):
        base = make_params(torch.float32, shapes=[(32, 48)])[0]
        param = base.detach().t().requires_grad_()  # (48, 32), not contiguous
        optimizer = optimi.Adam([param], lr=1e-2, weight_decay=0.1, **backend)
        train(optimizer, [param], 1e-2, steps=4)
        results.append([param])
    assert max_relative_error(*results) <= FP32_TOLERANCE


def test_triton_flag_on_cpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: triton=True is valid here (tests/test_cuda.py)")
    with pytest.raises(ValueError, match="triton"):
        optimi.AdamW(make_params(), lr=1e-3, triton=True)


def test_fused_under_gradient_release_matches_step_loop():
    """Gradient release (one fused call per parameter, inside backward) equals a for-loop step loop."""
    results = []
    for release in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))
        backend = dict(fused=True, gradient_release=True) if release else dict(foreach=False)
        optimizer = optimi.AdamW(model.parameters(), lr=1e-2, **backend)
        if release:
            optimi.prepare_for_gradient_release(model, optimizer)
        generator = torch.Generator().manual_seed(1)
        for _ in range(5):
            inputs = torch.randn(4, 16, generator=generator)
            model(inputs).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        if release:
            assert all(p.grad is None for p in model.parameters())
            optimi.remove_gradient_release(model)
        results.append(list(model.parameters()))
    assert max_relative_error(*results) <= FP32_TOLERANCE


def dynamo_calls() -> int:
    return sum(step.dynamo_calls for step in dispatch.COMPILED.values())


def check_direct_calls_equal_dynamo(spec, dtype: torch.dtype, device: str, monkeypatch) -> None:
    """Calling the captured graph without Dynamo gives Dynamo's bits, and skips Dynamo after step 1.

    On CPU a bf16 parameter of two elements is one int32 word: a length Dynamo specializes, so that
    row keeps going through Dynamo ([Note: calling the compiled graph directly]). StableAdamW's
    first pass has a float32 column (the sum it writes), so it never runs packed.
    """
    shapes = [*FUSED_SHAPES, (2,)]
    passes = 2 if spec.name == "stableadamw" else 1  # StableAdamW compiles two passes per row
    results = []
    for direct in (False, True):
        # both runs use the same compiled steps (captured at their first call); the first run never
        # calls the captured graph itself
        with monkeypatch.context() as patch:
            if not direct:
                patch.setattr(compilation.CompiledStep, "direct_call", lambda self, scalars, columns: None)
            params = [p.detach().to(device).requires_grad_() for p in make_params(dtype, shapes=shapes)]
            optimizer = spec.optimi_cls(params, lr=spec.lr, fused=True, **spec.kwargs)
            train_on(optimizer, params, spec.lr, steps=2)
            before = dynamo_calls()
            train_on(optimizer, params, spec.lr, steps=4)
            through_dynamo = dynamo_calls() - before
        results.append(state_tensors(optimizer, params))
        one_word_row = device == "cpu" and dtype == torch.bfloat16
        expected = 4 * (int(one_word_row) if direct else passes * len(shapes))
        assert through_dynamo == expected
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    for dynamo, direct in zip(*results):
        assert torch.equal(dynamo.view(bits), direct.view(bits))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("spec", OPTIMIZERS, ids=spec_id)
def test_direct_graph_calls_equal_dynamo_dispatch(spec, dtype, monkeypatch):
    check_direct_calls_equal_dynamo(spec, dtype, "cpu", monkeypatch)


def test_a_callable_scalar_is_refused():
    """A rule's scalars are numbers (runtime inputs) or ``bool``/``None``/``str`` switches, never callables."""

    def update(ops, param, grad, kahan_comp, *, lr, scale):
        ops.mul_(grad, scale(lr))
        ops.sub_(param, grad)

    param, grad = torch.ones(64), torch.full((64,), 0.5)
    with pytest.raises(TypeError, match="scale"):
        dispatch.run_fused(update, Columns([param], [grad], (), [None]), dict(lr=0.1, scale=abs))
    assert torch.equal(param, torch.ones(64))


def test_flat_views_follow_a_parameter_whose_data_is_replaced():
    """A cached flat view is rebuilt when ``p.data = ...`` moves the parameter to new memory."""
    results = []
    for replace in (False, True):
        param = torch.nn.Parameter(torch.linspace(-1, 1, 64))
        optimizer = optimi.AdamW([param], lr=1e-2, fused=True)
        train_on(optimizer, [param], 1e-2, steps=2)
        old = param.data
        if replace:
            param.data = param.data.clone()  # same values, new storage
        train_on(optimizer, [param], 1e-2, steps=2)
        if replace:
            assert param.data_ptr() != old.data_ptr()
            assert not torch.equal(param.detach(), old)  # the old memory was left alone
        results.append(param.detach().clone())
    assert torch.equal(*results)


def run_compiled_afresh(spec, dtype: torch.dtype, monkeypatch, count: str, **switches: bool) -> tuple[list, int]:
    """Four steps on kernels compiled afresh (no FX graph cache, no loaded modules) with ``switches``.

    Returns the state tensors and the sum of each compiled step's ``count`` attribute (how many
    statements or bitcasts a C++ rewrite changed).
    """
    from torch._inductor import config as inductor_config
    from torch._inductor.codecache import PyCodeCache

    tricks(monkeypatch, **switches)
    monkeypatch.setattr(dispatch, "COMPILED", {})
    PyCodeCache.cache_clear()
    params = params_on("cpu", dtype)
    optimizer = spec.optimi_cls(params, lr=spec.lr, fused=True, **spec.kwargs)
    with inductor_config.patch(fx_graph_cache=False):
        train_on(optimizer, params, spec.lr, steps=4)
    return state_tensors(optimizer, params), sum(getattr(step, count) for step in dispatch.COMPILED.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("spec", OPTIMIZERS, ids=spec_id)
def test_hoisted_scalars_give_the_generated_kernels_bits(spec, dtype, monkeypatch):
    """CPU kernels with their hyperparameter arithmetic hoisted out of the loop give the same bits.

    One run builds the kernels as Inductor generated them and the other the rewritten ones
    ([Note: hoisting the hyperparameters] in ``optimi/_fused/cpp_rewrites.py``); the counts show which is which.
    """
    generated, moved_off = run_compiled_afresh(spec, dtype, monkeypatch, "hoisted_statements", hoist_scalars=False)
    hoisted, moved_on = run_compiled_afresh(spec, dtype, monkeypatch, "hoisted_statements", hoist_scalars=True)
    assert moved_off == 0 and moved_on > 0, (moved_off, moved_on)
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    for a, b in zip(generated, hoisted):
        assert torch.equal(a.view(bits), b.view(bits))


@pytest.mark.parametrize("spec", OPTIMIZERS, ids=spec_id)
def test_vector_bitcasts_give_the_generated_kernels_bits(spec, monkeypatch):
    """Packed bf16 kernels with their bitcasts done by one store and load give the same bits.

    See [Note: bitcasts without the stack] in ``optimi/_fused/cpp_rewrites.py``.
    """
    count, dtype = "rewritten_bitcasts", torch.bfloat16
    generated, off = run_compiled_afresh(spec, dtype, monkeypatch, count, vector_bitcasts=False, packed_pairs=True)
    direct, on = run_compiled_afresh(spec, dtype, monkeypatch, count, vector_bitcasts=True, packed_pairs=True)
    assert off == 0 and on > 0, (off, on)
    for a, b in zip(generated, direct):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))


def test_a_rewritten_kernel_that_fails_to_build_falls_back_to_the_generated_one(monkeypatch):
    """Should a compiler reject a rewritten kernel, the step warns and runs the kernel as generated."""
    from torch._inductor import config as inductor_config
    from torch._inductor.codecache import PyCodeCache

    def broken(source: str) -> tuple[str, int]:
        return source.replace("{", "{ this does not compile;", 1), 1

    results = []
    for rewrite in (None, broken):
        monkeypatch.setattr(dispatch, "COMPILED", {})
        if rewrite is not None:
            monkeypatch.setattr(compilation, "hoist_invariant_scalars", rewrite)
        PyCodeCache.cache_clear()
        params = params_on("cpu", torch.float32)
        optimizer = optimi.AdamW(params, lr=1e-2, weight_decay=0.1, fused=True)
        with inductor_config.patch(fx_graph_cache=False):
            if rewrite is None:
                train_on(optimizer, params, 1e-2, steps=2)
            else:
                with pytest.warns(RuntimeWarning, match="rewritten by .*failed to build"):
                    train_on(optimizer, params, 1e-2, steps=2)
                assert sum(step.hoisted_statements for step in dispatch.COMPILED.values()) == 0
        results.append(state_tensors(optimizer, params))
    for expected, actual in zip(*results):
        assert torch.equal(expected, actual)
