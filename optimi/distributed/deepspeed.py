"""DeepSpeed integration: optimi optimizers as DeepSpeed client optimizers under ZeRO 1, 2 and 3.

DeepSpeed is imported lazily, inside the functions that need it, so importing this module never
requires it (``pip install optimi[deepspeed]``). Importing it registers :func:`count_engine_tensors`
with :func:`optimi.distributed.memory_report`, which then counts DeepSpeed engines.

[Note: what DeepSpeed hands a client optimizer]
Under ZeRO (stages 1, 2 and 3) DeepSpeed does not step the model's parameters. It flattens each
param group into one contiguous buffer, splits that buffer across the data-parallel ranks, and
replaces the group's ``params`` with this rank's *flat partition* (one 1-D tensor per group, or per
ZeRO-3 sub-group). The client optimizer then steps that partition with the partition of the
averaged gradient, and DeepSpeed copies (all-gathers) the result back into the model's parameters.
Without ZeRO it steps whole tensors (in its bf16/fp16 modes, per-tensor fp32 copies). Consequences
for optimi:

* Element-wise rules (Adam, AdamW, SGD, Lion, Adan, RAdam, Ranger) compute exactly what they
  compute on whole tensors, so sharded training matches a single process on the full batch.
* A rule with whole-tensor statistics (StableAdamW's per-tensor RMS of ``g / sqrt(v)``) cannot be
  computed from a flat slice that mixes pieces of several tensors, so such optimizers are rejected
  instead of silently running a different rule (see ``_needs_whole_tensors``).
* Debiasing reads the param group's step counter, which optimi increments once per ``step()`` on
  every group that has a gradient. DeepSpeed calls ``step()`` once per group (stages 1 and 2) or
  once per ZeRO-3 sub-group, so a param group split into several ZeRO-3 sub-groups would advance
  its counter several times per training step; ``prepare_config`` keeps each group in one
  sub-group.
* The optimizer sees the flat partition's dtype. With DeepSpeed's default bf16 mode that is an
  fp32 master copy (4 bytes/param of master weights plus fp32 moments). With
  ``bf16_master_weights_and_grads`` and ``bf16_optimizer_states`` the partition is bf16, so optimi
  keeps bf16 moments and, as for any bf16 parameter, turns on Kahan summation for it: the bf16
  compensation buffer takes the place of the fp32 master copy. The other ``low_precision`` modes
  apply to the partition as to any bf16 tensor: ``"remainder"`` keeps an int16 remainder per
  element (an exact fp32 master at the Kahan buffer's 2 bytes), ``"stochastic"`` keeps nothing.
  Stochastic rounding hashes each element's index in this rank's partition (DeepSpeed's flat
  partitions are plain tensors, unlike FSDP2's DTensors): a run is reproducible at a given world
  size, but, unlike FSDP2, the bits change with the world size.
"""

from __future__ import annotations

import copy
import logging
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from optimi.distributed.memory import TensorBytes, register_memory_accountant
from optimi.stableadamw import StableAdamW

__all__ = ["DeepSpeedSetup", "prepare_config", "initialize", "deepspeed_rank_memory", "count_engine_tensors"]

logger = logging.getLogger(__name__)

# DeepSpeed's default ZeRO-3 sub_group_size (elements); a param group larger than this is split
_DEFAULT_SUB_GROUP_SIZE = 1_000_000_000


@dataclass
class DeepSpeedSetup:
    """What :func:`initialize` returns."""

    engine: Any
    """The ``deepspeed.DeepSpeedEngine``: call ``engine(batch)``, ``engine.backward(loss)``, ``engine.step()``."""
    optimizer: Any
    """DeepSpeed's optimizer wrapper (ZeRO / bf16), which steps the optimi optimizer on flat partitions."""
    lr_scheduler: Any
    """The LR scheduler DeepSpeed steps inside ``engine.step()`` (``None`` if none was given or configured)."""
    config: dict[str, Any]
    """The DeepSpeed config actually used (a copy of the one passed in, with ``changes`` applied)."""
    changes: list[str] = field(default_factory=list)
    """One sentence per setting :func:`prepare_config` added or changed, saying why."""


def prepare_config(optimizer: torch.optim.Optimizer, config: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Check that ``optimizer`` can run as a DeepSpeed client optimizer under ``config``, and
    return a copy of ``config`` with what DeepSpeed needs for it, plus a list explaining each change.

    Changes (only where the config does not already say so):

    * ``zero_allow_untested_optimizer: true`` under ZeRO: DeepSpeed refuses optimizers outside its
      own list without it. optimi's element-wise rules are exact on flat partitions.
    * ``bf16.bf16_optimizer_states: true`` when ``bf16.bf16_master_weights_and_grads`` is set:
      optimi keeps its state in the parameter's dtype, so bf16 master partitions mean bf16
      moments anyway, and DeepSpeed accepts bf16 master weights with a GPU/CPU client optimizer
      only together with bf16 optimizer states (otherwise it demands ZeRO-Offload with
      DeepSpeedCPUAdam).
    * ``zero_optimization.sub_group_size`` under ZeRO-3, raised to the largest param group when
      DeepSpeed's default would split a group (see the module's [Note]).

    Raises ``ValueError`` when the combination cannot work: a ``gradient_release=True`` or
    ``optimizer_accumulation`` optimizer (DeepSpeed owns gradient reduction, accumulation and the
    step), an optimizer with whole-tensor statistics (StableAdamW) where DeepSpeed hands it flat
    partitions, an optimizer with ``state_bits=8`` (flat partitions have no rows to lay blocks on),
    an ``optimizer`` section in ``config`` next to a client optimizer (DeepSpeed would silently
    ignore it), or a user-set ZeRO-3 ``sub_group_size`` that splits a param group.
    """
    config = copy.deepcopy(dict(config))
    changes: list[str] = []
    name = type(optimizer).__name__

    if "optimizer" in config:
        raise ValueError(
            f"the DeepSpeed config has an 'optimizer' section and a client optimizer ({name}) was given: "
            "DeepSpeed would use the client optimizer and ignore the section; remove it from the config"
        )
    if any(group.get("gradient_release", False) for group in optimizer.param_groups) or getattr(
        optimizer, "_gradient_release_active", False
    ):
        raise ValueError(
            f"{name} was built with gradient_release=True, but under DeepSpeed the engine owns the step: it "
            "reduces (and partitions) the gradients and then calls optimizer.step() itself. Build the "
            "optimizer with gradient_release=False; ZeRO-2/3 already avoid holding the full gradient."
        )
    if any(group.get("state_bits") for group in optimizer.param_groups):
        raise ValueError(
            f"{name} was built with state_bits=8, but under ZeRO DeepSpeed hands the optimizer flat 1-d "
            "partitions, whose blocks cannot follow the parameters' rows (docs/state_bits.md): the state would "
            "silently stay unquantized. Use state_bits=None with DeepSpeed, or FSDP2 for 8-bit state"
        )
    if getattr(optimizer, "optimizer_accumulation", False):
        raise ValueError(
            f"{name}.optimizer_accumulation is set, but DeepSpeed accumulates gradients itself; use the "
            "config's 'gradient_accumulation_steps' instead"
        )

    zero = config.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0))
    bf16 = config.get("bf16") or config.get("bfloat16") or {}
    bf16_enabled = bool(bf16.get("enabled", False))

    if _needs_whole_tensors(optimizer) and stage > 0:
        raise ValueError(
            f"{name} needs statistics of whole tensors (StableAdamW: each tensor's RMS of g/sqrt(v)), but "
            f"under ZeRO stage {stage} DeepSpeed hands the optimizer flat partitions that mix slices of several "
            "tensors, so the rule cannot be computed as written. Use an element-wise optimizer (AdamW), or "
            "DeepSpeed without ZeRO (stage 0), which steps whole tensors (fp32, or per-tensor fp32 copies in "
            "its bf16/fp16 modes)."
        )

    if stage > 0 and not config.get("zero_allow_untested_optimizer", False):
        config["zero_allow_untested_optimizer"] = True
        changes.append(
            f"set zero_allow_untested_optimizer=true: DeepSpeed only accepts its own optimizers under ZeRO "
            f"stage {stage} without it; {name}'s element-wise update is exact on flat partitions"
        )

    if bf16_enabled and bf16.get("bf16_master_weights_and_grads", False):
        if "bf16_optimizer_states" not in bf16:
            key = "bf16" if "bf16" in config else "bfloat16"
            config[key] = {**bf16, "bf16_optimizer_states": True}
            changes.append(
                "set bf16.bf16_optimizer_states=true: with bf16 master weights optimi keeps its moments in bf16 "
                "(the partition's dtype), and DeepSpeed requires this flag for bf16 master weights without "
                "ZeRO-Offload"
            )
        if stage == 0:
            raise ValueError("bf16_master_weights_and_grads needs ZeRO stage 1, 2 or 3 (DeepSpeed rejects stage 0)")
        if any(
            group.get("low_precision") == "nearest"
            or (group.get("low_precision") is None and group.get("kahan_sum") is False)
            for group in optimizer.param_groups
        ):
            logger.warning(
                "%s rounds to nearest (kahan_sum=False or low_precision='nearest') with bf16 master weights: "
                "updates smaller than a bf16 ulp are lost; leave kahan_sum=None to compensate them, or use "
                "low_precision='stochastic' or 'remainder'",
                name,
            )

    if "gradient_clipping" not in config:
        # DeepSpeed (0.19.8 checked) defaults gradient_clipping to 1.0: without the key the step is
        # not the optimizer's rule alone
        logger.warning(
            "the DeepSpeed config has no 'gradient_clipping': DeepSpeed then clips gradients to global norm 1.0 "
            "(its default); set 'gradient_clipping': 0.0 to step with the unclipped gradient"
        )

    if stage == 3:
        largest = max((sum(p.numel() for p in g["params"]) for g in optimizer.param_groups), default=0)
        user_size = zero.get("sub_group_size")
        if user_size is not None and int(user_size) < largest:
            raise ValueError(
                f"zero_optimization.sub_group_size={user_size} splits a param group of {largest} elements into "
                f"several ZeRO-3 sub-groups; each calls {name}.step(), which advances the group's debiasing step "
                f"several times per training step. Set sub_group_size >= {largest}."
            )
        if user_size is None and largest > _DEFAULT_SUB_GROUP_SIZE:
            config["zero_optimization"] = {**zero, "sub_group_size": largest}
            changes.append(
                f"set zero_optimization.sub_group_size={largest}: DeepSpeed's default would split a param group "
                "into several ZeRO-3 sub-groups, each advancing the group's debiasing step"
            )
    return config, changes


def initialize(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    config: dict[str, Any],
    *,
    lr_scheduler: Any = None,
) -> DeepSpeedSetup:
    """``deepspeed.initialize`` for an optimi optimizer, with the config :func:`prepare_config` returns.

    ``optimizer`` must be built on ``model``'s parameters (any param groups: each becomes one flat
    partition per rank, keeping its hyperparameters). ``lr_scheduler`` is passed through: a
    scheduler built on ``optimizer`` (DeepSpeed steps the same param-group dicts, so it keeps
    working) or a callable that receives the optimizer. DeepSpeed steps it inside ``engine.step()``
    once per optimizer step; do not step it yourself as well. Every change to the config is logged
    on rank 0 and returned in :attr:`DeepSpeedSetup.changes`.

    The process group must be up: ``deepspeed.init_distributed(dist_backend="nccl")`` on GPUs,
    ``"gloo"`` on CPU (with ``DS_ACCELERATOR=cpu``).
    """
    config, changes = prepare_config(optimizer, config)
    _check_params_match(model, optimizer)
    if lr_scheduler is not None and not callable(lr_scheduler):
        scheduled = getattr(lr_scheduler, "optimizer", optimizer)
        if scheduled is not optimizer:
            raise ValueError(
                "lr_scheduler was built on a different optimizer; build it on the optimi optimizer passed here "
                "(DeepSpeed steps that optimizer's param groups) or pass a callable taking the optimizer"
            )

    import deepspeed
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if rank == 0:
        for change in changes:
            logger.info("optimi.distributed.deepspeed: %s", change)
    engine, ds_optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=config, lr_scheduler=lr_scheduler
    )
    return DeepSpeedSetup(engine=engine, optimizer=ds_optimizer, lr_scheduler=scheduler, config=config, changes=changes)


def deepspeed_rank_memory(engine: Any) -> dict[str, int]:
    """Bytes held on this rank by a DeepSpeed engine's model and optimizer, by role.

    Keys: ``params`` (the model's parameters as this rank holds them: whole under ZeRO 1/2, this
    rank's partition under ZeRO-3), ``param_numel`` (their element count), ``master_params`` (the
    flat partitions the client optimizer steps: DeepSpeed's master copy), ``grads`` (gradients and
    DeepSpeed's gradient/communication buffers: everything else the ZeRO optimizer keeps alive),
    ``optimizer_states`` (the client optimizer's state tensors, Kahan buffers included) and
    ``kahan`` (the Kahan buffers alone: state keys ending in ``_comp``).
    Each storage is counted once (flat buffers and the parameter views into them share storage).
    A snapshot: gradients freed after ``engine.step()`` are not counted then.
    """
    seen: set[tuple[str, int]] = set()

    def take(tensor: Tensor | None) -> int:
        if not isinstance(tensor, Tensor) or tensor.device.type == "meta":
            return 0
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        if storage.nbytes() == 0 or key in seen:
            return 0
        seen.add(key)
        return storage.nbytes()

    counts = dict(params=0, master_params=0, grads=0, optimizer_states=0, kahan=0, param_numel=0)
    for param in engine.module.parameters():
        # ZeRO-3 frees param.data between forwards; ds_tensor holds this rank's partition
        partition = getattr(param, "ds_tensor", None)
        counts["params"] += take(partition) + take(param.data)
        counts["param_numel"] += partition.numel() if isinstance(partition, Tensor) else param.numel()

    ds_optimizer = engine.optimizer
    basic = getattr(engine, "basic_optimizer", None) or ds_optimizer
    for state in basic.state.values():
        for key, value in state.items():
            if isinstance(value, Tensor) and value.dim() > 0:
                # kahan_comp, Ranger's slow-weight slow_comp and the int16 remainder of
                # low_precision="remainder" (memory.count_tensors' convention)
                low_bits = key.endswith("_comp") or key == "remainder"
                counts["kahan" if low_bits else "optimizer_states"] += take(value)
    counts["optimizer_states"] += counts["kahan"]

    masters = [p for g in basic.param_groups for p in g["params"]]
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition"):
        masters.extend(t for t in getattr(ds_optimizer, name, None) or [] if isinstance(t, Tensor))
    for master in masters:
        counts["master_params"] += take(master)

    grads = [p.grad for p in engine.module.parameters()] + [m.grad for m in masters]
    grads.extend(_tensors_in(vars(ds_optimizer), depth=3, skip=(basic, engine.module)))
    for grad in grads:
        counts["grads"] += take(grad)
    return counts


def _tensors_in(obj: Any, *, depth: int, skip: tuple[Any, ...]) -> Iterable[Tensor]:
    """Tensors reachable from ``obj`` through dicts, lists, tuples and plain objects (DeepSpeed's
    gradient buckets), ``depth`` levels deep, not entering ``skip`` objects or modules."""
    if isinstance(obj, Tensor):
        yield obj
        return
    if depth == 0 or any(obj is s for s in skip) or isinstance(obj, (torch.nn.Module, torch.optim.Optimizer)):
        return
    if isinstance(obj, dict):
        values: Iterable[Any] = obj.values()
    elif isinstance(obj, (list, tuple, set)):
        values = obj
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("deepspeed"):
        values = vars(obj).values()
    else:
        return
    for value in values:
        yield from _tensors_in(value, depth=depth - 1, skip=skip)


def _needs_whole_tensors(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer``'s rule reads whole-tensor statistics (see the module's [Note]).

    Optimizers declare it with a ``needs_whole_tensors = True`` class attribute; StableAdamW is
    recognised by class as well, so the check holds even where the attribute is absent.
    """
    if getattr(optimizer, "needs_whole_tensors", False):
        return True
    return isinstance(optimizer, StableAdamW)


def _check_params_match(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """DeepSpeed partitions the optimizer's param groups, which must hold ``model``'s parameters."""
    model_params = {id(p) for p in model.parameters()}
    foreign = sum(1 for g in optimizer.param_groups for p in g["params"] if id(p) not in model_params)
    if foreign:
        raise ValueError(
            f"{foreign} parameter(s) of the optimizer do not belong to the model; build the optimizer on "
            "model.parameters() (or param groups of them) before calling initialize"
        )
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    missing = sum(1 for p in model.parameters() if p.requires_grad and id(p) not in in_optimizer)
    if missing:
        logger.warning("%d trainable model parameter(s) are not in the optimizer and will not be trained", missing)


def _is_deepspeed_engine(model: Any) -> bool:
    # no import: a DeepSpeed engine can only exist once deepspeed has been imported
    deepspeed = sys.modules.get("deepspeed")
    engine_class = getattr(deepspeed, "DeepSpeedEngine", None)
    return engine_class is not None and isinstance(model, engine_class)


def count_engine_tensors(engine: Any, optimizer: Any = None) -> TensorBytes:
    """:func:`optimi.distributed.memory_report`'s accountant for a DeepSpeed engine.

    Counts with :func:`deepspeed_rank_memory`; ``optimizer`` is ignored (the engine knows its
    optimizer). As in the ZeRO paper, ``optimizer_states`` includes DeepSpeed's master partition
    (fp32 in the default bf16 mode, bf16 with ``bf16_master_weights_and_grads``), so the report
    shows what the fp32 master copy costs against optimi's Kahan buffers; ``grads`` includes
    DeepSpeed's gradient partitions and reduction buckets.
    """
    counts = deepspeed_rank_memory(engine)
    return TensorBytes(
        params=counts["params"],
        grads=counts["grads"],
        optimizer_states=counts["optimizer_states"] + counts["master_params"],
        kahan=counts["kahan"],
        param_numel=counts["param_numel"],
    )


register_memory_accountant(_is_deepspeed_engine, count_engine_tensors)
