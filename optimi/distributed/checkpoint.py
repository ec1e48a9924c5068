"""Atomic, reshardable checkpoints of a model and its optimizer through ``torch.distributed.checkpoint``.

[Note: one checkpoint format at every world size]
Every checkpoint is a ``torch.distributed.checkpoint`` (DCP) directory, also at world size 1 (where
DCP runs without a process group and one process writes every file). A single format is what
makes checkpoints portable: DCP stores each tensor by its global shape, so a checkpoint written by
2 FSDP2 ranks (sharded DTensor parameters and optimizer state) loads into a plain module on one
process, a world-size-1 checkpoint loads into FSDP2 shards on N ranks, and DDP, FSDP2 and plain
runs read each other's checkpoints, because ``get_state_dict`` gives all three the same fully
qualified names. Who wants one plain file can convert a directory with
``torch.distributed.checkpoint.format_utils.dcp_to_torch_save``. ``torch.save`` is used only for the
small non-tensor trainer state (step, scheduler, data position) and per-rank RNG state.

Non-tensor values in the state dicts (optimi's per-parameter python-int ``step`` counters, the
param groups' hyperparameters) are pickled by DCP and come back as the same python objects.

[Note: a crash mid-save never corrupts the latest checkpoint]
A checkpoint for step ``s`` is written into ``<dir>/.step_<s>.tmp``; after a barrier rank 0 renames it
to ``<dir>/step_<s>`` (a rename within one directory is atomic) and then rewrites the ``latest``
pointer file the same way (write ``latest.tmp``, fsync, ``os.replace``). A crash at any point
leaves either the previous ``latest`` or the new one, each pointing to a complete directory;
hidden ``.tmp`` leftovers are removed by the next save. Ranks must share the checkpoint
filesystem (on several machines: a network filesystem).

Layout::

    <dir>/latest                  "step_00000100" (the newest complete checkpoint)
    <dir>/step_00000100/.metadata, __*.distcp     model + optimizer (DCP, sharded by rank)
    <dir>/step_00000100/trainer.pt                {"step", "world_size", "extra"} from rank 0
    <dir>/step_00000100/rank_00000.pt             per-rank state (e.g. RNG), one file per rank
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from optimi.optimizer import OptimiOptimizer

__all__ = ["LoadedCheckpoint", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]

LATEST = "latest"
TRAINER_FILE = "trainer.pt"


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What :func:`load_checkpoint` restored besides the model and optimizer."""

    #: the checkpoint directory that was read
    path: Path
    #: the ``step`` passed to :func:`save_checkpoint`
    step: int
    #: the world size that wrote the checkpoint
    world_size: int
    #: the ``extra`` dict passed to :func:`save_checkpoint` (identical on every rank)
    extra: dict[str, Any]
    #: this rank's ``rank_extra`` dict, or None when the checkpoint was written by a different
    #: number of ranks (per-rank state such as RNG then has no counterpart)
    rank_extra: dict[str, Any] | None


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """Silence DCP's "assuming the intent is to save in a single process" warning: at world size 1
    that is the intent ([Note: one checkpoint format at every world size])."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _step_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_latest(root: Path, name: str) -> None:
    """Point ``<root>/latest`` at ``name`` atomically."""
    tmp = root / f"{LATEST}.tmp"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST)
    _fsync_dir(root)


def _ensure_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Allocate every parameter's optimi state, so that DCP has tensors to load into in place
    (DCP only fills keys that exist) and ``get_state_dict`` does not take a zero-gradient step to
    create them. State that exists (gradient release allocates it up front) is left alone."""
    if isinstance(optimizer, OptimiOptimizer):
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.requires_grad:
                    optimizer.init_param_state(param, group)


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in ``checkpoint_dir``, or None if there is none.

    Follows the ``latest`` pointer; if the pointer is missing or names a directory that no longer
    exists, falls back to the highest-numbered complete ``step_*`` directory.
    """
    root = Path(checkpoint_dir)
    pointer = root / LATEST
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if (target / TRAINER_FILE).is_file():
            return target
    complete = sorted(p for p in root.glob("step_*") if (p / TRAINER_FILE).is_file())
    return complete[-1] if complete else None


def save_checkpoint(
    checkpoint_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    extra: dict[str, Any] | None = None,
    rank_extra: dict[str, Any] | None = None,
) -> Path:
    """Write model + optimizer + ``extra`` as ``<checkpoint_dir>/step_<step>`` and point ``latest`` at it.

    Collective: every rank calls it (the model may be plain, ``DistributedDataParallel`` or FSDP2).
    Each rank writes its own shards; ``extra`` (trainer state, taken from rank 0) and
    ``rank_extra`` (this rank's own state, e.g. RNG) are pickled with ``torch.save``. Atomic
    ([Note: a crash mid-save never corrupts the latest checkpoint]); an existing checkpoint of the
    same step is replaced. Returns the checkpoint directory.
    """
    rank, world_size = _rank_and_world()
    root = Path(checkpoint_dir)
    name = _step_name(step)
    final, tmp, aside = root / name, root / f".{name}.tmp", root / f".{name}.old"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftover of a crashed save
        tmp.mkdir()
    _barrier()

    model_state, optim_state = get_state_dict(model, optimizer)
    with _single_process_quiet():
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp, no_dist=world_size == 1)
    torch.save(rank_extra or {}, tmp / f"rank_{rank:05d}.pt")
    if rank == 0:
        torch.save({"step": step, "world_size": world_size, "extra": extra or {}}, tmp / TRAINER_FILE)
    _barrier()  # every rank's files are in tmp

    if rank == 0:
        if final.exists():
            shutil.rmtree(aside, ignore_errors=True)
            os.rename(final, aside)
        os.rename(tmp, final)
        _fsync_dir(root)
        _write_latest(root, name)
        shutil.rmtree(aside, ignore_errors=True)
    _barrier()  # nobody reads `latest` before it is written
    return final


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> LoadedCheckpoint:
    """Load a checkpoint written by :func:`save_checkpoint` into ``model`` and ``optimizer`` in place.

    Collective. ``path`` is one checkpoint directory (see :func:`latest_checkpoint`). Works for any
    number of ranks and any of plain / DDP / FSDP2, whatever wrote the checkpoint
    ([Note: one checkpoint format at every world size]). Call it after
    ``optimi.prepare_for_gradient_release`` when gradient release is used: the hooks read the
    optimizer's live state and param groups, so they pick up what is loaded here.
    """
    path = Path(path)
    if not (path / TRAINER_FILE).is_file() or not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {TRAINER_FILE} or .metadata)")
    rank, world_size = _rank_and_world()
    _ensure_optimizer_state(optimizer)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=path, no_dist=world_size == 1)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])

    trainer = torch.load(path / TRAINER_FILE, weights_only=False)
    rank_file = path / f"rank_{rank:05d}.pt"
    rank_extra = None
    if trainer["world_size"] == world_size and rank_file.is_file():
        rank_extra = torch.load(rank_file, weights_only=False)
    return LoadedCheckpoint(
        path=path,
        step=trainer["step"],
        world_size=trainer["world_size"],
        extra=trainer["extra"],
        rank_extra=rank_extra,
    )
