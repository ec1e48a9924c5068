"""optimi.distributed: optimi under DDP, FSDP2 and DeepSpeed (re-exports only)."""

from optimi.distributed.deepspeed import DeepSpeedSetup, deepspeed_rank_memory, prepare_config

__all__ = ["DeepSpeedSetup", "deepspeed_rank_memory", "prepare_config"]
