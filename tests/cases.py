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
from tests.reference import ReferenceOptimizer, adam_reference, sgd_reference

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
