"""Shared update building blocks used by every optimi optimizer.

[Note: one update rule, three backends]
Each optimizer writes its update rule exactly once, as a function whose first argument is an
``ops`` namespace. The same function runs

* per tensor (the for-loop backend) with :data:`TENSOR_OPS`, where every argument is one tensor,
* over a whole bucket of tensors (the foreach backend) with :data:`FOREACH_OPS`, where every
  tensor argument is a list and each primitive is a ``torch._foreach_*`` kernel,
* under ``torch.compile`` as one fused pass per tensor (the fused backend), again per tensor.

So the three paths cannot drift apart: they execute the same sequence of primitives. Scalars
(learning rate, betas, ...) are Python floats or 0-d tensors; Python ``bool``/``None`` arguments
select the structure of the update (weight-decay mode, Kahan summation, accumulation) and are
fixed for a given configuration.

[Note: the gradient is a scratch buffer]
Temporaries reuse the gradient buffer instead of allocating (``ops.scratch(grads)``), which is
why an optimi step may overwrite ``p.grad``. Once the gradient's last use has passed, the update
rule is free to write into it.

[Note: Kahan summation]
A bf16 parameter cannot absorb an update much smaller than its unit in the last place: the add
rounds back to the old value and the update is lost. Kahan summation keeps a compensation buffer
``c`` (same dtype as the parameter) holding what previous adds lost. The update ``u`` is added
into ``c`` first, then ``p_new = p + c`` is rounded into the parameter and ``c`` keeps the part
that rounding dropped: ``c = c - (p_new - p)``. ``p_new - p`` is exact in floating point because
the two values are close, so over many steps no update is lost.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "TENSOR_OPS",
    "FOREACH_OPS",
    "TensorOps",
    "ForeachOps",
    "update_target",
    "decoupled_decay_",
    "kahan_apply_",
    "finish_update_",
    "bias_correction",
    "weight_decay_terms",
    "bucket_by_device_dtype",
    "run_update",
    "sum_dtype",
    "FALLBACK_BACKEND",
]

#: the backend that steps a fused configuration whose compile failed, set by the optimizer while it
#: steps a group for which it chose the fused backend itself; ``None`` (an explicit ``fused=True``,
#: or a functional call with ``backend="fused"``) raises ``FusedCompileError`` instead ([Note:
#: falling back from the fused backend] in ``_fused.py``)
FALLBACK_BACKEND: ContextVar[str | None] = ContextVar("optimi_fused_fallback", default=None)


_LOW_PRECISION = (torch.bfloat16, torch.float16)


def sum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a sum over a tensor of ``dtype`` accumulates in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class TensorOps:
    """Update primitives on single tensors (for-loop and fused backends)."""

    @staticmethod
    def scratch(grad: Tensor) -> Tensor:
        """A buffer shaped like ``grad`` that the update may overwrite (the gradient itself)."""
        return grad

    @staticmethod
    def copy_(dst: Tensor, src: Tensor) -> Tensor:
        return dst.copy_(src)

    @staticmethod
    def add_(x: Tensor, y: Tensor, alpha: float | Tensor = 1.0) -> Tensor:
        """``x += alpha * y``."""
        if isinstance(alpha, Tensor):
            return x.add_(y * alpha)
        return x.add_(y, alpha=alpha)

    @staticmethod
    def add_scalar_(x: Tensor, value: float | Tensor) -> Tensor:
        return x.add_(value)

    @staticmethod
    def sub_(x: Tensor, y: Tensor) -> Tensor:
        return x.sub_(y)

    @staticmethod
    def mul_(x: Tensor, value: float | Tensor) -> Tensor:
        """``x *= value`` for a scalar ``value``."""
        return x.mul_(value)

    @staticmethod
    def div_(x: Tensor, value: float | Tensor) -> Tensor:
        """``x /= value`` for a scalar ``value``."""
        return x.div_(value)

    @staticmethod
    def mul_tensor_(x: Tensor, y: Tensor) -> Tensor:
        return x.mul_(y)

    @staticmethod
    def div_tensor_(x: Tensor, y: Tensor) -> Tensor:
        return x.div_(y)

    @staticmethod
    def lerp_(x: Tensor, y: Tensor, weight: float | Tensor) -> Tensor:
        """``x += weight * (y - x)``."""
        return x.lerp_(y, weight)

    @staticmethod
    def addcmul_(x: Tensor, a: Tensor, b: Tensor, value: float | Tensor = 1.0) -> Tensor:
        """``x += value * a * b``."""
        if isinstance(value, Tensor):
            return x.add_(a * b * value)
        return x.addcmul_(a, b, value=value)

    @staticmethod
    def addcdiv_(x: Tensor, a: Tensor, b: Tensor, value: float | Tensor = 1.0) -> Tensor:
        """``x += value * a / b``."""
        if isinstance(value, Tensor):
            return x.add_(a / b * value)
        return x.addcdiv_(a, b, value=value)

    @staticmethod
    def sqrt_(x: Tensor) -> Tensor:
        return x.sqrt_()

    @staticmethod
    def sqrt_into_(dst: Tensor, src: Tensor) -> Tensor:
        """``dst = sqrt(src)``: one pass where ``copy_`` then ``sqrt_`` would make two."""
        if dst.dtype != src.dtype:  # out= would take the root in src's dtype, then convert
            return dst.copy_(src).sqrt_()
        return torch.sqrt(src, out=dst)

    @staticmethod
    def sign_(x: Tensor) -> Tensor:
        return x.sign_()

    @staticmethod
    def abs_(x: Tensor) -> Tensor:
        return x.abs_()

    @staticmethod
    def clamp_min_(x: Tensor, value: float | Tensor) -> Tensor:
        return x.clamp_min_(value)

    @staticmethod
    def clamp_min(x: Tensor, value: float | Tensor) -> Tensor:
        """``max(x, value)`` as a new tensor (``x`` is left unchanged)."""
        return x.clamp_min(value)

    @staticmethod
    def sum(x: Tensor) -> Tensor:
        """Sum of all elements, accumulated in float32 or wider (a 0-d tensor)."""
        return x.sum(dtype=sum_dtype(x.dtype))

    @staticmethod
    def numel(x: Tensor) -> int:
        return x.numel()

    @staticmethod
    def copy_of(x: Tensor) -> Tensor:
        """A new tensor holding ``x``'s values (inside a compiled kernel: registers, not memory)."""
        return x.clone()

    def sum_into_(self, out: Tensor, x: Tensor) -> Tensor:
        """``out = sum(x)``, accumulated as :meth:`sum` accumulates, for a 0-d or 1-element ``out``."""
        return out.copy_(self.sum(x).reshape(out.shape))


class ForeachOps:
    """The same primitives over lists of tensors, one ``torch._foreach_*`` kernel each.

    Scalar arguments may also be a list with one scalar per tensor (a per-tensor learning rate).
    """

    @staticmethod
    def scratch(grads: list[Tensor]) -> list[Tensor]:
        return grads

    @staticmethod
    def copy_(dst: list[Tensor], src: list[Tensor]) -> list[Tensor]:
        torch._foreach_copy_(dst, src)
        return dst

    @staticmethod
    def add_(x: list[Tensor], y: list[Tensor], alpha: Any = 1.0) -> list[Tensor]:
        if isinstance(alpha, (list, tuple)):
            # no foreach kernel takes a per-tensor alpha with a tensor list, and scaling first
            # (_foreach_mul then _foreach_add_) rounds twice where Tensor.add_ rounds once: add
            # tensor by tensor so both backends give the same bits (StableAdamW's per-tensor lr)
            for xi, yi, ai in zip(x, y, alpha):
                xi.add_(yi, alpha=ai)
        else:
            torch._foreach_add_(x, y, alpha=alpha)
        return x

    @staticmethod
    def add_scalar_(x: list[Tensor], value: Any) -> list[Tensor]:
        torch._foreach_add_(x, value)
        return x

    @staticmethod
    def sub_(x: list[Tensor], y: list[Tensor]) -> list[Tensor]:
        torch._foreach_sub_(x, y)
        return x

    @staticmethod
    def mul_(x: list[Tensor], value: Any) -> list[Tensor]:
        if x and x[0].device.type == "cpu" and x[0].dtype in _LOW_PRECISION:
            # the CPU Scalar and ScalarList overloads round the factor to bf16 first (beta2=0.99
            # becomes 0.98828125); 0-d tensors multiply in fp32 like Tensor.mul_
            if isinstance(value, float):
                value = torch.tensor(value)
            elif isinstance(value, (list, tuple)):
                value = [torch.tensor(float(v)) for v in value]
        torch._foreach_mul_(x, value)
        return x

    @staticmethod
    def div_(x: list[Tensor], value: Any) -> list[Tensor]:
        torch._foreach_div_(x, value)
        return x

    @staticmethod
    def mul_tensor_(x: list[Tensor], y: list[Tensor]) -> list[Tensor]:
        torch._foreach_mul_(x, y)
        return x

    @staticmethod
    def div_tensor_(x: list[Tensor], y: list[Tensor]) -> list[Tensor]:
        torch._foreach_div_(x, y)
        return x

    @staticmethod
    def lerp_(x: list[Tensor], y: list[Tensor], weight: Any) -> list[Tensor]:
        if isinstance(weight, (list, tuple)):
            # x + w*(y - x) with a per-tensor weight
            delta = torch._foreach_sub(y, x)
            torch._foreach_mul_(delta, list(weight))
            torch._foreach_add_(x, delta)
        else:
            torch._foreach_lerp_(x, y, weight)
        return x

    @staticmethod
    def addcmul_(x: list[Tensor], a: list[Tensor], b: list[Tensor], value: Any = 1.0) -> list[Tensor]:
        torch._foreach_addcmul_(x, a, b, list(value) if isinstance(value, tuple) else value)
        return x

    @staticmethod
    def addcdiv_(x: list[Tensor], a: list[Tensor], b: list[Tensor], value: Any = 1.0) -> list[Tensor]:
        torch._foreach_addcdiv_(x, a, b, list(value) if isinstance(value, tuple) else value)
        return x

    @staticmethod
    def sqrt_(x: list[Tensor]) -> list[Tensor]:
        torch._foreach_sqrt_(x)
        return x

    @staticmethod
    def sqrt_into_(dst: list[Tensor], src: list[Tensor]) -> list[Tensor]:
        """``dst = sqrt(src)`` per tensor, one pass each: no ``_foreach`` kernel takes ``out=``, and
        one ``torch.sqrt(out=)`` per tensor measured as fast as ``torch._foreach_sqrt`` on CPU."""
        for d, x in zip(dst, src):
            TensorOps.sqrt_into_(d, x)
        return dst

    @staticmethod
    def sign_(x: list[Tensor]) -> list[Tensor]:
        torch._foreach_sign_(x)
        return x

    @staticmethod
    def abs_(x: list[Tensor]) -> list[Tensor]:
        torch._foreach_abs_(x)
        return x

    @staticmethod
    def clamp_min_(x: list[Tensor], value: Any) -> list[Tensor]:
        torch._foreach_clamp_min_(x, value)
        return x

    @staticmethod
    def clamp_min(x: list[Tensor], value: Any) -> list[Tensor]:
        return torch._foreach_clamp_min(x, value)

    @staticmethod
    def sum(x: list[Tensor]) -> list[Tensor]:
        return [TensorOps.sum(t) for t in x]

    @staticmethod
    def numel(x: list[Tensor]) -> list[int]:
        return [t.numel() for t in x]

    @staticmethod
    def copy_of(x: list[Tensor]) -> list[Tensor]:
        return [t.clone() for t in x]

    @staticmethod
    def sum_into_(out: list[Tensor], x: list[Tensor]) -> list[Tensor]:
        for out_i, x_i in zip(out, x):
            TENSOR_OPS.sum_into_(out_i, x_i)
        return out


TENSOR_OPS = TensorOps()
FOREACH_OPS = ForeachOps()


def update_target(param: Any, kahan_comp: Any) -> Any:
    """Where the update is added: the Kahan buffer when compensating, else the parameter itself.

    Under Kahan summation every contribution to ``p`` (the optimizer's step and decoupled weight
    decay) is first summed into the compensation buffer and applied by :func:`finish_update_`.
    """
    return param if kahan_comp is None else kahan_comp


def decoupled_decay_(ops: Any, param: Any, kahan_comp: Any, factor: float | Tensor) -> None:
    """Decoupled weight decay ``p <- p * (1 - factor)``, compensated under Kahan summation."""
    if kahan_comp is None:
        ops.mul_(param, 1 - factor)
    else:
        # the decay of a bf16 weight is mostly below its ulp: sum it with the update instead
        ops.add_(kahan_comp, param, alpha=-factor)


def kahan_apply_(ops: Any, param: Any, kahan_comp: Any, scratch: Any) -> None:
    """``p <- p + c`` and ``c <- c - (p_new - p_old)`` (see [Note: Kahan summation]).

    ``scratch`` is a dead buffer shaped like ``param`` (the gradient), overwritten here.
    """
    ops.copy_(scratch, param)
    ops.add_(param, kahan_comp)
    ops.sub_(scratch, param)  # p_old - p_new, exact because the two are close
    ops.add_(kahan_comp, scratch)


def finish_update_(ops: Any, param: Any, kahan_comp: Any, scratch: Any) -> None:
    """Complete an update summed with :func:`update_target`: a no-op without Kahan."""
    if kahan_comp is not None:
        kahan_apply_(ops, param, kahan_comp, scratch)


def bias_correction(beta: float, step: int) -> float:
    """Adam's debias denominator ``1 - beta**step``."""
    return 1 - beta**step


def weight_decay_terms(
    *,
    lr: float,
    weight_decay: float,
    decouple_wd: bool,
    decouple_lr: bool,
    max_lr: float | None,
) -> tuple[float | None, float | None]:
    """Split weight decay into its L2 and decoupled parts for one step.

    Returns ``(l2, decay)``: ``l2`` is added to the gradient as ``g += l2 * p``; ``decay`` scales
    the parameter as ``p *= 1 - decay``. At most one of them is not ``None``.

    * L2 (default): ``l2 = weight_decay``.
    * decoupled (``decouple_wd``): ``decay = lr * weight_decay``.
    * fully decoupled (``decouple_lr``): ``decay = (lr / max_lr) * weight_decay``, so decay no
      longer scales with the peak learning rate, only with the schedule.
    """
    if weight_decay == 0:
        return None, None
    if decouple_lr:
        if not max_lr:
            raise ValueError(f"max_lr must be > 0 for fully decoupled weight decay, got {max_lr}")
        return None, lr / max_lr * weight_decay
    if decouple_wd:
        return None, lr * weight_decay
    return weight_decay, None


def bucket_by_device_dtype(
    tensor_lists: Sequence[Sequence[Any]],
) -> list[list[list[Any] | None]]:
    """Split parallel lists into foreach buckets sharing device, dtype and Kahan on/off.

    ``tensor_lists[0]`` are the parameters and the last list holds the Kahan buffers (``None``
    entries for parameters without one). A bucket's Kahan list is ``None`` when none has one.
    """
    buckets: dict[tuple, list[list[Any]]] = defaultdict(lambda: [[] for _ in tensor_lists])
    for i, param in enumerate(tensor_lists[0]):
        key = (param.device, param.dtype, tensor_lists[-1][i] is not None)
        for column, tensors in zip(buckets[key], tensor_lists):
            column.append(tensors[i])
    result = []
    for (_, _, has_kahan), columns in buckets.items():
        if not has_kahan:
            columns[-1] = None
        result.append(columns)
    return result


def run_update(
    update: Callable[..., None],
    backend: str,
    tensor_lists: Sequence[Sequence[Any]],
    **scalars: Any,
) -> None:
    """Run an optimizer's update rule on a parameter group with the chosen backend.

    ``update(ops, *tensors, **scalars)`` is the optimizer's single definition of its math (see
    [Note: one update rule, three backends]). ``tensor_lists`` are parallel lists: parameters
    first, Kahan buffers last.
    """
    if backend == "for_loop":
        for tensors in zip(*tensor_lists):
            update(TENSOR_OPS, *tensors, **scalars)
    elif backend == "foreach":
        for bucket in bucket_by_device_dtype(tensor_lists):
            update(FOREACH_OPS, *bucket, **scalars)
    elif backend == "fused":
        from optimi._fused import run_fused

        run_fused(update, tensor_lists, scalars)
    else:
        raise ValueError(f"unknown backend {backend!r}: expected 'for_loop', 'foreach' or 'fused'")
