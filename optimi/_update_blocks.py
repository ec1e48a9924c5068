"""The update rules' shared building blocks: Kahan summation, weight decay, Adam's moments.

Every optimizer's rule (``_<name>_update`` in its module) is composed of :class:`~optimi._ops.UpdateOps`
primitives and of the blocks below, so that a piece of math shared by several optimizers exists
once ([Note: one update rule, three backends] in ``_ops.py``).

[Note: Kahan summation]
A bf16 parameter cannot absorb an update much smaller than its unit in the last place: the add
rounds back to the old value and the update is lost. Kahan summation keeps a compensation buffer
``c`` (same dtype as the parameter) holding what previous adds lost. The update ``u`` is added
into ``c`` first, then ``p_new = p + c`` is rounded into the parameter and ``c`` keeps the part
that rounding dropped: ``c = c - (p_new - p)``. ``p_new - p`` is exact in floating point because
the two values are close, so over many steps no update is lost.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from optimi._ops import UpdateOps

__all__ = [
    "adam_denominator_",
    "adam_moments_",
    "bias_correction",
    "decoupled_decay_",
    "finish_update_",
    "kahan_apply_",
    "second_moment_",
    "update_target",
    "weight_decay_terms",
]


def update_target(param: Any, kahan_comp: Any) -> Any:
    """Where the update is added: the Kahan buffer when compensating, else the parameter itself.

    Under Kahan summation every contribution to ``p`` (the optimizer's step and decoupled weight
    decay) is first summed into the compensation buffer and applied by :func:`finish_update_`.
    """
    return param if kahan_comp is None else kahan_comp


def decoupled_decay_(ops: UpdateOps, param: Any, kahan_comp: Any, factor: float | Tensor) -> None:
    """Decoupled weight decay ``p <- p * (1 - factor)``, compensated under Kahan summation."""
    if kahan_comp is None:
        ops.mul_(param, 1 - factor)
    else:
        # the decay of a bf16 weight is mostly below its ulp: sum it with the update instead
        ops.add_(kahan_comp, param, alpha=-factor)


def kahan_apply_(ops: UpdateOps, param: Any, kahan_comp: Any, scratch: Any) -> None:
    """``p <- p + c`` and ``c <- c - (p_new - p_old)`` (see [Note: Kahan summation]).

    ``scratch`` is a dead buffer shaped like ``param`` (the gradient), overwritten here.
    """
    ops.copy_(scratch, param)
    ops.add_(param, kahan_comp)
    ops.sub_(scratch, param)  # p_old - p_new, exact because the two are close
    ops.add_(kahan_comp, scratch)


def finish_update_(ops: UpdateOps, param: Any, kahan_comp: Any, scratch: Any) -> None:
    """Complete an update summed with :func:`update_target`: a no-op without Kahan."""
    if kahan_comp is not None:
        kahan_apply_(ops, param, kahan_comp, scratch)


def bias_correction(beta: float, step: int) -> float:
    """Adam's debias denominator ``1 - beta**step``."""
    return 1 - beta**step


def weight_decay_terms(
    *,
    lr: float,
    weight_decay: float,
    decouple_wd: bool,
    decouple_lr: bool,
    max_lr: float | None,
) -> tuple[float | None, float | None]:
    """Split weight decay into its L2 and decoupled parts for one step.

    Returns ``(l2, decay)``: ``l2`` is added to the gradient as ``g += l2 * p``; ``decay`` scales
    the parameter as ``p *= 1 - decay``. At most one of them is not ``None``.

    * L2 (default): ``l2 = weight_decay``.
    * decoupled (``decouple_wd``): ``decay = lr * weight_decay``.
    * fully decoupled (``decouple_lr``): ``decay = (lr / max_lr) * weight_decay``, so decay no
      longer scales with the peak learning rate, only with the schedule.
    """
    if weight_decay == 0:
        return None, None
    if decouple_lr:
        if not max_lr:
            raise ValueError(f"max_lr must be > 0 for fully decoupled weight decay, got {max_lr}")
        return None, lr / max_lr * weight_decay
    if decouple_wd:
        return None, lr * weight_decay
    return weight_decay, None


def second_moment_(ops: UpdateOps, exp_avg_sq: Any, grad: Any, beta2: float | Tensor) -> None:
    """``v <- beta2 v + (1 - beta2) g^2``: the squared-gradient average of Adam (Adan's ``n``)."""
    ops.mul_(exp_avg_sq, beta2)
    ops.addcmul_(exp_avg_sq, grad, grad, value=1 - beta2)


def adam_moments_(
    ops: UpdateOps, grad: Any, exp_avg: Any, exp_avg_sq: Any, beta1: float | Tensor, beta2: float | Tensor
) -> None:
    """Fold the gradient into Adam's two moments: ``m <- m + (1 - beta1)(g - m)`` and :func:`second_moment_`."""
    ops.lerp_(exp_avg, grad, 1 - beta1)
    second_moment_(ops, exp_avg_sq, grad, beta2)


def adam_denominator_(
    ops: UpdateOps,
    grad: Any,
    exp_avg_sq: Any,
    eps: float | Tensor,
    inverse_bias_correction2_sqrt: float | Tensor | None = None,
) -> Any:
    """``sqrt(v) / sqrt(1 - beta2**t) + eps`` built in the dead gradient buffer, which is returned.

    ``inverse_bias_correction2_sqrt`` is ``(1 - beta2**t) ** -0.5`` (a multiply per element
    instead of a division: the step is divider-bound on CPU); ``None`` leaves ``v`` undebiased
    (RAdam folds its debiasing into the step size, StableAdamW into its betas).
    """
    denom = ops.scratch(grad)
    ops.sqrt_into_(denom, exp_avg_sq)
    if inverse_bias_correction2_sqrt is not None:
        ops.mul_(denom, inverse_bias_correction2_sqrt)
    ops.add_scalar_(denom, eps)
    return denom
