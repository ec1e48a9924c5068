"""The update primitives as a compiled kernel computes them: :class:`FusedOps`.

[Note: the fused backend leaves gradients intact]
The for-loop and foreach rules write temporaries into the gradient buffer to save allocations
([Note: the gradient is a scratch buffer]). Inside a compiled kernel a temporary costs nothing
(it lives in registers), while writing the gradient back costs a store per element. So the
compiled step hands the rule a copy of the gradient (float32 for a bf16/fp16 gradient; a copy
Inductor folds into the loads): ``scratch(grad)`` and every write to the gradient land in that
temporary, and the compiled kernel never writes ``p.grad``.

[Note: fused numerics]
Eager PyTorch computes each bf16/fp16 op in float32 and rounds its result once. Inductor keeps a
fused chain of ops in float32 and rounds only the final store, dropping even an explicit
``.to(bf16).float()``. That would also drop the rounding Kahan summation depends on
(``p_new - p_old`` must be taken from the stored, rounded ``p_new``). So every primitive of
:class:`FusedOps` that writes a bf16/fp16 tensor rounds its result to that dtype in the kernel:
on CPU with Veltkamp splitting (three float32 operations that Inductor keeps, see
:func:`_round_to`), on CUDA through Inductor's ``emulate_precision_casts`` (Triton contracts
multiply-adds, which would defeat the splitting; the casts are cheap there). Scalars (0-d
float64 tensors) are converted exactly as the eager kernels convert a Python scalar, and an add
with ``alpha`` is computed the way each device's eager kernel computes it (one fused multiply-add,
or on CPU bf16 a bf16-rounded ``alpha``). The parameter, moments and Kahan buffer therefore
follow eager's roundings and the Kahan bookkeeping is exact.

On CPU the Kahan buffer is the exception. Kahan summation needs one exact rounding per element,
that of the new parameter, so that ``c - (p_new - p_old)`` holds what the bf16 store dropped. The
rule's updates to the buffer (decoupled decay, the step, the compensation itself) are therefore
summed in a float32 copy of it that the kernel stores, rounded, once at the end: three of the
seven in-kernel roundings of bf16 AdamW's element fewer. The buffer then differs from eager's
in bits far below the parameter's last place (``p + c`` agrees to a few hundredths of its ulp),
and ``p`` itself by one ulp where ``p + c`` lies next to a rounding tie. The moments keep eager's
roundings: rounding them only at their final store would let multi-step updates (SGD's
``b = mu b + g``, Adan's ``n``) differ by several ulps where they cancel. CUDA keeps the Kahan
buffer in bf16 (its casts are emulated and cheap).

Two deliberate differences remain. The rule's temporaries live in a float32 copy of the gradient
rather than in the bf16 gradient buffer: rounding them (the Adam denominator, the Kahan scratch)
costs instructions in a kernel that should be memory-bound, and leaving them unrounded is more
accurate. Rules that put an intermediate into the gradient buffer before a state reads it
(Adam/RAdam's L2 term, Lion's ``g - m``) therefore round once where the for-loop rounds twice.
And the compilers may order float32 arithmetic differently. Measured per step from the same
state (``tests/test_fused.py``): fp32 agrees to 1e-6 relative over whole runs; bf16+Kahan agrees
to one ulp on >= 99.98% of elements (mostly bit-identical; Kahan pairs compared as ``p + c``),
99.7% for Adam/RAdam with L2 and Lion.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from optimi._columns import Columns
from optimi._ops import LOW_PRECISION_DTYPES, TensorOps

__all__ = ["HIGH_HALF", "SPLIT", "FusedOps", "round_to", "update_row"]


def _opmath(x: Tensor) -> Tensor:
    """``x`` in the dtype eager kernels compute in: float32 for bf16/fp16, else unchanged."""
    return x.float() if x.dtype in LOW_PRECISION_DTYPES else x


def _scalar(value: float | Tensor, like: Tensor) -> float | Tensor:
    """A hyperparameter in ``like``'s compute dtype, as eager kernels convert a Python scalar.

    Left as float64, Inductor would first round it to a bf16 tensor's own dtype.
    """
    return value.to(_opmath(like).dtype) if isinstance(value, Tensor) else value


def _fma(fma: Callable[..., Tensor] | None, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """``a * b + c``, rounded once where Inductor's ``fma`` prim is available (``inductor_fma``)."""
    return a * b + c if fma is None else fma(a, b, c)


#: Veltkamp's splitting constants 2**(24 - p) + 1: rounding a float32 to p significant bits
SPLIT = {torch.bfloat16: float(2**16 + 1), torch.float16: float(2**13 + 1)}


def round_to(value: Tensor, split: float | Tensor) -> Tensor:
    """float32 ``value`` rounded to nearest with the precision of ``split``'s dtype, still as float32.

    Veltkamp splitting: ``t = v * (2**k + 1)``, then ``t - (t - v)`` keeps the top ``24 - k``
    bits, rounded to nearest: three float32 operations that the compiler may not reassociate or
    contract (Inductor builds its C++ without unsafe math and with ``-ffp-contract=off``).
    Inductor drops an explicit ``.to(bf16).float()`` inside a fused kernel, which is why the
    rounding is arithmetic ([Note: fused numerics]). ``split`` (one of :data:`SPLIT`) reaches
    the kernel as a runtime input among the packed scalars: written as a literal it let GCC build
    a 1.4x slower CPU kernel (measured, AdamW bf16+Kahan).
    """
    scaled = value * split
    return scaled - (scaled - value)


HIGH_HALF = -65536  # 0xFFFF0000 as an int32


def _scalar_rounded_to(value: Tensor, dtype: torch.dtype) -> Tensor:
    """A float32 0-d ``value`` rounded to nearest-even in ``dtype``'s precision, still float32.

    For bf16 with integer operations on the float32's bits: Inductor before torch 2.13 drops a
    scalar's ``.to(bf16).float()`` round trip, and a scalar's float arithmetic may run in double
    precision, where Veltkamp splitting (:func:`round_to`) rounds to the wrong precision.
    """
    if dtype != torch.bfloat16:
        return value.to(dtype).float()
    bits = value.view(torch.int32)
    # add just under half of bf16's last place, plus the kept last bit for ties, then truncate
    return ((bits + (0x7FFF + ((bits >> 16) & 1))) & HIGH_HALF).view(torch.float32)


class FusedOps(TensorOps):
    """:class:`TensorOps` for code compiled by ``torch.compile`` (see [Note: fused numerics]).

    Scalars arrive as 0-d float64 tensors; each primitive converts them as the eager kernel
    converts a Python scalar and computes in float32 for bf16/fp16 tensors. With ``round_stores``
    each result written into a bf16/fp16 tensor is rounded to that dtype inside the kernel, so a
    later primitive reading it sees what eager would have stored (Inductor otherwise keeps the
    float32 value); without it the compiler is asked to emulate eager's casts instead (CUDA: Triton
    contracts ``a * b - c`` into a fused multiply-add, which would defeat the splitting). ``splits``
    holds the splitting constants of :data:`SPLIT` as the kernel receives them.
    ``scratch(grad)`` is still the gradient, but the fused step hands the rule a private copy of it
    ([Note: the fused backend leaves gradients intact]).
    """

    def __init__(
        self,
        round_stores: bool,
        splits: dict[torch.dtype, float | Tensor],
        fma: Callable[..., Tensor] | None = None,
    ):
        self.round_stores = round_stores
        self.splits = splits
        self.fma = fma
        # the tensors the rule wrote, in order: what a packed row stores back, and whether a rule
        # wrote its float32 master ([Note: one-pass float32 masters] in ``masters.py``)
        self.written: list[Tensor] = []

    def dtype_of(self, x: Tensor) -> torch.dtype:
        """The dtype ``x`` stands for: its own here, bf16 for a half of a packed column."""
        return x.dtype

    def keep_float32(self, x: Tensor) -> None:
        """Store ``x``, a float32 temporary such as a parameter's master, unrounded.

        Nothing to do here: a store rounds to the dtype of the tensor it writes, float32 for ``x``
        (a packed row's halves all stand for bf16, see ``PackedOps``).
        """

    def _rounded_for(self, x: Tensor, value: Tensor) -> Tensor:
        """``value`` rounded in the kernel to the dtype ``x`` stands for, where stores round."""
        dtype = self.dtype_of(x)
        return round_to(value, self.splits[dtype]) if self.round_stores and dtype in self.splits else value

    def _store(self, x: Tensor, value: Tensor) -> Tensor:
        self.written.append(x)
        return x.copy_(self._rounded_for(x, value))

    def copy_(self, dst: Tensor, src: Tensor) -> Tensor:
        return self._store(dst, _opmath(src))

    def add_(self, x: Tensor, y: Tensor, alpha: float | Tensor = 1.0) -> Tensor:
        if not isinstance(alpha, Tensor):
            if alpha == 1:
                return self._store(x, _opmath(x) + _opmath(y))
            alpha = torch.full((), float(alpha), dtype=torch.float64, device=x.device)
        alpha = alpha.to(_opmath(x).dtype)
        dtype = self.dtype_of(x)
        if dtype in LOW_PRECISION_DTYPES and x.device.type == "cpu":
            # eager's CPU kernel rounds alpha to the tensor's dtype for bf16/fp16 ...
            return self._store(x, _opmath(x) + _opmath(y) * _scalar_rounded_to(alpha, dtype))
        # ... and computes x + alpha * y as one fused multiply-add otherwise
        return self._store(x, _fma(self.fma, _opmath(y), alpha, _opmath(x)))

    def add_scalar_(self, x: Tensor, value: float | Tensor) -> Tensor:
        return self._store(x, _opmath(x) + _scalar(value, x))

    def sub_(self, x: Tensor, y: Tensor) -> Tensor:
        return self._store(x, _opmath(x) - _opmath(y))

    def mul_(self, x: Tensor, value: float | Tensor) -> Tensor:
        return self._store(x, _opmath(x) * _scalar(value, x))

    def div_(self, x: Tensor, value: float | Tensor) -> Tensor:
        return self._store(x, _opmath(x) / _scalar(value, x))

    def mul_tensor_(self, x: Tensor, y: Tensor) -> Tensor:
        return self._store(x, _opmath(x) * _opmath(y))

    def div_tensor_(self, x: Tensor, y: Tensor) -> Tensor:
        return self._store(x, _opmath(x) / _opmath(y))

    def lerp_(self, x: Tensor, y: Tensor, weight: float | Tensor) -> Tensor:
        return self._store(x, torch.lerp(_opmath(x), _opmath(y), _scalar(weight, x)))

    def addcmul_(self, x: Tensor, a: Tensor, b: Tensor, value: float | Tensor = 1.0) -> Tensor:
        return self._store(x, _opmath(x) + _scalar(value, x) * _opmath(a) * _opmath(b))

    def addcdiv_(self, x: Tensor, a: Tensor, b: Tensor, value: float | Tensor = 1.0) -> Tensor:
        return self._store(x, _opmath(x) + _scalar(value, x) * _opmath(a) / _opmath(b))

    def sqrt_(self, x: Tensor) -> Tensor:
        return self._store(x, _opmath(x).sqrt())

    def sqrt_into_(self, dst: Tensor, src: Tensor) -> Tensor:
        return self._store(dst, self._rounded_for(dst, _opmath(src)).sqrt())

    def sign_(self, x: Tensor) -> Tensor:
        return self._store(x, _opmath(x).sign())

    def abs_(self, x: Tensor) -> Tensor:
        return self._store(x, _opmath(x).abs())

    def clamp_min_(self, x: Tensor, value: float | Tensor) -> Tensor:
        return self._store(x, _opmath(x).clamp_min(_scalar(value, x)))

    def clamp_min(self, x: Tensor, value: float | Tensor) -> Tensor:
        return self._rounded_for(x, _opmath(x).clamp_min(_scalar(value, x))).to(x.dtype)


def update_row(
    update: Callable[..., None],
    ops: FusedOps,
    row: Columns,
    scalars: dict[str, Any],
    kahan_in_float32: bool,
) -> None:
    """Run ``update`` on one row of flat tensors, as the compiled step traces it.

    The rule gets a private float32 copy of the gradient: its temporaries live there unrounded
    and the kernel never stores it ([Note: the fused backend leaves gradients intact]). With
    ``kahan_in_float32`` (CPU) a bf16/fp16 Kahan buffer's updates are summed in a float32 copy
    stored once at the end; the parameter's rounding alone keeps the compensation exact
    ([Note: fused numerics]).
    """
    grad = row.grad.float() if row.grad.dtype in LOW_PRECISION_DTYPES else row.grad.clone()
    comp = row.kahan
    summed_comp = comp
    if kahan_in_float32 and isinstance(comp, Tensor) and comp.dtype in LOW_PRECISION_DTYPES:
        summed_comp = comp.float()
    update(ops, row.param, grad, *row.states, summed_comp, **scalars)
    if summed_comp is not comp:
        comp.copy_(summed_comp)
