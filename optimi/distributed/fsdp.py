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
4. the release hook installed here (``optimi.gradient_release.release_step``) steps that
   parameter's local shard with the averaged gradient shard (``optimizer.step_param``, which hands
   the kernels local tensors, see ``optimi/distributed/_dtensor.py``) and drops ``.grad``. Once
   every parameter of the group has been stepped nothing references the reduce-scatter output any
   more and it is freed.

The installer below is registered for the ``"fsdp2"`` kind; the checks, the up-front sharded state
and the removal are shared with the other kinds ([Note: one installer for every kind of model] in
``optimi/gradient_release.py``).

Autograd itself never sees the sharded parameters (the forward uses the unsharded ones), so the
hooks run exactly once per parameter and backward, after the reduction. The hooks of the root
module's own parameters run from FSDP2's final backward callback, after the last group.

With ``optimizer.optimizer_accumulation = True`` the same hooks fold each micro-step's reduced
gradient shard into the sharded state; no gradient survives the micro-step. Turning gradient sync
off (``model.set_requires_gradient_sync(False)``, FSDP2's ``no_sync``) would skip steps 2-4 and keep
full unsharded gradients instead, so a forward with sync off raises while release is active.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from optimi.gradient_release import (
    ReleaseInstaller,
    Removable,
    hook_each_parameter,
    named_trainable,
    register_release_installer,
)
from optimi.optimizer import OptimiOptimizer

__all__: list[str] = []


def _install(model: nn.Module, optimizer: OptimiOptimizer, trainable: list[tuple[str, Tensor]]) -> list[Removable]:
    """Release hooks on the sharded parameters, and the forward pre-hook that refuses sync off.

    FSDP2 calls a sharded parameter's post-accumulate-grad hooks after the reduce-scatter, with
    ``.grad`` a DTensor view of this rank's averaged shard (see [Note: what happens when under FSDP2]).
    """
    return [*hook_each_parameter(optimizer, trainable), model.register_forward_pre_hook(_refuse_sync_off)]


register_release_installer("fsdp2", ReleaseInstaller(trainable=named_trainable, install=_install))


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
