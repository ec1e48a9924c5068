"""Gradient release on FSDP2 (``torch.distributed.fsdp.fully_shard``) models.

[Note: what happens when under FSDP2]
For each FSDP parameter group (one ``fully_shard`` call), in backward:

1. autograd computes the *unsharded* gradients of the group's parameters;
2. FSDP2's post-backward reduce-scatters them (averaging over the data-parallel ranks) into one
   flat buffer, of which each rank keeps its own shard;
3. for every parameter of the group, FSDP2 sets the *sharded* parameter's ``.grad`` to a DTensor
   view of that buffer and then calls the sharded parameter's post-accumulate-grad hooks
   (``foreach_reduce`` in ``torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py``; on CUDA
   inside the post-reduce stream, so the step is ordered after the reduce-scatter);
4. the release hook installed here steps that parameter's local shard with the averaged gradient
   shard (``optimizer.step_param``, which hands the kernels local tensors, see
   ``optimi/distributed/_dtensor.py``) and drops ``.grad``. Once every parameter of the group has
   been stepped nothing references the reduce-scatter output any more and it is freed.

Autograd itself never sees the sharded parameters (the forward uses the unsharded ones), so the
hooks run exactly once per parameter and backward, after the reduction. The hooks of the root
module's own parameters run from FSDP2's final backward callback, after the last group.

With ``optimizer.optimizer_accumulation = True`` the same hooks fold each micro-step's reduced
gradient shard into the sharded state; no gradient survives the micro-step. Turning gradient sync
off (``model.set_requires_gradient_sync(False)``, FSDP2's ``no_sync``) would skip steps 2-4 and keep
full unsharded gradients instead, so a forward with sync off raises while release is active.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from optimi.gradient_release import check_managed, check_no_existing_hooks, check_release_optimizer
from optimi.optimizer import OptimiOptimizer

__all__ = ["is_fsdp2_model", "prepare_fsdp_gradient_release", "remove_fsdp_gradient_release"]

# attribute on the root module holding what prepare_fsdp_gradient_release installed
_HOOKS_ATTR = "_optimi_fsdp_gradient_release"


@dataclass
class _FSDPReleaseHooks:
    """What :func:`prepare_fsdp_gradient_release` installed on a model."""

    #: the optimizer the hooks step
    optimizer: OptimiOptimizer
    #: one post-accumulate-grad hook handle per trainable sharded parameter
    handles: list[RemovableHandle] = field(default_factory=list)
    #: the forward pre-hook that refuses to run with gradient sync turned off
    sync_check: RemovableHandle | None = None


def is_fsdp2_model(model: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``model`` or one of its submodules."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return any(isinstance(module, FSDPModule) for module in model.modules())


def prepare_fsdp_gradient_release(
    model: nn.Module, optimizer: OptimiOptimizer, *, ignore_existing_hooks: bool = False
) -> None:
    """Step each sharded parameter's local shard right after its reduce-scatter.

    See [Note: what happens when under FSDP2]. ``optimizer`` must have been built from the sharded
    parameters (after ``fully_shard``) with ``gradient_release=True``. All optimizer state is
    allocated here, as DTensors sharded like the parameters, before the first backward (lazily
    created state fragments the allocator, see ``optimi/gradient_release.py``).

    Raises:
        TypeError: ``optimizer`` is not an optimi optimizer.
        ValueError: ``gradient_release=False``; a trainable parameter is not in ``optimizer``; the
            model is already prepared; a parameter already has post-accumulate-grad hooks and
            ``ignore_existing_hooks`` is False.
    """
    check_release_optimizer(optimizer)
    if getattr(model, _HOOKS_ATTR, None) is not None:
        raise ValueError(
            "model is already prepared for gradient release; call optimi.remove_gradient_release(model) first"
        )
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    check_managed(optimizer, trainable)
    check_no_existing_hooks(trainable, ignore_existing_hooks)

    # sharded state up front: zeros_like of a DTensor parameter is a DTensor with its placements
    for _, param in trainable:
        optimizer.init_param_state(param, optimizer.group_of(param))

    hooks = _FSDPReleaseHooks(optimizer)
    for _, param in trainable:
        hooks.handles.append(param.register_post_accumulate_grad_hook(_release_hook(optimizer)))
    hooks.sync_check = model.register_forward_pre_hook(_refuse_sync_off)
    setattr(model, _HOOKS_ATTR, hooks)
    optimizer.set_gradient_release_active(True)


def remove_fsdp_gradient_release(model: nn.Module) -> bool:
    """Remove what :func:`prepare_fsdp_gradient_release` installed; False if nothing was."""
    hooks: _FSDPReleaseHooks | None = getattr(model, _HOOKS_ATTR, None)
    if hooks is None:
        return False
    for handle in hooks.handles:
        handle.remove()
    if hooks.sync_check is not None:
        hooks.sync_check.remove()
    hooks.optimizer.set_gradient_release_active(False)
    delattr(model, _HOOKS_ATTR)
    return True


def _release_hook(optimizer: OptimiOptimizer):
    """Step the sharded parameter on its reduce-scattered local gradient shard, then free it."""

    def hook(param: Tensor) -> None:
        # param.grad is a DTensor view of this group's reduce-scatter output, already averaged
        optimizer.step_param(param)
        param.grad = None

    return hook


def _fsdp_param_groups(state: Any) -> list[Any]:
    """The (private) FSDP2 parameter groups of one module's FSDP state; empty if their layout is unknown.

    torch 2.10 keeps at most one group, as ``_fsdp_param_group`` (None without parameters); later torch
    keeps a list, ``_fsdp_param_groups``, and turns ``_fsdp_param_group`` into a property that raises
    when there are several. Read the list where it exists, so the newer layout never hits that error.
    """
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is not None:
        return list(groups)
    group = getattr(state, "_fsdp_param_group", None)
    return [] if group is None else [group]


def _refuse_sync_off(module: nn.Module, args: Any) -> None:
    """Forward pre-hook: gradient release needs every backward to reduce-scatter."""
    from torch.distributed.fsdp import FSDPModule

    for submodule in module.modules():
        if not isinstance(submodule, FSDPModule):
            continue
        # FSDP2 keeps the flag on its (private) parameter groups; skip the check if that changes
        for param_group in _fsdp_param_groups(submodule._get_fsdp_state()):
            if not getattr(param_group, "reduce_grads", True):
                raise RuntimeError(
                    "gradient sync is off (set_requires_gradient_sync(False)) while optimi gradient release is "
                    "active: the backward would skip the reduce-scatter, so no parameter would be stepped and "
                    "full unsharded gradients would pile up. For accumulation keep gradient sync on and set "
                    "optimizer.optimizer_accumulation = True for the micro-steps instead"
                )
