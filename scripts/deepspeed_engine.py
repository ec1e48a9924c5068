"""The ``--parallel deepspeed`` path of ``scripts/train.py``: an optimi optimizer inside a DeepSpeed ZeRO engine.

    DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node 2 scripts/train.py --parallel deepspeed --zero-stage 2

Four functions, each called from one place: ``config_problem`` (flag checks), ``init_distributed``
(the process group), ``wrap`` (the engine around the model, optimizer and scheduler) and
``train_step`` (one optimizer step). DeepSpeed is imported inside them, never at import, so the other
modes run without it. See docs/deepspeed.md.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from train_config import TrainConfig

    import optimi


def config_problem(config: TrainConfig) -> str | None:
    """Why ``config`` cannot run under ``--parallel deepspeed``, or None."""
    if config.gradient_release:
        return (
            "--gradient-release cannot serve --parallel deepspeed: the DeepSpeed engine owns the gradients "
            "and calls optimizer.step() itself"
        )
    if config.zero_stage not in (0, 1, 2, 3):
        return f"--zero-stage must be 0, 1, 2 or 3, not {config.zero_stage}"
    if config.dtype == "bf16" and config.zero_stage == 0:
        return "--dtype bf16 under --parallel deepspeed means bf16 master weights: DeepSpeed needs --zero-stage 1-3"
    if config.checkpoint_dir is not None or config.resume is not None:
        return "--checkpoint-dir/--resume are not wired for --parallel deepspeed (use engine.save_checkpoint)"
    return None


def init_distributed(use_cuda: bool) -> None:
    """Start the process group through DeepSpeed (nccl on CUDA, gloo on CPU)."""
    if not use_cuda:
        # DeepSpeed picks its accelerator once, on first use; on CPU it must be told
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as error:
        raise SystemExit(f"--parallel deepspeed needs DeepSpeed (pip install optimi[deepspeed]): {error}") from None
    if not use_cuda:
        # on CPU DeepSpeed JIT-compiles a shared-memory all-reduce op when its comm backend starts
        # (30 s and more); only its inference all-reduce uses it, never training: skip it through
        # DeepSpeed's own (cached, mutable) table of compatible ops
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")


def wrap(
    model: nn.Module,
    optimizer: optimi.OptimiOptimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    config: TrainConfig,
    world_size: int,
) -> nn.Module:
    """The DeepSpeed engine training ``model`` with ``optimizer`` under ZeRO ``--zero-stage``.

    ``--dtype bf16``: bf16 master weights and optimizer states, optimi's Kahan buffers instead of
    the fp32 master copy; ``--dtype mixed``: DeepSpeed's default bf16 (fp32 master weights and
    optimizer states); ``--dtype fp32``: fp32 throughout. The engine steps the optimizer and the
    scheduler in ``engine.step()`` and accumulates ``--accumulation-steps`` micro-batches itself.
    Prints, on rank 0, each change ``optimi.distributed.deepspeed.initialize`` made to the config.
    """
    from optimi.distributed.deepspeed import initialize

    n_params = sum(p.numel() for p in model.parameters())
    ds_config = {
        "train_batch_size": config.batch_size,
        "train_micro_batch_size_per_gpu": config.batch_size // (world_size * config.accumulation_steps),
        "gradient_accumulation_steps": config.accumulation_steps,
        "gradient_clipping": config.grad_clip,
        "zero_optimization": {
            "stage": config.zero_stage,
            # DeepSpeed's default buckets hold 5e8 elements, allocated in full under ZeRO-3 (1 GB in bf16):
            # one model's worth is enough for a model this size
            "reduce_bucket_size": n_params,
            "allgather_bucket_size": n_params,
            "stage3_prefetch_bucket_size": n_params,
        },
    }
    if config.dtype == "bf16":
        ds_config["bf16"] = {"enabled": True, "bf16_master_weights_and_grads": True, "bf16_optimizer_states": True}
    elif config.dtype == "mixed":
        ds_config["bf16"] = {"enabled": True}
    try:
        setup = initialize(model, optimizer, ds_config, lr_scheduler=scheduler)
    except ValueError as error:  # e.g. StableAdamW on flat ZeRO partitions
        raise SystemExit(f"--parallel deepspeed: {error}") from None
    if torch.distributed.get_rank() == 0:
        for change in setup.changes:
            print(f"deepspeed config: {change}")
    return setup.engine


def train_step(engine: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """One optimizer step of ``engine`` over this rank's micro-batches; returns their mean loss (on device).

    The engine scales each micro-batch's loss by 1/``gradient_accumulation_steps``, reduces the
    gradients and, after the last micro-batch, steps the optimizer and the LR scheduler.
    """
    step_loss = torch.zeros((), device=batches[0][0].device)
    for inputs, targets in batches:
        loss = engine(inputs, targets)
        engine.backward(loss)
        engine.step()
        step_loss += loss.detach().float() / len(batches)
    return step_loss
