"""Train a small byte-level GPT on the Python standard library's source with an optimi optimizer.

One process (world size 1)::

    python scripts/train.py --optimizer adamw --dtype bf16 --steps 300

Two ranks on one machine, FSDP2 with pure bf16 + Kahan summation + gradient release (the README demo)::

    torchrun --standalone --nproc_per_node 2 scripts/train.py --parallel fsdp2 --dtype bf16 --gradient-release

DDP, fp32 parameters with bf16 autocast, 4 micro-batches per step::

    torchrun --standalone --nproc_per_node 2 scripts/train.py --parallel ddp --dtype mixed --accumulation-steps 4

DeepSpeed ZeRO-2, bf16 master weights with optimi's Kahan summation in place of DeepSpeed's fp32 master
copy (``--dtype mixed`` gives DeepSpeed's default bf16 mode: fp32 master weights and optimizer states)::

    DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node 2 scripts/train.py --parallel deepspeed --zero-stage 2

Checkpoint every 100 steps, then continue from the newest checkpoint (on any number of ranks)::

    python scripts/train.py --steps 300 --checkpoint-dir ckpt --checkpoint-every 100
    torchrun --standalone --nproc_per_node 2 scripts/train.py --parallel fsdp2 --steps 300 \\
        --checkpoint-dir ckpt --resume

Several machines: ``torchrun --nnodes M --nproc_per_node N --rdzv-backend c10d --rdzv-endpoint HOST:PORT
scripts/train.py ...`` (checkpoints then need a filesystem that every machine sees).

DDP/FSDP2 are detected from torchrun's environment at run time (gloo on CPU, nccl on CUDA); rank 0
prints a line every ``--log-every`` steps and, at the end, the held-out loss, the wall time and the
per-rank memory table. See docs/training.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/gpt.py, also under torchrun

from gpt import GPT, ByteDataset, GPTConfig, load_stdlib_text  # noqa: E402

import optimi  # noqa: E402
from optimi.distributed import latest_checkpoint, load_checkpoint, memory_report, save_checkpoint  # noqa: E402

#: --optimizer names (case-insensitive) -> optimi class names
OPTIMIZERS = {
    "adam": "Adam",
    "adamw": "AdamW",
    "adan": "Adan",
    "lion": "Lion",
    "radam": "RAdam",
    "ranger": "Ranger",
    "sgd": "SGD",
    "stableadamw": "StableAdamW",
}
PARALLEL_MODES = ("none", "ddp", "fsdp2", "deepspeed")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on; one field per command-line flag (``--field-name``)."""

    #: none (one process), ddp (DistributedDataParallel), fsdp2 (fully_shard), deepspeed
    parallel: str = "none"
    #: ZeRO stage under --parallel deepspeed (1, 2 or 3; 0: data parallel without partitioning)
    zero_stage: int = 2
    #: optimi optimizer, any of OPTIMIZERS
    optimizer: str = "adamw"
    #: fp32 params; bf16 params (pure low precision); mixed = fp32 params computed in bf16
    #: (autocast, or FSDP2's MixedPrecisionPolicy under fsdp2)
    dtype: str = "bf16"
    #: Kahan summation for bf16 params: auto (on for bf16), on, off
    kahan: str = "auto"
    #: step each parameter during backward and free its gradient at once
    gradient_release: bool = False
    #: micro-batches per optimizer step: optimizer accumulation under gradient release, gradient
    #: accumulation otherwise
    accumulation_steps: int = 1
    #: peak learning rate
    lr: float = 3e-3
    #: weight decay; None keeps the optimizer's default
    weight_decay: float | None = None
    #: cosine (decay to 10% of lr) or constant, both after a linear warm-up
    schedule: str = "cosine"
    #: warm-up steps
    warmup_steps: int = 20
    #: clip the global gradient norm to this value (0: off); needs every gradient, so not with
    #: gradient release
    grad_clip: float = 0.0
    #: optimizer steps in the whole run (also after --resume)
    steps: int = 300
    #: global batch in sequences per optimizer step, split over ranks and micro-batches
    batch_size: int = 16
    #: seed of the model initialisation and of the data order
    seed: int = 0
    #: GPT context length in bytes
    block_size: int = 64
    #: GPT transformer blocks
    n_layer: int = 2
    #: GPT attention heads
    n_head: int = 4
    #: GPT embedding width
    n_embd: int = 64
    #: cpu, cuda, or auto (cuda when available)
    device: str = "auto"
    #: print a progress line every this many steps
    log_every: int = 25
    #: held-out batches (of --batch-size sequences) for the final validation loss
    eval_batches: int = 8
    #: where checkpoints go (none written if unset)
    checkpoint_dir: str | None = None
    #: write a checkpoint every this many steps, and at the end (0: only at the end)
    checkpoint_every: int = 0
    #: resume from this checkpoint, or "latest" for the newest one in --checkpoint-dir
    resume: str | None = None
    #: rank 0 appends one JSON line per step (step, loss, lr) to this file
    metrics_file: str | None = None


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Build a ``TrainConfig`` from the command line (flags are the field names with dashes)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    defaults = TrainConfig()
    choices = {
        "parallel": PARALLEL_MODES,
        "optimizer": tuple(OPTIMIZERS),
        "dtype": ("fp32", "bf16", "mixed"),
        "kahan": ("auto", "on", "off"),
        "schedule": ("cosine", "constant"),
        "device": ("auto", "cpu", "cuda"),
    }
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        if field.name == "gradient_release":
            parser.add_argument(flag, action="store_true")
        elif field.name == "resume":
            parser.add_argument(flag, nargs="?", const="latest", default=None, metavar="CHECKPOINT")
        elif field.name in choices:
            parser.add_argument(flag, type=str.lower, choices=choices[field.name], default=default)
        else:
            kind = {"int": int, "float": float}.get(field.type.split(" ")[0], str)
            parser.add_argument(flag, type=kind, default=default)
    args = parser.parse_args(argv)
    config = TrainConfig(**vars(args))
    problem = config_problem(config)
    if problem:
        parser.error(problem)
    return config


def config_problem(config: TrainConfig) -> str | None:
    """Why ``config`` cannot run (independent of the world size), or None."""
    for name in ("steps", "batch_size", "accumulation_steps", "log_every", "block_size", "n_layer", "n_head"):
        if getattr(config, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1"
    if config.lr <= 0:
        return "--lr must be > 0"
    if config.gradient_release:
        if config.grad_clip > 0:
            return (
                "--gradient-release cannot serve --grad-clip: clipping needs the norm of every gradient before "
                "any parameter steps, but gradient release steps each parameter (and frees its gradient) as soon "
                "as that gradient is ready"
            )
        if config.parallel == "deepspeed":
            return (
                "--gradient-release cannot serve --parallel deepspeed: the DeepSpeed engine owns the gradients "
                "and calls optimizer.step() itself"
            )
    if config.parallel == "deepspeed":
        if config.zero_stage not in (0, 1, 2, 3):
            return f"--zero-stage must be 0, 1, 2 or 3, not {config.zero_stage}"
        if config.dtype == "bf16" and config.zero_stage == 0:
            return "--dtype bf16 under --parallel deepspeed means bf16 master weights: DeepSpeed needs --zero-stage 1-3"
        if config.checkpoint_dir is not None or config.resume is not None:
            return "--checkpoint-dir/--resume are not wired for --parallel deepspeed (use engine.save_checkpoint)"
    elif config.zero_stage != TrainConfig.zero_stage:
        return "--zero-stage applies to --parallel deepspeed only"
    if config.kahan == "on" and config.dtype != "bf16":
        return f"--kahan on needs bf16 parameters (--dtype bf16); with --dtype {config.dtype} they are fp32"
    if config.resume == "latest" and config.checkpoint_dir is None:
        return "--resume without a path resumes from --checkpoint-dir, so give --checkpoint-dir"
    return None


# -- distributed setup ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Runtime:
    """Where this process runs."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_runtime(config: TrainConfig) -> Runtime:
    """Read torchrun's environment and start the process group for ddp/fsdp2 (gloo on CPU, nccl on CUDA)."""
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if config.parallel in ("ddp", "fsdp2", "deepspeed") and not under_torchrun:
        raise SystemExit(
            f"--parallel {config.parallel} needs torchrun to start its ranks, e.g. "
            f"torchrun --standalone --nproc_per_node 2 scripts/train.py --parallel {config.parallel} ..."
        )
    if config.parallel == "none" and world_size > 1:
        raise SystemExit(f"--parallel none runs one process, but torchrun started {world_size}; use ddp or fsdp2")
    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if config.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but CUDA is not available")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if config.parallel == "none":
        return Runtime(rank=0, world_size=1, device=device)
    if config.parallel == "deepspeed":
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
        return Runtime(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Runtime(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device)


def parallelize(model: nn.Module, config: TrainConfig, runtime: Runtime) -> nn.Module:
    """Wrap ``model`` for ``config.parallel``; one branch per mode (DeepSpeed: see ``deepspeed_engine``)."""
    if config.parallel in ("none", "deepspeed"):
        return model
    if config.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    if config.parallel == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
        # mixed: fp32 sharded parameters, all-gathered and computed in bf16, gradients reduced in fp32
        mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        options = {"mesh": mesh, "mp_policy": mp_policy} if config.dtype == "mixed" else {"mesh": mesh}
        for block in model.blocks:
            fully_shard(block, **options)
        fully_shard(model, **options)
        return model
    raise SystemExit(f"--parallel {config.parallel} is not supported")


def no_gradient_sync(model: nn.Module, config: TrainConfig, sync: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce/reduce-scatter of a non-final micro-batch (plain gradient
    accumulation). Gradient release reduces every micro-batch: its hooks fold each reduced
    gradient into the optimizer state (optimizer accumulation)."""
    if sync or config.gradient_release:
        if config.parallel == "fsdp2":
            model.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if config.parallel == "ddp":
        return model.no_sync()
    if config.parallel == "fsdp2":
        model.set_requires_gradient_sync(False)
    return contextlib.nullcontext()


def deepspeed_engine(
    model: nn.Module,
    optimizer: optimi.OptimiOptimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    config: TrainConfig,
    runtime: Runtime,
) -> nn.Module:
    """The DeepSpeed engine training ``model`` with ``optimizer`` under ZeRO ``--zero-stage``.

    ``--dtype bf16``: bf16 master weights and optimizer states, optimi's Kahan buffers instead of
    the fp32 master copy; ``--dtype mixed``: DeepSpeed's default bf16 (fp32 master weights and
    optimizer states); ``--dtype fp32``: fp32 throughout. DeepSpeed steps the optimizer and the
    scheduler in ``engine.step()`` and accumulates ``--accumulation-steps`` micro-batches itself.
    """
    from optimi.distributed.deepspeed import initialize

    n_params = sum(p.numel() for p in model.parameters())
    ds_config = {
        "train_batch_size": config.batch_size,
        "train_micro_batch_size_per_gpu": config.batch_size // (runtime.world_size * config.accumulation_steps),
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
    if runtime.is_main:
        for change in setup.changes:
            print(f"deepspeed config: {change}")
    return setup.engine


def all_mean(value: torch.Tensor, runtime: Runtime) -> float:
    """Mean of a scalar over ranks."""
    if runtime.world_size > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= runtime.world_size
    return value.item()


# -- model, optimizer, schedule --------------------------------------------------------------------


def build_optimizer(model: nn.Module, config: TrainConfig) -> optimi.OptimiOptimizer:
    """The optimi optimizer named by ``--optimizer`` over ``model``'s parameters."""
    name = OPTIMIZERS[config.optimizer]
    cls = getattr(optimi, name, None)
    if cls is None:
        raise SystemExit(f"--optimizer {config.optimizer}: optimi {optimi.__version__} has no {name}")
    options = {"kahan_sum": {"auto": None, "on": True, "off": False}[config.kahan]}
    if config.weight_decay is not None:
        options["weight_decay"] = config.weight_decay
    return cls(model.parameters(), lr=config.lr, gradient_release=config.gradient_release, **options)


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of --lr before optimizer step ``step`` (0-based): linear warm-up, then cosine to 10%
    or constant."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def resume_path(config: TrainConfig) -> Path | None:
    """The checkpoint ``--resume`` names (``latest`` of ``--checkpoint-dir`` by default), or None."""
    if config.resume is None:
        return None
    if config.resume != "latest":
        if not Path(config.resume).is_dir():
            raise SystemExit(f"--resume: checkpoint directory {config.resume} does not exist")
        return Path(config.resume)
    if not Path(config.checkpoint_dir).is_dir():
        raise SystemExit(f"--resume: checkpoint directory {config.checkpoint_dir} does not exist")
    path = latest_checkpoint(config.checkpoint_dir)
    if path is None:
        raise SystemExit(f"--resume: no complete checkpoint in {config.checkpoint_dir}")
    return path


# -- training --------------------------------------------------------------------------------------


def train(config: TrainConfig) -> float:
    """Run ``config``; returns the held-out loss."""
    runtime = init_runtime(config)
    try:
        val_loss = _train(config, runtime)
        if dist.is_initialized():
            # [teardown] FSDP2 modules sit in reference cycles and hold the process group through their
            # device mesh. Collect them now, so that the group is really destroyed below rather than during
            # interpreter shutdown (where gloo intermittently aborts with "terminate called without an
            # active exception"), and leave together.
            gc.collect()
            dist.barrier()
        return val_loss
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _train(config: TrainConfig, runtime: Runtime) -> float:
    micro_batches = config.accumulation_steps
    if config.batch_size % (runtime.world_size * micro_batches):
        raise SystemExit(
            f"--batch-size {config.batch_size} must be divisible by world size {runtime.world_size} x "
            f"--accumulation-steps {micro_batches}"
        )
    resume = resume_path(config)
    log = print if runtime.is_main else (lambda *args, **kwargs: None)

    train_text, val_text = load_stdlib_text()
    train_data, val_data = ByteDataset(train_text, config.block_size), ByteDataset(val_text, config.block_size)
    torch.manual_seed(config.seed)  # same initial weights on every rank
    gpt_config = GPTConfig(config.block_size, config.n_layer, config.n_head, config.n_embd)
    model = GPT(gpt_config).to(runtime.device)
    n_params = sum(p.numel() for p in model.parameters())
    if config.dtype == "bf16":
        optimi.to_low_precision(model)
    model = parallelize(model, config, runtime)
    optimizer = build_optimizer(model, config)
    if config.gradient_release:
        # DDP and FSDP2 models are handed to optimi.distributed (reduce first, step the local shard)
        optimi.prepare_for_gradient_release(model, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    use_deepspeed = config.parallel == "deepspeed"
    if use_deepspeed:
        model = deepspeed_engine(model, optimizer, scheduler, config, runtime)
    data_order = torch.Generator().manual_seed(config.seed)  # its state is the data position
    # autocast for mixed precision; FSDP2 casts through its MixedPrecisionPolicy, DeepSpeed keeps a
    # bf16 model next to its fp32 master weights
    autocast_on = config.dtype == "mixed" and config.parallel not in ("fsdp2", "deepspeed")

    kahan = "on" if config.dtype == "bf16" and config.kahan != "off" else "off"
    log(
        f"GPT {config.n_layer}x{config.n_embd} ({n_params / 1e6:.2f}M params), {train_text.numel() / 1e6:.1f}MB "
        f"of stdlib text | {config.optimizer} {config.dtype} kahan={kahan} "
        f"release={config.gradient_release} parallel={config.parallel} x{runtime.world_size}"
    )
    start = 0
    if resume is not None:
        loaded = load_checkpoint(resume, model, optimizer)
        scheduler.load_state_dict(loaded.extra["scheduler"])
        data_order.set_state(loaded.extra["data_order"])
        if loaded.rank_extra is not None:
            torch.set_rng_state(loaded.rank_extra["torch_rng"])
        start = loaded.step
        log(f"resumed from {resume} at step {start} (written by {loaded.world_size} rank(s))")

    micro_global = config.batch_size // micro_batches
    local = micro_global // runtime.world_size
    metrics = open(config.metrics_file, "a") if config.metrics_file and runtime.is_main else None
    started = last_time = time.perf_counter()
    losses = []  # per step, mean over ranks, since the last progress line
    for step in range(start, config.steps):
        model.train()
        batches = []
        for _ in range(micro_batches):
            # every rank draws the whole global micro-batch and keeps its slice: the data order
            # does not depend on the world size
            starts = train_data.starts(micro_global, data_order)[runtime.rank * local : (runtime.rank + 1) * local]
            batches.append(tuple(t.to(runtime.device) for t in train_data.batch(starts)))
        lr = optimizer.param_groups[0]["lr"]
        if use_deepspeed:
            loss = deepspeed_step(model, batches)  # the engine steps the optimizer and the scheduler
        else:
            loss = train_step(model, optimizer, batches, config, autocast_on)
            scheduler.step()

        losses.append(all_mean(loss, runtime))
        if metrics is not None:
            metrics.write(json.dumps({"step": step + 1, "loss": losses[-1], "lr": lr}) + "\n")
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            now = time.perf_counter()
            tokens_per_s = len(losses) * config.batch_size * config.block_size / (now - last_time)
            log(
                f"step {step + 1:>5}/{config.steps} | loss {sum(losses) / len(losses):.4f} | lr {lr:.2e} | "
                f"{tokens_per_s / 1e3:.1f}k tok/s"
            )
            losses, last_time = [], now
        if config.checkpoint_dir and (
            step + 1 == config.steps or (config.checkpoint_every and (step + 1) % config.checkpoint_every == 0)
        ):
            extra = {"scheduler": scheduler.state_dict(), "data_order": data_order.get_state()}
            rank_extra = {"torch_rng": torch.get_rng_state()}
            save_checkpoint(config.checkpoint_dir, step + 1, model, optimizer, extra=extra, rank_extra=rank_extra)
    if metrics is not None:
        metrics.close()
    wall = time.perf_counter() - started

    val_loss = evaluate(model, val_data, config, runtime, autocast_on)
    log(f"held-out loss {val_loss:.4f} | wall time {wall:.1f}s ({config.steps - start} steps)")
    report = memory_report(model, optimizer)  # collective: every rank measures itself
    log(report)
    return val_loss


def train_step(
    model: nn.Module,
    optimizer: optimi.OptimiOptimizer,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    config: TrainConfig,
    autocast_on: bool,
) -> torch.Tensor:
    """One optimizer step over ``batches`` (this rank's micro-batches); returns the mean loss."""
    step_loss = torch.zeros((), device=batches[0][0].device)
    for micro, (inputs, targets) in enumerate(batches):
        last = micro == len(batches) - 1
        if config.gradient_release:
            # the release hooks fold the first K-1 micro-batches into the optimizer state
            optimizer.optimizer_accumulation = not last
        with no_gradient_sync(model, config, last):
            with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=autocast_on):
                loss = model(inputs, targets)
            (loss / len(batches)).backward()
        step_loss += loss.detach() / len(batches)
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    # under gradient release the parameters were stepped inside backward and these are no-ops
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss


def deepspeed_step(engine: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """One optimizer step of a DeepSpeed engine over ``batches``; returns the mean loss.

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


@torch.no_grad()
def evaluate(model: nn.Module, data: ByteDataset, config: TrainConfig, runtime: Runtime, autocast_on: bool) -> float:
    """Mean loss over ``config.eval_batches`` fixed held-out batches (the same for every run and world size)."""
    model.eval()
    order = torch.Generator().manual_seed(1234)
    local = config.batch_size // runtime.world_size
    total = torch.zeros((), device=runtime.device)
    for _ in range(config.eval_batches):
        starts = data.starts(config.batch_size, order)[runtime.rank * local : (runtime.rank + 1) * local]
        inputs, targets = (t.to(runtime.device) for t in data.batch(starts))
        with torch.autocast(runtime.device.type, dtype=torch.bfloat16, enabled=autocast_on):
            total += model(inputs, targets)
    return all_mean(total / config.eval_batches, runtime)


def main(argv: list[str] | None = None) -> float:
    # the fused backend logs each one-time compile and its duration (seconds: not a hang)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("optimi").setLevel(logging.INFO)
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
