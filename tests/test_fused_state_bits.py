"""The fused backend stepping 8-bit states in its one pass ([Note: 8-bit states in the fused kernel]).

The kernel dequantizes the codes, runs the rule and quantizes the new moments itself
(``optimi/_fused/quantized.py``). Given the same float32 moments it must write the eager path's
codes and scales: against the fused backend stepping eager float32 temporaries (the path every
parameter took before, and still takes with a ragged last block) it agrees bit for bit (up to
eager ``sqrt``'s rounding, :func:`assert_same_bits`), and
against the for-loop backend it agrees as the fused backend always agrees with it ([Note: fused
numerics]), to float32 rounding of the moments, which moves a code by at most one step where it
straddles a rounding boundary. Each configuration compiles once per pytest process (seconds on 2
cores), so the cases share shapes: whole blocks only (row lengths 256 and 512), two ranks.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch._dynamo.utils import counters

import optimi
import optimi.optimizer as optimizer_module
from optimi import _torch_internals
from optimi._fused import FusedCompileError, compilation, compiled_configurations, dispatch
from optimi._quantization import dequantize, quantized_keys, scale_key

pytestmark = pytest.mark.skipif(not hasattr(torch, "compile"), reason="the fused backend needs torch.compile")

#: whole blocks (256 elements per row, 512 per index of the first dimension): the kernel steps them
IN_KERNEL_SHAPES = [(64, 256), (8, 4, 128)]
#: a ragged last block (300 = 256 + 44) and a 1-d bias: eager temporaries and plain state
ELSEWHERE_SHAPES = [(40, 300), (64,)]
STEPS = 5
CASES = {
    "adamw": (optimi.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "sgd": (optimi.SGD, dict(lr=1e-2, momentum=0.9, weight_decay=1e-4)),
    "lion": (optimi.Lion, dict(lr=2**-9, weight_decay=0.1)),
    "stableadamw": (optimi.StableAdamW, dict(lr=1e-2, weight_decay=0.1)),
}
DTYPES = {"fp32": torch.float32, "bf16_kahan": torch.bfloat16}
#: fused against for-loop: parameters to this fraction of their largest magnitude (fp32: float32
#: rounding; bf16: one or two ulps where the two round an intermediate differently), dequantized
#: moments to this relative L2 error (a code one step apart on a few percent of the elements)
PARAM_TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 1e-2}
MOMENT_TOLERANCE = 2e-2


def run(
    name: str,
    dtype: torch.dtype,
    backend: str,
    shapes=IN_KERNEL_SHAPES,
    steps: int = STEPS,
    **options,
):
    """``steps`` steps from seeded parameters and gradients with a changing learning rate."""
    cls, kwargs = CASES[name]
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(shape, generator=generator).to(dtype).requires_grad_() for shape in shapes]
    flags = dict(fused=True) if backend == "fused" else dict(fused=False, foreach=False)
    optimizer = cls(params, state_bits=8, **{**flags, **kwargs, **options})
    for step in range(steps):
        for index, param in enumerate(params):
            param.grad = (torch.randn(param.shape, generator=generator) * (1 + index)).to(dtype)
        for group in optimizer.param_groups:
            group["lr"] = kwargs["lr"] / (1 + step)  # a scheduler's new value every step
        optimizer.step()
    return params, optimizer


def eager_temporaries(monkeypatch) -> None:
    """The fused backend as it stepped 8-bit states before: through eager float32 temporaries."""
    monkeypatch.setattr(optimizer_module, "codes_in_kernel", lambda *args, **kwargs: None)


def states_of(optimizer, params) -> list[torch.Tensor]:
    """Every state tensor (codes, scales, Kahan buffers, ...) in a fixed order."""
    return [value for p in params for _, value in sorted(optimizer.state[p].items()) if torch.is_tensor(value)]


def assert_same_bits(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    """The eager path's bits, up to eager float32 ``sqrt``'s rounding.

    Eager ``torch.sqrt`` on a CPU float32 tensor is not correctly rounded (one ulp off on 0.7% of
    elements, measured on this repository's 2-core CI machine), the compiled kernel's is: where
    the code stores ``sqrt(v)`` a block's scale can differ by an ulp or two, and a float32
    parameter, which the next step divides by the read-back moment, by as little. Codes and every
    other tensor are bit for bit.
    """
    assert len(actual) == len(expected)
    for x, y in zip(actual, expected):
        x, y = x.detach(), y.detach()
        assert x.dtype == y.dtype and x.shape == y.shape
        if x.dtype == torch.uint8:
            assert (x == y).float().mean() >= 0.999  # measured: all equal
        else:
            assert (x.float() - y.float()).abs().max() <= 2**-21 * y.float().abs().max()


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("name", CASES)
def test_fused_codes_match_the_for_loop(name, dtype):
    """Fused 8-bit state against the for-loop backend's 8-bit state over five steps."""
    fused_params, fused = run(name, dtype, "fused")
    loop_params, loop = run(name, dtype, "for_loop")
    for a, b in zip(fused_params, loop_params):
        scale = b.detach().float().abs().max()
        assert (a.detach().float() - b.detach().float()).abs().max() <= PARAM_TOLERANCE[dtype] * scale
        state_a, state_b = fused.state[a], loop.state[b]
        keys = quantized_keys(state_a, type(fused)._QUANTIZED_STATES)
        assert keys and keys == quantized_keys(state_b, type(loop)._QUANTIZED_STATES)
        for key in keys:
            kind = type(fused)._QUANTIZED_STATES[key]
            x = dequantize(state_a[key], state_a[scale_key(key)], kind)
            y = dequantize(state_b[key], state_b[scale_key(key)], kind)
            assert (x - y).norm() <= MOMENT_TOLERANCE * y.norm(), key
            assert (state_a[key] == state_b[key]).float().mean() >= 0.85, key


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_in_kernel_codes_equal_eager_temporaries_bit_for_bit(dtype, monkeypatch):
    """Same float32 moments, same codes: the one-pass kernel against dequantize, fused step, quantize."""
    in_kernel = run("adamw", dtype, "fused")
    eager_temporaries(monkeypatch)
    eager = run("adamw", dtype, "fused")
    assert_same_bits(in_kernel[0], eager[0])
    assert_same_bits(states_of(in_kernel[1], in_kernel[0]), states_of(eager[1], eager[0]))


def test_stochastic_rounding_masters_combine_with_codes_in_the_kernel(monkeypatch):
    """A bf16 ``"stochastic"`` parameter's float32 master and its 8-bit moments, one pass, eager bits."""
    in_kernel = run("adamw", torch.bfloat16, "fused", low_precision="stochastic")
    assert sum(step.label.endswith("8-bit states)") for step in dispatch.COMPILED.values()) >= 1
    eager_temporaries(monkeypatch)
    eager = run("adamw", torch.bfloat16, "fused", low_precision="stochastic")
    assert_same_bits(in_kernel[0], eager[0])
    assert_same_bits(states_of(in_kernel[1], in_kernel[0]), states_of(eager[1], eager[0]))


def test_the_eager_helpers_are_not_called_on_the_fused_path(monkeypatch):
    """Whole blocks never go through ``_dequantized_view``/``_requantize_``; a ragged block does."""

    def called(*args, **kwargs):
        raise AssertionError("the fused path dequantized into eager temporaries")

    monkeypatch.setattr(optimizer_module, "_dequantized_view", called)
    monkeypatch.setattr(optimizer_module, "_requantize_", called)
    params, optimizer = run("adamw", torch.bfloat16, "fused", steps=2)
    assert all(quantized_keys(optimizer.state[p], optimi.AdamW._QUANTIZED_STATES) for p in params)
    with pytest.raises(AssertionError, match="eager temporaries"):  # the check itself works
        run("adamw", torch.bfloat16, "fused", shapes=ELSEWHERE_SHAPES[:1], steps=1)


def test_ragged_blocks_and_plain_states_step_beside_the_kernel(monkeypatch):
    """A ragged last block takes the eager temporaries, a bias its plain state, in the same group."""
    shapes = IN_KERNEL_SHAPES + ELSEWHERE_SHAPES
    in_kernel = run("adamw", torch.bfloat16, "fused", shapes=shapes)
    eager_temporaries(monkeypatch)
    eager = run("adamw", torch.bfloat16, "fused", shapes=shapes)
    assert_same_bits(in_kernel[0], eager[0])
    assert_same_bits(states_of(in_kernel[1], in_kernel[0]), states_of(eager[1], eager[0]))


def test_no_recompile_across_steps_shapes_or_learning_rates():
    """One compile for the configuration; later steps with new learning rates and shapes reuse it."""
    run("adamw", torch.bfloat16, "fused", steps=1)  # compiled here, or by an earlier test
    graphs, configurations = counters["stats"]["unique_graphs"], compiled_configurations()
    run("adamw", torch.bfloat16, "fused", shapes=[(32, 512), (16, 2, 256), (64, 256)], steps=6)
    assert counters["stats"]["unique_graphs"] == graphs
    assert compiled_configurations() == configurations
    if _torch_internals.enabled("direct_calls"):  # and later calls skip Dynamo (the code's constants allow it)
        steps = [step for step in dispatch.COMPILED.values() if step.label.endswith("8-bit states)")]
        assert steps and all(step.direct is not None for step in steps)


@pytest.fixture
def failing_compile(monkeypatch):
    """Empty compiled-step tables and a Dynamo that fails every compile."""
    monkeypatch.setattr(dispatch, "COMPILED", {})
    monkeypatch.setattr(dispatch, "PACKING_FAILED", set())
    monkeypatch.setattr(dispatch, "FELL_BACK", {})

    def no_compiler(self, packed_scalars, columns):
        raise RuntimeError("no working C++ compiler")

    monkeypatch.setattr(compilation.CompiledStep, "_through_dynamo", no_compiler)


def test_a_failed_compile_falls_back_to_the_uncompiled_step(failing_compile, monkeypatch):
    """``fused=None``: one warning, then the same Python step runs eagerly, close to the for-loop."""
    monkeypatch.setattr(optimizer_module, "FUSED_MIN_ELEMENTS", 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        params, optimizer = run("adamw", torch.float32, "fused", fused=None)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "uncompiled" in messages[0], messages
    loop_params, _ = run("adamw", torch.float32, "for_loop")
    for a, b in zip(params, loop_params):
        assert (a.detach() - b.detach()).abs().max() <= 1e-6 * b.detach().abs().max()


def test_an_explicit_fused_request_raises_when_compiling_fails(failing_compile):
    with pytest.raises(FusedCompileError, match="fused=True"):
        run("adamw", torch.float32, "fused", steps=1)
