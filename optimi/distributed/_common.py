"""Checks shared by the FSDP2 and DDP gradient-release entry points."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from optimi.optimizer import OptimiOptimizer

__all__ = ["check_release_optimizer", "check_managed", "check_no_existing_hooks", "name_list"]


def check_release_optimizer(optimizer: Any) -> None:
    """Raise unless ``optimizer`` is an optimi optimizer built with ``gradient_release=True``."""
    if not isinstance(optimizer, OptimiOptimizer):
        raise TypeError(
            "gradient release needs an optimi optimizer constructed with gradient_release=True, "
            f"got {type(optimizer).__module__}.{type(optimizer).__qualname__}"
        )
    if not optimizer.defaults.get("gradient_release", False):
        raise ValueError(
            f"optimizer {type(optimizer).__name__} was constructed with gradient_release=False; "
            "construct it with gradient_release=True to use gradient release"
        )


def name_list(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names) - limit} more)"


def check_managed(optimizer: OptimiOptimizer, named_params: list[tuple[str, Tensor]]) -> None:
    """Raise if a trainable parameter is not in ``optimizer`` (release would never step it)."""
    missing = []
    for name, param in named_params:
        try:
            optimizer.group_of(param)
        except ValueError:
            missing.append(name)
    if missing:
        raise ValueError(
            f"{len(missing)} trainable parameter(s) of the model are not in the optimizer, so gradient release "
            f"would never step them: {name_list(missing)}. Build the optimizer from the wrapped model's "
            "parameters (after fully_shard / DistributedDataParallel) or set requires_grad=False"
        )


def check_no_existing_hooks(named_params: list[tuple[str, Tensor]], ignore_existing_hooks: bool) -> None:
    """Raise if a parameter already has post-accumulate-grad hooks, unless told to ignore them."""
    if ignore_existing_hooks:
        return
    hooked = [
        name
        for name, p in named_params
        if any(
            not getattr(hook, "optimi_memory_hook", False)
            for hook in (getattr(p, "_post_accumulate_grad_hooks", None) or {}).values()
        )
    ]
    if hooked:
        raise ValueError(
            f"parameter(s) {name_list(hooked)} already have post-accumulate-grad hooks; gradient release frees "
            "the gradient in its own hook, so a later hook would see None. Pass ignore_existing_hooks=True to "
            "install the release hooks anyway"
        )
