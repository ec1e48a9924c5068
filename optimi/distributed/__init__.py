"""optimi.distributed: gradient release, accumulation, memory accounting and checkpoints for FSDP2 and DDP.

Re-exports only; each concern lives in its own module (``release`` dispatches to ``fsdp`` and
``ddp``, ``memory`` reports per-rank bytes, ``checkpoint`` saves and loads through
``torch.distributed.checkpoint``, DTensor handling is confined to ``_dtensor``).
Importing this package never initializes a process group.
"""

from optimi.distributed.checkpoint import LoadedCheckpoint, latest_checkpoint, load_checkpoint, save_checkpoint
from optimi.distributed.memory import MemoryReport, RankMemory, memory_report, register_memory_accountant
from optimi.distributed.release import prepare_gradient_release, remove_gradient_release

__all__ = [
    "LoadedCheckpoint",
    "MemoryReport",
    "RankMemory",
    "latest_checkpoint",
    "load_checkpoint",
    "memory_report",
    "prepare_gradient_release",
    "register_memory_accountant",
    "remove_gradient_release",
    "save_checkpoint",
]
