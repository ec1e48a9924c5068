"""The dispatching entry points that ``optimi.prepare_for_gradient_release`` calls for distributed models."""

from __future__ import annotations

import warnings

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from optimi.distributed.ddp import prepare_ddp_gradient_release, remove_ddp_gradient_release
from optimi.distributed.fsdp import is_fsdp2_model, prepare_fsdp_gradient_release, remove_fsdp_gradient_release
from optimi.gradient_release import check_release_optimizer
from optimi.optimizer import OptimiOptimizer

__all__ = ["prepare_gradient_release", "remove_gradient_release"]


def prepare_gradient_release(
    model: nn.Module, optimizer: OptimiOptimizer, *, ignore_existing_hooks: bool = False
) -> None:
    """Gradient release for a ``DistributedDataParallel`` or FSDP2 model.

    Called by :func:`optimi.prepare_for_gradient_release` for distributed models. DDP gets a
    communication hook that steps each bucket after its all-reduce (``optimi/distributed/ddp.py``);
    an FSDP2 model gets post-accumulate-grad hooks on its sharded parameters that step each local
    shard after its reduce-scatter (``optimi/distributed/fsdp.py``).
    """
    check_release_optimizer(optimizer)
    if isinstance(model, DistributedDataParallel):
        prepare_ddp_gradient_release(model, optimizer, ignore_existing_hooks=ignore_existing_hooks)
    elif is_fsdp2_model(model):
        prepare_fsdp_gradient_release(model, optimizer, ignore_existing_hooks=ignore_existing_hooks)
    else:
        raise TypeError(
            f"expected a DistributedDataParallel or FSDP2 (fully_shard) model, got {type(model).__qualname__}; "
            "use optimi.prepare_for_gradient_release for a plain module"
        )


def remove_gradient_release(model: nn.Module) -> None:
    """Undo :func:`prepare_gradient_release` (see ``ddp.py`` for what DDP allows)."""
    if isinstance(model, DistributedDataParallel):
        removed = remove_ddp_gradient_release(model)
    else:
        removed = remove_fsdp_gradient_release(model)
    if not removed:
        warnings.warn("model has no gradient release hooks to remove", stacklevel=2)
