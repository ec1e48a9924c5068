"""``"stochastic"``/``"remainder"`` bf16 parameters stepped through a float32 master inside the kernel.

[Note: one-pass float32 masters]
The for-loop and foreach backends step a ``"stochastic"`` or ``"remainder"`` bf16 parameter
through a float32 master built eagerly ([Note: low-precision update modes] in
``optimi/_low_precision.py``): one pass to build it, the step on the float32 master, one pass to
round it (hashing each element's index) and write it back. A compiled kernel keeps that master in
registers instead. :func:`through_master` wraps an update rule so that, per element, the kernel

1. reads the parameter's bits (its column is the bf16 memory viewed as int16) and, in
   ``"remainder"`` mode, the int16 remainder, and builds the float32 master (``master_bits``);
2. runs the unchanged rule on that master: its writes to the parameter land in the float32
   temporary, and there is no Kahan buffer;
3. writes the parameter back, only if the rule wrote it: ``"remainder"`` splits the master into
   the bf16 parameter (round to nearest, ties away) and the remainder (``split_bits``);
   ``"stochastic"`` hashes the element's index (an ``arange`` in the kernel plus
   ``first_index + key``, a runtime number, so neither a new step nor a shard recompiles) and
   rounds with those bits (``hash_bits16``, ``stochastic_bf16_bits``).

The integer forms are those of the eager functions, from the same constants, so the parameter,
the remainder and the random bits are the eager ones bit for bit (given the same master;
``tests/test_fused_low_precision.py``). The rule's float32 arithmetic is the fused backend's
([Note: fused numerics] in ``ops.py``): the master agrees with the for-loop's to float32
rounding. A rule that never writes the parameter (StableAdamW's reduction, [Note: StableAdamW's
two passes]) stores nothing back, and the compiler drops the master's unused loads.

The wrapped rule is a configuration of its own (the mode is part of its key through the cached
wrapper). On CPU its rows run the packed kernel where they fit ([Note: packed bf16 columns]): the
parameter and the remainder are int32 words of two 16-bit patterns, each half read as the float32
whose upper half it is, and stored back, exactly, as such a float32. Inductor's C++ code does not
vectorize int16 columns, so the plain layout (an odd length or offset, or packing switched off
by a failed self-check) is a scalar loop; for the same reason a float32-master step never runs the
process-wide timing of packed against plain kernels, and keeps packing where that timing turned
it off for plain rows (``works_but_slower`` in ``_torch_internals.py``: 34.5 -> 7.15 ms per AdamW
step of 20 x 2^18 elements on a Sapphire Rapids, where plain rows run faster unpacked).
Measured (``scripts/bench_fused_masters.py``, AdamW, 20 x 2^18 bf16 elements, 1 thread, minimum
of 30 steps): remainder 39.4 -> 8.66 ms per step against the eager
master (Kahan: 9.37 ms), stochastic 74.5 -> 14.7 ms.

fp16 ``"stochastic"`` parameters keep the eager write-back: their rounding needs fp16's
neighbours (``nextafter``), not a bit split.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor

from optimi._fused.ops import FusedOps
from optimi._fused.packing import PackedOps
from optimi._low_precision import hash_bits16, master_bits, split_bits, stochastic_bf16_bits

__all__ = ["through_master"]


@functools.cache
def through_master(update: Callable[..., None], mode: str) -> Callable[..., None]:
    """``update`` stepping a bf16 parameter's float32 master in the kernel ([Note: one-pass float32 masters]).

    The wrapped rule takes ``(ops, param, grad, *states, written_with, kahan, **scalars)``, where
    ``written_with`` is the int16 remainder (``"remainder"``) or the hash offset ``first_index +
    key`` as an int32-valued number (``"stochastic"``), in one of two layouts:

    * packed (``ops`` is a ``PackedOps``, [Note: packed bf16 columns]): the parameter and the
      remainder are float32 halves of int32 words whose bits are the 16 stored bits ``<< 16``;
    * plain: the parameter is its bf16 memory viewed as int16, the remainder int16.

    Cached, so that a rule and mode always give the same function: the configuration's key.
    """
    if mode not in ("stochastic", "remainder"):
        raise ValueError(f"no in-kernel float32 master for low_precision={mode!r}")

    def rule(ops: FusedOps, param: Tensor, grad: Tensor, *rest: Any, **scalars: Any) -> None:
        *states, written_with, kahan = rest
        packed = isinstance(ops, PackedOps)
        # the parameter's bits << 16: the float32 it stands for, and the master's upper half
        upper = param.view(torch.int32) if packed else param.to(torch.int32) << 16
        if mode == "remainder":
            remainder = written_with.view(torch.int32) >> 16 if packed else written_with.to(torch.int32)
            master = master_bits(upper, remainder)
        else:
            master = upper.view(torch.float32)
        ops.keep_float32(master)
        stores = len(ops.written)
        update(ops, master, grad, *states, kahan, **scalars)
        if not any(t is master for t in ops.written[stores:]):
            return  # the rule left the parameter alone: store nothing back
        words = master.view(torch.int32)
        if mode == "remainder":
            param_bits, remainder = split_bits(words)
            _store_bits(ops, written_with, remainder, packed)
        else:
            # each element's index in the whole tensor plus the key, (i + key) mod 2**32 in int32;
            # a packed row holds elements 2j (even half) and 2j + 1 (odd half) in word j
            # (a row with 8-bit states is 2-D: [Note: 8-bit states in the fused kernel] in quantized.py)
            index = torch.arange(param.numel(), dtype=torch.int32, device=param.device).view(param.shape)
            if packed:
                index = index * 2 + cast(PackedOps, ops).half
            param_bits = stochastic_bf16_bits(words, hash_bits16(index + written_with.to(torch.int32)))
        _store_bits(ops, param, param_bits, packed)

    rule.__name__ = rule.__qualname__ = update.__name__
    rule.__doc__ = f"{update.__name__} through a float32 master, {mode} write-back."
    return rule


def _store_bits(ops: FusedOps, column: Tensor, bits: Tensor, packed: bool) -> None:
    """Store 16-bit patterns ``bits`` (int32 in int16's range) into a column, exactly.

    A packed half receives them as the upper half of a float32 (``pack`` keeps exactly that half)
    and is marked written; a plain column is int16. No float conversion touches them, so a NaN's
    bits survive.
    """
    if packed:
        column.copy_((bits << 16).view(torch.float32))
        ops.written.append(column)
    else:
        column.copy_(bits.to(torch.int16))
