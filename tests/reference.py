"""Float64 reference optimizers written straight from the papers' update equations.

Each ``*_reference`` function performs one step on one float64 tensor and keeps its own state in
``state``. They are deliberately plain and independent of optimi's code: no shared helpers, no
in-place tricks, one function per optimizer. ``wd_mode`` is ``"l2"``, ``"decoupled"`` or
``"full"`` (fully decoupled, ``decay = lr / max_lr * weight_decay``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _decay_factor(wd_mode: str, lr: float, weight_decay: float, max_lr: float) -> float:
    if wd_mode == "decoupled":
        return lr * weight_decay
    if wd_mode == "full":
        return lr / max_lr * weight_decay
    return 0.0


def adam_reference(
    p: Tensor,
    g: Tensor,
    state: dict,
    *,
    lr: float,
    step: int,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    wd_mode: str,
    max_lr: float,
) -> None:
    """Kingma & Ba (2015), Algorithm 1, with L2 / decoupled (Loshchilov & Hutter) decay."""
    beta1, beta2 = betas
    if wd_mode == "l2":
        g = g + weight_decay * p
    m = state.get("m", torch.zeros_like(p))
    v = state.get("v", torch.zeros_like(p))
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    state["m"], state["v"] = m, v
    m_hat = m / (1 - beta1**step)
    v_hat = v / (1 - beta2**step)
    decayed = p * (1 - _decay_factor(wd_mode, lr, weight_decay, max_lr))
    p.copy_(decayed - lr * m_hat / (v_hat.sqrt() + eps))


def sgd_reference(
    p: Tensor,
    g: Tensor,
    state: dict,
    *,
    lr: float,
    step: int,
    momentum: float,
    dampening: bool,
    torch_init: bool,
    weight_decay: float,
    wd_mode: str,
    max_lr: float,
) -> None:
    """SGD with heavy-ball momentum: b = mu*b + (1 - tau)*g, p -= lr*b."""
    if wd_mode == "l2":
        g = g + weight_decay * p
    if momentum != 0:
        if "b" not in state:
            b = g.clone() if torch_init else (1 - (momentum if dampening else 0.0)) * g
        else:
            b = momentum * state["b"] + (1 - (momentum if dampening else 0.0)) * g
        state["b"] = b
        direction = b
    else:
        direction = g
    decayed = p * (1 - _decay_factor(wd_mode, lr, weight_decay, max_lr))
    p.copy_(decayed - lr * direction)


class ReferenceOptimizer:
    """Runs a ``*_reference`` step function over float64 copies of a list of tensors."""

    def __init__(self, params: list[Tensor], step_fn, lr: float, **hyperparameters):
        self.params = params
        self.step_fn = step_fn
        self.lr = lr
        self.max_lr = hyperparameters.pop("max_lr", None) or lr
        self.hyperparameters = hyperparameters
        self.states: list[dict] = [{} for _ in params]
        self.step_count = 0

    @torch.no_grad()
    def step(self) -> None:
        self.step_count += 1
        for p, state in zip(self.params, self.states):
            self.step_fn(p, p.grad, state, lr=self.lr, step=self.step_count, max_lr=self.max_lr, **self.hyperparameters)
