"""Lion: evolved sign momentum (Chen et al., 2023, https://arxiv.org/abs/2302.06675)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from optimi._backends import run_update
from optimi._columns import Columns
from optimi._ops import UpdateOps
from optimi._update_blocks import decoupled_decay_, finish_update_, update_target, weight_decay_terms
from optimi.optimizer import SHARED_ARGS_DOC, OptimiOptimizer, check_betas

__all__ = ["Lion", "lion"]


class Lion(OptimiOptimizer):
    __doc__ = rf"""Lion optimizer (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms",
    https://arxiv.org/abs/2302.06675), Algorithm 2.

    For gradient :math:`g_t` and learning rate :math:`\gamma_t`:

    .. math::

        u_t &= \operatorname{{sign}}\big(\beta_1 m_{{t-1}} + (1 - \beta_1) g_t\big) \\
        \theta_t &= \theta_{{t-1}}(1 - \gamma_t \lambda) - \gamma_t u_t \\
        m_t &= \beta_2 m_{{t-1}} + (1 - \beta_2) g_t

    Weight decay is always decoupled, as in the paper (an L2 term would vanish inside the sign);
    with ``decouple_lr=True`` it is :math:`\theta(1 - \frac{{\gamma_t}}{{\gamma_\max}}\lambda)`. The
    update has unit magnitude per element, so Lion wants a learning rate 3-10x smaller than AdamW
    and a weight decay 3-10x larger.

    Args:
        params: Iterable of parameters or dicts defining parameter groups.
        lr: Learning rate.
        betas: Interpolation coefficients: ``beta1`` for the update direction, ``beta2`` for the
            momentum (default: (0.9, 0.99)).
        weight_decay: Decoupled weight decay coefficient (default: 0).
{SHARED_ARGS_DOC}"""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0,
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
        check_betas(group["betas"], 2)

    _QUANTIZED_STATES = {"exp_avg": "signed"}

    def _init_state(self, param: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)

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
        lion(
            params,
            grads,
            [s["exp_avg"] for s in states],
            [s.get("kahan_comp") for s in states],
            lr=group["lr"],
            beta1=group["betas"][0],
            beta2=group["betas"][1],
            weight_decay=group["weight_decay"],
            decouple_lr=group["decouple_lr"],
            max_lr=group["max_lr"],
            accumulate=accumulate,
            backend=backend,
        )


def lion(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    kahan_comps: list[Tensor | None],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    decouple_lr: bool = False,
    max_lr: float | None = None,
    accumulate: bool = False,
    backend: str = "for_loop",
) -> None:
    """Functional Lion: update ``params`` in place (see :class:`Lion` for the rule).

    With ``accumulate=True`` the gradient is folded into the momentum only
    (``m = beta2 * m + (1 - beta2) * g``); the parameters and weight decay are left untouched.
    """
    _, decay = weight_decay_terms(
        lr=lr, weight_decay=weight_decay, decouple_wd=True, decouple_lr=decouple_lr, max_lr=max_lr
    )
    run_update(
        _lion_update,
        backend,
        Columns(params, grads, (exp_avgs,), kahan_comps),
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        decay=decay,
        accumulate=accumulate,
    )


def _lion_update(
    ops: UpdateOps,
    param: Any,
    grad: Any,
    exp_avg: Any,
    kahan_comp: Any,
    *,
    lr: float | Tensor,
    beta1: float | Tensor,
    beta2: float | Tensor,
    decay: float | Tensor | None,
    accumulate: bool,
) -> None:
    """Lion's update rule, written once for every backend ([Note: one update rule, three backends])."""
    if accumulate:
        ops.lerp_(exp_avg, grad, 1 - beta2)
        return
    # Both interpolations are m + (1 - beta) (g - m): keep d = g - m in the gradient buffer,
    # advance the momentum with beta2, then rebuild the update direction from the new momentum,
    #   beta1 m + (1 - beta1) g = m_new + (beta2 - beta1) d,
    # so no extra buffer is needed and no coefficient exceeds 1 in magnitude.
    direction = ops.scratch(grad)
    ops.sub_(direction, exp_avg)
    ops.add_(exp_avg, direction, alpha=1 - beta2)
    ops.mul_(direction, beta2 - beta1)
    ops.add_(direction, exp_avg)
    ops.sign_(direction)

    target = update_target(param, kahan_comp)
    if decay is not None:
        decoupled_decay_(ops, param, kahan_comp, decay)
    ops.add_(target, direction, alpha=-lr)
    finish_update_(ops, param, kahan_comp, direction)
