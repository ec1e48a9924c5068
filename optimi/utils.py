"""Helpers for setting up optimi optimizers."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from optimi._ops import LOW_PRECISION_DTYPES

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


def to_low_precision(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Cast ``model``'s floating-point parameters and buffers to ``dtype`` in place (pure
    low-precision training, where optimi's Kahan summation replaces an fp32 master copy)."""
    if dtype not in LOW_PRECISION_DTYPES:
        raise ValueError(f"Invalid dtype: {dtype} (must be torch.bfloat16 or torch.float16)")
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(dtype)
    return model
