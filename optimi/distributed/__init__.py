"""optimi.distributed: gradient release, accumulation and memory accounting for FSDP2 and DDP; DeepSpeed.

Re-exports only; each concern lives in its own module (``release`` dispatches to ``fsdp`` and
``ddp``, ``memory`` reports per-rank bytes, DTensor handling is confined to ``_dtensor``,
``deepspeed`` runs optimi optimizers under DeepSpeed ZeRO and imports DeepSpeed only when used).
Importing this package never initializes a process group.
"""

from optimi.distributed.deepspeed import DeepSpeedSetup, deepspeed_rank_memory, prepare_config
from optimi.distributed.memory import MemoryReport, RankMemory, memory_report, register_memory_accountant
from optimi.distributed.release import prepare_gradient_release, remove_gradient_release

__all__ = [
    "DeepSpeedSetup",
    "MemoryReport",
    "RankMemory",
    "deepspeed_rank_memory",
    "memory_report",
    "prepare_config",
    "prepare_gradient_release",
    "register_memory_accountant",
    "remove_gradient_release",
]
