"""Where ``scripts/train.py`` runs: the device, the process group, and the DDP / FSDP2 wrappers.

``--parallel none`` is one process; ``ddp`` and ``fsdp2`` read torchrun's environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``) when ``init_runtime`` is called, never at import, and start the
process group: gloo on CPU, nccl on CUDA. ``deepspeed`` starts it through DeepSpeed
(``deepspeed_engine.init_distributed``) and wraps the model there, not here.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator
from dataclasses import dataclass

import deepspeed_engine
import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Runtime:
    """Where this process runs."""

    #: this process's rank (0 without a process group)
    rank: int
    #: number of ranks (1 without a process group)
    world_size: int
    #: the device this rank computes on
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 prints, writes the metrics file and the shared checkpoint files."""
        return self.rank == 0


def init_runtime(parallel: str, device: str) -> Runtime:
    """Choose the device (``device``: auto, cpu or cuda) and start the process group ``parallel`` needs."""
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if parallel != "none" and not under_torchrun:
        raise SystemExit(
            f"--parallel {parallel} needs torchrun to start its ranks, e.g. "
            f"torchrun --standalone --nproc_per_node 2 scripts/train.py --parallel {parallel} ..."
        )
    if parallel == "none" and world_size > 1:
        raise SystemExit(f"--parallel none runs one process, but torchrun started {world_size}; use ddp or fsdp2")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but CUDA is not available")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    chosen = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(chosen)
    if parallel == "none":
        return Runtime(rank=0, world_size=1, device=chosen)
    if parallel == "deepspeed":
        deepspeed_engine.init_distributed(use_cuda)
    else:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Runtime(rank=dist.get_rank(), world_size=dist.get_world_size(), device=chosen)


@contextlib.contextmanager
def started(parallel: str, device: str) -> Iterator[Runtime]:
    """``init_runtime``, and at the end leave the process group together (destroyed even on an error)."""
    runtime = init_runtime(parallel, device)
    try:
        yield runtime
        if dist.is_initialized():
            # FSDP2 modules sit in reference cycles and hold the process group through their device
            # mesh. Collect them now, so that the group is really destroyed below rather than during
            # interpreter shutdown (where gloo intermittently aborts with "terminate called without an
            # active exception"), and leave together.
            gc.collect()
            dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def parallelize(model: nn.Module, parallel: str, dtype: str, runtime: Runtime) -> nn.Module:
    """``model`` wrapped for ``parallel``: DDP, or ``fully_shard`` on every block and the root for FSDP2.

    ``none`` and ``deepspeed`` return ``model`` unchanged (DeepSpeed wraps it with the optimizer).
    """
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    if parallel == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        options = {"mesh": init_device_mesh(runtime.device.type, (runtime.world_size,))}
        if dtype == "mixed":
            # fp32 sharded parameters, all-gathered and computed in bf16, gradients reduced in fp32
            options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, **options)
        fully_shard(model, **options)
    return model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, parallel: str, enabled: bool) -> Iterator[None]:
    """Run a forward and backward with the gradient all-reduce (DDP) / reduce-scatter (FSDP2) on or off.

    Off for the non-final micro-batches of plain gradient accumulation: the gradients pile up in
    ``.grad`` and the last micro-batch reduces their sum once.
    """
    if parallel == "ddp" and not enabled:
        with model.no_sync():
            yield
        return
    if parallel == "fsdp2":
        model.set_requires_gradient_sync(enabled)
    yield


def mean_over_ranks(values: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """Element-wise mean of ``values`` over ranks (one all-reduce; no host sync)."""
    values = values.detach().clone()
    if runtime.world_size > 1:
        dist.all_reduce(values)
        values /= runtime.world_size
    return values
