"""optimi.distributed: gradient release, memory accounting and checkpoints for DDP / FSDP2 (re-exports only)."""

from optimi.distributed.checkpoint import LoadedCheckpoint, latest_checkpoint, load_checkpoint, save_checkpoint

__all__ = ["LoadedCheckpoint", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]
