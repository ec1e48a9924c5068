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


def adan_reference(
    p: Tensor,
    g: Tensor,
    state: dict,
    *,
    lr: float,
    step: int,
    betas: tuple[float, float, float],
    eps: float,
    weight_decay: float,
    wd_mode: str,
    adam_wd: bool,
    max_lr: float,
) -> None:
    """Xie et al. (2022), Algorithm 1, in the paper's notation (its beta_i are one minus ours).

    The moments start at zero and are debiased, and g_0 = g_1 (the first difference is zero), as
    in the authors' implementation. ``wd_mode`` is "decoupled" or "full" (the factor); the paper's
    proximal step divides by 1 + factor, ``adam_wd`` multiplies by 1 - factor instead.
    """
    b1, b2, b3 = (1 - beta for beta in betas)  # the paper's betas
    g_prev = state.get("g_prev", g)
    m = (1 - b1) * state.get("m", torch.zeros_like(p)) + b1 * g
    v = (1 - b2) * state.get("v", torch.zeros_like(p)) + b2 * (g - g_prev)
    n = (1 - b3) * state.get("n", torch.zeros_like(p)) + b3 * (g + (1 - b2) * (g - g_prev)) ** 2
    state.update(m=m, v=v, n=n, g_prev=g.clone())
    m_hat = m / (1 - betas[0] ** step)
    v_hat = v / (1 - betas[1] ** step)
    n_hat = n / (1 - betas[2] ** step)
    eta = lr / (n_hat.sqrt() + eps)
    factor = _decay_factor(wd_mode, lr, weight_decay, max_lr)
    if adam_wd:
        p.copy_(p * (1 - factor) - eta * (m_hat + (1 - b2) * v_hat))
    else:
        p.copy_((p - eta * (m_hat + (1 - b2) * v_hat)) / (1 + factor))


def lion_reference(
    p: Tensor,
    g: Tensor,
    state: dict,
    *,
    lr: float,
    step: int,
    betas: tuple[float, float],
    weight_decay: float,
    wd_mode: str,
    max_lr: float,
) -> None:
    """Chen et al. (2023), Algorithm 2 (decoupled decay; "full" scales it by lr / max_lr)."""
    beta1, beta2 = betas
    m = state.get("m", torch.zeros_like(p))
    update = torch.sign(beta1 * m + (1 - beta1) * g)
    p.copy_(p * (1 - _decay_factor(wd_mode, lr, weight_decay, max_lr)) - lr * update)
    state["m"] = beta2 * m + (1 - beta2) * g


def radam_reference(
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
    """Liu et al. (2020), Algorithm 2, with eps added to sqrt(v_t) as torch.optim.RAdam does."""
    beta1, beta2 = betas
    if wd_mode == "l2":
        g = g + weight_decay * p
    m = beta1 * state.get("m", torch.zeros_like(p)) + (1 - beta1) * g
    v = beta2 * state.get("v", torch.zeros_like(p)) + (1 - beta2) * g * g
    state["m"], state["v"] = m, v
    m_hat = m / (1 - beta1**step)
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * beta2**step / (1 - beta2**step)
    decayed = p * (1 - _decay_factor(wd_mode, lr, weight_decay, max_lr))
    if rho_t > 5:
        l_t = (1 - beta2**step) ** 0.5 / (v.sqrt() + eps)
        r_t = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
        p.copy_(decayed - lr * r_t * m_hat * l_t)
    else:
        p.copy_(decayed - lr * m_hat)


def ranger_reference(
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
    k: int,
    alpha: float,
    max_lr: float,
) -> None:
    """RAdam inside Lookahead (Zhang et al. 2019, Algorithm 1): every k steps
    phi <- phi + alpha (theta - phi), theta <- phi."""
    slow = state.setdefault("slow", p.clone())
    radam_reference(
        p, g, state, lr=lr, step=step, betas=betas, eps=eps, weight_decay=weight_decay, wd_mode=wd_mode, max_lr=max_lr
    )
    if step % k == 0:
        slow = slow + alpha * (p - slow)
        state["slow"] = slow
        p.copy_(slow)


def stableadamw_reference(
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
    """Wortsman et al. (2023), Algorithm 2: AdamW with debiased betas and per-tensor update clipping."""
    beta1, beta2 = betas
    beta1_hat = beta1 * (1 - beta1 ** (step - 1)) / (1 - beta1**step)
    beta2_hat = beta2 * (1 - beta2 ** (step - 1)) / (1 - beta2**step)
    m = beta1_hat * state.get("m", torch.zeros_like(p)) + (1 - beta1_hat) * g
    u = beta2_hat * state.get("u", torch.zeros_like(p)) + (1 - beta2_hat) * g * g
    state["m"], state["u"] = m, u
    rms = (g * g / torch.clamp(u, min=eps**2)).mean().sqrt().item()
    eta = lr / max(1.0, rms)
    factor = _decay_factor(wd_mode, eta, weight_decay, max_lr)
    p.copy_(p - factor * p - eta * m / (u.sqrt() + eps))


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
