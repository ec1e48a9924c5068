"""8-bit optimizer state: moments stored as 8-bit codes with one scale per block of each row.

[Note: 8-bit optimizer state]
With ``state_bits=8`` each moment of a parameter is held as two tensors: ``codes`` (uint8, shaped
like the parameter) and ``scales`` (float32, shaped ``(rows, blocks per row)``). A parameter of
shape ``(R, *rest)`` is read as ``R`` rows of ``C = prod(rest)`` elements; each row is cut into
blocks of :data:`BLOCK_SIZE` consecutive elements (the last block of a row may be shorter). A block
stores its largest magnitude as its scale and, per element, the code of ``x / scale``, a number in
``[-1, 1]``, in a dynamic tree code (below). Dequantizing is ``value(code) * scale``.

Why the blocks follow rows. FSDP2 shards a parameter by rows (``Shard(0)``), so a block never
straddles two shards: codes and scales are sharded exactly like the parameter (both are DTensors
with its placements), DCP saves and reshards them like any state, and a shard quantizes its rows
to the same bits the whole tensor would (tests/distributed: 2 ranks equal one process bit for bit).

The code. The dynamic tree code of the 8-bit optimizers paper (Dettmers et al. 2022), as that
paper describes it: after a sign bit, the number ``E`` of leading zero bits gives the decade
``10**-E``, the next one bit ends that count, and the remaining ``n = 6 - E`` bits are a linear
fraction: the value is ``10**-E * (0.1 + 0.9 * j / 2**n)`` for ``j = 1 .. 2**n``. Values near the
block's largest get six bits of fraction, small ones fewer bits but a range down to ``1e-6`` of the
largest. Encoding is computed, not searched: the decade from ``log10``, ``j`` rounded to nearest in
it (``j = 0`` is the top of the next decade down), and decoding computes the value from the bits:
elementwise operations only, which a compiled kernel fuses and vectorizes.

Second moments (kind ``"second"``) are stored by their square root, in the unsigned variant of the
code (no sign bit: ``n = 7 - E``, a range down to ``1e-7``). The square root is what Adam divides
by, and it spans the gradients' range rather than twice it, so an element whose gradients are
``1e-6`` of its block's largest still has its own second moment; and a nonzero second moment is
never rounded to zero (it takes the smallest value instead): read back as zero, it would let one
step's gradient alone set the denominator, a step up to ``1 / sqrt(1 - beta2)`` times too large.

Measured on the small GPT (``scripts/bench_state_codes.py``, docs/state_bits.md): against the
AdamW moments of a float32 run, the Adam direction ``m / (sqrt(v) + eps)`` after a round trip is
off by 1.5% (relative L2) with this code (1.4% storing ``v`` itself, with a range that stops at
``3e-4`` of the largest gradient), 2.9% with float8 e4m3 and 720% with a linear code, which flushes
small moments to zero; and bf16 + Kahan AdamW with this code reached the held-out loss of bf16
moments (2.2954 vs 2.3127) where e4m3 did not (2.3282). Blocks of 256 keep the scales at 1/64 byte
per element: 32-element blocks cut the direction error only from 1.4% to 1.2%.

Each element's error is at most half a step of its decade, ``0.45 * 10**-E / 2**n`` times the
block's largest magnitude for ``x`` in decade ``E`` (in the last decade, where zero and ``10**-E``
are the only values, half of ``10**-E``): so at most ``0.71%`` (unsigned ``0.36%``) of the block's
largest for any element, and ``7.1%`` (``3.6%``) of the element itself down to a tenth of the
largest. For second moments these bounds hold for ``sqrt(v)``, except in the last decade, where a
nonzero one below half the smallest value takes that value (an error up to it). A block of zeros
stays zero.

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
    "MIN_QUANTIZED_NUMEL",
    "STATE_BITS",
    "blocks_per_row",
    "check_state_bits",
    "code_values",
    "decode",
    "dequantize",
    "encode",
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


def check_state_bits(value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is ``None`` or 8."""
    if value is not None and (type(value) is not int or value not in STATE_BITS):
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


def _magnitude_bits(kind: str) -> int:
    """Bits after the sign: 7 for the signed code (kind ``"signed"``: first moments and other
    signed states), all 8 for the unsigned one (kind ``"second"``: second moments)."""
    return 8 if kind == "second" else 7


def code_values(kind: str, device: torch.device | str = "cpu") -> Tensor:
    """The 256 values (float32) that the codes of ``kind`` stand for, indexed by code."""
    return _value_of_bits(torch.arange(256, device=device).to(torch.uint8), kind)


#: ``code_values`` per (kind, device): eager decoding is one lookup in them
_VALUE_TABLES: dict[tuple[str, torch.device], Tensor] = {}


def _decade_powers(decade: Tensor, bits: int, base: float) -> Tensor:
    """``base ** decade`` for the integer-valued float ``decade`` in ``[0, bits - 1]``, exactly."""
    power = torch.ones_like(decade)
    for k in range(1, bits):
        power = torch.where(decade == k, base**k, power)
    return power


def encode(normalized: Tensor, kind: str) -> Tensor:
    """The codes (uint8) of ``normalized`` (float32 in ``[-1, 1]``): each the nearest value of the code.

    Elementwise operations only; see [Note: 8-bit optimizer state] for the layout of the bits.
    The decade ``E`` (``|x|`` in ``(10**-(E+1), 10**-E]``) is found with ``log10`` in eager mode
    (fewer passes over memory) and by comparisons with the powers of ten in a compiled kernel
    (cheaper per element); both give the nearest value's code, so they differ at most where
    ``|x|`` is within float32 rounding of the midpoint between two values.
    """
    bits = _magnitude_bits(kind)
    last = float(bits - 1)  # the smallest decade
    magnitude = normalized.abs()
    if torch.compiler.is_compiling():
        decade = torch.zeros_like(magnitude)
        for k in range(1, bits):
            decade = decade + (magnitude <= 10.0**-k).to(magnitude.dtype)
        steps = _decade_powers(decade, bits, 0.5) * 2.0 ** (bits - 1)  # 2**n, n = bits - 1 - E
        in_decade = magnitude * _decade_powers(decade, bits, 10.0)
    else:
        decade = torch.floor(-torch.log10(magnitude)).clamp(0.0, last)  # 0 -> the smallest decade
        steps = torch.exp2((bits - 1) - decade)
        in_decade = magnitude * torch.pow(10.0, decade)
    j = torch.round((in_decade - 0.1) * steps / 0.9).clamp(max=steps)
    # j = 0 is the value 0.1 * 10**-E, the top of the next decade down; in the last decade the
    # only value is 10**-E, and below half of it the nearest value is zero. A second moment is
    # never rounded to zero unless it is zero: Adam divides by its square root, and a moment read
    # back as zero would let this step's gradient alone set the denominator (steps up to
    # 1 / sqrt(1 - beta2) times too large); the smallest value instead errs towards smaller steps
    smallest = decade == last
    zero = smallest & ((in_decade < 0.5) if bits == 7 else (magnitude == 0))
    down = (j < 1) & ~smallest
    j = torch.where(smallest, torch.ones_like(j), j)
    steps = torch.where(down, steps * 0.5, steps)
    j = torch.where(down, steps, j)
    code = steps + j - 1  # the ending one bit at 2**n, then j - 1 in the n fraction bits
    code = torch.where(zero, torch.zeros_like(code), code)
    if bits == 7:
        code = code + torch.where(normalized < 0, 128.0, 0.0)
    return code.to(torch.uint8)


def decode(codes: Tensor, kind: str) -> Tensor:
    """The values (float32) that ``codes`` stand for.

    Eagerly one lookup in the 256 values of :func:`code_values`; in a compiled kernel computed
    from the bits, which vectorizes where a gather from the table ran at half the speed. The table
    is that same computation applied to every code, so both give the same bits.
    """
    if torch.compiler.is_compiling():
        return _value_of_bits(codes, kind)
    table = _VALUE_TABLES.get((kind, codes.device))
    if table is None:
        table = _VALUE_TABLES[(kind, codes.device)] = code_values(kind, codes.device)
    return table[codes.long()]


def _value_of_bits(codes: Tensor, kind: str) -> Tensor:
    """The values of ``codes`` from their bits: sign, decade (leading zeros), fraction."""
    bits = _magnitude_bits(kind)
    code = codes.to(torch.int32)
    magnitude = code & ((1 << bits) - 1)
    decade = torch.zeros_like(magnitude)  # E: the leading zeros of the magnitude bits
    for k in range(1, bits):
        decade = decade + (magnitude < (1 << (bits - k))).to(torch.int32)
    steps = (torch.ones_like(magnitude) << ((bits - 1) - decade)).float()  # 2**n
    j = magnitude.float() - steps + 1
    value = _decade_powers(decade.float(), bits, 0.1) * (0.1 + 0.9 * j / steps)
    value = torch.where(magnitude == 0, 0.0, value)
    if bits == 7:
        value = torch.where(code >= 128, -value, value)
    return value


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

    Each block's scale is its largest magnitude; each element is coded as ``x / scale`` (a block
    of zeros divides by one and stays zero). A ``"second"`` moment is coded by its square root.
    The error bound is in [Note: 8-bit optimizer state].
    """
    rows = codes.shape[0]
    x = _rows(value, rows).float()
    if kind == "second":
        x = x.clamp_min(0.0).sqrt()
    scales.copy_(_blockwise_max(x.abs()))
    divisor = _per_element(torch.where(scales > 0, scales, torch.ones_like(scales)), x.shape[1])
    _rows(codes, rows).copy_(encode((x / divisor).clamp_(-1.0, 1.0), kind))


def dequantize(codes: Tensor, scales: Tensor, kind: str) -> Tensor:
    """The float32 values that ``codes`` and ``scales`` hold (a new tensor shaped like ``codes``)."""
    rows = codes.shape[0]
    x = decode(_rows(codes, rows), kind)
    x.mul_(_per_element(scales, x.shape[1]))
    if kind == "second":
        x.square_()
    return x.view(codes.shape)
