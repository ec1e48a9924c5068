"""bf16 columns packed two values to an int32 word, for the CPU kernel.

[Note: packed bf16 columns]
On CPU a bf16 kernel spends more instructions converting than computing: each load widens bf16
to float32 and each store rounds back to nearest-even with a NaN check (seven integer
instructions per 16 values: Inductor does not target AVX512-BF16's conversion instruction), on
top of the exact roundings above. When every tensor of a row is bf16 with an even length and an
even storage offset, the fused step instead views each column as int32 words that each hold two
bf16 values. A bf16 value is the upper half of the float32 with the same value, so one shift
(even element) or one mask (odd element) turns a word into two float32 values. The update rule
runs twice, on the even and on the odd halves, under :class:`PackedOps`, which rounds each store
exactly as :class:`FusedOps` rounds a bf16 store; every value written is then exactly
representable in bf16, and a pair goes back into its word with one shift and one bitwise select.
Only the columns the rule wrote are stored (a rule that leaves a state untouched does not
rewrite it). The result is bit-identical to the plain fused kernel
(``tests/test_fused.py``) and the bf16+Kahan AdamW step runs 1.2-1.3x faster on a 2-core AVX-512
CPU (docs/benchmarks.md). Rows with an odd length or offset, other dtypes, and CUDA (where
Inductor's conversions are cheap) run the plain kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from optimi._columns import Columns
from optimi._fused.ops import HIGH_HALF, FusedOps, round_to

__all__ = ["PackedOps", "pack", "pairs_fit", "unpack", "update_packed_row"]


class PackedOps(FusedOps):
    """:class:`FusedOps` over the float32 halves of bf16 columns packed two to an int32.

    Every tensor the rule sees is a float32 half (see [Note: packed bf16 columns]) and stands for
    a bf16 tensor, except those in ``exact``: the gradient's private copy and the Kahan buffer,
    whose values stay unrounded float32 as in :class:`FusedOps`. Only the tensors the rule wrote
    (``written``) are packed and stored back.
    """

    def __init__(
        self,
        exact: Sequence[Tensor],
        splits: dict[torch.dtype, float | Tensor],
        fma: Callable[..., Tensor] | None = None,
        half: int = 0,
    ):
        super().__init__(round_stores=True, splits=splits, fma=fma)
        self.exact = tuple(exact)
        #: which element of each word the rule runs on: 0 the even one, 1 the odd one
        self.half = half

    def dtype_of(self, x: Tensor) -> torch.dtype:
        return x.dtype if any(x is t for t in self.exact) else torch.bfloat16

    def keep_float32(self, x: Tensor) -> None:
        """Store ``x``, a float32 temporary such as a parameter's master, unrounded."""
        self.exact = (*self.exact, x)


def unpack(words: Tensor) -> tuple[Tensor, Tensor]:
    """The two bf16 values of each int32 of ``words`` as float32: (even elements, odd elements)."""
    return (words << 16).view(torch.float32), (words & HIGH_HALF).view(torch.float32)


def pack(even: Tensor, odd: Tensor) -> Tensor:
    """The inverse of :func:`unpack` for values already rounded to bf16: the low halves are zero."""
    return ((even.view(torch.int32) >> 16) & 0xFFFF) | (odd.view(torch.int32) & HIGH_HALF)


def pairs_fit(tensor: Tensor) -> bool:
    """Whether ``tensor`` can be viewed as int32 pairs ([Note: packed bf16 columns]).

    bf16, or int16: a ``"remainder"`` parameter's remainder, whose halves the rule reads as
    bit patterns ([Note: one-pass float32 masters] in ``masters.py``).
    """
    return (
        tensor.dtype in (torch.bfloat16, torch.int16) and tensor.numel() % 2 == 0 and tensor.storage_offset() % 2 == 0
    )


def update_packed_row(
    update: Callable[..., None],
    row: Columns,
    scalars: dict[str, Any],
    splits: dict[torch.dtype, Tensor],
    fma: Callable[..., Tensor] | None,
) -> None:
    """Run ``update`` on one row of int32 words, each holding two bf16 values, as the compiled step traces it.

    Every tensor column of a packed row is bf16 ([Note: packed bf16 columns]), so its words are
    int32; number columns arrive as float64 scalars and ``None`` stays ``None``. The rule runs on
    the even halves, then on the odd halves; only the columns it wrote are packed and stored, the
    gradient never (it is the rule's scratch space) and the Kahan buffer rounded once, having been
    summed unrounded.
    """
    words = row.arguments()
    is_word = [isinstance(c, Tensor) and c.dtype == torch.int32 for c in words]
    halves = [unpack(c) if word else (c, c) for c, word in zip(words, is_word)]
    even_row = Columns.from_arguments([pair[0] for pair in halves])
    written: list[Tensor] = []
    for half in (0, 1):
        half_row = Columns.from_arguments([pair[half] for pair in halves])
        # the gradient half is already a private float32 copy ([Note: fused numerics])
        exact = [half_row.kahan] if isinstance(row.kahan, Tensor) else []
        exact.append(half_row.grad)
        half_ops = PackedOps(exact, splits, fma, half)
        update(half_ops, *half_row.arguments(), **scalars)
        if half == 0:
            written = half_ops.written
    for word, is_packed, (even, odd) in zip(words, is_word, halves):
        if not is_packed or not any(even is t for t in written) or even is even_row.grad:
            continue
        if even is even_row.kahan:  # summed unrounded: round it once now
            split = splits[torch.bfloat16]
            even, odd = round_to(even, split), round_to(odd, split)
        word.copy_(pack(even, odd))
