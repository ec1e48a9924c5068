"""Per-rank memory accounting: what each rank holds for parameters, gradients and optimizer state.

``memory_report(model, optimizer)`` is collective: every rank calls it, each counts what *it*
holds (local shards under FSDP2, its full replica under DDP) and the counts are all-gathered, so
every rank gets the same :class:`MemoryReport` with one :class:`RankMemory` per rank. Without an
initialized process group it reports the single process as rank 0.

Counting is done by an *accountant*: a function ``(model, optimizer) -> TensorBytes``. The default
one understands plain modules, ``DistributedDataParallel`` and FSDP2 models; other engines (a
DeepSpeed engine keeps gradients and optimizer state in its own partitioned buffers) register their
own with :func:`register_memory_accountant`.

Tensor counts say what the tensors hold, not what the process paid for: allocator caching,
fragmentation and communication buffers (DDP buckets, FSDP2 reduce-scatter outputs) show up only
in ``rss`` / ``rss_peak`` and, on CUDA, ``device_allocated`` / ``device_peak``.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import psutil
import torch
import torch.distributed as dist
from torch import Tensor, nn

from optimi.distributed._dtensor import local_nbytes

__all__ = [
    "MemoryReport",
    "RankMemory",
    "TensorBytes",
    "GradientPeak",
    "memory_report",
    "register_memory_accountant",
    "track_gradient_peak",
]


@dataclass(frozen=True)
class TensorBytes:
    """What an accountant counts on one rank (bytes of local tensors)."""

    #: parameters this rank holds (its shards under FSDP2, its replica under DDP)
    params: int
    #: live ``.grad`` tensors at the time of the report
    grads: int
    #: every tensor in the optimizer state (moments, slow weights, Kahan buffers)
    optimizer_states: int
    #: the Kahan compensation buffers and int16 remainders alone (state keys ending in ``_comp``, and
    #: ``remainder``; included in ``optimizer_states``)
    kahan: int
    #: number of parameter elements this rank holds
    param_numel: int


@dataclass(frozen=True)
class RankMemory:
    """Memory one rank holds, in bytes. Tensor counts are local (shards under FSDP2)."""

    #: the rank (0 without a process group)
    rank: int
    #: parameters this rank holds (its shards under FSDP2, its full replica under DDP)
    params: int
    #: live ``.grad`` tensors at the time of the report (0 under gradient release after backward)
    grads: int
    #: the most ``.grad`` bytes alive at once during the backwards observed by
    #: :func:`track_gradient_peak`; ``None`` when not tracked
    grads_peak: int | None
    #: every tensor of the optimizer state: moments, slow weights and Kahan buffers
    optimizer_states: int
    #: the Kahan compensation buffers and ``low_precision="remainder"`` remainders alone (included
    #: in ``optimizer_states``)
    kahan: int
    #: number of parameter elements this rank holds (for bytes per parameter)
    param_numel: int
    #: resident set size of the process now (psutil)
    rss: int
    #: peak resident set size of the process so far (``getrusage``); ``None`` where unavailable
    rss_peak: int | None
    #: CUDA bytes allocated now by this rank's device; ``None`` on CPU
    device_allocated: int | None
    #: CUDA peak bytes allocated since the last ``torch.cuda.reset_peak_memory_stats``; ``None`` on CPU
    device_peak: int | None

    @property
    def total(self) -> int:
        """``params + grads + optimizer_states``: the tensors training keeps on this rank."""
        return self.params + self.grads + self.optimizer_states

    @property
    def bytes_per_param(self) -> float:
        """``(params + max(grads, grads_peak) + optimizer_states) / param_numel``."""
        grads = max(self.grads, self.grads_peak or 0)
        return (self.params + grads + self.optimizer_states) / max(self.param_numel, 1)


@dataclass(frozen=True)
class MemoryReport:
    """Per-rank memory, one :class:`RankMemory` per rank in rank order."""

    #: one entry per rank
    ranks: list[RankMemory]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict: ``{"ranks": [{field: value, ...}, ...]}``."""
        return {"ranks": [asdict(rank) for rank in self.ranks]}

    def __str__(self) -> str:
        columns = [f.name for f in fields(RankMemory) if f.name not in ("rank", "param_numel")]
        header = ["rank", *columns]
        rows = [[str(r.rank), *(_human(getattr(r, c)) for c in columns)] for r in self.ranks]
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
        lines = ["memory per rank"]
        lines.append("  ".join(h.rjust(w) for h, w in zip(header, widths)))
        lines.extend("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows)
        return "\n".join(lines)


def _human(value: int | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value} B"


# -- accountants ----------------------------------------------------------------------------------

Accountant = Callable[[Any, Any], TensorBytes]

# (predicate, accountant) pairs, most recently registered first; the default is the fallback
_ACCOUNTANTS: list[tuple[Callable[[Any], bool], Accountant]] = []


def register_memory_accountant(applies_to: Callable[[Any], bool], accountant: Accountant) -> None:
    """Teach :func:`memory_report` to count a kind of model it does not understand.

    ``applies_to(model)`` says whether ``accountant(model, optimizer)`` should count ``model``; the
    accountant returns this rank's :class:`TensorBytes`. Used for engines that keep gradients or
    optimizer state outside ``param.grad`` and ``optimizer.state`` (a DeepSpeed engine).
    Accountants registered later take precedence.
    """
    _ACCOUNTANTS.insert(0, (applies_to, accountant))


def _unwrap(model: Any) -> Any:
    """The module holding the parameters (DDP wraps it in ``.module``)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def count_tensors(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> TensorBytes:
    """The default accountant: parameters and ``.grad`` of ``model``, tensors in ``optimizer.state``.

    Works for plain modules, DDP (its replica) and FSDP2 (local shards of the DTensors).
    """
    params = list({id(p): p for p in _unwrap(model).parameters()}.values())
    param_bytes = sum(local_nbytes(p) for p in params)
    param_numel = sum(local_nbytes(p) // max(p.element_size(), 1) for p in params)
    grad_bytes = sum(local_nbytes(p.grad) for p in params)
    state_bytes = kahan_bytes = 0
    if optimizer is not None:
        for state in optimizer.state.values():
            for key, value in state.items():
                if isinstance(value, Tensor):
                    nbytes = local_nbytes(value)
                    state_bytes += nbytes
                    # kahan_comp, Ranger's slow-weight slow_comp, and the int16 remainder of a
                    # low_precision="remainder" master: the bytes that keep low-precision updates
                    if key.endswith("_comp") or key == "remainder":
                        kahan_bytes += nbytes
    return TensorBytes(
        params=param_bytes,
        grads=grad_bytes,
        optimizer_states=state_bytes,
        kahan=kahan_bytes,
        param_numel=param_numel,
    )


def _accountant_for(model: Any) -> Accountant:
    for applies_to, accountant in _ACCOUNTANTS:
        if applies_to(model):
            return accountant
    return count_tensors


# -- gradient peak --------------------------------------------------------------------------------

_PEAK_ATTR = "_optimi_gradient_peak"


class GradientPeak:
    """Records the most ``.grad`` bytes alive at once, sampled in post-accumulate-grad hooks.

    Install with :func:`track_gradient_peak` *before* gradient release, so that each sample sees
    the parameter's gradient before the release hook frees it. Each sample sums the live gradients
    of all parameters (O(parameters) per hook: a diagnostic, not for production runs).
    """

    def __init__(self, params: list[Tensor]):
        self.params = params
        self.peak = 0

        def sample(param: Tensor) -> None:
            live = sum(local_nbytes(p.grad) for p in self.params)
            self.peak = max(self.peak, live)

        # the distributed release entry points' "existing hooks" check skips optimi's own sampler
        sample.optimi_memory_hook = True
        self.handles = [p.register_post_accumulate_grad_hook(sample) for p in params]

    def reset(self) -> None:
        """Forget the peak recorded so far (e.g. after DDP's first iteration rebuilt its buckets)."""
        self.peak = 0

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def track_gradient_peak(model: nn.Module) -> GradientPeak:
    """Start recording the peak of live ``.grad`` bytes of ``model`` (see :class:`GradientPeak`).

    Reported as ``grads_peak`` by :func:`memory_report`. Call it before preparing gradient release
    (then pass ``ignore_existing_hooks=True`` to a single-process ``prepare_for_gradient_release``;
    the distributed entry points recognise these hooks).
    """
    module = _unwrap(model)
    tracker = getattr(module, _PEAK_ATTR, None)
    if tracker is None:
        tracker = GradientPeak([p for p in module.parameters() if p.requires_grad])
        setattr(module, _PEAK_ATTR, tracker)
    return tracker


# -- the report -----------------------------------------------------------------------------------


def _rss_peak() -> int | None:
    if sys.platform.startswith("linux"):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    if sys.platform == "darwin":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS
    return None


def _device_of(model: Any) -> torch.device:
    module = _unwrap(model)
    parameters = getattr(module, "parameters", None) or getattr(getattr(module, "module", None), "parameters", None)
    for param in parameters() if parameters is not None else ():
        return param.device
    return torch.device("cpu")


def local_memory(model: Any, optimizer: Any, rank: int = 0) -> RankMemory:
    """This rank's :class:`RankMemory` (not collective)."""
    counts = _accountant_for(model)(model, optimizer)
    device = _device_of(model)
    allocated = peak = None
    if device.type == "cuda":
        allocated = torch.cuda.memory_allocated(device)
        peak = torch.cuda.max_memory_allocated(device)
    tracker = getattr(_unwrap(model), _PEAK_ATTR, None) if isinstance(_unwrap(model), nn.Module) else None
    rss, rss_peak = psutil.Process().memory_info().rss, _rss_peak()
    return RankMemory(
        rank=rank,
        params=counts.params,
        grads=counts.grads,
        grads_peak=None if tracker is None else max(tracker.peak, counts.grads),
        optimizer_states=counts.optimizer_states,
        kahan=counts.kahan,
        param_numel=counts.param_numel,
        rss=rss,
        rss_peak=None if rss_peak is None else max(rss_peak, rss),
        device_allocated=allocated,
        device_peak=peak,
    )


def memory_report(model: Any, optimizer: Any = None, *, group: dist.ProcessGroup | None = None) -> MemoryReport:
    """Per-rank memory of ``model`` and ``optimizer``: collective, every rank must call it.

    Each rank counts its own tensors (local shards under FSDP2) and the entries are all-gathered
    over ``group`` (the default group), so every rank returns the same report. Without an
    initialized process group the report has the single process as rank 0.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return MemoryReport([local_memory(model, optimizer, 0)])
    mine = local_memory(model, optimizer, dist.get_rank(group))
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, asdict(mine), group=group)
    return MemoryReport([RankMemory(**entry) for entry in gathered])
