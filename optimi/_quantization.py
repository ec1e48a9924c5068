"""8-bit optimizer state: moments stored as 8-bit codes with one scale per block of each row.

[Note: 8-bit optimizer state]
With ``state_bits=8`` each moment of a parameter is held as two tensors: ``codes`` (uint8, shaped
like the parameter) and ``scales`` (float32, shaped ``(rows, blocks per row)``). A parameter of
shape ``(R, *rest)`` is read as ``R`` rows of ``C = prod(rest)`` elements; each row is cut into
blocks of :data:`BLOCK_SIZE` consecutive elements (the last block of a row may be shorter), and
a block stores ``scale = max |x| / 448`` and, per element, ``x / scale`` as a float8 e4m3 number
(1 sign, 4 exponent and 3 mantissa bits; 448 is its largest finite value) whose bits are the
code. Dequantizing is ``float(code) * scale``.

Why the blocks follow rows. FSDP2 shards a parameter by rows (``Shard(0)``), so a block never
straddles two shards: codes and scales are sharded exactly like the parameter (both are DTensors
with its placements), DCP saves and reshards them like any state, and a shard quantizes its rows
to the same bits the whole tensor would (tests/distributed: 2 ranks equal one process bit for bit).

Why float8 e4m3, and the square root for second moments. Measured on the Adam moments of the
small GPT (``scripts/bench_state_codes.py``, docs/state_bits.md): moments within a block span
several orders of magnitude, which a linear 8-bit code (``round(127 x / max)``) flushes to zero,
while a floating-point code keeps about 6% relative precision over 17 binades. Second moments
``v`` span twice the binades of the gradients they square; their square root, which is what
the update divides by, spans the gradients' own range. So a second moment is stored as
``sqrt(v)`` (kind ``"second"``) and squared back when read; first moments and other signed
states (kind ``"signed"``) are stored as they are. The float8 cast is one instruction per
element on every backend, unlike a lookup table.

The update itself never sees codes: each step dequantizes a parameter's moments into float32
temporaries (one parameter, or a bounded chunk of parameters, at a time), runs the optimizer's
unchanged update rule on them, and quantizes them back. Tensors with fewer than
:data:`MIN_QUANTIZED_NUMEL` elements or fewer than two dimensions (biases, norm weights: a
negligible share of the memory) keep their state in the parameter's dtype.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "BLOCK_SIZE",
    "CODE_MAX",
    "MIN_QUANTIZED_NUMEL",
    "STATE_BITS",
    "blocks_per_row",
    "check_state_bits",
    "dequantize",
    "is_quantized",
    "quantizable",
    "quantize_",
    "quantized_keys",
    "scale_key",
]

#: the values ``state_bits`` accepts: ``None`` (moments in the parameter's dtype) or 8
STATE_BITS = (None, 8)
#: elements per block of a row (the last block of a row may be shorter): one float32 scale per
#: 256 codes adds 1/64 byte per element (measured choice: docs/state_bits.md)
BLOCK_SIZE = 256
#: parameters with fewer elements keep unquantized state
MIN_QUANTIZED_NUMEL = 4096
#: the largest finite float8 e4m3 value: a block's largest magnitude is scaled to it
CODE_MAX = 448.0
#: how each kind of state is coded: signed values as they are, second moments by their square root
KINDS = ("signed", "second")

_FLOAT8 = torch.float8_e4m3fn


def check_state_bits(value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is ``None`` or 8."""
    if value is not None and (isinstance(value, bool) or value not in STATE_BITS):
        raise ValueError(f"Invalid state_bits: {value!r} (must be None, for the parameter's dtype, or 8)")


def quantizable(param: Tensor) -> bool:
    """Whether ``param``'s moments are stored in 8 bits under ``state_bits=8``.

    At least :data:`MIN_QUANTIZED_NUMEL` elements and two dimensions (a 1-d tensor has no rows that
    a shard could keep whole), floating point and contiguous.
    """
    return (
        param.dim() >= 2
        and param.numel() >= MIN_QUANTIZED_NUMEL
        and param.is_floating_point()
        and param.is_contiguous()
    )


def scale_key(key: str) -> str:
    """The state key of the scales of the quantized state ``key``."""
    return f"{key}_scales"


def blocks_per_row(shape: torch.Size | tuple[int, ...]) -> int:
    """Blocks in each row of a tensor of ``shape`` (rows: the first dimension)."""
    columns = math.prod(shape[1:])
    return -(-columns // BLOCK_SIZE)


def is_quantized(state: dict[str, Any], key: str) -> bool:
    """Whether ``state[key]`` holds codes (with scales under :func:`scale_key`)."""
    return scale_key(key) in state and isinstance(state.get(key), Tensor) and state[key].dtype == torch.uint8


def quantized_keys(state: dict[str, Any], kinds: dict[str, str]) -> list[str]:
    """The keys of ``kinds`` (an optimizer's quantizable states) that ``state`` holds as codes."""
    return [key for key in kinds if is_quantized(state, key)]


def _rows(tensor: Tensor, rows: int) -> Tensor:
    return tensor.reshape(rows, -1)


def _blockwise_max(magnitudes: Tensor) -> Tensor:
    """``(R, blocks)`` maxima of the ``(R, C)`` ``magnitudes`` over each row's blocks."""
    rows, columns = magnitudes.shape
    full = columns // BLOCK_SIZE
    parts = []
    if full:
        parts.append(magnitudes[:, : full * BLOCK_SIZE].reshape(rows, full, BLOCK_SIZE).amax(dim=-1))
    if columns % BLOCK_SIZE:
        parts.append(magnitudes[:, full * BLOCK_SIZE :].amax(dim=-1, keepdim=True))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _per_element(scales: Tensor, columns: int) -> Tensor:
    """``(R, blocks)`` block values broadcast to ``(R, C)`` elements."""
    return scales.repeat_interleave(BLOCK_SIZE, dim=1)[:, :columns]


def quantize_(codes: Tensor, scales: Tensor, value: Tensor, kind: str) -> None:
    """Store ``value`` (any float dtype, shaped like ``codes``) as ``codes`` and ``scales`` in place.

    The round trip ``dequantize(codes, scales, kind)`` is within ``2**-4`` of each element relative
    to itself (3 mantissa bits, round to nearest), for elements no smaller than ``2**-6 / 448`` of
    their block's largest; smaller ones keep an absolute error below ``2**-10 / 448`` of it
    (float8's subnormals), and a block of zeros stays zero. Kind ``"second"`` applies these
    bounds to ``sqrt(value)``.
    """
    rows = codes.shape[0]
    x = _rows(value, rows).float()
    if kind == "second":
        x = x.clamp_min(0).sqrt()
    block_max = _blockwise_max(x.abs())
    scales.copy_(block_max / CODE_MAX)
    # divide by the stored scale (not multiply by its reciprocal): dequantize multiplies by it
    divisor = _per_element(torch.where(scales > 0, scales, torch.ones_like(scales)), x.shape[1])
    scaled = (x / divisor).clamp_(-CODE_MAX, CODE_MAX)
    _rows(codes, rows).copy_(scaled.to(_FLOAT8).view(torch.uint8))


def dequantize(codes: Tensor, scales: Tensor, kind: str) -> Tensor:
    """The float32 values that ``codes`` and ``scales`` hold (a new tensor shaped like ``codes``)."""
    rows = codes.shape[0]
    x = _rows(codes, rows).view(_FLOAT8).float()
    x.mul_(_per_element(scales, x.shape[1]))
    if kind == "second":
        x.square_()
    return x.view(codes.shape)
