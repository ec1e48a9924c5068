"""Adam: adaptive moment estimation (Kingma & Ba, 2015, https://arxiv.org/abs/1412.6980)."""

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
    adam_moments_,
    bias_correction,
    decoupled_decay_,
    finish_update_,
    update_target,
    weight_decay_terms,
)
from optimi.optimizer import SHARED_ARGS_DOC, OptimiOptimizer, check_betas, check_range

__all__ = ["Adam", "adam"]


class Adam(OptimiOptimizer):
    __doc__ = rf"""Adam optimizer, with optional decoupled and fully decoupled weight decay.

    For gradient :math:`g_t` at step :math:`t` and learning rate :math:`\gamma_t`:

    .. math::

        g_t &\leftarrow g_t + \lambda \theta_{{t-1}} \quad \text{{(L2 weight decay, default)}} \\
        m_t &= \beta_1 m_{{t-1}} + (1 - \beta_1) g_t \\
        v_t &= \beta_2 v_{{t-1}} + (1 - \beta_2) g_t^2 \\
        \theta_t &= \theta_{{t-1}} - \gamma_t \frac{{m_t / (1 - \beta_1^t)}}
            {{\sqrt{{v_t / (1 - \beta_2^t)}} + \epsilon}}

    With ``decouple_wd=True`` the decay is instead :math:`\theta \leftarrow \theta(1 - \gamma_t\lambda)`
    (AdamW, Loshchilov & Hutter 2019), with ``decouple_lr=True``
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

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0,
        eps: float = 1e-6,
        decouple_wd: bool = False,
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
            decouple_wd=decouple_wd,
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
        super().__init__(params, {**defaults, **self._extra_defaults()})

    def _extra_defaults(self) -> dict[str, Any]:
        """Hyperparameters a subclass adds to Adam's, validated with them (Ranger's ``k`` and ``alpha``)."""
        return {}

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        check_betas(group["betas"], 2)
        check_range("eps", group["eps"], 0.0)

    _QUANTIZED_STATES = {"exp_avg": "signed", "exp_avg_sq": "second"}

    def _init_state(self, param: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)

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
        adam(
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


def adam(
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
    """Functional Adam: update ``params`` in place (see :class:`Adam` for the rule).

    ``step`` is the 1-based step count used for debiasing. With ``accumulate=True`` only the
    moments absorb the gradient; the parameters and weight decay are left untouched.
    """
    l2, decay = weight_decay_terms(
        lr=lr, weight_decay=weight_decay, decouple_wd=decouple_wd, decouple_lr=decouple_lr, max_lr=max_lr
    )
    run_update(
        _adam_update,
        backend,
        Columns(params, grads, (exp_avgs, exp_avg_sqs), kahan_comps),
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        l2=l2,
        decay=decay,
        bias_correction1=bias_correction(beta1, step),
        # a multiply per element instead of a division: the step is divider-bound on CPU
        inverse_bias_correction2_sqrt=bias_correction(beta2, step) ** -0.5,
        accumulate=accumulate,
    )


def _adam_update(
    ops: UpdateOps,
    param: Any,
    grad: Any,
    exp_avg: Any,
    exp_avg_sq: Any,
    kahan_comp: Any,
    *,
    lr: float | Tensor,
    beta1: float | Tensor,
    beta2: float | Tensor,
    eps: float | Tensor,
    l2: float | Tensor | None,
    decay: float | Tensor | None,
    bias_correction1: float | Tensor,
    inverse_bias_correction2_sqrt: float | Tensor,
    accumulate: bool,
) -> None:
    """Adam's update rule, written once for every backend ([Note: one update rule, three backends])."""
    if l2 is not None and not accumulate:
        ops.add_(grad, param, alpha=l2)
    adam_moments_(ops, grad, exp_avg, exp_avg_sq, beta1, beta2)
    if accumulate:
        return

    # the gradient is dead from here on: build the denominator sqrt(v_hat) + eps in its buffer
    denom = adam_denominator_(ops, grad, exp_avg_sq, eps, inverse_bias_correction2_sqrt)

    target = update_target(param, kahan_comp)
    if decay is not None:
        decoupled_decay_(ops, param, kahan_comp, decay)
    ops.addcdiv_(target, exp_avg, denom, value=-lr / bias_correction1)
    finish_update_(ops, param, kahan_comp, denom)
