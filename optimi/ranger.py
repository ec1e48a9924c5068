"""Ranger: RAdam (Liu et al., 2020) wrapped in Lookahead (Zhang et al., 2019, https://arxiv.org/abs/1907.08610)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from optimi._backends import run_update
from optimi._columns import Columns
from optimi._ops import UpdateOps
from optimi._update_blocks import finish_update_, weight_decay_terms
from optimi.optimizer import SHARED_ARGS_DOC, check_range
from optimi.radam import RADAM_MATH, RAdam, radam_moments_, radam_step_, radam_step_size

__all__ = ["Ranger", "ranger"]


class Ranger(RAdam):
    __doc__ = rf"""Ranger optimizer: RAdam inside Lookahead.

    The fast weights :math:`\theta` take RAdam steps (Liu et al., 2020,
    https://arxiv.org/abs/1908.03265):
{RADAM_MATH}
    and every :math:`k` parameter updates Lookahead (Zhang et al., 2019, "Lookahead Optimizer: k steps
    forward, 1 step back", https://arxiv.org/abs/1907.08610) pulls them towards the slow weights
    :math:`\phi` (kept in the optimizer state, initialised to the parameter) and restarts from there:

    .. math::

        \phi &\leftarrow \phi + \alpha (\theta - \phi) \\
        \theta &\leftarrow \phi

    Decay is decoupled by default, :math:`\theta \leftarrow \theta(1 - \gamma_t\lambda)`;
    ``decouple_wd=False`` gives the L2 penalty :math:`g_t \leftarrow g_t + \lambda\theta_{{t-1}}`, and
    ``decouple_lr=True`` :math:`\theta \leftarrow \theta(1 - \frac{{\gamma_t}}{{\gamma_\max}}\lambda)`.
    Lookahead counts each parameter's own updates; optimizer accumulation steps do not count. Under
    Kahan summation the slow weights keep their own compensation (``slow_comp``), so lookahead
    interpolates the exact fast and slow weights.

    Args:
        params: Iterable of parameters or dicts defining parameter groups.
        lr: Learning rate.
        betas: Coefficients for the gradient and squared-gradient moving averages
            (default: (0.9, 0.99)).
        weight_decay: Weight decay coefficient (default: 0).
        eps: Added to the denominator for numerical stability (default: 1e-6).
        k: Lookahead synchronises the fast and slow weights every ``k`` updates; an integer
            >= 1 (default: 6).
        alpha: Lookahead's slow-weight step size, in (0, 1] (default: 0.5).
        decouple_wd: Apply decoupled weight decay instead of L2 penalty (default: True).
{SHARED_ARGS_DOC}"""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0,
        eps: float = 1e-6,
        k: int = 6,
        alpha: float = 0.5,
        decouple_wd: bool = True,
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
        # Lookahead's hyperparameters join RAdam's defaults through Adam's _extra_defaults
        self._lookahead_defaults = {"k": k, "alpha": alpha}
        super().__init__(
            params,
            lr=lr,
            betas=betas,
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

    def _extra_defaults(self) -> dict[str, Any]:
        return dict(self._lookahead_defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        k = group["k"]
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"Invalid k: {k!r} (must be an integer >= 1)")
        check_range("alpha", group["alpha"], 0.0, 1.0, low_inclusive=False, high_inclusive=True)

    def _init_state(self, param: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        super()._init_state(param, group, state)  # RAdam's two moments
        state["slow_param"] = param.detach().clone(memory_format=torch.preserve_format)
        if self.uses_kahan(param, group):
            # the slow weights' Kahan residual, so that lookahead interpolates exact values
            state["slow_comp"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        # parameter updates since the start; lookahead syncs when it reaches a multiple of k
        state["lookahead_step"] = 0

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
        # split the parameters by whether this update ends a lookahead cycle (usually all or none)
        subsets: dict[bool, list[int]] = {False: [], True: []}
        for i, state in enumerate(states):
            if not accumulate:
                state["lookahead_step"] += 1
            subsets[not accumulate and state["lookahead_step"] % group["k"] == 0].append(i)
        for lookahead, indices in subsets.items():
            if not indices:
                continue
            ranger(
                [params[i] for i in indices],
                [grads[i] for i in indices],
                [states[i]["exp_avg"] for i in indices],
                [states[i]["exp_avg_sq"] for i in indices],
                [states[i]["slow_param"] for i in indices],
                [states[i].get("slow_comp") for i in indices],
                [states[i].get("kahan_comp") for i in indices],
                lr=group["lr"],
                beta1=group["betas"][0],
                beta2=group["betas"][1],
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                alpha=group["alpha"],
                decouple_wd=group["decouple_wd"],
                decouple_lr=group["decouple_lr"],
                max_lr=group["max_lr"],
                step=step,
                lookahead=lookahead,
                accumulate=accumulate,
                backend=backend,
            )


def ranger(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    slow_params: list[Tensor],
    slow_comps: list[Tensor | None],
    kahan_comps: list[Tensor | None],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    alpha: float,
    decouple_wd: bool = True,
    decouple_lr: bool = False,
    max_lr: float | None = None,
    step: int,
    lookahead: bool,
    accumulate: bool = False,
    backend: str = "for_loop",
) -> None:
    """Functional Ranger: update ``params`` in place (see :class:`Ranger` for the rule).

    ``slow_comps`` are the slow weights' Kahan residuals, present exactly where ``kahan_comps`` are.
    ``step`` is the 1-based step count used for RAdam's debiasing and rectification; with
    ``lookahead=True`` this update ends a lookahead cycle (the caller counts ``k``). With
    ``accumulate=True`` only the moments absorb the gradient: no step, no decay, no lookahead.
    """
    l2, decay = weight_decay_terms(
        lr=lr, weight_decay=weight_decay, decouple_wd=decouple_wd, decouple_lr=decouple_lr, max_lr=max_lr
    )
    rectify, step_size = radam_step_size(lr=lr, beta1=beta1, beta2=beta2, step=step)
    run_update(
        _ranger_update,
        backend,
        Columns(params, grads, (exp_avgs, exp_avg_sqs, slow_params, slow_comps), kahan_comps),
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        alpha=alpha,
        l2=l2,
        decay=decay,
        rectify=rectify,
        step_size=step_size,
        lookahead=lookahead and not accumulate,
        accumulate=accumulate,
    )


def _ranger_update(
    ops: UpdateOps,
    param: Any,
    grad: Any,
    exp_avg: Any,
    exp_avg_sq: Any,
    slow_param: Any,
    slow_comp: Any,
    kahan_comp: Any,
    *,
    beta1: float | Tensor,
    beta2: float | Tensor,
    eps: float | Tensor,
    alpha: float | Tensor,
    l2: float | Tensor | None,
    decay: float | Tensor | None,
    rectify: bool,
    step_size: float | Tensor,
    lookahead: bool,
    accumulate: bool,
) -> None:
    """Ranger's update rule, written once for every backend ([Note: one update rule, three backends])."""
    radam_moments_(ops, param, grad, exp_avg, exp_avg_sq, beta1=beta1, beta2=beta2, l2=l2, accumulate=accumulate)
    if accumulate:
        return
    radam_step_(
        ops, param, grad, exp_avg, exp_avg_sq, kahan_comp, eps=eps, decay=decay, rectify=rectify, step_size=step_size
    )
    scratch = ops.scratch(grad)
    if not lookahead:
        finish_update_(ops, param, kahan_comp, scratch)
        return
    if kahan_comp is None:
        # theta <- phi + alpha (theta - phi)
        ops.lerp_(param, slow_param, 1 - alpha)
        ops.copy_(slow_param, param)
        return
    # Under Kahan summation the exact fast weight is p + c (c holds this step's RAdam update too)
    # and the exact slow weight s + r, r being what the fast weight's compensation held when they
    # were last synchronised. Interpolating the exact values,
    #   (s + r) + alpha (p + c - s - r) = p + [alpha c + (alpha - 1)(p - s) + (1 - alpha) r],
    # so the whole jump goes through the compensation, and the slow weight stays exact as well.
    ops.copy_(scratch, param)
    ops.sub_(scratch, slow_param)  # exact: p and s are close
    ops.mul_(kahan_comp, alpha)
    ops.add_(kahan_comp, scratch, alpha=alpha - 1)
    ops.add_(kahan_comp, slow_comp, alpha=1 - alpha)
    finish_update_(ops, param, kahan_comp, scratch)
    ops.copy_(slow_param, param)
    ops.copy_(slow_comp, kahan_comp)
