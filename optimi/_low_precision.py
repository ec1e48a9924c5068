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

For ``"stochastic"`` and ``"remainder"`` the optimizer builds the parameter's float32 master (one
parameter at a time, so the temporary never exceeds one parameter's float32 size), runs the
unchanged update rule on it, and writes it back with the functions below.

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

import torch
from torch import Tensor

__all__ = [
    "LOW_PRECISION_MODES",
    "MASTER_MODES",
    "master_from_remainder",
    "random_bits16",
    "split_master_",
    "stochastic_round_",
]

#: the values of ``low_precision``
LOW_PRECISION_MODES = ("kahan", "stochastic", "remainder", "nearest")
#: the modes that step a float32 master built for the step
MASTER_MODES = ("stochastic", "remainder")

_MASK32 = 0xFFFFFFFF
#: elements per chunk of the hash: its int64 temporaries stay small whatever the tensor's size
_CHUNK = 1 << 16


def _mix32(x: int | Tensor) -> int | Tensor:
    """A 32-bit integer hash (xor-shift-multiply rounds), on Python ints or int64 tensors."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def stream_key(seed: int, step: int) -> int:
    """The hash key of one (seed, step): every element of the step is hashed with it."""
    return _mix32((_mix32(seed & _MASK32) + step * 0x9E3779B9) & _MASK32)


def random_bits16(key: int, first_index: int, count: int, device: torch.device) -> Tensor:
    """16 random bits (int32 in [0, 2**16)) for elements ``first_index ..`` of a tensor, under ``key``."""
    index = torch.arange(first_index, first_index + count, dtype=torch.int64, device=device)
    return (_mix32((index + key) & _MASK32) >> 16).to(torch.int32)


def stochastic_round_(param: Tensor, master: Tensor, *, key: int, first_index: int = 0) -> None:
    """``param = master`` rounded stochastically to ``param``'s dtype (unbiased); ``master`` is overwritten.

    ``first_index`` is the index of ``param``'s first element in the whole tensor (non-zero for a
    shard), so that a shard draws the bits the whole tensor would.
    """
    flat_master = master.reshape(-1)
    flat_param = param.view(-1)
    for start in range(0, flat_master.numel(), _CHUNK):
        chunk = flat_master[start : start + _CHUNK]
        bits = random_bits16(key, first_index + start, chunk.numel(), chunk.device)
        if param.dtype == torch.bfloat16:
            words = chunk.view(torch.int32)
            finite = chunk.isfinite()
            words.add_(bits * finite)  # inf and NaN keep their bits
            words.bitwise_right_shift_(16)
            flat_param[start : start + _CHUNK].view(torch.int16).copy_(words)
        else:
            flat_param[start : start + _CHUNK].copy_(_stochastic_fp16(chunk, bits))


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


def master_from_remainder(param: Tensor, remainder: Tensor) -> Tensor:
    """The exact float32 master of a bf16 ``param`` and its int16 ``remainder`` (a new tensor)."""
    words = param.view(torch.int16).to(torch.int32).bitwise_left_shift_(16)
    return words.add_(remainder).view(torch.float32)


def split_master_(param: Tensor, remainder: Tensor, master: Tensor) -> None:
    """Store float32 ``master`` as bf16 ``param`` (rounded to nearest) and int16 ``remainder``.

    ``master`` is overwritten.
    """
    words = master.view(torch.int32)
    remainder.copy_(words)  # the low 16 bits, as a signed int16
    words.sub_(remainder)  # (P << 16): exact
    words.bitwise_right_shift_(16)
    param.view(torch.int16).copy_(words)
