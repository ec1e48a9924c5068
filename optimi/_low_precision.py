"""Writing an fp32 update into a bf16/fp16 parameter: stochastic rounding and bf16 + int16 masters.

[Note: low-precision update modes]
A bf16 parameter cannot absorb an update below half its last place. ``low_precision`` chooses how
optimi keeps such updates (per param group; fp32 parameters ignore it):

* ``"kahan"`` (the default for bf16/fp16): a compensation buffer in the parameter's dtype holds
  what rounding dropped ([Note: Kahan summation] in ``_update_blocks.py``);
* ``"nearest"``: plain round to nearest, small updates are lost (``kahan_sum=False``);
* ``"stochastic"``: the update is applied to the parameter's value in float32 and the result is
  rounded up or down at random, with the probability that makes the rounding unbiased: no extra
  memory, and on average no update is lost;
* ``"remainder"`` (bf16 only): the parameter is the float32 master rounded to nearest and a signed
  int16 state holds the 16 bits that rounding dropped, so the optimizer steps an exact float32
  master at Kahan's memory cost.

For ``"stochastic"`` and ``"remainder"`` the for-loop and foreach backends build the parameter's
float32 master (one parameter at a time, so the temporary never exceeds one parameter's float32
size), run the unchanged update rule on it, and write it back with the in-place functions below.
The fused backend does all three inside its compiled kernel, in one pass over memory, with the
out-of-place forms below (``master_bits``, ``split_bits``, ``hash_bits16``, ``stochastic_bf16_bits``):
the kernel reads the bf16 parameter (and int16 remainder), keeps the master in registers, and
writes the parameter (and remainder) once ([Note: one-pass float32 masters] in
``optimi/_fused/masters.py``): AdamW over 20 x 2^18 bf16 elements steps in 8.7 ms instead of 39 ms
(remainder) and 15 ms instead of 75 ms (stochastic), measured on one CPU thread. Each in-place
function and its out-of-place form compute the same bits from the same constants
(``tests/test_fused_low_precision.py``).

The bf16 + int16 split. A float32 ``M`` has bits ``H << 16 | L`` (``H``: the upper 16 bits, which
are the bf16 value ``M`` truncates to; ``L``: the lower 16). The parameter stores
``P = H + (L >= 0x8000)``, ``M`` rounded to nearest (ties away from zero, so that the split can
be undone: with ties to even, ``L == 0x8000`` would leave it ambiguous whether ``P`` was rounded
up), and the remainder stores ``L`` read as a signed int16, ``r = L - 0x10000 * (L >= 0x8000)``.
Then ``bits(M) = (P << 16) + r`` in int32 arithmetic, for negative values too (the low bits of a
float are magnitude bits whatever its sign), so :func:`master_from_remainder` rebuilds ``M`` exactly.

Stochastic rounding to bf16 adds 16 random bits to ``L`` and truncates: ``M`` becomes ``H + 1``
with probability ``L / 2**16``, which is exactly its distance from ``H`` in units of ``H``'s last
place, so the expected result is ``M``. The random bits come from a counter-based hash of (seed,
step, the element's index in the whole tensor), never from torch's random number generator:
replicas and resumed runs draw the same bits, and so does every backend.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "FLOAT32_MASTERS",
    "LOW_PRECISION_MODES",
    "MASTER_MODES",
    "MasterRow",
    "MasterRows",
    "hash_bits16",
    "hash_offset",
    "master_bits",
    "master_from_remainder",
    "random_bits16",
    "split_bits",
    "split_master_",
    "stochastic_bf16_bits",
    "stochastic_round_",
    "stream_key",
    "eager_master",
    "write_master_",
]

#: the values of ``low_precision``
LOW_PRECISION_MODES = ("kahan", "stochastic", "remainder", "nearest")
#: the modes that step a float32 master built for the step
MASTER_MODES = ("stochastic", "remainder")

_MASK32 = 0xFFFFFFFF
#: elements per chunk of the hash: its temporaries stay small whatever the tensor's size
_CHUNK = 1 << 18
#: the hash's xor-shift-multiply rounds: (right shift, the mask that makes an int32 shift logical,
#: multiplier); a last xor-shift by :data:`_FINAL_SHIFT` follows
_HASH_ROUNDS = ((16, 0xFFFF, 0x7FEB352D), (15, 0x1FFFF, 0x846CA68B))
_FINAL_SHIFT, _FINAL_MASK = 16, 0xFFFF
#: float32 bits: all but the sign, and those of +inf (a larger magnitude is a NaN)
_MAGNITUDE, _FLOAT32_INF = 0x7FFFFFFF, 0x7F800000
#: bf16's quiet-NaN bit, which ``.to(torch.bfloat16)`` sets on every NaN it rounds
_BF16_QUIET_BIT = 0x40


def _mix32(x: int) -> int:
    """A 32-bit integer hash (xor-shift-multiply rounds) of a Python int in [0, 2**32)."""
    for shift, _, multiplier in _HASH_ROUNDS:
        x ^= x >> shift
        x = (x * multiplier) & _MASK32
    return x ^ (x >> _FINAL_SHIFT)


def _as_int32(value: int) -> int:
    """``value`` mod 2**32 as a signed 32-bit integer (the same bits)."""
    value &= _MASK32
    return value - (1 << 32) if value >= 1 << 31 else value


def _mix32_(x: Tensor, scratch: Tensor) -> Tensor:
    """:func:`_mix32` in place on an int32 tensor holding the same bits (``scratch``: same shape, overwritten).

    int32 multiplication wraps modulo 2**32 and xor acts on bits, so the results are bit for bit
    those of the unsigned hash; the right shifts are made logical with a mask (torch shifts int32
    arithmetically). ``tests/test_low_precision.py`` checks it against :func:`_mix32`.
    """
    for shift, mask, multiplier in _HASH_ROUNDS:
        x.bitwise_xor_(torch.bitwise_right_shift(x, shift, out=scratch).bitwise_and_(mask))
        x.mul_(_as_int32(multiplier))
    return x.bitwise_xor_(torch.bitwise_right_shift(x, _FINAL_SHIFT, out=scratch).bitwise_and_(_FINAL_MASK))


def hash_bits16(counter: Tensor) -> Tensor:
    """The 16 random bits (int32 in [0, 2**16)) of each int32 ``counter``: :func:`_mix32`'s upper half.

    The out-of-place form of :func:`_mix32_` for compiled code, where the temporaries live in
    registers; ``counter`` holds ``(i + key) mod 2**32`` as an int32 (the bits of the unsigned).
    """
    for shift, mask, multiplier in _HASH_ROUNDS:
        counter = counter ^ ((counter >> shift) & mask)
        counter = counter * _as_int32(multiplier)  # int32 multiplication wraps modulo 2**32
    counter = counter ^ ((counter >> _FINAL_SHIFT) & _FINAL_MASK)
    return (counter >> 16) & 0xFFFF


def stream_key(seed: int, step: int) -> int:
    """The hash key of one (seed, step): every element of the step is hashed with it."""
    return _mix32((_mix32(seed & _MASK32) + step * 0x9E3779B9) & _MASK32)


def hash_offset(key: int, first_index: int) -> int:
    """What the hash adds to an element's index within a shard: ``first_index + key``, as an int32."""
    return _as_int32(first_index + key)


class _Bits16:
    """16 random bits per element (int32 in [0, 2**16)) for chunks of a tensor, under one key.

    Element ``i`` of the whole tensor gets the upper 16 bits of ``_mix32((i + key) mod 2**32)``.
    The buffers are allocated once per call and reused for every chunk.
    """

    def __init__(self, key: int, chunk: int, device: torch.device):
        self.key = key
        self.counting = torch.arange(chunk, dtype=torch.int32, device=device)
        self.bits = torch.empty(chunk, dtype=torch.int32, device=device)
        self.scratch = torch.empty(chunk, dtype=torch.int32, device=device)

    def __call__(self, first_index: int, count: int) -> Tensor:
        bits, scratch = self.bits[:count], self.scratch[:count]
        torch.add(self.counting[:count], hash_offset(self.key, first_index), out=bits)
        _mix32_(bits, scratch)
        return bits.bitwise_right_shift_(16).bitwise_and_(0xFFFF)


def random_bits16(key: int, first_index: int, count: int, device: torch.device) -> Tensor:
    """16 random bits (int32 in [0, 2**16)) for elements ``first_index ..`` of a tensor, under ``key``."""
    return _Bits16(key, count, device)(first_index, count).clone()


def stochastic_round_(param: Tensor, master: Tensor, *, key: int, first_index: int = 0) -> None:
    """``param = master`` rounded stochastically to ``param``'s dtype (unbiased); ``master`` is overwritten.

    ``first_index`` is the index of ``param``'s first element in the whole tensor (non-zero for a
    shard), so that a shard draws the bits the whole tensor would.
    """
    flat_master = master.reshape(-1)
    flat_param = param.view(-1)
    total = flat_master.numel()
    random_bits = _Bits16(key, min(_CHUNK, max(total, 1)), flat_master.device)
    for start in range(0, total, _CHUNK):
        chunk = flat_master[start : start + _CHUNK]
        bits = random_bits(first_index + start, chunk.numel())
        if param.dtype == torch.bfloat16:
            words = chunk.view(torch.int32)
            # inf and NaN get no random bits (a carry would change their class), and a NaN whose
            # payload lies only in the dropped bits gets bf16's quiet bit, as .to(bf16) does
            magnitude = torch.bitwise_and(words, _MAGNITUDE, out=random_bits.scratch[: chunk.numel()])
            bits.masked_fill_(magnitude.ge(_FLOAT32_INF), 0)
            nan = magnitude.gt(_FLOAT32_INF)
            words.add_(bits).bitwise_right_shift_(16).bitwise_or_(nan.to(torch.int32).mul_(_BF16_QUIET_BIT))
            flat_param[start : start + _CHUNK].view(torch.int16).copy_(words)
        else:
            flat_param[start : start + _CHUNK].copy_(_stochastic_fp16(chunk, bits))


def stochastic_bf16_bits(words: Tensor, bits16: Tensor) -> Tensor:
    """The bf16 bits (int32) of float32 bits ``words`` rounded stochastically with ``bits16``.

    The out-of-place form of :func:`stochastic_round_`'s bf16 branch, for compiled code: inf and
    NaN get no random bits, and a NaN gets bf16's quiet bit.
    """
    magnitude = words & _MAGNITUDE
    bits16 = torch.where(magnitude >= _FLOAT32_INF, 0, bits16)
    quiet = (magnitude > _FLOAT32_INF).to(torch.int32) * _BF16_QUIET_BIT
    return ((words + bits16) >> 16) | quiet


def _stochastic_fp16(value: Tensor, bits: Tensor) -> Tensor:
    """float32 ``value`` rounded stochastically to fp16: to one of its two fp16 neighbours, unbiased."""
    nearest = value.to(torch.float16)
    error = value - nearest.float()
    toward = torch.where(error > 0, torch.full_like(nearest, float("inf")), torch.full_like(nearest, float("-inf")))
    other = torch.nextafter(nearest, toward)
    gap = (other.float() - nearest.float()).abs()
    probability = torch.where(gap > 0, error.abs() / gap, torch.zeros_like(gap))
    uniform = (bits.float() + 0.5) / 65536.0
    return torch.where((uniform < probability) & value.isfinite(), other, nearest)


class MasterRow(NamedTuple):
    """How one bf16 parameter is written back from its float32 master."""

    #: its int16 remainder (``"remainder"`` mode), else ``None``
    remainder: Tensor | None
    #: the hash key of this step (``"stochastic"`` mode: :func:`stream_key`), else 0
    key: int
    #: the index of the parameter's first element in the whole tensor (a shard's offset), else 0
    first_index: int


class MasterRows(NamedTuple):
    """The parameters of one ``_step_group`` call that are stepped through float32 masters."""

    #: ``"stochastic"`` or ``"remainder"``
    mode: str
    #: ``id(param)`` -> its row: the update functions see the parameters, in their own order
    rows: dict[int, MasterRow]


#: set by the optimizer while the fused backend steps ``"stochastic"``/``"remainder"`` bf16
#: parameters: ``run_update`` hands those rows to the compiled kernel, which builds, steps and
#: writes back each master itself ([Note: one-pass float32 masters] in ``optimi/_fused/masters.py``)
FLOAT32_MASTERS: ContextVar[MasterRows | None] = ContextVar("optimi_float32_masters", default=None)


def master_from_remainder(param: Tensor, remainder: Tensor) -> Tensor:
    """The exact float32 master of a bf16 ``param`` and its int16 ``remainder`` (a new tensor).

    ``bits = (P << 16) + r`` in int32 arithmetic, built in the int32 tensor that becomes the master.
    """
    words = param.view(torch.int16).to(torch.int32).bitwise_left_shift_(16)
    return words.add_(remainder).view(torch.float32)


def master_bits(upper: Tensor, remainder: Tensor) -> Tensor:
    """The float32 master from ``upper = P << 16`` and the remainder ``r``, both int32.

    :func:`master_from_remainder` out of place, for compiled code: ``bits = (P << 16) + r``.
    """
    return (upper + remainder).view(torch.float32)


def split_bits(words: Tensor) -> tuple[Tensor, Tensor]:
    """``(P, r)`` of float32 bits ``words`` (int32 in, both int32 out): :func:`split_master_` out of place.

    ``r`` is the low half read as a signed 16-bit number (``L - 0x10000 * (L >= 0x8000)``, computed
    in int32 so that no conversion has to wrap) and ``P = (bits - r) >> 16``, both within int16's
    range; int32 subtraction wraps as in :func:`split_master_`.
    """
    remainder = ((words & 0xFFFF) ^ 0x8000) - 0x8000
    return (words - remainder) >> 16, remainder


def split_master_(param: Tensor, remainder: Tensor, master: Tensor) -> None:
    """Store float32 ``master`` as bf16 ``param`` (rounded to nearest, ties away) and int16 ``remainder``.

    The inverse of :func:`master_from_remainder`, in place on ``master``'s bits (overwritten): ``r``
    is the low half read as int16, and ``bits - r`` is exactly ``P << 16``.
    """
    words = master.view(torch.int32)
    remainder.copy_(words)  # the low 16 bits, as a signed int16
    words.sub_(remainder)  # (P << 16): exact
    words.bitwise_right_shift_(16)
    param.view(torch.int16).copy_(words)


def eager_master(param: Tensor, row: MasterRow) -> Tensor:
    """The float32 master of a bf16/fp16 ``param`` as a new tensor, built eagerly (a pass over memory)."""
    return param.float() if row.remainder is None else master_from_remainder(param, row.remainder)


def write_master_(param: Tensor, master: Tensor, row: MasterRow) -> None:
    """Write ``master`` back into ``param`` (and its remainder) eagerly; ``master`` is overwritten."""
    if row.remainder is not None:
        split_master_(param, row.remainder, master)
    else:
        stochastic_round_(param, master, key=row.key, first_index=row.first_index)
