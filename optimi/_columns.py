"""``Columns``: the tensors an update rule reads and writes, by role.

An update rule is called as ``update(ops, param, grad, *states, kahan_comp, **scalars)``. The
backends do more than pass these on: the fused backend hands the rule a private copy of the
gradient and sums the Kahan buffer in float32 ([Note: fused numerics] in ``optimi/_fused/ops.py``),
and the foreach backend buckets parameters by whether they have a Kahan buffer. They find those
tensors by role, never by position, so an optimizer whose rule has other states cannot make a
backend mistake a state for the gradient or the Kahan buffer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

__all__ = ["Columns"]


class Columns(NamedTuple):
    """The tensors of one update, by role: lists over a param group, or one tensor each (a row)."""

    #: the parameters, updated in place
    param: Any
    #: their gradients; the rule may use them as scratch space ([Note: the gradient is a scratch buffer])
    grad: Any
    #: the rule's other columns, in the order of its arguments: optimizer state, and per-tensor
    #: numbers (a float per tensor) or outputs (a 0-d sum per tensor) some rules take
    states: tuple[Any, ...]
    #: the Kahan compensation buffers (``None`` for a parameter without one; a bucket's column is
    #: ``None`` where none has one)
    kahan: Any

    def arguments(self) -> tuple[Any, ...]:
        """The rule's positional tensor arguments: ``param, grad, *states, kahan``."""
        return (self.param, self.grad, *self.states, self.kahan)

    @classmethod
    def from_arguments(cls, arguments: Sequence[Any]) -> Columns:
        """The inverse of :meth:`arguments`."""
        return cls(arguments[0], arguments[1], tuple(arguments[2:-1]), arguments[-1])

    def select(self, indices: Sequence[int]) -> Columns:
        """The columns of the parameters at ``indices``, as lists."""
        return Columns(
            [self.param[i] for i in indices],
            [self.grad[i] for i in indices],
            tuple([s[i] for i in indices] for s in self.states),
            [self.kahan[i] for i in indices],
        )

    def buckets(self) -> list[Columns]:
        """Split into foreach buckets sharing device, dtype and Kahan on/off.

        A bucket's ``kahan`` is ``None`` when none of its parameters has a buffer.
        """
        groups: dict[tuple, list[int]] = {}
        for i, param in enumerate(self.param):
            groups.setdefault((param.device, param.dtype, self.kahan[i] is not None), []).append(i)
        result = []
        for (_, _, has_kahan), indices in groups.items():
            bucket = self.select(indices)
            result.append(bucket if has_kahan else bucket._replace(kahan=None))
        return result
