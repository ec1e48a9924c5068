"""The one module that knows about DTensor: local views, sharded state, cross-shard reductions.

[Note: kernels see local shards]
Under FSDP2 every parameter, its gradient and its optimizer state are DTensors sharded the same
way (``Shard(0)`` over the data-parallel mesh). The update of an elementwise optimizer is
elementwise, so each rank can run it on its local shards alone: the local gradient shard already
holds the reduce-scattered (averaged) gradient of exactly the elements the rank owns. Running
optimi's kernels on DTensors would go through DTensor's dispatcher for every primitive (slow,
and the foreach and fused paths are not written for it), so :func:`step_local` hands the kernels
plain local tensors that share storage with the DTensors: every in-place write lands in the
sharded parameter and sharded state.

State is created by ``torch.zeros_like(param)`` (and friends) in the optimizers' ``_init_state``;
on a DTensor that returns a DTensor with the parameter's mesh and placements, so moments, Kahan
buffers and slow weights are sharded like the parameter and ``torch.distributed.checkpoint``
saves and reshards them like any other DTensor.

[Note: whole-tensor statistics under sharding]
A statistic over a whole tensor (StableAdamW's per-tensor RMS) computed on a local shard would
differ per rank and from the unsharded run. The optimizer asks for such sums through
``optimizer._reduce_sums`` (``None`` in a single process); while :func:`step_local` runs it is a
function that all-reduces the per-tensor sums and element counts over the mesh dimensions on which
each parameter is sharded, so N ranks compute the statistic of the full tensor, exactly as one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

from optimi._clipping import sum_of_squares
from optimi._low_precision import MASTER_MODES

__all__ = [
    "is_dtensor",
    "local",
    "local_nbytes",
    "first_element_index",
    "map_local",
    "global_sum_of_squares",
    "reduce_partial_sums",
    "full_tensor",
    "shard_groups",
    "step_local",
]


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a DTensor (an FSDP2 parameter, gradient or state entry)."""
    return isinstance(tensor, DTensor)


def local(tensor: Any) -> Any:
    """The local shard of a DTensor (sharing its storage); anything else unchanged."""
    if isinstance(tensor, DTensor):
        with torch.no_grad():  # to_local without autograd returns the local tensor itself
            return tensor.to_local()
    return tensor


def local_nbytes(tensor: Tensor | None) -> int:
    """Bytes this rank holds for ``tensor``: the local shard of a DTensor, else the tensor."""
    if tensor is None:
        return 0
    tensor = local(tensor)
    return tensor.numel() * tensor.element_size()


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole tensor (all-gathered for a DTensor: collective); a plain tensor unchanged."""
    if isinstance(tensor, DTensor):
        return tensor.full_tensor()
    return tensor


def shard_groups(tensor: Tensor) -> tuple[dist.ProcessGroup, ...]:
    """The process groups over which ``tensor`` is sharded (empty for plain or replicated tensors).

    FSDP2 has one (its data-parallel mesh); HSDP shards over one mesh dimension and replicates over
    the other, so only the shard dimension's group holds the pieces of one tensor.
    """
    if not isinstance(tensor, DTensor):
        return ()
    mesh = tensor.device_mesh
    return tuple(mesh.get_group(dim) for dim, placement in enumerate(tensor.placements) if placement.is_shard())


def first_element_index(tensor: Tensor) -> int:
    """Where this rank's local shard of ``tensor`` starts in the whole tensor's row-major order.

    FSDP2 (and HSDP) shard dimension 0 over one mesh dimension the way ``torch.chunk`` splits it:
    ``ceil(rows / ranks)`` rows per rank, so the local elements are one contiguous block of the
    whole tensor. A plain or replicated tensor starts at 0. Other layouts (several sharded mesh
    dimensions, a sharded dimension other than 0) raise ``NotImplementedError``.
    """
    if not isinstance(tensor, DTensor):
        return 0
    sharded = [(dim, placement) for dim, placement in enumerate(tensor.placements) if placement.is_shard()]
    if not sharded:
        return 0
    if len(sharded) > 1 or sharded[0][1].dim != 0:
        raise NotImplementedError(
            f"stochastic rounding on a DTensor sharded as {tensor.placements}: only Shard(0) on one mesh "
            "dimension (FSDP2, HSDP) is supported"
        )
    mesh_dim = sharded[0][0]
    rows = tensor.shape[0]
    ranks = tensor.device_mesh.size(mesh_dim)
    rows_per_rank = -(-rows // ranks)
    start_row = min(tensor.device_mesh.get_local_rank(mesh_dim) * rows_per_rank, rows)
    return start_row * (tensor.numel() // rows if rows else 0)


def _wrap_like(local_tensor: Tensor, param: DTensor) -> DTensor:
    """A DTensor with ``param``'s mesh, placements and global shape around a local shard."""
    return DTensor.from_local(
        local_tensor,
        param.device_mesh,
        param.placements,
        run_check=False,
        shape=param.shape,
        stride=param.stride(),
    )


def rows_like(param: DTensor, columns: int, dtype: torch.dtype) -> DTensor:
    """Zeros of shape ``(param.shape[0], columns)``, sharded by rows exactly like ``param``.

    For per-row block scales ([Note: 8-bit optimizer state] in ``optimi/_quantization.py``): a
    ``Shard(0)`` DTensor splits rows the same way whatever its other dimensions, so each rank's
    scales belong to the rows of its parameter shard. Other placements than ``Shard(0)`` and
    ``Replicate`` are refused. (Plain parameters never come here: the single-process path makes
    their scales itself.)
    """
    for placement in param.placements:
        if placement.is_shard() and placement.dim != 0:
            raise NotImplementedError(
                f"state_bits=8 on a DTensor sharded as {param.placements}: blocks follow rows, so only Shard(0) "
                "(FSDP2, HSDP) and Replicate placements are supported"
            )
    local_param = local(param)
    return DTensor.from_local(
        torch.zeros(local_param.shape[0], columns, dtype=dtype, device=local_param.device),
        param.device_mesh,
        param.placements,
        run_check=False,
        shape=torch.Size((param.shape[0], columns)),
        stride=(columns, 1),
    )


def map_local(function: Callable[..., Tensor], like: Tensor, *tensors: Tensor) -> Tensor:
    """``function`` of the local shards of ``tensors``, as a DTensor sharded like ``like``.

    For bit manipulations (the bf16 + int16 master split) that must not go through DTensor's
    dispatch: an elementwise function of shards that are laid out alike is the shard of the
    function of the whole tensors. Plain tensors pass straight to ``function``.
    """
    result = function(*(local(t) for t in tensors))
    return _wrap_like(result, like) if isinstance(like, DTensor) else result


def global_sum_of_squares(grads: Sequence[Tensor]) -> Tensor:
    """``sum_i ||g_i||^2`` over the whole tensors of possibly sharded ``grads`` (0-d float32; collective).

    Each rank sums the squares of its local shards; shards of one process group are added with
    one all-reduce per group (FSDP2: a single scalar all-reduce), while replicated or plain
    gradients, identical on every rank (DDP averages them), count once.
    """
    partial_sums: dict[tuple[dist.ProcessGroup, ...], Tensor] = {}
    by_groups: dict[tuple[dist.ProcessGroup, ...], list[Tensor]] = {}
    for grad in grads:
        by_groups.setdefault(shard_groups(grad), []).append(local(grad))
    for groups, tensors in by_groups.items():
        partial_sums[groups] = sum_of_squares(tensors)
    return reduce_partial_sums(partial_sums, non_finite=False)[0]


def reduce_partial_sums(
    partial_sums: dict[tuple[dist.ProcessGroup, ...], Tensor], non_finite: bool
) -> tuple[Tensor, bool]:
    """Whole-model sum of squares from per-shard-group partial sums, and whether any rank saw a non-finite one.

    Collective over each key's process groups: every rank must call it with the same keys (FSDP2:
    one group, one all-reduce of two numbers). ``non_finite`` travels with the sums, so a NaN on
    one rank's shard is reported on all of them.
    """
    total: Tensor | None = None
    any_non_finite = non_finite
    for groups, partial in partial_sums.items():
        packed = torch.stack([partial.float(), torch.tensor(float(non_finite), device=partial.device)])
        for group in groups:
            dist.all_reduce(packed, group=group)
        if groups and bool(packed[1] > 0):  # some rank saw a non-finite gradient in these shards
            any_non_finite = True
        total = packed[0] if total is None else total + packed[0].to(total.device)
    return (total if total is not None else torch.zeros((), dtype=torch.float32)), any_non_finite


def _local_state(state: dict[str, Any]) -> dict[str, Any]:
    return {key: local(value) for key, value in state.items()}


def _write_back(state: dict[str, Any], local_state: dict[str, Any], param: Tensor) -> None:
    """Carry what the kernels changed in a local state view back into the DTensor state.

    Tensors were updated in place (they share storage); only entries the optimizer added or
    rebound during the step (a buffer created late, a Python counter) need copying back, and new
    tensors of the parameter's shape become DTensors sharded like it.
    """
    for key, value in local_state.items():
        old = state.get(key)
        if old is not None and local(old) is value:
            continue
        if isinstance(value, Tensor) and isinstance(param, DTensor) and value.shape == local(param).shape:
            value = _wrap_like(value, param)
        state[key] = value


def make_reduce_sums(params: Sequence[Tensor]) -> Callable[[list[Tensor], list[int]], tuple[list[Tensor], list[int]]]:
    """A ``reduce_sums(sums, counts)`` for per-tensor statistics of ``params``' local shards.

    ``sums[i]`` (a 0-d float tensor) and ``counts[i]`` (an element count) belong to ``params[i]``.
    Returns the sums and counts over the whole tensors: summed over every mesh dimension on which
    ``params[i]`` is sharded, one all-reduce per process group for all tensors that share it.
    Every rank must call it with the same parameters (it is collective), which holds because all
    ranks step the same parameters in the same order.
    """
    groups = [shard_groups(p) for p in params]

    def reduce_sums(sums: list[Tensor], counts: list[int]) -> tuple[list[Tensor], list[int]]:
        sums = list(sums)
        counts = list(counts)
        by_group: dict[dist.ProcessGroup, list[int]] = {}
        for i, param_groups in enumerate(groups):
            for group in param_groups:
                by_group.setdefault(group, []).append(i)
        for group, indices in by_group.items():
            # one flat float64 buffer: sums, then counts (exact up to 2**53 elements)
            packed = torch.stack(
                [sums[i].detach().to(torch.float64) for i in indices]
                + [torch.tensor(float(counts[i]), dtype=torch.float64, device=sums[i].device) for i in indices]
            )
            dist.all_reduce(packed, group=group)
            for j, i in enumerate(indices):
                sums[i] = packed[j].to(sums[i].dtype)
                counts[i] = int(packed[len(indices) + j].item())
        return sums, counts

    return reduce_sums


def step_local(
    optimizer: Any,
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    *,
    step: int,
    accumulate: bool,
    backend: str,
) -> None:
    """Run ``optimizer._step_group`` on the local shards of DTensor parameters.

    See [Note: kernels see local shards]. Parameters that are plain tensors pass through
    unchanged. While the kernels run, ``optimizer._reduce_sums`` reduces whole-tensor statistics
    across shards ([Note: whole-tensor statistics under sharding]).
    """
    local_params = [local(p) for p in params]
    local_grads = [local(g) for g in grads]
    local_states = [_local_state(s) for s in states]
    previous = getattr(optimizer, "_reduce_sums", None)
    # stochastic rounding hashes each element's index in the whole tensor: a shard starts further in
    first_indices = [first_element_index(p) for p in params] if group.get("low_precision") == "stochastic" else None
    # the float32-master modes step one parameter at a time (OptimiOptimizer._step_in_precision), so
    # whole-tensor sums are then reduced for that parameter alone
    # and so do 8-bit states (dequantized one chunk at a time)
    one_at_a_time = (group.get("low_precision") in MASTER_MODES and not accumulate) or group.get("state_bits")
    batches = [[i] for i in range(len(params))] if one_at_a_time else [list(range(len(params)))]
    try:
        for batch in batches:
            sharded = [params[i] for i in batch]
            optimizer._reduce_sums = make_reduce_sums(sharded) if any(shard_groups(p) for p in sharded) else None
            optimizer._step_in_precision(
                group,
                [local_params[i] for i in batch],
                [local_grads[i] for i in batch],
                [local_states[i] for i in batch],
                step=step,
                accumulate=accumulate,
                backend=backend,
                first_indices=[first_indices[i] for i in batch] if first_indices else None,
            )
    finally:
        optimizer._reduce_sums = previous
    for param, state, local_state in zip(params, states, local_states):
        _write_back(state, local_state, param)
