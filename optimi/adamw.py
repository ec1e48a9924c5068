"""AdamW: Adam with decoupled weight decay (Loshchilov & Hutter, 2019, https://arxiv.org/abs/1711.05101)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from optimi.adam import Adam
from optimi.optimizer import SHARED_ARGS_DOC

__all__ = ["AdamW"]


class AdamW(Adam):
    __doc__ = rf"""AdamW optimizer: :class:`optimi.Adam` with decoupled weight decay pinned on.

    .. math::

        m_t &= \beta_1 m_{{t-1}} + (1 - \beta_1) g_t \\
        v_t &= \beta_2 v_{{t-1}} + (1 - \beta_2) g_t^2 \\
        \theta_t &= \theta_{{t-1}}(1 - \gamma_t \lambda) - \gamma_t \frac{{m_t / (1 - \beta_1^t)}}
            {{\sqrt{{v_t / (1 - \beta_2^t)}} + \epsilon}}

    With ``decouple_lr=True`` the decay is :math:`\theta(1 - \frac{{\gamma_t}}{{\gamma_\max}}\lambda)`.

    Args:
        params: Iterable of parameters or dicts defining parameter groups.
        lr: Learning rate.
        betas: Coefficients for the gradient and squared-gradient moving averages
            (default: (0.9, 0.99)).
        weight_decay: Decoupled weight decay coefficient (default: 1e-2).
        eps: Added to the denominator for numerical stability (default: 1e-6).
{SHARED_ARGS_DOC}"""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 1e-2,
        eps: float = 1e-6,
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
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            weight_decay=weight_decay,
            eps=eps,
            decouple_wd=True,
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
