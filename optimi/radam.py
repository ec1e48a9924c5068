"""RAdam: Adam with variance rectification (Liu et al., 2020, https://arxiv.org/abs/1908.03265)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from optimi._backends import run_update
from optimi._columns import Columns
from optimi._ops import UpdateOps
from optimi._update_blocks import (
    adam_denominator_,
    adam_moments_,
    bias_correction,
    decoupled_decay_,
    finish_update_,
    update_target,
    weight_decay_terms,
)
from optimi.adam import Adam
from optimi.optimizer import SHARED_ARGS_DOC

__all__ = ["RAdam", "radam"]

#: RAdam takes the rectified adaptive step only once the SMA length exceeds this (Liu et al., Alg. 2)
SMA_THRESHOLD = 5.0

RADAM_MATH = r"""
    .. math::

        g_t &\leftarrow g_t + \lambda \theta_{{t-1}} \quad \text{{(L2 weight decay, default)}} \\
        m_t &= \beta_1 m_{{t-1}} + (1 - \beta_1) g_t \\
        v_t &= \beta_2 v_{{t-1}} + (1 - \beta_2) g_t^2 \\
        \rho_\infty &= \frac{{2}}{{1 - \beta_2}} - 1, \qquad
            \rho_t = \rho_\infty - \frac{{2 t \beta_2^t}}{{1 - \beta_2^t}} \\
        r_t &= \sqrt{{\frac{{(\rho_t - 4)(\rho_t - 2)\rho_\infty}}{{(\rho_\infty - 4)(\rho_\infty - 2)\rho_t}}}} \\
        \theta_t &= \theta_{{t-1}} - \gamma_t \frac{{m_t}}{{1 - \beta_1^t}} \cdot
            \begin{{cases}}
                r_t \frac{{\sqrt{{1 - \beta_2^t}}}}{{\sqrt{{v_t}} + \epsilon}} & \rho_t > 5 \\
                1 & \text{{otherwise (un-adapted momentum SGD)}}
            \end{{cases}}
"""


class RAdam(Adam):
    __doc__ = rf"""RAdam optimizer: Adam whose adaptive step is rectified for the variance of the early
    second-moment estimate (Liu et al., 2020, "On the Variance of the Adaptive Learning Rate and
    Beyond", https://arxiv.org/abs/1908.03265).

    For gradient :math:`g_t` at step :math:`t` and learning rate :math:`\gamma_t`:
{RADAM_MATH}
    As in ``torch.optim.RAdam``, :math:`\epsilon` is added to :math:`\sqrt{{v_t}}` before debiasing.
    With ``decouple_wd=True`` the decay is :math:`\theta \leftarrow \theta(1 - \gamma_t\lambda)`
    (``torch.optim.RAdam(decoupled_weight_decay=True)``), with ``decouple_lr=True``
    :math:`\theta \leftarrow \theta(1 - \frac{{\gamma_t}}{{\gamma_\max}}\lambda)`.

    Args:
        params: Iterable of parameters or dicts defining parameter groups.
        lr: Learning rate.
        betas: Coefficients for the gradient and squared-gradient moving averages
            (default: (0.9, 0.99)).
        weight_decay: Weight decay coefficient (default: 0).
        eps: Added to the denominator for numerical stability (default: 1e-6).
        decouple_wd: Apply decoupled weight decay instead of L2 penalty (default: False).
{SHARED_ARGS_DOC}"""

    def _step_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Any]],
        *,
        step: int,
        accumulate: bool,
        backend: str,
    ) -> None:
        radam(
            params,
            grads,
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [s.get("kahan_comp") for s in states],
            lr=group["lr"],
            beta1=group["betas"][0],
            beta2=group["betas"][1],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            decouple_wd=group["decouple_wd"],
            decouple_lr=group["decouple_lr"],
            max_lr=group["max_lr"],
            step=step,
            accumulate=accumulate,
            backend=backend,
        )


def radam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    kahan_comps: list[Tensor | None],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    decouple_wd: bool,
    decouple_lr: bool = False,
    max_lr: float | None = None,
    step: int,
    accumulate: bool = False,
    backend: str = "for_loop",
) -> None:
    """Functional RAdam: update ``params`` in place (see :class:`RAdam` for the rule).

    ``step`` is the 1-based step count used for debiasing and the rectification. With
    ``accumulate=True`` only the moments absorb the gradient; the parameters are left untouched.
    """
    l2, decay = weight_decay_terms(
        lr=lr, weight_decay=weight_decay, decouple_wd=decouple_wd, decouple_lr=decouple_lr, max_lr=max_lr
    )
    rectify, step_size = radam_step_size(lr=lr, beta1=beta1, beta2=beta2, step=step)
    run_update(
        _radam_update,
        backend,
        Columns(params, grads, (exp_avgs, exp_avg_sqs), kahan_comps),
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        l2=l2,
        decay=decay,
        rectify=rectify,
        step_size=step_size,
        accumulate=accumulate,
    )


def radam_step_size(*, lr: float, beta1: float, beta2: float, step: int) -> tuple[bool, float]:
    """Whether step ``step`` is rectified (``rho_t > 5``), and the factor multiplying ``m_t``.

    Rectified: ``lr * r_t * sqrt(1 - beta2**t) / (1 - beta1**t)``, applied to ``m_t / (sqrt(v_t) + eps)``.
    Otherwise ``lr / (1 - beta1**t)``, applied to ``m_t`` (momentum SGD with a debiased momentum).
    """
    bias_correction1 = bias_correction(beta1, step)
    bias_correction2 = bias_correction(beta2, step)
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * beta2**step / bias_correction2
    if rho_t > SMA_THRESHOLD:
        rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
        return True, lr * rect * bias_correction2**0.5 / bias_correction1
    return False, lr / bias_correction1


def radam_moments_(
    ops: UpdateOps,
    param: Any,
    grad: Any,
    exp_avg: Any,
    exp_avg_sq: Any,
    *,
    beta1: float | Tensor,
    beta2: float | Tensor,
    l2: float | Tensor | None,
    accumulate: bool,
) -> None:
    """Fold the gradient (plus the L2 term, unless accumulating) into RAdam's two moments."""
    if l2 is not None and not accumulate:
        ops.add_(grad, param, alpha=l2)
    adam_moments_(ops, grad, exp_avg, exp_avg_sq, beta1, beta2)


def radam_step_(
    ops: UpdateOps,
    param: Any,
    grad: Any,
    exp_avg: Any,
    exp_avg_sq: Any,
    kahan_comp: Any,
    *,
    eps: float | Tensor,
    decay: float | Tensor | None,
    rectify: bool,
    step_size: float | Tensor,
) -> None:
    """Add RAdam's step and decoupled decay to ``update_target``; the caller finishes the update.

    The gradient is dead here and its buffer holds the denominator.
    """
    target = update_target(param, kahan_comp)
    if decay is not None:
        decoupled_decay_(ops, param, kahan_comp, decay)
    if rectify:
        # eps is added before debiasing, as in torch.optim.RAdam: the debiasing is in step_size
        denom = adam_denominator_(ops, grad, exp_avg_sq, eps)
        ops.addcdiv_(target, exp_avg, denom, value=-step_size)
    else:
        ops.add_(target, exp_avg, alpha=-step_size)


def _radam_update(
    ops: UpdateOps,
    param: Any,
    grad: Any,
    exp_avg: Any,
    exp_avg_sq: Any,
    kahan_comp: Any,
    *,
    beta1: float | Tensor,
    beta2: float | Tensor,
    eps: float | Tensor,
    l2: float | Tensor | None,
    decay: float | Tensor | None,
    rectify: bool,
    step_size: float | Tensor,
    accumulate: bool,
) -> None:
    """RAdam's update rule, written once for every backend ([Note: one update rule, three backends])."""
    radam_moments_(ops, param, grad, exp_avg, exp_avg_sq, beta1=beta1, beta2=beta2, l2=l2, accumulate=accumulate)
    if accumulate:
        return
    radam_step_(
        ops, param, grad, exp_avg, exp_avg_sq, kahan_comp, eps=eps, decay=decay, rectify=rectify, step_size=step_size
    )
    finish_update_(ops, param, kahan_comp, ops.scratch(grad))
