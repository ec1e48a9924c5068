"""The flags of ``scripts/train.py``: one documented dataclass field per flag, with its argparse type,
the checks that reject bad combinations, and the checkpoint ``--resume`` names.

Used by ``scripts/train.py``; see its docstring for the command lines. ``python scripts/train.py --help``
prints every flag with the help text written here. Nothing here touches the process group, CUDA or
the environment at import.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed_engine

from optimi.distributed import latest_checkpoint

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


def flag(default: Any, help: str, **argparse_options: Any) -> Any:
    """A config field and its flag: ``help`` and ``argparse_options`` (type, choices, action, ...) go to
    ``ArgumentParser.add_argument`` unchanged."""
    return dataclasses.field(default=default, metadata={"help": help, **argparse_options})


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on; field ``name`` is the flag ``--name`` (underscores as dashes)."""

    # -- parallelism and precision
    parallel: str = flag(
        "none",
        "none (one process), ddp (DistributedDataParallel), fsdp2 (fully_shard), deepspeed",
        type=str.lower,
        choices=("none", "ddp", "fsdp2", "deepspeed"),
    )
    zero_stage: int = flag(2, "ZeRO stage under --parallel deepspeed (1-3; 0: no partitioning)", type=int)
    dtype: str = flag(
        "bf16",
        "fp32 parameters; bf16 parameters and optimizer state (pure low precision); mixed: fp32 parameters "
        "computed in bf16 (autocast, or FSDP2's MixedPrecisionPolicy under fsdp2)",
        type=str.lower,
        choices=("fp32", "bf16", "mixed"),
    )
    kahan: str = flag(
        "auto", "Kahan summation for bf16 parameters (auto: on for bf16)", type=str.lower, choices=("auto", "on", "off")
    )
    low_precision: str | None = flag(
        None,
        "how bf16 parameters keep small updates: kahan, stochastic (rounding), remainder (an exact fp32 master "
        "in bf16 + int16) or nearest; default: follow --kahan",
        type=str.lower,
        choices=("kahan", "stochastic", "remainder", "nearest"),
    )
    state_bits: int | None = flag(
        None,
        "8: store the optimizer's moments as 8-bit codes with per-block scales (docs/state_bits.md); "
        "default: in the parameters' dtype",
        type=int,
        choices=(8,),
    )
    torchao_adamw8bit: str | None = flag(
        None,
        "for comparisons: train with torchao's AdamW8bit imported from this directory "
        "(pip install --no-deps --target DIR torchao) instead of an optimi optimizer",
        type=str,
        metavar="DIR",
    )
    gradient_release: bool = flag(
        False, "step each parameter during backward and free its gradient at once", action="store_true"
    )
    accumulation_steps: int = flag(
        1,
        "micro-batches per optimizer step: optimizer accumulation under --gradient-release, gradient "
        "accumulation otherwise",
        type=int,
    )
    # -- optimizer and schedule
    optimizer: str = flag("adamw", "optimi optimizer", type=str.lower, choices=tuple(OPTIMIZERS))
    lr: float = flag(3e-3, "peak learning rate", type=float)
    weight_decay: float | None = flag(
        None,
        "weight decay of the matrices (biases, norms and other 1-d parameters get none); default: the optimizer's own",
        type=float,
    )
    schedule: str = flag(
        "cosine",
        "after a linear warm-up: cosine decay to 10%% of --lr, or constant",
        type=str.lower,
        choices=("cosine", "constant"),
    )
    warmup_steps: int = flag(20, "linear warm-up steps", type=int)
    grad_clip: float = flag(
        0.0,
        "clip the global gradient norm to this (0: off): the optimizer's max_grad_norm, also under "
        "--gradient-release, where each backward is clipped by the previous backward's norm",
        type=float,
    )
    exact_clip: bool = flag(
        False,
        "with --gradient-release and --grad-clip: clip exactly, with two backward passes (release_backward)",
        action="store_true",
    )
    # -- run length, data and model
    steps: int = flag(300, "optimizer steps of the whole run (also after --resume)", type=int)
    batch_size: int = flag(16, "global batch in sequences per step, split over ranks and micro-batches", type=int)
    seed: int = flag(0, "seed of the initial weights and of the data order", type=int)
    block_size: int = flag(64, "GPT context length in bytes", type=int)
    n_layer: int = flag(2, "GPT transformer blocks", type=int)
    n_head: int = flag(4, "GPT attention heads", type=int)
    n_embd: int = flag(64, "GPT embedding width", type=int)
    device: str = flag("auto", "auto: cuda when available", type=str.lower, choices=("auto", "cpu", "cuda"))
    # -- logging and checkpoints
    log_every: int = flag(25, "print a progress line every this many steps", type=int)
    eval_batches: int = flag(8, "held-out batches (of --batch-size sequences) for the final loss", type=int)
    metrics_file: str | None = flag(None, "rank 0 appends one JSON line per step (step, loss, lr)", type=str)
    checkpoint_dir: str | None = flag(None, "where checkpoints go (none written if unset)", type=str)
    checkpoint_every: int = flag(
        0, "write a checkpoint every this many steps and at the end (0: only at the end)", type=int
    )
    resume: str | None = flag(
        None,
        "resume from CHECKPOINT, or without one from the newest checkpoint in --checkpoint-dir",
        nargs="?",
        const="latest",
        metavar="CHECKPOINT",
        type=str,
    )

    @property
    def kahan_on(self) -> bool:
        """Whether the optimizer keeps Kahan buffers (bf16 parameters, unless --kahan off or another mode)."""
        if self.low_precision is not None:
            return self.dtype == "bf16" and self.low_precision == "kahan"
        return self.dtype == "bf16" and self.kahan != "off"

    @property
    def autocast(self) -> bool:
        """Mixed precision through autocast; FSDP2 casts through its MixedPrecisionPolicy instead, and
        DeepSpeed keeps a bf16 model next to its fp32 master weights."""
        return self.dtype == "mixed" and self.parallel in ("none", "ddp")


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The ``TrainConfig`` of the command line; bad input exits with status 2 and a message."""
    parser = argparse.ArgumentParser(description="Train a small byte-level GPT with an optimi optimizer.")
    for field in dataclasses.fields(TrainConfig):
        parser.add_argument("--" + field.name.replace("_", "-"), default=field.default, **field.metadata)
    config = TrainConfig(**vars(parser.parse_args(argv)))
    problem = config_problem(config)
    if problem:
        parser.error(problem)
    return config


def config_problem(config: TrainConfig) -> str | None:
    """Why ``config`` cannot run (whatever the world size), or None."""
    for name in ("steps", "batch_size", "accumulation_steps", "log_every", "block_size", "n_layer", "n_head"):
        if getattr(config, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1"
    if config.lr <= 0:
        return "--lr must be > 0"
    if config.exact_clip and not (config.gradient_release and config.grad_clip > 0):
        return "--exact-clip needs --gradient-release and --grad-clip (without release the clip is exact anyway)"
    if config.parallel == "deepspeed":
        problem = deepspeed_engine.config_problem(config)
        if problem:
            return problem
    elif config.zero_stage != TrainConfig.zero_stage:
        return "--zero-stage applies to --parallel deepspeed only"
    if config.kahan == "on" and config.dtype != "bf16":
        return f"--kahan on needs bf16 parameters (--dtype bf16); with --dtype {config.dtype} they are fp32"
    if config.low_precision is not None and config.dtype != "bf16":
        return f"--low-precision needs bf16 parameters (--dtype bf16); with --dtype {config.dtype} they are fp32"
    if config.low_precision is not None and config.kahan != "auto":
        if config.low_precision != ("kahan" if config.kahan == "on" else "nearest"):
            return f"--low-precision {config.low_precision} contradicts --kahan {config.kahan}: give one of them"
    if config.state_bits and config.parallel == "deepspeed":
        return "--state-bits cannot serve --parallel deepspeed: ZeRO hands the optimizer flat partitions without rows"
    if config.torchao_adamw8bit is not None:
        if config.optimizer != "adamw" or config.gradient_release or config.state_bits or config.low_precision:
            return (
                "--torchao-adamw8bit replaces --optimizer adamw and takes none of --gradient-release, "
                "--state-bits, --low-precision"
            )
        if config.parallel not in ("none", "fsdp2"):
            return "--torchao-adamw8bit runs on one process or under --parallel fsdp2"
    if config.resume == "latest" and config.checkpoint_dir is None:
        return "--resume without a path resumes from --checkpoint-dir, so give --checkpoint-dir"
    return None


def resume_path(config: TrainConfig) -> Path | None:
    """The checkpoint ``--resume`` names (the newest one in ``--checkpoint-dir`` by default), or None."""
    if config.resume is None:
        return None
    directory = Path(config.resume if config.resume != "latest" else config.checkpoint_dir)
    if not directory.is_dir():
        raise SystemExit(f"--resume: checkpoint directory {directory} does not exist")
    if config.resume != "latest":
        return directory
    path = latest_checkpoint(directory)
    if path is None:
        raise SystemExit(f"--resume: no complete checkpoint in {directory}")
    return path
