"""optimi.distributed: gradient release, accumulation and memory accounting for FSDP2 and DDP.

Re-exports only; each concern lives in its own module (``release`` dispatches to ``fsdp`` and
``ddp``, ``memory`` reports per-rank bytes, DTensor handling is confined to ``_dtensor``).
Importing this package never initializes a process group.
"""

from optimi.distributed.memory import MemoryReport, RankMemory, memory_report, register_memory_accountant
from optimi.distributed.release import prepare_gradient_release, remove_gradient_release

__all__ = [
    "MemoryReport",
    "RankMemory",
    "memory_report",
    "prepare_gradient_release",
    "register_memory_accountant",
    "remove_gradient_release",
]
