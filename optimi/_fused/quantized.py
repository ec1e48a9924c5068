"""8-bit states dequantized, stepped and quantized back inside the fused kernel.

[Note: 8-bit states in the fused kernel]
The for-loop and foreach backends step a parameter whose moments are 8-bit codes ([Note: 8-bit
optimizer state] in ``optimi/_quantization.py``) through float32 temporaries: one pass to
dequantize the codes, the step, one pass (several, eagerly) to quantize the temporaries back,
and 8 bytes of temporaries per element and moment, each pass an eager kernel of its own. The
fused backend does all three in its one compiled step per parameter. While the optimizer steps
a param group with the fused backend it sets :data:`CODES_IN_KERNEL` to the codes of the
parameters the kernel takes (:func:`codes_in_kernel`) and hands their codes, not temporaries, to
the update rule's columns. ``run_fused`` then appends
each coded state's scales to the row, wraps the rule (:func:`through_codes`) and passes every
column as long as the parameter as ``(blocks, BLOCK_SIZE)`` and the scales as ``(blocks, 1)``
(``_flat_row`` in ``dispatch.py``; the block width is a static size for Dynamo). Per block the
kernel

1. dequantizes the codes with the block's scale;
2. runs the unchanged rule on those float32 values (the rule is elementwise, or sums the whole
   tensor, so the 2-D layout changes nothing but the loop nest Inductor generates);
3. where the rule wrote a coded state, quantizes it back: the block's scale, then its codes.

Steps 1 and 3 *are* :func:`~optimi._quantization.dequantize` and
:func:`~optimi._quantization.quantize_`, traced on rows of one block each (a ``(blocks,
BLOCK_SIZE)`` tensor is such a tensor's rows): the code and its scale rule exist once, and the
kernel computes the eager path's operations on the same float32 values (their constants must be
literals or tensors: Dynamo would lift a module-level float into a runtime input, which the direct
calls of [Note: calling the compiled graph directly] cannot build). Inductor fuses the block
reductions of step 3 and the pointwise work into one kernel of loop nests over the parameter's
blocks (CPU: one C++ function). Whether it recomputes the new moments in each nest or keeps them
in a float32 buffer is its choice per code: with the dynamic tree code it computes them once into
buffers of the parameter's size, then finds each block's largest, encodes, and adds the step to the
parameter (Kahan: a last nest over the whole tensor), all within the one call; with the earlier
float8 code it recomputed them instead. Measured (AdamW, bf16 + Kahan, 20 tensors of 1024 x 256,
``OMP_NUM_THREADS=1``, median of 7 rounds of 10 steps, torch 2.13): 391 ms per step through eager
temporaries, 48 ms in the kernel, where bf16 moments take 7.5 ms. The step costs what the code
costs: encoding and decoding are a few dozen float operations per element each (the decade by
comparisons with the powers of ten, the value from the bits), where the bf16 step is a handful.
A first version that took ``log10``/``pow`` per element and decoded through a table lookup ran
at 101 ms.

A state the rule only reads (StableAdamW's reduction pass, [Note: StableAdamW's two passes]) is
left as it is.

Which parameters the kernel takes. The fused backend's rows carry no shape, so a block must be a
run of :data:`~optimi._quantization.BLOCK_SIZE` consecutive elements of the flat tensor: a row
length ``C`` (elements per index of the first dimension) that is a multiple of the block size.
A parameter with a ragged last block (``C % 256 != 0``), or a non-contiguous tensor among its
columns, is stepped as before, through eager temporaries (by the fused kernel, on the
temporaries). The wrapped rule is a configuration of its own (the layout of its states is part
of its key through the cached wrapper): it compiles once per rule, dtypes and layout, never per
step, shape or learning rate (scalars stay runtime inputs, [Note: the fused backend]).

Float32 masters combine: ``through_master`` ([Note: one-pass float32 masters] in ``masters.py``)
wraps the wrapped rule, so a ``"stochastic"``/``"remainder"`` bf16 parameter with 8-bit moments
is one pass too (on the plain layout: codes are bytes, not bf16 pairs).

Numerics. Given the same float32 moments the kernel writes the eager codes and scales: the same
operations, compiled (``tests/test_fused_state_bits.py`` checks them against the fused backend
stepping eager temporaries, bit for bit). One exception: where the code stores a square root,
eager float32 ``sqrt`` on CPU is not correctly rounded (one ulp off on 0.7% of elements,
measured) and the kernel's is, so a block's scale may differ by an ulp. The moments themselves
are the fused backend's ([Note: fused numerics] in ``ops.py``), which agree with the for-loop's to
float32 rounding; where such a difference straddles a rounding boundary of the code, that code
differs by one step.

A configuration whose compile fails, where the optimizer chose the fused backend itself, runs the
same Python step eagerly (FusedOps's arithmetic without the compiler) rather than going to
another backend, whose rule could not read codes ([Note: falling back from the fused backend]).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from typing import Any, NamedTuple

from torch import Tensor

from optimi._fused.ops import FusedOps
from optimi._quantization import BLOCK_SIZE, dequantize, quantize_, quantized_keys, scale_key

__all__ = [
    "CODES_IN_KERNEL",
    "CodedStates",
    "codes_in_kernel",
    "coded_row",
    "through_codes",
]


class CodedStates(NamedTuple):
    """The 8-bit states of one ``_step_group`` call that the fused kernel steps itself."""

    #: ``id(codes)`` -> (its scales, its kind): the rule's columns hold the codes
    codes: dict[int, tuple[Tensor, str]]
    #: the indices (into the call's parameters) whose states are all stepped in the kernel
    rows: frozenset[int]


#: set by the optimizer while the fused backend steps a param group whose 8-bit states it takes
#: ([Note: 8-bit states in the fused kernel]); ``None`` otherwise
CODES_IN_KERNEL: ContextVar[CodedStates | None] = ContextVar("optimi_codes_in_kernel", default=None)


def codes_in_kernel(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[dict[str, Any]],
    quantized: Sequence[int],
    kinds: dict[str, str],
) -> CodedStates | None:
    """The parameters among ``quantized`` (indices) whose 8-bit states the fused kernel can step.

    Whole blocks only (a row length that is a multiple of the block size) and contiguous
    tensors; ``None`` where there is none.
    """
    codes: dict[int, tuple[Tensor, str]] = {}
    rows = []
    for i in quantized:
        param, state = params[i], states[i]
        if param.dim() < 2 or param.numel() == 0 or (param.numel() // param.shape[0]) % BLOCK_SIZE:
            continue  # a ragged last block (or an empty shard): eager temporaries
        tensors = [param, grads[i], *(value for value in state.values() if isinstance(value, Tensor))]
        if not all(t.is_contiguous() for t in tensors):
            continue  # a strided tensor cannot be viewed as blocks
        for key in quantized_keys(state, kinds):
            codes[id(state[key])] = (state[scale_key(key)], kinds[key])
        rows.append(i)
    return CodedStates(codes, frozenset(rows)) if rows else None


def coded_row(
    update: Callable[..., None], row: Sequence[Any], coded: CodedStates
) -> tuple[Callable[..., None], tuple[Any, ...], bool]:
    """``update`` and ``row`` as the kernel steps them: :func:`through_codes` and the scales appended.

    ``row`` is ``(param, grad, *states, kahan)``; the result's row is ``(param, grad, *states,
    *scales, kahan)``, one scales column per coded state in order. The flag says whether any
    state is coded (else ``update`` and ``row`` come back unchanged).
    """
    layout: list[str | None] = []
    scales: list[Tensor] = []
    for state in row[2:-1]:
        found = coded.codes.get(id(state)) if isinstance(state, Tensor) else None
        layout.append(None if found is None else found[1])
        if found is not None:
            scales.append(found[0])
    if not scales:
        return update, tuple(row), False
    return through_codes(update, tuple(layout)), (*row[:-1], *scales, row[-1]), True


@functools.cache
def through_codes(update: Callable[..., None], layout: tuple[str | None, ...]) -> Callable[..., None]:
    """``update`` reading and writing 8-bit states as codes ([Note: 8-bit states in the fused kernel]).

    ``layout`` gives each state column's kind of code (``None``: not coded, passed on as it is:
    another state, a per-tensor sum or number). The wrapped rule takes
    ``(ops, param, grad, *states, *scales, kahan, **scalars)``, one scales column per coded state:
    every column as long as the parameter as ``(blocks, BLOCK_SIZE)``, the scales as ``(blocks,
    1)``. Cached, so that a rule and layout always give the same function: the configuration's key.
    """
    coded = sum(1 for kind in layout if kind is not None)

    def rule(ops: FusedOps, param: Tensor, grad: Tensor, *rest: Any, **scalars: Any) -> None:
        *columns, kahan = rest
        states, scales = list(columns[: len(layout)]), columns[len(layout) :]
        assert len(scales) == coded
        moments: list[tuple[Tensor, Tensor, str, Tensor]] = []  # codes, scales, kind, float32 values
        for j, kind in enumerate(layout):
            if kind is not None:
                # rows of one block each: dequantize's operations on the block and its scale
                values = dequantize(states[j], scales[len(moments)], kind)
                moments.append((states[j], scales[len(moments)], kind, values))
                states[j] = values
        stores = len(ops.written)
        update(ops, param, grad, *states, kahan, **scalars)
        written = ops.written[stores:]
        for codes, block_scales, kind, values in moments:
            if any(t is values for t in written):
                quantize_(codes, block_scales, values, kind)

    rule.__name__ = rule.__qualname__ = update.__name__
    rule.__doc__ = f"{update.__name__} on 8-bit states {layout}."
    return rule
