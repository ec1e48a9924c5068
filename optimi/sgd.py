"""SGD with optional momentum, dampening and decoupled weight decay."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from optimi._backends import run_update
from optimi._columns import Columns
from optimi._ops import UpdateOps
from optimi._update_blocks import decoupled_decay_, finish_update_, update_target, weight_decay_terms
from optimi.optimizer import SHARED_ARGS_DOC, OptimiOptimizer, check_range

__all__ = ["SGD", "sgd"]


class SGD(OptimiOptimizer):
    __doc__ = rf"""Stochastic gradient descent with momentum.

    For gradient :math:`g_t`, learning rate :math:`\gamma_t` and momentum :math:`\mu`:

    .. math::

        g_t &\leftarrow g_t + \lambda \theta_{{t-1}} \quad \text{{(L2 weight decay, default)}} \\
        b_t &= \mu b_{{t-1}} + (1 - \tau) g_t \\
        \theta_t &= \theta_{{t-1}} - \gamma_t b_t

    where :math:`\tau = \mu` with ``dampening=True`` and :math:`\tau = 0` otherwise. Without
    momentum :math:`b_t = g_t` and no buffer is kept. The buffer starts at zero, or at the first
    gradient with ``torch_init=True`` (PyTorch's convention). ``decouple_wd`` and ``decouple_lr``
    switch to decoupled decay :math:`\theta(1 - \gamma_t\lambda)` and fully decoupled decay
    :math:`\theta(1 - \frac{{\gamma_t}}{{\gamma_\max}}\lambda)`.

    Args:
        params: Iterable of parameters or dicts defining parameter groups.
        lr: Learning rate.
        momentum: Momentum factor in [0, 1) (default: 0).
        weight_decay: Weight decay coefficient (default: 0).
        dampening: Scale the gradient by ``1 - momentum`` in the buffer (default: False).
        decouple_wd: Apply decoupled weight decay instead of L2 penalty (default: False).
        torch_init: Start the momentum buffer at the first gradient like ``torch.optim.SGD``
            (default: False).
{SHARED_ARGS_DOC}"""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0,
        weight_decay: float = 0,
        dampening: bool = False,
        decouple_wd: bool = False,
        decouple_lr: bool = False,
        max_lr: float | None = None,
        torch_init: bool = False,
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
            momentum=momentum,
            weight_decay=weight_decay,
            dampening=dampening,
            decouple_wd=decouple_wd,
            decouple_lr=decouple_lr,
            max_lr=max_lr,
            torch_init=torch_init,
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
        check_range("momentum", group["momentum"], 0.0, 1.0)
        if not isinstance(group["dampening"], bool):
            raise ValueError(f"Invalid dampening: {group['dampening']!r} (must be a bool: True or False)")

    _QUANTIZED_STATES = {"momentum_buffer": "signed"}

    def _init_state(self, param: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        if group["momentum"] != 0:
            state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)

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
        has_momentum = group["momentum"] != 0
        if has_momentum and any("momentum_buffer" not in s for s in states):
            # momentum switched on after the state was created (e.g. by a momentum scheduler)
            for param, state in zip(params, states):
                state.setdefault("momentum_buffer", torch.zeros_like(param, memory_format=torch.preserve_format))
        sgd(
            params,
            grads,
            [s["momentum_buffer"] for s in states] if has_momentum else None,
            [s.get("kahan_comp") for s in states],
            lr=group["lr"],
            momentum=group["momentum"],
            weight_decay=group["weight_decay"],
            dampening=group["dampening"],
            decouple_wd=group["decouple_wd"],
            decouple_lr=group["decouple_lr"],
            max_lr=group["max_lr"],
            torch_init=group["torch_init"],
            step=step,
            accumulate=accumulate,
            backend=backend,
        )


def sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor] | None,
    kahan_comps: list[Tensor | None],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    dampening: bool,
    decouple_wd: bool,
    decouple_lr: bool = False,
    max_lr: float | None = None,
    torch_init: bool = False,
    step: int,
    accumulate: bool = False,
    backend: str = "for_loop",
) -> None:
    """Functional SGD: update ``params`` in place (see :class:`SGD` for the rule).

    ``momentum_buffers`` is ``None`` when ``momentum == 0``. With ``accumulate=True`` the gradient
    is folded into the momentum buffers only, which needs momentum.
    """
    if momentum_buffers is None and accumulate:
        raise ValueError(
            "SGD optimizer accumulation needs momentum > 0: without a momentum buffer there is no "
            "optimizer state to accumulate gradients into"
        )
    l2, decay = weight_decay_terms(
        lr=lr, weight_decay=weight_decay, decouple_wd=decouple_wd, decouple_lr=decouple_lr, max_lr=max_lr
    )
    if momentum_buffers is None:
        run_update(_sgd_update, backend, Columns(params, grads, (), kahan_comps), lr=lr, l2=l2, decay=decay)
    else:
        run_update(
            _sgd_momentum_update,
            backend,
            Columns(params, grads, (momentum_buffers,), kahan_comps),
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            l2=l2,
            decay=decay,
            init_buffer=torch_init and step == 1,
            accumulate=accumulate,
        )


def _sgd_update(
    ops: UpdateOps,
    param: Any,
    grad: Any,
    kahan_comp: Any,
    *,
    lr: float | Tensor,
    l2: float | Tensor | None,
    decay: float | Tensor | None,
) -> None:
    """Plain SGD: ``p -= lr * (g + l2 * p)``, with decoupled decay and Kahan summation."""
    if l2 is not None:
        ops.add_(grad, param, alpha=l2)
    target = update_target(param, kahan_comp)
    if decay is not None:
        decoupled_decay_(ops, param, kahan_comp, decay)
    ops.add_(target, grad, alpha=-lr)
    finish_update_(ops, param, kahan_comp, ops.scratch(grad))


def _sgd_momentum_update(
    ops: UpdateOps,
    param: Any,
    grad: Any,
    momentum_buffer: Any,
    kahan_comp: Any,
    *,
    lr: float | Tensor,
    momentum: float | Tensor,
    dampening: bool,
    l2: float | Tensor | None,
    decay: float | Tensor | None,
    init_buffer: bool,
    accumulate: bool,
) -> None:
    """SGD with momentum: ``b = mu * b + (1 - tau) * g``, ``p -= lr * b``."""
    if l2 is not None and not accumulate:
        ops.add_(grad, param, alpha=l2)
    if init_buffer:
        ops.copy_(momentum_buffer, grad)
    elif dampening:
        ops.lerp_(momentum_buffer, grad, 1 - momentum)
    else:
        ops.mul_(momentum_buffer, momentum)
        ops.add_(momentum_buffer, grad)
    if accumulate:
        return
    target = update_target(param, kahan_comp)
    if decay is not None:
        decoupled_decay_(ops, param, kahan_comp, decay)
    ops.add_(target, momentum_buffer, alpha=-lr)
    finish_update_(ops, param, kahan_comp, ops.scratch(grad))
