"""``run_update``: one update rule, run by the backend chosen for a param group.

The for-loop and foreach backends live here (they only loop: the rule's primitives are
:class:`~optimi._ops.TensorOps` and :class:`~optimi._ops.ForeachOps`); the fused backend is the
package ``optimi._fused``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from optimi._columns import Columns
from optimi._fused import run_fused
from optimi._low_precision import FLOAT32_MASTERS, MasterRows, eager_master, write_master_
from optimi._ops import FOREACH_OPS, TENSOR_OPS

__all__ = ["run_eager", "run_update"]


def run_update(update: Callable[..., None], backend: str, columns: Columns, **scalars: Any) -> None:
    """Run an optimizer's update rule on a parameter group with the chosen backend.

    ``update(ops, param, grad, *states, kahan, **scalars)`` is the optimizer's single definition of
    its math ([Note: one update rule, three backends] in ``_ops.py``); ``columns`` hold its tensors
    by role, as lists over the group. Parameters listed in :data:`FLOAT32_MASTERS` are stepped
    through their float32 masters ([Note: low-precision update modes] in ``_low_precision.py``):
    in the kernel by the fused backend, eagerly where a row falls back to another backend.
    """
    masters = FLOAT32_MASTERS.get()
    if backend in ("for_loop", "foreach"):
        run_eager(update, backend, columns, scalars, masters)
    elif backend == "fused":
        # rows the fused backend hands back: strided ones, and those whose compile failed
        for other_backend, rows in run_fused(update, columns, scalars, masters).items():
            run_eager(update, other_backend, columns.select(rows), scalars, masters)
    else:
        raise ValueError(f"unknown backend {backend!r}: expected 'for_loop', 'foreach' or 'fused'")


def run_eager(
    update: Callable[..., None],
    backend: str,
    columns: Columns,
    scalars: dict[str, Any],
    masters: MasterRows | None = None,
) -> None:
    """Step ``columns`` with the for-loop (one tensor at a time) or foreach (one bucket at a time) backend.

    A parameter in ``masters`` is stepped alone, through a float32 master built and written back
    eagerly, so that the temporary never exceeds one parameter.
    """
    if masters is not None and any(id(p) in masters.rows for p in columns.param):
        through_masters = [i for i, p in enumerate(columns.param) if id(p) in masters.rows]
        others = [i for i in range(len(columns.param)) if i not in through_masters]
        if others:
            run_eager(update, backend, columns.select(others), scalars)
        for i in through_masters:
            row = columns.select([i])
            param, master_row = row.param[0], masters.rows[id(row.param[0])]
            master = eager_master(param, master_row)
            run_eager(update, backend, row._replace(param=[master]), scalars)
            write_master_(param, master, master_row)
        return
    if backend == "foreach":
        for bucket in columns.buckets():
            update(FOREACH_OPS, *bucket.arguments(), **scalars)
    else:
        # zip over the argument lists rather than build a Columns per row: this loop runs once per
        # parameter under gradient release, where that measured ~2 us of a ~25 us step
        for row in zip(*columns.arguments()):
            update(TENSOR_OPS, *row, **scalars)
