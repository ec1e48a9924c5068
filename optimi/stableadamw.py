"""StableAdamW: AdamW with update clipping (Wortsman et al., 2023, https://arxiv.org/abs/2304.13013)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from optimi._backends import run_update
from optimi._columns import Columns
from optimi._ops import TENSOR_OPS, UpdateOps, sum_dtype
from optimi._update_blocks import (
    adam_denominator_,
    adam_moments_,
    finish_update_,
    second_moment_,
    update_target,
    weight_decay_terms,
)
from optimi.adam import Adam
from optimi.optimizer import SHARED_ARGS_DOC

__all__ = ["StableAdamW", "stableadamw", "ReduceSums"]

#: ``reduce_sums(sums, counts) -> (sums, counts)``: combine the per-tensor partial sums of
#: ``g^2 / max(v, eps^2)`` (0-d float32 tensors) and element counts across shards.
ReduceSums = Callable[[list[Tensor], list[int]], tuple[list[Tensor], list[int]]]


class StableAdamW(Adam):
    __doc__ = rf"""StableAdamW optimizer (Wortsman et al., 2023, "Stable and low-precision training for
    large-scale vision-language models", https://arxiv.org/abs/2304.13013), Algorithm 2: AdamW whose
    learning rate is scaled down, per tensor, whenever the gradient is large relative to its
    second-moment estimate (AdaFactor's update clipping).

    With the debiased betas :math:`\hat\beta(t) = \beta\frac{{1 - \beta^{{t-1}}}}{{1 - \beta^t}}` (so the
    stored moments are already debiased), gradient :math:`g_t` and learning rate :math:`\gamma_t`:

    .. math::

        m_t &= \hat\beta_1(t) m_{{t-1}} + (1 - \hat\beta_1(t)) g_t \\
        v_t &= \hat\beta_2(t) v_{{t-1}} + (1 - \hat\beta_2(t)) g_t^2 \\
        \mathrm{{RMS}}_t &= \sqrt{{\operatorname{{mean}}\big(g_t^2 / \max(v_t, \epsilon^2)\big)}}
            \quad \text{{(over the tensor)}} \\
        \eta_t &= \gamma_t / \max(1, \mathrm{{RMS}}_t) \\
        \theta_t &= \theta_{{t-1}} - \eta_t \lambda \theta_{{t-1}} - \eta_t \frac{{m_t}}{{\sqrt{{v_t}} + \epsilon}}

    Weight decay is decoupled and scaled by the clipped learning rate :math:`\eta_t`, as in the
    paper; with ``decouple_lr=True`` it is :math:`\frac{{\eta_t}}{{\gamma_\max}}\lambda`. The RMS needs a
    reduction over each tensor, so a step reads one number per tensor back to the host.

    Args:
        params: Iterable of parameters or dicts defining parameter groups.
        lr: Learning rate.
        betas: Coefficients for the gradient and squared-gradient moving averages
            (default: (0.9, 0.99)).
        weight_decay: Decoupled weight decay coefficient (default: 1e-2).
        eps: Added to the denominator for numerical stability; ``eps**2`` floors the second moment
            in the RMS (default: 1e-6).
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
        # Adam's hyperparameters, validation and state (two moments); weight decay is always
        # decoupled, so the group's decouple_wd is pinned to True, as torch's AdamW pins Adam's
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
        stableadamw(
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
            decouple_lr=group["decouple_lr"],
            max_lr=group["max_lr"],
            step=step,
            accumulate=accumulate,
            backend=backend,
            # set by optimi.distributed while stepping sharded parameters: the RMS covers whole tensors
            reduce_sums=self._reduce_sums,
        )


def debiased_beta(beta: float, step: int) -> float:
    """``beta * (1 - beta**(step - 1)) / (1 - beta**step)``: an EMA with this beta is unbiased."""
    return beta * (1 - beta ** (step - 1)) / (1 - beta**step)


def stableadamw(
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
    decouple_lr: bool = False,
    max_lr: float | None = None,
    step: int,
    accumulate: bool = False,
    backend: str = "for_loop",
    reduce_sums: ReduceSums | None = None,
) -> None:
    """Functional StableAdamW: update ``params`` in place (see :class:`StableAdamW` for the rule).

    Two passes, because each tensor's clipped learning rate needs a sum over the whole tensor of
    ``g^2 / max(v, eps^2)`` with this step's ``v``. ``reduce_sums(sums, counts)`` may combine the
    per-tensor sums and element counts across shards between them (``None``: each tensor is
    whole here). With ``accumulate=True`` only the moments absorb the gradient. ``step`` is the
    1-based step count used for debiasing.

    [Note: StableAdamW's two passes]
    The for-loop and foreach backends fold the gradient into the moments in the first pass and
    leave ``g^2 / max(v, eps^2)`` in the gradient buffer, which is summed eagerly; the second pass
    applies the step. That needs no memory beyond the gradient, but moves 44 bytes per fp32
    element where the step itself needs 28. A compiled kernel keeps temporaries in registers, so
    the fused backend instead makes the first pass a pure reduction (it reads ``g`` and ``v``,
    forms this step's ``v`` without storing it, and sums the ratio in the kernel) and the second
    pass one update of moments and parameter: 36 bytes per element. Both orders are composed from
    the same functions (``adam_moments_`` of ``_update_blocks.py``, :func:`_rms_terms_`,
    :func:`_stableadamw_step`), so the math exists once.
    """
    if not params:
        return
    betas = dict(beta1=debiased_beta(beta1, step), beta2=debiased_beta(beta2, step))
    moments = Columns(params, grads, (exp_avgs, exp_avg_sqs), kahan_comps)
    fused = backend == "fused"
    if accumulate:
        run_update(_stableadamw_moments, backend, moments, **betas, eps_sq=eps * eps, accumulate=True)
        return
    if fused:
        sums = [torch.zeros((), dtype=sum_dtype(p.dtype), device=p.device) for p in params]
        with_sums = moments._replace(states=(*moments.states, sums))
        run_update(_stableadamw_rms_sums, backend, with_sums, beta2=betas["beta2"], eps_sq=eps * eps)
    else:
        run_update(_stableadamw_moments, backend, moments, **betas, eps_sq=eps * eps, accumulate=False)
        # the gradient buffers now hold g^2 / max(v, eps^2): reduce them to one RMS per tensor
        sums = [TENSOR_OPS.sum(grad) for grad in grads]
    counts = [TENSOR_OPS.numel(grad) for grad in grads]
    if reduce_sums is not None:
        sums, counts = reduce_sums(sums, counts)
    # one host read for all tensors (a device sync on CUDA), not one per tensor
    sum_values = torch.stack([s.to(sums[0].device, torch.float64) for s in sums]).tolist()
    lrs = [lr / max(1.0, (total / count) ** 0.5) for total, count in zip(sum_values, counts)]

    decays = [
        weight_decay_terms(
            lr=lr_i, weight_decay=weight_decay, decouple_wd=True, decouple_lr=decouple_lr, max_lr=max_lr
        )[1]
        for lr_i in lrs
    ]
    has_decay = weight_decay != 0
    # per-tensor scalars travel as columns next to the tensors: floats in the for-loop,
    # lists in the foreach backend
    per_tensor = (
        [-lr_i for lr_i in lrs],
        [1 - d if has_decay else 1.0 for d in decays],
        [-d if has_decay else 0.0 for d in decays],
    )
    # the fused order updates the moments in this pass ([Note: StableAdamW's two passes])
    fused_betas = betas if fused else {}
    with_lrs = moments._replace(states=(*moments.states, *per_tensor))
    run_update(_stableadamw_step, backend, with_lrs, eps=eps, has_decay=has_decay, **fused_betas)


def _rms_terms_(ops: UpdateOps, grad: Any, exp_avg_sq: Any, eps_sq: float | Tensor) -> None:
    """``g <- g^2 / max(v, eps^2)`` in the gradient buffer: the terms the RMS averages.

    The paper's RMS uses the second moment after this step's update.
    """
    ops.mul_tensor_(grad, grad)
    ops.div_tensor_(grad, ops.clamp_min(exp_avg_sq, eps_sq))


def _stableadamw_moments(
    ops: UpdateOps,
    param: Any,
    grad: Any,
    exp_avg: Any,
    exp_avg_sq: Any,
    kahan_comp: Any,
    *,
    beta1: float | Tensor,
    beta2: float | Tensor,
    eps_sq: float | Tensor,
    accumulate: bool,
) -> None:
    """First pass (for-loop, foreach): update the moments, leave the RMS terms in the gradient buffer."""
    adam_moments_(ops, grad, exp_avg, exp_avg_sq, beta1, beta2)
    if not accumulate:
        _rms_terms_(ops, grad, exp_avg_sq, eps_sq)


def _stableadamw_rms_sums(
    ops: UpdateOps,
    param: Any,
    grad: Any,
    exp_avg: Any,
    exp_avg_sq: Any,
    rms_sum: Any,
    kahan_comp: Any,
    *,
    beta2: float | Tensor,
    eps_sq: float | Tensor,
) -> None:
    """First pass (fused): ``rms_sum = sum(g^2 / max(v_t, eps^2))``, storing nothing else.

    This step's ``v_t`` and the terms live in temporaries (registers in a compiled kernel); the
    gradient survives for the second pass.
    """
    updated_exp_avg_sq = ops.copy_of(exp_avg_sq)
    second_moment_(ops, updated_exp_avg_sq, grad, beta2)
    terms = ops.copy_of(grad)
    _rms_terms_(ops, terms, updated_exp_avg_sq, eps_sq)
    ops.sum_into_(rms_sum, terms)


def _stableadamw_step(
    ops: UpdateOps,
    param: Any,
    grad: Any,
    exp_avg: Any,
    exp_avg_sq: Any,
    neg_lr: float | list[float],
    keep: float | list[float],
    neg_decay: float | list[float],
    kahan_comp: Any,
    *,
    eps: float | Tensor,
    has_decay: bool,
    beta1: float | Tensor | None = None,
    beta2: float | Tensor | None = None,
) -> None:
    """Second pass: ``p <- p (1 - eta lambda) - eta m / (sqrt(v) + eps)`` with this tensor's clipped lr ``eta``.

    ``neg_lr = -eta``, ``keep = 1 - decay`` and ``neg_decay = -decay`` are per tensor. Given the
    betas (the fused order), the moments are updated first, in the same pass; without them (the
    for-loop and foreach order) the first pass already updated them.
    """
    if beta1 is not None and beta2 is not None:
        adam_moments_(ops, grad, exp_avg, exp_avg_sq, beta1, beta2)
    # the gradient is dead from here on: build the denominator in its buffer (the betas debias)
    denom = adam_denominator_(ops, grad, exp_avg_sq, eps)

    target = update_target(param, kahan_comp)
    if has_decay:
        if kahan_comp is None:
            ops.mul_(param, keep)
        else:
            # the decay of a bf16 weight is mostly below its ulp: sum it with the update
            ops.add_(kahan_comp, param, alpha=neg_decay)
    ops.addcdiv_(target, exp_avg, denom, value=neg_lr)
    finish_update_(ops, param, kahan_comp, denom)
