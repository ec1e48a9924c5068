"""The global gradient norm, clipping by it, and the guard that keeps non-finite gradients out.

[Note: gradient clipping and the non-finite guard]
With ``max_grad_norm`` set, an optimizer measures the global L2 norm of the gradients it is about
to apply, ``||g|| = sqrt(sum_i ||g_i||^2)`` over all of its parameters, and scales every gradient
by ``min(1, max_grad_norm / (||g|| + 1e-6))``: exactly what ``torch.nn.utils.clip_grad_norm_``
followed by ``step()`` does. The squared norms are summed in float32 whatever the gradients' dtype.
Across ranks the norm is that of the whole model: FSDP2's gradient shards add their partial sums
with one all-reduce (``optimi/distributed/_dtensor.py``); DDP's gradients are already averaged and
identical on every rank, so no collective is needed.

[Note: clipping under gradient release]
Under gradient release each parameter steps the moment its gradient is ready, before the global
norm exists. Each release step therefore scales its gradient by the coefficient of the *previous*
backward's global norm (:class:`ReleaseClipping`): the norm is accumulated as the gradients pass
by (their squares summed, at no extra pass over memory) and completed when the backward ends (an
autograd end-of-backward callback; FSDP2 adds the shards' partial sums there with one scalar
all-reduce) or, for DDP, whose release steps run in the all-reduce's callback thread, when the
next backward begins or ``grad_norm`` is read. The first backward is not clipped (there is no
previous norm yet). With optimizer accumulation each backward's gradient is clipped by the
previous backward's norm, and ``grad_norm`` is the norm of the last backward's gradient, not of
the accumulated step. A parameter whose gradient is not finite is skipped (its weights and state
untouched, counted in ``skipped_steps``; under FSDP2 the check is per shard), the others step;
its squares are left out of the coefficient, while ``grad_norm`` reports the backward as non-finite.

``optimi.release_backward(loss, optimizer)`` clips exactly instead, as LOMO does: a first backward
(``retain_graph=True``) only measures, each gradient freed as soon as its squares are summed, so
the peak memory stays that of release; then, with the exact coefficient of this backward's norm,
a second backward steps. It costs a second backward pass (under FSDP2 also a second
reduce-scatter; under DDP, whose reducer all-reduces only the first backward after a forward, the
second pass all-reduces each parameter's gradient itself, unbucketed). A non-finite norm skips
the whole step (no second pass).

A gradient whose norm is not finite (an inf or NaN anywhere) would write NaN into the weights and
the optimizer state, for good. ``step()`` therefore skips the whole step when the global norm is
not finite: no weight, state or step counter changes, ``optimizer.skipped_steps`` grows by one and
a warning says so (at most one per :data:`WARNING_INTERVAL` seconds). That decision needs the norm
on the host: one device-to-host synchronization per step, the price of the guard.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "CLIP_EPS",
    "ReleaseClipping",
    "WARNING_INTERVAL",
    "check_max_grad_norm",
    "clip_coefficient",
    "scale_",
    "sum_of_squares",
    "warn_skipped",
]

#: added to the norm before dividing, as ``torch.nn.utils.clip_grad_norm_`` adds it
CLIP_EPS = 1e-6
#: seconds between two warnings about skipped steps (each skip is counted regardless)
WARNING_INTERVAL = 60.0


def check_max_grad_norm(max_grad_norm: float | None) -> None:
    """Raise ``ValueError`` unless ``max_grad_norm`` is ``None`` or a number in (0, inf]."""
    if max_grad_norm is None:
        return
    if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)):
        raise ValueError(f"Invalid max_grad_norm: {max_grad_norm!r} (must be a number in (0, inf], or None)")
    if math.isnan(max_grad_norm) or max_grad_norm <= 0:
        raise ValueError(
            f"Invalid max_grad_norm: {max_grad_norm!r} (must be in (0, inf]; inf measures the norm and "
            "guards against non-finite gradients without clipping; None switches both off)"
        )


def sum_of_squares(grads: Sequence[Tensor]) -> Tensor:
    """``sum_i ||g_i||^2`` of plain tensors, as a float32 0-d tensor on the first gradient's device.

    Each tensor's norm is computed in float32 (``torch._foreach_norm`` per device and dtype: one
    kernel per group of tensors rather than one per tensor).
    """
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    device = grads[0].device
    by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for grad in grads:
        by_kind.setdefault((grad.device, grad.dtype), []).append(grad)
    total = torch.zeros((), dtype=torch.float32, device=device)
    for tensors in by_kind.values():
        norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
        total += torch.stack(norms).square().sum().to(device)
    return total


def clip_coefficient(total_norm: Tensor, max_grad_norm: float) -> Tensor:
    """``min(1, max_grad_norm / (total_norm + 1e-6))``, a 0-d tensor (no host synchronization)."""
    return (max_grad_norm / (total_norm + CLIP_EPS)).clamp(max=1.0)


def scale_(tensors: Sequence[Tensor], coefficient: Tensor) -> None:
    """Multiply plain ``tensors`` in place by the 0-d ``coefficient`` (one foreach call per device)."""
    by_device: dict[torch.device, list[Tensor]] = {}
    for tensor in tensors:
        by_device.setdefault(tensor.device, []).append(tensor)
    for device, group in by_device.items():
        torch._foreach_mul_(group, coefficient.to(device))


class ReleaseClipping:
    """The running norm of one backward under gradient release ([Note: clipping under gradient release]).

    ``partial_sums`` maps the process groups a gradient is sharded over (``()`` for a whole tensor)
    to the sum of squares of the finite gradients seen so far in this backward.
    """

    def __init__(self) -> None:
        self.partial_sums: dict[tuple[Any, ...], Tensor] = {}
        #: parameters (by id) seen in this backward: one seen again means a new backward began
        self.seen: set[int] = set()
        self.non_finite = False
        #: whether the end of this backward will complete the norm (an autograd callback is queued)
        self.finishes_itself = False
        #: the previous backward's clip coefficient (None: nothing to clip by yet)
        self.coefficient: Tensor | None = None
        #: release_backward's first pass: gradients are measured and freed, nothing steps
        self.measuring = False

    def observe(self, key: tuple[Any, ...], local_grad: Tensor) -> bool:
        """Add ``local_grad``'s squares to this backward's norm; False where they are not finite."""
        squares = sum_of_squares([local_grad])
        if not bool(torch.isfinite(squares)):  # one host synchronization per parameter
            self.non_finite = True
            # the key still joins this backward's reduction: every rank must reduce the same keys
            self.partial_sums.setdefault(key, torch.zeros((), dtype=torch.float32, device=squares.device))
            return False
        previous = self.partial_sums.get(key)
        self.partial_sums[key] = squares if previous is None else previous + squares.to(previous.device)
        return True

    def reset(self) -> None:
        self.partial_sums = {}
        self.seen = set()
        self.non_finite = False
        self.finishes_itself = False


class _SkipWarnings:
    """Rate-limits the skipped-step warning: one per :data:`WARNING_INTERVAL` seconds per process."""

    last: float | None = None


def warn_skipped(what: str, total: int) -> None:
    """Warn (rate-limited) that ``what`` was skipped because of a non-finite gradient."""
    now = time.monotonic()
    if _SkipWarnings.last is not None and now - _SkipWarnings.last < WARNING_INTERVAL:
        return
    _SkipWarnings.last = now
    warnings.warn(
        f"optimi: {what} skipped: the gradient norm is not finite (inf or NaN); weights and optimizer state "
        f"are unchanged ({total} skipped so far, optimizer.skipped_steps; this warning repeats at most once "
        f"per {WARNING_INTERVAL:.0f} s)",
        RuntimeWarning,
        stacklevel=4,
    )
