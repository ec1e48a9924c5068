"""The shared test machinery: every optimizer's test cases and a deterministic training loop.

One parametrized suite runs over these tables; adding an optimizer means adding its rows here
(and its float64 reference in ``reference.py``), never copying tests.

* ``REFERENCE_CASES``: an optimi configuration and an independent reference, ``torch.optim`` where
  it has the same algorithm, else a float64 reference from the paper.
* ``OPTIMIZERS``: one representative configuration per optimizer, for the behaviour tests
  (Kahan, state_dict, validation, gradient release).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor

import optimi
from tests.reference import (
    ReferenceOptimizer,
    adam_reference,
    adan_reference,
    lion_reference,
    radam_reference,
    ranger_reference,
    sgd_reference,
    stableadamw_reference,
)

SHAPES = [(48, 32), (32,), (6, 5, 4), (1,)]
STEPS = 24
LR_DROP_STEP = 12  # the learning rate changes mid-run, as a scheduler would change it


@dataclass(frozen=True)
class ReferenceCase:
    """An optimi configuration and the independent implementation it must match."""

    id: str
    optimi_cls: type
    kwargs: dict[str, Any]
    lr: float
    #: builds the reference optimizer over the given parameters and learning rate
    reference: Callable[[list[Tensor], float], Any]
    #: float32 for a torch.optim reference, float64 for a paper reference
    reference_dtype: torch.dtype = torch.float64


@dataclass(frozen=True)
class OptimizerSpec:
    """One representative configuration of an optimizer for behaviour tests."""

    name: str
    optimi_cls: type
    kwargs: dict[str, Any] = field(default_factory=dict)
    lr: float = 1e-3
    #: (argument, bad value) pairs that must raise a ValueError naming the argument
    invalid: tuple[tuple[str, Any], ...] = ()
    #: whether ``optimizer_accumulation`` is supported by this configuration
    accumulates: bool = True
    #: low-precision dtypes this optimizer trains sensibly in. Pure fp16 state underflows for
    #: optimizers with a second moment (0.01 * g**2 falls below fp16's 6e-8 and the step explodes)
    low_precision_dtypes: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)


def _torch(cls: type, **kwargs: Any) -> Callable[[list[Tensor], float], Any]:
    return lambda params, lr: cls(params, lr=lr, **kwargs)


def _ref(step_fn: Callable, **kwargs: Any) -> Callable[[list[Tensor], float], Any]:
    return lambda params, lr: ReferenceOptimizer(params, step_fn, lr, **kwargs)


_ADAM_HP = dict(betas=(0.9, 0.99), eps=1e-6)
_adam_ref = partial(_ref, adam_reference, **_ADAM_HP)


def _sgd_ref(momentum: float, dampening: bool, torch_init: bool, weight_decay: float, wd_mode: str):
    return _ref(
        sgd_reference,
        momentum=momentum,
        dampening=dampening,
        torch_init=torch_init,
        weight_decay=weight_decay,
        wd_mode=wd_mode,
    )


_LION_LR = 2**-9

_radam_ref = partial(_ref, radam_reference, **_ADAM_HP)


def _ranger_ref(weight_decay: float, wd_mode: str, k: int = 6, alpha: float = 0.5):
    return _ref(ranger_reference, weight_decay=weight_decay, wd_mode=wd_mode, k=k, alpha=alpha, **_ADAM_HP)


def _adan_ref(wd_mode: str, adam_wd: bool, max_lr: float | None = None):
    return _ref(
        adan_reference,
        betas=(0.98, 0.92, 0.99),
        eps=1e-6,
        weight_decay=0.1,
        wd_mode=wd_mode,
        adam_wd=adam_wd,
        max_lr=max_lr,
    )


def _lion_ref(weight_decay: float, wd_mode: str):
    return _ref(lion_reference, betas=(0.9, 0.99), weight_decay=weight_decay, wd_mode=wd_mode)


def _stableadamw_ref(wd_mode: str):
    return _ref(stableadamw_reference, weight_decay=0.1, wd_mode=wd_mode, **_ADAM_HP)


REFERENCE_CASES: list[ReferenceCase] = [
    # Adam / AdamW against torch.optim (fp32)
    ReferenceCase("adam", optimi.Adam, {}, 1e-2, _torch(torch.optim.Adam, **_ADAM_HP), torch.float32),
    ReferenceCase(
        "adam-l2",
        optimi.Adam,
        dict(weight_decay=0.1),
        1e-2,
        _torch(torch.optim.Adam, weight_decay=0.1, **_ADAM_HP),
        torch.float32,
    ),
    ReferenceCase(
        "adam-decoupled",
        optimi.Adam,
        dict(weight_decay=0.1, decouple_wd=True),
        1e-2,
        _torch(torch.optim.AdamW, weight_decay=0.1, **_ADAM_HP),
        torch.float32,
    ),
    ReferenceCase(
        "adamw", optimi.AdamW, {}, 1e-2, _torch(torch.optim.AdamW, weight_decay=1e-2, **_ADAM_HP), torch.float32
    ),
    # fully decoupled decay exists only here: float64 reference of the formula
    ReferenceCase(
        "adam-full",
        optimi.Adam,
        dict(weight_decay=1e-2, decouple_lr=True),
        1e-2,
        _adam_ref(weight_decay=1e-2, wd_mode="full"),
    ),
    ReferenceCase(
        "adamw-full-maxlr",
        optimi.AdamW,
        dict(weight_decay=1e-2, decouple_lr=True, max_lr=2e-2),
        1e-2,
        _adam_ref(weight_decay=1e-2, wd_mode="full", max_lr=2e-2),
    ),
    # SGD against torch.optim (fp32)
    ReferenceCase("sgd", optimi.SGD, {}, 1e-2, _torch(torch.optim.SGD), torch.float32),
    ReferenceCase(
        "sgd-l2", optimi.SGD, dict(weight_decay=0.1), 1e-2, _torch(torch.optim.SGD, weight_decay=0.1), torch.float32
    ),
    ReferenceCase(
        "sgd-momentum", optimi.SGD, dict(momentum=0.9), 1e-2, _torch(torch.optim.SGD, momentum=0.9), torch.float32
    ),
    ReferenceCase(
        "sgd-momentum-l2",
        optimi.SGD,
        dict(momentum=0.9, weight_decay=0.1),
        1e-2,
        _torch(torch.optim.SGD, momentum=0.9, weight_decay=0.1),
        torch.float32,
    ),
    ReferenceCase(
        "sgd-dampening-torch-init",
        optimi.SGD,
        dict(momentum=0.9, dampening=True, torch_init=True),
        1e-2,
        _torch(torch.optim.SGD, momentum=0.9, dampening=0.9),
        torch.float32,
    ),
    # zero-initialised dampened buffer and decoupled modes have no torch.optim twin
    ReferenceCase(
        "sgd-dampening",
        optimi.SGD,
        dict(momentum=0.9, dampening=True),
        1e-2,
        _sgd_ref(0.9, True, False, 0.0, "l2"),
    ),
    ReferenceCase(
        "sgd-momentum-decoupled",
        optimi.SGD,
        dict(momentum=0.9, weight_decay=0.1, decouple_wd=True),
        1e-2,
        _sgd_ref(0.9, False, False, 0.1, "decoupled"),
    ),
    ReferenceCase(
        "sgd-full",
        optimi.SGD,
        dict(momentum=0.9, weight_decay=1e-2, decouple_lr=True),
        1e-2,
        _sgd_ref(0.9, False, False, 1e-2, "full"),
    ),
    # RAdam against torch.optim (fp32); fully decoupled decay against the float64 paper reference
    ReferenceCase("radam", optimi.RAdam, {}, 1e-2, _torch(torch.optim.RAdam, **_ADAM_HP), torch.float32),
    ReferenceCase(
        "radam-l2",
        optimi.RAdam,
        dict(weight_decay=0.1),
        1e-2,
        _torch(torch.optim.RAdam, weight_decay=0.1, **_ADAM_HP),
        torch.float32,
    ),
    ReferenceCase(
        "radam-decoupled",
        optimi.RAdam,
        dict(weight_decay=0.1, decouple_wd=True),
        1e-2,
        _torch(torch.optim.RAdam, weight_decay=0.1, decoupled_weight_decay=True, **_ADAM_HP),
        torch.float32,
    ),
    ReferenceCase(
        "radam-full",
        optimi.RAdam,
        dict(weight_decay=0.1, decouple_lr=True),
        1e-2,
        _radam_ref(weight_decay=0.1, wd_mode="full"),
    ),
    # Ranger: RAdam + Lookahead, float64 reference (k=6 syncs at steps 6, 12, 18, 24)
    ReferenceCase("ranger", optimi.Ranger, {}, 1e-2, _ranger_ref(weight_decay=0.0, wd_mode="decoupled")),
    ReferenceCase(
        "ranger-decoupled",
        optimi.Ranger,
        dict(weight_decay=0.1, k=5, alpha=0.8),
        1e-2,
        _ranger_ref(weight_decay=0.1, wd_mode="decoupled", k=5, alpha=0.8),
    ),
    ReferenceCase(
        "ranger-l2",
        optimi.Ranger,
        dict(weight_decay=0.1, decouple_wd=False),
        1e-2,
        _ranger_ref(weight_decay=0.1, wd_mode="l2"),
    ),
    ReferenceCase(
        "ranger-full",
        optimi.Ranger,
        dict(weight_decay=0.1, decouple_lr=True, k=4),
        1e-2,
        _ranger_ref(weight_decay=0.1, wd_mode="full", k=4),
    ),
    # Adan: proximal (default) and AdamW-style decay, each with the lr or lr / max_lr factor
    ReferenceCase("adan", optimi.Adan, dict(weight_decay=0.1), 1e-2, _adan_ref(wd_mode="decoupled", adam_wd=False)),
    ReferenceCase(
        "adan-adam-wd",
        optimi.Adan,
        dict(weight_decay=0.1, adam_wd=True),
        1e-2,
        _adan_ref(wd_mode="decoupled", adam_wd=True),
    ),
    ReferenceCase(
        "adan-full",
        optimi.Adan,
        dict(weight_decay=0.1, decouple_lr=True),
        1e-2,
        _adan_ref(wd_mode="full", adam_wd=False),
    ),
    ReferenceCase(
        "adan-full-adam-wd",
        optimi.Adan,
        dict(weight_decay=0.1, adam_wd=True, decouple_lr=True, max_lr=2e-2),
        1e-2,
        _adan_ref(wd_mode="full", adam_wd=True, max_lr=2e-2),
    ),
    # Lion: decay is always decoupled. Its steps are +-lr exactly, so in fp32 the parameter's own
    # rounding of p +- lr tends to go the same way every step (a drift of up to one half-ulp per step
    # that any fp32 implementation has); a power-of-two lr keeps that floor well below 1e-6.
    ReferenceCase("lion", optimi.Lion, {}, _LION_LR, _lion_ref(weight_decay=0.0, wd_mode="decoupled")),
    ReferenceCase(
        "lion-decoupled",
        optimi.Lion,
        dict(weight_decay=1.0),
        _LION_LR,
        _lion_ref(weight_decay=1.0, wd_mode="decoupled"),
    ),
    ReferenceCase(
        "lion-full",
        optimi.Lion,
        dict(weight_decay=0.1, decouple_lr=True),
        _LION_LR,
        _lion_ref(weight_decay=0.1, wd_mode="full"),
    ),
    # StableAdamW: decay scaled by the clipped per-tensor learning rate
    ReferenceCase(
        "stableadamw", optimi.StableAdamW, dict(weight_decay=0.1), 1e-2, _stableadamw_ref(wd_mode="decoupled")
    ),
    ReferenceCase(
        "stableadamw-full",
        optimi.StableAdamW,
        dict(weight_decay=0.1, decouple_lr=True),
        1e-2,
        _stableadamw_ref(wd_mode="full"),
    ),
    # bf16 without Kahan runs the per-tensor decay factor through ForeachOps.mul_ (foreach == for-loop)
    ReferenceCase(
        "stableadamw-no-kahan",
        optimi.StableAdamW,
        dict(weight_decay=0.1, kahan_sum=False),
        1e-2,
        _stableadamw_ref(wd_mode="decoupled"),
    ),
]

_ADAM_INVALID = (
    ("lr", -1e-3),
    ("weight_decay", -0.1),
    ("eps", -1e-8),
    ("betas", (1.0, 0.99)),
    ("betas", (0.9, -0.1)),
    ("betas", (0.9,)),
    ("max_lr", -1.0),
    ("lr", float("nan")),
)

BF16 = (torch.bfloat16,)

OPTIMIZERS: list[OptimizerSpec] = [
    OptimizerSpec("adam", optimi.Adam, dict(weight_decay=1e-2), 1e-3, _ADAM_INVALID, low_precision_dtypes=BF16),
    OptimizerSpec("adamw", optimi.AdamW, dict(weight_decay=1e-2), 1e-3, _ADAM_INVALID, low_precision_dtypes=BF16),
    OptimizerSpec(
        "sgd",
        optimi.SGD,
        dict(momentum=0.9, weight_decay=1e-2, decouple_wd=True),
        1e-2,
        (("lr", -0.1), ("momentum", 1.0), ("momentum", -0.5), ("weight_decay", -1.0), ("dampening", 0.5)),
    ),
    OptimizerSpec(
        "adan",
        optimi.Adan,
        dict(weight_decay=2e-2),
        1e-3,
        (
            ("lr", -1e-3),
            ("weight_decay", -0.1),
            ("eps", -1e-8),
            ("betas", (1.0, 0.92, 0.99)),
            ("betas", (0.98, 0.92, -0.1)),
            ("betas", (0.98, 0.92)),
            ("max_lr", -1.0),
        ),
        low_precision_dtypes=BF16,
    ),
    OptimizerSpec(
        "lion",
        optimi.Lion,
        dict(weight_decay=0.1),
        1e-3,
        (("lr", -1e-3), ("weight_decay", -0.1), ("betas", (0.9, 1.0)), ("betas", (0.9, 0.99, 0.9))),
    ),
    OptimizerSpec("radam", optimi.RAdam, dict(weight_decay=1e-2), 1e-3, _ADAM_INVALID, low_precision_dtypes=BF16),
    OptimizerSpec(
        "ranger",
        optimi.Ranger,
        dict(weight_decay=1e-2, k=5),
        # lookahead halves how far the weights travel: at 1e-3 the bf16 run without Kahan barely
        # trails fp32, leaving nothing for Kahan summation to win back in 60 steps
        2e-3,
        _ADAM_INVALID + (("k", 0), ("k", 2.5), ("alpha", 0.0), ("alpha", 1.5)),
        low_precision_dtypes=BF16,
    ),
    OptimizerSpec(
        "stableadamw", optimi.StableAdamW, dict(weight_decay=1e-2), 1e-3, _ADAM_INVALID, low_precision_dtypes=BF16
    ),
]


# -- a deterministic training loop shared by every test -------------------------------------------


def make_params(dtype: torch.dtype = torch.float32, seed: int = 0, shapes=SHAPES) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator).to(dtype).requires_grad_() for shape in shapes]


def clone_params(params: list[Tensor], dtype: torch.dtype | None = None) -> list[Tensor]:
    return [p.detach().clone().to(dtype or p.dtype).requires_grad_() for p in params]


def synthetic_grad(param: Tensor, step: int, index: int) -> Tensor:
    """Gradient of a noisy quadratic, computed in fp32 from the current parameter.

    It depends on the parameter (closed loop, like real training) plus step-dependent noise that
    is the same for every implementation.
    """
    generator = torch.Generator().manual_seed(1000 * step + index)
    noise = torch.randn(param.shape, generator=generator)
    return (0.5 * param.detach().float() + noise).to(param.dtype)


def set_lr(optimizer: Any, lr: float) -> None:
    if hasattr(optimizer, "param_groups"):
        for group in optimizer.param_groups:
            group["lr"] = lr
    else:
        optimizer.lr = lr


def lr_at(step: int, lr: float) -> float:
    return lr if step < LR_DROP_STEP else lr * 0.3


def train(optimizer: Any, params: list[Tensor], lr: float, steps: int = STEPS, start: int = 0) -> None:
    """Run ``steps`` optimizer steps on synthetic gradients, dropping the LR at ``LR_DROP_STEP``."""
    for step in range(start, start + steps):
        set_lr(optimizer, lr_at(step, lr))
        for index, param in enumerate(params):
            param.grad = synthetic_grad(param, step, index)
        optimizer.step()


def max_relative_error(actual: list[Tensor], expected: list[Tensor]) -> float:
    """Largest |actual - expected| relative to the tensor's largest magnitude."""
    return max(
        ((a.detach().double() - e.detach().double()).abs().max() / e.detach().double().abs().max()).item()
        for a, e in zip(actual, expected)
    )
