"""Helpers for setting up optimi optimizers."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from optimi._ops import LOW_PRECISION_DTYPES
from optimi._torch_internals import convert_module_tensors
from optimi.optimizer import OptimiOptimizer

__all__ = ["param_groups_weight_decay", "to_low_precision"]


def param_groups_weight_decay(
    model: nn.Module,
    weight_decay: float = 1e-5,
    additional_layers: Iterable[str] | None = None,
) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into a decayed and a non-decayed param group.

    Biases, normalization weights and every other parameter with fewer than two dimensions get
    no weight decay, nor do parameters whose name contains one of ``additional_layers``
    (for example ``["embed"]``).

    Returns ``[{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]``,
    ready to pass to any optimizer.
    """
    if weight_decay < 0:
        raise ValueError(f"Invalid weight_decay: {weight_decay!r} (must be in [0, inf))")
    skip = set(additional_layers) if additional_layers is not None else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or any(layer in name for layer in skip):
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


def to_low_precision(
    model: nn.Module, dtype: torch.dtype = torch.bfloat16, optimizer: OptimiOptimizer | None = None
) -> nn.Module:
    """Cast ``model``'s floating-point parameters and buffers to ``dtype`` in place (pure
    low-precision training, where optimi's Kahan summation or remainder replaces an fp32 master copy).

    With ``optimizer`` (built on ``model``'s float32 parameters, before its first step), the bits
    the cast drops are kept in each parameter's optimizer state instead of being lost: in
    ``low_precision="remainder"`` the int16 remainder is seeded so that
    ``optimizer.master_param(p)`` equals the float32 value exactly (the parameter is then that
    value rounded to nearest), in ``"kahan"`` the compensation buffer is seeded so that ``p + c``
    equals it to Kahan's precision (about 16 significant bits). An fp32 checkpoint thus becomes a
    bf16 run without losing its low bits ([Note: low-precision update modes]).

    Raises:
        ValueError: ``dtype`` is not bf16/fp16, or ``optimizer`` already has state for a parameter
            being cast (its moments would keep the float32 dtype).
    """
    if dtype not in LOW_PRECISION_DTYPES:
        raise ValueError(f"Invalid dtype: {dtype} (must be torch.bfloat16 or torch.float16)")
    managed = _managed_parameters(optimizer) if optimizer is not None else set()
    if optimizer is not None and any(optimizer.state.get(param) for param in managed):
        raise ValueError(
            "to_low_precision(..., optimizer=...) must run before the optimizer's first step: it already holds "
            "float32 state for a parameter being cast"
        )
    # what each cast parameter's state must be seeded with, filled in while casting
    seeds: dict[torch.Tensor, tuple[str, torch.Tensor]] = {}

    def cast(tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_floating_point():
            return tensor
        if optimizer is None or tensor not in managed or tensor.dtype != torch.float32:
            return tensor.to(dtype)
        rounded, seed = optimizer._cast_keeping_low_bits(tensor, dtype)
        if seed is not None:
            seeds[tensor] = seed
        return rounded

    # parameters stay the same objects, so the optimizer keeps them ([Note] in convert_module_tensors)
    convert_module_tensors(model, cast)
    assert optimizer is not None or not seeds
    for param, (key, value) in seeds.items():
        optimizer.init_param_state(param, optimizer.group_of(param))[key].copy_(value)
    return model


def _managed_parameters(optimizer: OptimiOptimizer) -> set[torch.Tensor]:
    return {param for group in optimizer.param_groups for param in group["params"]}
