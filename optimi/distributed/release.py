"""The public distributed entry points: gradient release for ``DistributedDataParallel`` and FSDP2 models.

Importing this module imports ``ddp`` and ``fsdp``, which register their installers with
``optimi.gradient_release``; installing and removing is the shared helper there ([Note: one
installer for every kind of model] in ``optimi/gradient_release.py``).
"""

from __future__ import annotations

import warnings

from torch import nn

import optimi.distributed.ddp  # noqa: F401 (registers the "ddp" installer)
import optimi.distributed.fsdp  # noqa: F401 (registers the "fsdp2" installer)
from optimi.gradient_release import (
    check_release_optimizer,
    install_release_hooks,
    model_kind,
    uninstall_release_hooks,
)
from optimi.optimizer import OptimiOptimizer

__all__ = ["prepare_gradient_release", "remove_gradient_release"]


def prepare_gradient_release(
    model: nn.Module, optimizer: OptimiOptimizer, *, ignore_existing_hooks: bool = False
) -> None:
    """Gradient release for a ``DistributedDataParallel`` or FSDP2 model.

    What :func:`optimi.prepare_for_gradient_release` does for these models. DDP gets a
    communication hook that steps each bucket once its all-reduce completes
    (``optimi/distributed/ddp.py``); an FSDP2 model gets post-accumulate-grad hooks on its sharded
    parameters that step each local shard after its reduce-scatter (``optimi/distributed/fsdp.py``).

    Raises:
        TypeError: ``optimizer`` is not an optimi optimizer; ``model`` is neither DDP nor FSDP2.
        ValueError: as :func:`optimi.prepare_for_gradient_release`, and for a DDP model that already
            has a communication hook that is not optimi's.
    """
    check_release_optimizer(optimizer)
    if model_kind(model) == "plain":
        raise TypeError(
            f"expected a DistributedDataParallel or FSDP2 (fully_shard) model, got {type(model).__qualname__}; "
            "use optimi.prepare_for_gradient_release for a plain module"
        )
    install_release_hooks(model, optimizer, ignore_existing_hooks=ignore_existing_hooks)


def remove_gradient_release(model: nn.Module) -> None:
    """Undo :func:`prepare_gradient_release` (see ``ddp.py`` for what DDP allows); warns if there is nothing to undo."""
    # a plain module's hooks are optimi.remove_gradient_release's to remove
    if model_kind(model) == "plain" or not uninstall_release_hooks(model):
        warnings.warn("model has no gradient release hooks to remove", stacklevel=2)
