"""optimi.distributed: gradient release, accumulation, memory accounting and checkpoints for FSDP2 and DDP; DeepSpeed.

Re-exports only; each concern lives in its own module (``release`` dispatches to ``fsdp`` and
``ddp``, ``memory`` reports per-rank bytes, ``checkpoint`` saves and loads through
``torch.distributed.checkpoint``, DTensor handling is confined to ``_dtensor``, ``deepspeed`` runs
optimi optimizers under DeepSpeed ZeRO and imports DeepSpeed only when used).
Importing this package never initializes a process group.
"""

from optimi.distributed.checkpoint import LoadedCheckpoint, latest_checkpoint, load_checkpoint, save_checkpoint
from optimi.distributed.deepspeed import DeepSpeedSetup, deepspeed_rank_memory, prepare_config
from optimi.distributed.memory import MemoryReport, RankMemory, memory_report, register_memory_accountant
from optimi.distributed.release import prepare_gradient_release, remove_gradient_release

__all__ = [
    "DeepSpeedSetup",
    "LoadedCheckpoint",
    "MemoryReport",
    "RankMemory",
    "deepspeed_rank_memory",
    "latest_checkpoint",
    "load_checkpoint",
    "memory_report",
    "prepare_config",
    "prepare_gradient_release",
    "register_memory_accountant",
    "remove_gradient_release",
    "save_checkpoint",
]
