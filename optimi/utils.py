"""Helpers for setting up optimi optimizers."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from optimi._low_precision import split_master_
from optimi._ops import LOW_PRECISION_DTYPES
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
    for tensor in list(model.parameters()) + list(model.buffers()):
        if not tensor.is_floating_point():
            continue
        if optimizer is None or tensor not in managed or tensor.dtype != torch.float32:
            tensor.data = tensor.data.to(dtype)
            continue
        if optimizer.state.get(tensor):
            raise ValueError(
                "to_low_precision(..., optimizer=...) must run before the optimizer's first step: it already holds "
                "float32 state for a parameter being cast"
            )
        _cast_keeping_low_bits(tensor, dtype, optimizer)
    return model


def _managed_parameters(optimizer: OptimiOptimizer) -> set[torch.Tensor]:
    return {param for group in optimizer.param_groups for param in group["params"]}


@torch.no_grad()
def _cast_keeping_low_bits(param: torch.Tensor, dtype: torch.dtype, optimizer: OptimiOptimizer) -> None:
    """Cast float32 ``param`` to ``dtype`` and seed its remainder or compensation with what the cast drops."""
    full = param.data
    group = optimizer.group_of(param)
    if dtype == torch.bfloat16 and group.get("low_precision") == "remainder":
        rounded = torch.empty_like(full, dtype=dtype)
        remainder = torch.empty_like(full, dtype=torch.int16)
        split_master_(rounded, remainder, full.clone())
        param.data = rounded
        optimizer.init_param_state(param, group)["remainder"].copy_(remainder)
        return
    param.data = full.to(dtype)
    if optimizer.uses_kahan(param, group):
        state = optimizer.init_param_state(param, group)
        state["kahan_comp"].copy_(full - param.data.float())
