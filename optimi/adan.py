"""Adan: adaptive Nesterov momentum (Xie et al., 2022, https://arxiv.org/abs/2208.06677)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from optimi._backends import run_update
from optimi._columns import Columns
from optimi._ops import UpdateOps
from optimi._update_blocks import (
    adam_denominator_,
    bias_correction,
    decoupled_decay_,
    finish_update_,
    second_moment_,
    update_target,
    weight_decay_terms,
)
from optimi.optimizer import SHARED_ARGS_DOC, OptimiOptimizer, check_betas, check_range

__all__ = ["Adan", "adan"]


class Adan(OptimiOptimizer):
    __doc__ = rf"""Adan optimizer (Xie et al., 2022, "Adan: Adaptive Nesterov Momentum Algorithm for
    Faster Optimizing Deep Models", https://arxiv.org/abs/2208.06677), Algorithm 1.

    The betas here are one minus the paper's (the paper's :math:`\beta_1 = 0.02` is ``0.98``). For
    gradient :math:`g_t` (with :math:`g_0 = g_1`, so the first difference is zero) and learning
    rate :math:`\gamma_t`:

    .. math::

        m_t &= \beta_1 m_{{t-1}} + (1 - \beta_1) g_t \\
        v_t &= \beta_2 v_{{t-1}} + (1 - \beta_2) (g_t - g_{{t-1}}) \\
        n_t &= \beta_3 n_{{t-1}} + (1 - \beta_3) \big(g_t + \beta_2 (g_t - g_{{t-1}})\big)^2 \\
        u_t &= \frac{{m_t / (1 - \beta_1^t) + \beta_2 v_t / (1 - \beta_2^t)}}
            {{\sqrt{{n_t / (1 - \beta_3^t)}} + \epsilon}} \\
        \theta_t &= \frac{{\theta_{{t-1}} - \gamma_t u_t}}{{1 + \gamma_t \lambda}}

    The default decay is the paper's proximal step, applied after the update. ``adam_wd=True``
    uses AdamW-style decay instead, :math:`\theta_t = \theta_{{t-1}}(1 - \gamma_t\lambda) - \gamma_t u_t`.
    With ``decouple_lr=True`` :math:`\gamma_t\lambda` becomes :math:`\frac{{\gamma_t}}{{\gamma_\max}}\lambda`
    in either form. Adan keeps the previous gradient in its state: four buffers per parameter.

    Args:
        params: Iterable of parameters or dicts defining parameter groups.
        lr: Learning rate.
        betas: Coefficients for the gradient, gradient-difference and squared-update moving
            averages (default: (0.98, 0.92, 0.99)).
        weight_decay: Weight decay coefficient (default: 2e-2).
        eps: Added to the denominator for numerical stability (default: 1e-6).
        adam_wd: Apply AdamW-style decoupled decay instead of Adan's proximal decay
            (default: False).
{SHARED_ARGS_DOC}"""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        betas: tuple[float, float, float] = (0.98, 0.92, 0.99),
        weight_decay: float = 2e-2,
        eps: float = 1e-6,
        adam_wd: bool = False,
        decouple_lr: bool = False,
        max_lr: float | None = None,
        kahan_sum: bool | None = None,
        low_precision: str | None = None,
        foreach: bool | None = None,
        triton: bool | None = None,
        gradient_release: bool = False,
        fused: bool | None = None,
        max_grad_norm: float | None = None,
        state_bits: int | None = None,
    ):
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, list) else betas,
            weight_decay=weight_decay,
            eps=eps,
            adam_wd=adam_wd,
            decouple_lr=decouple_lr,
            max_lr=max_lr,
            kahan_sum=kahan_sum,
            low_precision=low_precision,
            foreach=foreach,
            triton=triton,
            gradient_release=gradient_release,
            fused=fused,
            max_grad_norm=max_grad_norm,
            state_bits=state_bits,
        )
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        check_betas(group["betas"], 3)
        check_range("eps", group["eps"], 0.0)

    # the previous gradient stays exact: the next step takes its difference with the new one
    _QUANTIZED_STATES = {"exp_avg": "signed", "exp_avg_diff": "signed", "exp_avg_sq": "second"}

    def _init_state(self, param: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_diff"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["prev_grad"] = torch.zeros_like(param, memory_format=torch.preserve_format)

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
        for grad, state in zip(grads, states):
            if state["step"] == 1:
                # a parameter's first gradient has no predecessor: its difference is zero
                state["prev_grad"].copy_(grad)
        adan(
            params,
            grads,
            [s["exp_avg"] for s in states],
            [s["exp_avg_diff"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [s["prev_grad"] for s in states],
            [s.get("kahan_comp") for s in states],
            lr=group["lr"],
            beta1=group["betas"][0],
            beta2=group["betas"][1],
            beta3=group["betas"][2],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            adam_wd=group["adam_wd"],
            decouple_lr=group["decouple_lr"],
            max_lr=group["max_lr"],
            step=step,
            accumulate=accumulate,
            backend=backend,
        )


def adan(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_diffs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    prev_grads: list[Tensor],
    kahan_comps: list[Tensor | None],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    beta3: float,
    weight_decay: float,
    eps: float,
    adam_wd: bool = False,
    decouple_lr: bool = False,
    max_lr: float | None = None,
    step: int,
    accumulate: bool = False,
    backend: str = "for_loop",
) -> None:
    """Functional Adan: update ``params`` in place (see :class:`Adan` for the rule).

    ``prev_grads`` hold the previous gradients and are overwritten with the current ones; set them
    to the first gradient before a parameter's first step. ``step`` is the 1-based step count used
    for debiasing. With ``accumulate=True`` only the moments (and ``prev_grads``) absorb the
    gradient; the parameters and weight decay are left untouched.
    """
    _, decay = weight_decay_terms(
        lr=lr, weight_decay=weight_decay, decouple_wd=True, decouple_lr=decouple_lr, max_lr=max_lr
    )
    run_update(
        _adan_update,
        backend,
        Columns(params, grads, (exp_avgs, exp_avg_diffs, exp_avg_sqs, prev_grads), kahan_comps),
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        beta3=beta3,
        eps=eps,
        decay=decay,
        adam_wd=adam_wd,
        bias_correction1=bias_correction(beta1, step),
        bias_correction2=bias_correction(beta2, step),
        # a multiply per element instead of a division: the step is divider-bound on CPU
        inverse_bias_correction3_sqrt=bias_correction(beta3, step) ** -0.5,
        accumulate=accumulate,
    )


def _adan_update(
    ops: UpdateOps,
    param: Any,
    grad: Any,
    exp_avg: Any,
    exp_avg_diff: Any,
    exp_avg_sq: Any,
    prev_grad: Any,
    kahan_comp: Any,
    *,
    lr: float | Tensor,
    beta1: float | Tensor,
    beta2: float | Tensor,
    beta3: float | Tensor,
    eps: float | Tensor,
    decay: float | Tensor | None,
    adam_wd: bool,
    bias_correction1: float | Tensor,
    bias_correction2: float | Tensor,
    inverse_bias_correction3_sqrt: float | Tensor,
    accumulate: bool,
) -> None:
    """Adan's update rule, written once for every backend ([Note: one update rule, three backends])."""
    # prev_grad <- g_{t-1} - g_t: the negated gradient difference, built in place
    ops.sub_(prev_grad, grad)
    ops.lerp_(exp_avg, grad, 1 - beta1)
    # v = beta2 v + (1 - beta2) (g_t - g_{t-1})
    ops.mul_(exp_avg_diff, beta2)
    ops.add_(exp_avg_diff, prev_grad, alpha=-(1 - beta2))
    # prev_grad <- g_t + beta2 (g_t - g_{t-1}), the Nesterov-corrected gradient
    ops.mul_(prev_grad, -beta2)
    ops.add_(prev_grad, grad)
    second_moment_(ops, exp_avg_sq, prev_grad, beta3)
    ops.copy_(prev_grad, grad)  # the next step's previous gradient
    if accumulate:
        return

    # the gradient is dead from here on: build the denominator sqrt(n_hat) + eps in its buffer
    denom = adam_denominator_(ops, grad, exp_avg_sq, eps, inverse_bias_correction3_sqrt)

    target = update_target(param, kahan_comp)
    if decay is not None and adam_wd:
        decoupled_decay_(ops, param, kahan_comp, decay)
    ops.addcdiv_(target, exp_avg, denom, value=-lr / bias_correction1)
    ops.addcdiv_(target, exp_avg_diff, denom, value=-lr * beta2 / bias_correction2)
    if decay is not None and not adam_wd:
        # proximal decay of the updated weight, p / (1 + f) = p - p f / (1 + f): subtracting the
        # small term rounds once, where dividing by the rounded 1 + f would bias every step alike
        shrink = decay / (1 + decay)
        if kahan_comp is None:
            ops.add_(param, param, alpha=-shrink)
        else:
            # the exact updated weight is p + c: (p + c) / (1 + f) = p + [c (1 - shrink) - p shrink],
            # so the decay goes through the compensation too
            ops.mul_(kahan_comp, 1 - shrink)
            ops.add_(kahan_comp, param, alpha=-shrink)
    finish_update_(ops, param, kahan_comp, denom)
