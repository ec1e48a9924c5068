"""The tensor primitives that optimi's update rules are written against.

[Note: one update rule, three backends]
Each optimizer writes its update rule exactly once, as a function whose first argument is an
``ops`` object satisfying :class:`UpdateOps`. The same function runs

* per tensor (the for-loop backend) with :data:`TENSOR_OPS`, where every argument is one tensor,
* over a whole bucket of tensors (the foreach backend) with :data:`FOREACH_OPS`, where every
  tensor argument is a list and each primitive is a ``torch._foreach_*`` kernel,
* under ``torch.compile`` as one fused pass per tensor (the fused backend, ``optimi._fused``),
  with its ``FusedOps``, again per tensor.

So the three paths cannot drift apart: they execute the same sequence of primitives. Scalars
(learning rate, betas, ...) are Python floats or 0-d tensors; Python ``bool``/``None`` arguments
select the structure of the update (weight-decay mode, Kahan summation, accumulation) and are
fixed for a given configuration. The rule receives its tensors by role (``optimi._columns``).

[Note: the gradient is a scratch buffer]
Temporaries reuse the gradient buffer instead of allocating (``ops.scratch(grads)``), which is
why an optimi step may overwrite ``p.grad``. Once the gradient's last use has passed, the update
rule is free to write into it.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "FOREACH_OPS",
    "LOW_PRECISION_DTYPES",
    "TENSOR_OPS",
    "ForeachOps",
    "TensorOps",
    "UpdateOps",
    "sum_dtype",
]

#: the dtypes whose parameters get Kahan summation and whose arithmetic runs in float32
LOW_PRECISION_DTYPES = (torch.bfloat16, torch.float16)


def sum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a sum over a tensor of ``dtype`` accumulates in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@runtime_checkable
class UpdateOps(Protocol):
    """What an update rule may call on its ``ops`` ([Note: one update rule, three backends]).

    ``X`` below is one tensor (for-loop, fused) or a list of tensors (foreach); a scalar is a
    Python float or a 0-d tensor (foreach: also one scalar per tensor). Methods ending in ``_``
    write their first argument and return it. ``tests/test_ops.py`` checks that every ops class
    has exactly these methods, with these parameter names, and that they compute the same values.
    """

    def scratch(self, grad: Any) -> Any:
        """A buffer shaped like ``grad`` that the update may overwrite (the gradient itself)."""

    def copy_(self, dst: Any, src: Any) -> Any:
        """``dst = src``."""

    def add_(self, x: Any, y: Any, alpha: Any = 1.0) -> Any:
        """``x += alpha * y``."""

    def add_scalar_(self, x: Any, value: Any) -> Any:
        """``x += value``."""

    def sub_(self, x: Any, y: Any) -> Any:
        """``x -= y``."""

    def mul_(self, x: Any, value: Any) -> Any:
        """``x *= value`` for a scalar ``value``."""

    def div_(self, x: Any, value: Any) -> Any:
        """``x /= value`` for a scalar ``value``."""

    def mul_tensor_(self, x: Any, y: Any) -> Any:
        """``x *= y`` elementwise."""

    def div_tensor_(self, x: Any, y: Any) -> Any:
        """``x /= y`` elementwise."""

    def lerp_(self, x: Any, y: Any, weight: Any) -> Any:
        """``x += weight * (y - x)``."""

    def addcmul_(self, x: Any, a: Any, b: Any, value: Any = 1.0) -> Any:
        """``x += value * a * b``."""

    def addcdiv_(self, x: Any, a: Any, b: Any, value: Any = 1.0) -> Any:
        """``x += value * a / b``."""

    def sqrt_(self, x: Any) -> Any:
        """``x = sqrt(x)``."""

    def sqrt_into_(self, dst: Any, src: Any) -> Any:
        """``dst = sqrt(src)`` in one pass."""

    def sign_(self, x: Any) -> Any:
        """``x = sign(x)``."""

    def abs_(self, x: Any) -> Any:
        """``x = |x|``."""

    def clamp_min_(self, x: Any, value: Any) -> Any:
        """``x = max(x, value)``."""

    def clamp_min(self, x: Any, value: Any) -> Any:
        """``max(x, value)`` as a new tensor (``x`` is left unchanged)."""

    def sum(self, x: Any) -> Any:
        """Sum of all elements, accumulated in float32 or wider (a 0-d tensor per tensor)."""

    def numel(self, x: Any) -> Any:
        """Number of elements (per tensor)."""

    def copy_of(self, x: Any) -> Any:
        """A new tensor holding ``x``'s values (inside a compiled kernel: registers, not memory)."""

    def sum_into_(self, out: Any, x: Any) -> Any:
        """``out = sum(x)``, accumulated as :meth:`sum` accumulates, for a 0-d or 1-element ``out``."""


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
        if y.dtype != x.dtype:  # a float32 master towards bf16 slow weights: lerp needs one dtype
            y = y.to(x.dtype)
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
    def scratch(grad: list[Tensor]) -> list[Tensor]:
        return grad

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
        if x and x[0].device.type == "cpu" and x[0].dtype in LOW_PRECISION_DTYPES:
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
        elif x and y[0].dtype != x[0].dtype:  # see TensorOps.lerp_
            for xi, yi in zip(x, y):
                TensorOps.lerp_(xi, yi, weight)
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
