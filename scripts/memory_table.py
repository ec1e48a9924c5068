"""The last lines of ``scripts/train.py``: bytes per parameter each rank held, measured, beside fp32 AdamW.

    torchrun --standalone --nproc_per_node 2 scripts/train.py --parallel fsdp2 --dtype bf16 --gradient-release

The measurement is ``optimi.distributed.memory_report`` (every rank counts the tensors it holds,
``track_gradient_peak`` records the most gradient bytes alive at once during backward); this module
only divides and formats. Nothing here touches the process group, CUDA or the environment at import.
"""

from __future__ import annotations

from optimi.distributed import MemoryReport

#: bytes per parameter of fp32 AdamW: a 4-byte weight, a 4-byte gradient and two 4-byte moments
FP32_ADAMW_BYTES = 16

HEADER = ["rank", "params", "weights", "grads", "opt state", "(Kahan)", "total", "fp32 AdamW", "saved", "peak RSS"]


def bytes_per_param_table(report: MemoryReport, n_params: int) -> str:
    """What each rank held per parameter, measured, and fp32 AdamW's 16 bytes on the same parameters.

    Per parameter the rank holds (its shard under FSDP2 and ZeRO-3, the whole model otherwise):
    ``weights`` and ``opt state`` (moments and Kahan buffers; under DeepSpeed also its master copy)
    as ``memory_report`` counted them, ``grads`` at the peak of live ``.grad`` bytes during
    backward where ``track_gradient_peak`` recorded it, else (DeepSpeed) the gradient buffers alive
    at the report. The comparison is fp32 AdamW holding 16 bytes for every parameter this rank
    holds, where every gradient is alive after backward; the last line adds fp32 AdamW on the
    whole model (``n_params``) in one process. ``peak RSS`` is the whole process: for a model this
    small the Python and torch runtime dominate it.
    """
    rows = []
    for rank in report.ranks:
        held = max(rank.param_numel, 1)
        grads = max(rank.grads, rank.grads_peak or 0)
        parts = [rank.params / held, grads / held, rank.optimizer_states / held, rank.kahan / held]
        total = rank.bytes_per_param  # (params + peak grads + optimizer states) / param_numel
        rows.append(
            [str(rank.rank), f"{rank.param_numel:,}", *(f"{part:.2f}" for part in parts), f"{total:.2f}"]
            + [f"{FP32_ADAMW_BYTES:.2f}", f"{1 - total / FP32_ADAMW_BYTES:.0%}", _mib(rank.rss_peak)]
        )
    widths = [max(len(name), *(len(row[i]) for row in rows)) for i, name in enumerate(HEADER)]
    first = report.ranks[0]
    grads_when = "at their peak" if all(rank.grads_peak is not None for rank in report.ranks) else "at the end"
    return "\n".join(
        [f"bytes per parameter held, measured (grads {grads_when}), vs fp32 AdamW: 4 weight + 4 grad + 8 moments"]
        + ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in [HEADER, *rows]]
        + [
            f"rank 0 held {_mib(round(first.bytes_per_param * first.param_numel))} for its "
            f"{first.param_numel:,} parameters; fp32 AdamW would hold {_mib(FP32_ADAMW_BYTES * first.param_numel)} "
            f"for them, {_mib(FP32_ADAMW_BYTES * n_params)} for all {n_params:,} in one process"
        ]
    )


def _mib(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.2f} MiB"
