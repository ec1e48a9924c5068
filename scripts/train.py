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

Read top to bottom: build, resume, train, evaluate; the flags are in train_config.py, the device and
process group in parallel.py, DeepSpeed in deepspeed_engine.py, the closing bytes/param table in
memory_table.py. See docs/training.md.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the modules next to this one, also under torchrun

import deepspeed_engine  # noqa: E402
import memory_table  # noqa: E402
import parallel  # noqa: E402
from gpt import GPT, ByteDataset, GPTConfig, load_stdlib_text  # noqa: E402
from parallel import Runtime  # noqa: E402
from train_config import OPTIMIZERS, TrainConfig, parse_args, resume_path  # noqa: E402

import optimi  # noqa: E402
from optimi.distributed import load_checkpoint, memory_report, save_checkpoint  # noqa: E402
from optimi.distributed.memory import track_gradient_peak  # noqa: E402

# -- build -----------------------------------------------------------------------------------------


@dataclass
class Training:
    """What ``build`` makes: everything the loop steps, evaluates and checkpoints."""

    #: the GPT, wrapped for --parallel (DDP, fully_shard, or a DeepSpeed engine)
    model: nn.Module
    optimizer: optimi.OptimiOptimizer
    #: linear warm-up, then cosine or constant; one step per optimizer step
    scheduler: torch.optim.lr_scheduler.LambdaLR
    train_data: ByteDataset
    val_data: ByteDataset
    #: draws the training windows: its state is the data position
    data_order: torch.Generator
    #: parameters of the whole model (all ranks together)
    n_params: int


def build(config: TrainConfig, runtime: Runtime) -> Training:
    """Data, model, optimizer and schedule for ``config``, the model placed and wrapped for ``runtime``."""
    train_text, val_text = load_stdlib_text()
    torch.manual_seed(config.seed)  # same initial weights on every rank
    model = GPT(GPTConfig(config.block_size, config.n_layer, config.n_head, config.n_embd)).to(runtime.device)
    n_params = sum(p.numel() for p in model.parameters())
    if config.dtype == "bf16":
        optimi.to_low_precision(model)
    model = parallel.parallelize(model, config.parallel, config.dtype, runtime)
    optimizer = build_optimizer(model, config)
    if config.parallel != "deepspeed":  # (DeepSpeed keeps its gradients in buffers of its own)
        # samples the live .grad bytes in post-accumulate-grad hooks for memory_report's grads_peak;
        # installed first, so that it sees each gradient before gradient release frees it
        track_gradient_peak(model)
    if config.gradient_release:
        # DDP and FSDP2 models are handed to optimi.distributed (reduce first, step the local shard)
        optimi.prepare_for_gradient_release(model, optimizer, ignore_existing_hooks=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    if config.parallel == "deepspeed":
        model = deepspeed_engine.wrap(model, optimizer, scheduler, config, runtime.world_size)
    return Training(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        train_data=ByteDataset(train_text, config.block_size),
        val_data=ByteDataset(val_text, config.block_size),
        data_order=torch.Generator().manual_seed(config.seed),
        n_params=n_params,
    )


def build_optimizer(model: nn.Module, config: TrainConfig) -> optimi.OptimiOptimizer:
    """The optimi optimizer of ``--optimizer``; biases, norms and other 1-d parameters get no weight decay."""
    cls = getattr(optimi, OPTIMIZERS[config.optimizer])
    weight_decay = config.weight_decay
    if weight_decay is None:  # the optimizer's own default
        weight_decay = inspect.signature(cls).parameters["weight_decay"].default
    groups = optimi.param_groups_weight_decay(model, weight_decay)
    if config.torchao_adamw8bit is not None:
        return torchao_adamw8bit(groups, config)
    kahan_sum = {"auto": None, "on": True, "off": False}[config.kahan]
    return cls(
        groups,
        lr=config.lr,
        kahan_sum=kahan_sum,
        low_precision=config.low_precision,
        gradient_release=config.gradient_release,
        # DeepSpeed clips itself (its config's gradient_clipping)
        max_grad_norm=config.grad_clip if config.grad_clip > 0 and config.parallel != "deepspeed" else None,
        state_bits=config.state_bits,
    )


def torchao_adamw8bit(groups: list[dict], config: TrainConfig) -> torch.optim.Optimizer:
    """torchao's ``AdamW8bit`` from the ``--torchao-adamw8bit`` directory, for comparisons (bf16
    parameters: its stochastic rounding, torchao's way of keeping small updates)."""
    sys.path.insert(0, config.torchao_adamw8bit)
    from torchao.optim import AdamW8bit

    return AdamW8bit(groups, lr=config.lr, bf16_stochastic_round=config.dtype == "bf16")


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of --lr before step ``step`` (0-based): linear warm-up, then cosine to 10% or constant."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# -- resume and save -------------------------------------------------------------------------------


def resume(path: Path, training: Training) -> tuple[int, int]:
    """Load checkpoint ``path`` into ``training``; returns (its step, the world size that wrote it)."""
    loaded = load_checkpoint(path, training.model, training.optimizer)
    training.scheduler.load_state_dict(loaded.extra["scheduler"])
    training.data_order.set_state(loaded.extra["data_order"])
    if loaded.rank_extra is not None:  # same world size: each rank continues its own RNG stream
        torch.set_rng_state(loaded.rank_extra["torch_rng"])
    return loaded.step, loaded.world_size


def save(config: TrainConfig, training: Training, step: int) -> None:
    """Write the checkpoint of ``step`` to ``--checkpoint-dir`` (DCP, atomically; collective)."""
    extra = {"scheduler": training.scheduler.state_dict(), "data_order": training.data_order.get_state()}
    rank_extra = {"torch_rng": torch.get_rng_state()}
    save_checkpoint(config.checkpoint_dir, step, training.model, training.optimizer, extra=extra, rank_extra=rank_extra)


# -- train -----------------------------------------------------------------------------------------


def train(config: TrainConfig, runtime: Runtime, training: Training, start: int) -> float:
    """Optimizer steps ``start + 1`` to ``--steps``; returns the wall time in seconds."""
    micro_global = config.batch_size // config.accumulation_steps  # sequences per micro-batch, all ranks
    local = micro_global // runtime.world_size
    pending = []  # (step, lr, loss and grad norm on device) since the last progress line: no host sync between
    started = last_log = time.perf_counter()
    for step in range(start + 1, config.steps + 1):
        batches = []
        for _ in range(config.accumulation_steps):
            # every rank draws the whole global micro-batch and keeps its slice: the data order does
            # not depend on the world size
            starts = training.train_data.starts(micro_global, training.data_order)
            starts = starts[runtime.rank * local : (runtime.rank + 1) * local]
            batches.append(tuple(t.to(runtime.device) for t in training.train_data.batch(starts)))
        lr = float(training.optimizer.param_groups[0]["lr"])  # torchao keeps a tensor there
        training.model.train()
        if config.parallel == "deepspeed":
            loss = deepspeed_engine.train_step(training.model, batches)  # steps optimizer and scheduler too
        else:
            loss = train_step(training.model, training.optimizer, batches, config)
            training.scheduler.step()
        # the last backward's gradient norm with --grad-clip (a tensor: read only when logged)
        grad_norm = getattr(training.optimizer, "grad_norm", None) if config.parallel != "deepspeed" else None
        pending.append((step, lr, loss, grad_norm))

        if step % config.log_every == 0 or step == config.steps:
            now = time.perf_counter()
            report_progress(pending, now - last_log, config, runtime)
            pending, last_log = [], now
        every = config.checkpoint_every
        if config.checkpoint_dir and (step == config.steps or (every and step % every == 0)):
            save(config, training, step)
    return time.perf_counter() - started


def train_step(model: nn.Module, optimizer: optimi.OptimiOptimizer, batches: list, config: TrainConfig) -> torch.Tensor:
    """One optimizer step over this rank's micro-batches; returns their mean loss, on the device."""
    step_loss = torch.zeros((), device=batches[0][0].device)
    for micro, (inputs, targets) in enumerate(batches):
        last = micro == len(batches) - 1
        if config.gradient_release:
            # the release hooks fold the first K-1 micro-batches into the optimizer state
            optimizer.optimizer_accumulation = not last
        # gradient accumulation reduces the summed gradients once, after the last micro-batch;
        # gradient release reduces every micro-batch (its hooks step or accumulate the result)
        with parallel.gradient_sync(model, config.parallel, enabled=last or config.gradient_release):
            with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=config.autocast):
                loss = model(inputs, targets)
            if config.exact_clip:  # two backward passes: measure, then step with the exact clip
                optimi.release_backward(loss / len(batches), optimizer)
            else:
                (loss / len(batches)).backward()
        step_loss += loss.detach() / len(batches)
    # --grad-clip is the optimizer's max_grad_norm: step() clips (and under gradient release the
    # parameters were stepped, and clipped, inside backward: these are no-ops)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss


def report_progress(pending: list, seconds: float, config: TrainConfig, runtime: Runtime) -> None:
    """The steps since the last progress line, with one all-reduce and one host sync for all of them:
    rank 0 appends their rows to ``--metrics-file`` and prints their mean loss."""
    steps, lrs, losses, norms = zip(*pending)
    losses = parallel.mean_over_ranks(torch.stack(losses), runtime).tolist()
    # the same on every rank (optimi reduces it), so no collective
    norms = [None if norm is None else norm.item() for norm in norms]
    if not runtime.is_main:
        return
    if config.metrics_file:
        with open(config.metrics_file, "a") as metrics:
            for step, lr, loss, norm in zip(steps, lrs, losses, norms):
                row = {"step": step, "loss": loss, "lr": lr} | ({} if norm is None else {"grad_norm": norm})
                metrics.write(json.dumps(row) + "\n")
    tokens_per_s = len(steps) * config.batch_size * config.block_size / seconds
    norm_column = "" if norms[-1] is None else f" | grad norm {norms[-1]:.3f}"
    print(
        f"step {steps[-1]:>5}/{config.steps} | loss {sum(losses) / len(losses):.4f} | lr {lrs[-1]:.2e}{norm_column} | "
        f"{tokens_per_s / 1e3:.1f}k tok/s"
    )


# -- evaluate --------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(config: TrainConfig, runtime: Runtime, training: Training) -> float:
    """Mean loss over ``--eval-batches`` fixed held-out batches (the same for every run and world size)."""
    training.model.eval()
    order = torch.Generator().manual_seed(1234)
    local = config.batch_size // runtime.world_size
    total = torch.zeros((), device=runtime.device)
    for _ in range(config.eval_batches):
        starts = training.val_data.starts(config.batch_size, order)[runtime.rank * local : (runtime.rank + 1) * local]
        inputs, targets = (t.to(runtime.device) for t in training.val_data.batch(starts))
        with torch.autocast(runtime.device.type, dtype=torch.bfloat16, enabled=config.autocast):
            total += training.model(inputs, targets)
    return parallel.mean_over_ranks(total / config.eval_batches, runtime).item()


# -- main ------------------------------------------------------------------------------------------


def run(config: TrainConfig, runtime: Runtime) -> float:
    """Build, resume, train, evaluate, report (rank 0 prints); returns the held-out loss."""
    if config.batch_size % (runtime.world_size * config.accumulation_steps):
        raise SystemExit(
            f"--batch-size {config.batch_size} must be divisible by world size {runtime.world_size} x "
            f"--accumulation-steps {config.accumulation_steps}"
        )
    log = print if runtime.is_main else (lambda *args: None)
    checkpoint = resume_path(config)  # a bad --resume fails before anything is built
    training = build(config, runtime)
    log(
        f"GPT {config.n_layer}x{config.n_embd} ({training.n_params / 1e6:.2f}M params), "
        f"{training.train_data.data.numel() / 1e6:.1f}MB of stdlib text | {config.optimizer} {config.dtype} "
        f"kahan={'on' if config.kahan_on else 'off'} release={config.gradient_release} "
        f"parallel={config.parallel} x{runtime.world_size}"
    )
    start = 0
    if checkpoint is not None:
        start, written_by = resume(checkpoint, training)
        log(f"resumed from {checkpoint} at step {start} (written by {written_by} rank(s))")

    wall = train(config, runtime, training, start)
    # measured before evaluate: FSDP2 leaves the root module's parameters unsharded after a forward
    # without backward, which is not what training holds (collective: every rank measures itself)
    report = memory_report(training.model, training.optimizer)
    val_loss = evaluate(config, runtime, training)
    log(f"held-out loss {val_loss:.4f} | wall time {wall:.1f}s ({config.steps - start} steps)")
    log(report)
    log(memory_table.bytes_per_param_table(report, training.n_params))
    return val_loss


def main(argv: list[str] | None = None) -> float:
    """Parse the flags, start the ranks, run; returns the held-out loss."""
    # the fused backend logs each one-time compile and its duration (seconds: not a hang)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("optimi").setLevel(logging.INFO)
    config = parse_args(argv)
    with parallel.started(config.parallel, config.device) as runtime:
        return run(config, runtime)


if __name__ == "__main__":
    main()
