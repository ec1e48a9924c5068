"""The fused backend: each optimizer's update rule compiled into one pass over memory per tensor.

[Note: the fused backend]
``run_fused`` runs the same ``_<name>_update(ops, ...)`` function that the for-loop backend runs
(see [Note: one update rule, three backends] in ``_kernels.py``), per tensor, under
``torch.compile``. Inductor fuses the dozen in-place primitives of the rule into one loop that
reads the parameter, gradient and states once and writes the parameter and states once:
vectorized C++ on CPU, a Triton kernel on CUDA. There is no second copy of the math.

What keeps compilation to once per *configuration* (update rule, device type, dtype, which
optional tensors are ``None``, the rule's ``bool``/``None`` switches) rather than once per shape
or step:

* every tensor is passed as a flat 1-D view with a dynamic length, so parameters of any shape
  share one kernel (lengths 0 and 1 are specialized by Dynamo: at most one more compile each);
* numeric hyperparameters (learning rate, betas, bias corrections, ...) travel packed in one
  float64 tensor, so a scheduler changing them never triggers a recompile. float64 keeps their
  Python arithmetic (``1 - beta1``, ``-lr / bias_correction1``) bit-identical to the other
  backends before they are rounded to the kernel's compute dtype;
* each configuration is its own compiled region, so Dynamo's per-function recompile limit is
  never shared between optimizers or configurations;
* after a configuration's first call its compiled graph is called without Dynamo (see [Note:
  calling the compiled graph directly] at :class:`_CompiledStep`).

On CPU the arithmetic the kernel derives from the packed scalars is moved out of its loop before
the kernel is built ([Note: hoisting the hyperparameters] in ``_cpp_hoist.py``): Inductor writes
it inside the loop, where the compiler has to redo it for every vector.

[Note: the fused backend leaves gradients intact]
The for-loop and foreach rules write temporaries into the gradient buffer to save allocations
([Note: the gradient is a scratch buffer]). Inside a compiled kernel a temporary costs nothing
(it lives in registers), while writing the gradient back costs a store per element. So the
compiled step hands the rule a copy of the gradient (float32 for a bf16/fp16 gradient; a copy
Inductor folds into the loads): ``scratch(grad)`` and every write to the gradient land in that
temporary, and the compiled kernel never writes ``p.grad``.

[Note: fused numerics]
Eager PyTorch computes each bf16/fp16 op in float32 and rounds its result once. Inductor keeps a
fused chain of ops in float32 and rounds only the final store, dropping even an explicit
``.to(bf16).float()``. That would also drop the rounding Kahan summation depends on
(``p_new - p_old`` must be taken from the stored, rounded ``p_new``). So every primitive of
:class:`FusedOps` that writes a bf16/fp16 tensor rounds its result to that dtype in the kernel:
on CPU with Veltkamp splitting (three float32 operations that Inductor keeps, see
:func:`_round_to`), on CUDA through Inductor's ``emulate_precision_casts`` (Triton contracts
multiply-adds, which would defeat the splitting; the casts are cheap there). Scalars (0-d
float64 tensors) are converted exactly as the eager kernels convert a Python scalar, and an add
with ``alpha`` is computed the way each device's eager kernel computes it (one fused multiply-add,
or on CPU bf16 a bf16-rounded ``alpha``). The parameter, moments and Kahan buffer therefore
follow eager's roundings and the Kahan bookkeeping is exact.

On CPU the Kahan buffer is the exception. Kahan summation needs one exact rounding per element,
that of the new parameter, so that ``c - (p_new - p_old)`` holds what the bf16 store dropped. The
rule's updates to the buffer (decoupled decay, the step, the compensation itself) are therefore
summed in a float32 copy of it that the kernel stores, rounded, once at the end: three of the
seven in-kernel roundings of bf16 AdamW's element fewer. The buffer then differs from eager's
in bits far below the parameter's last place (``p + c`` agrees to a few hundredths of its ulp),
and ``p`` itself by one ulp where ``p + c`` lies next to a rounding tie. The moments keep eager's
roundings: rounding them only at their final store would let multi-step updates (SGD's
``b = mu b + g``, Adan's ``n``) differ by several ulps where they cancel. CUDA keeps the Kahan
buffer in bf16 (its casts are emulated and cheap).

Two deliberate differences remain. The rule's temporaries live in a float32 copy of the gradient
rather than in the bf16 gradient buffer: rounding them (the Adam denominator, the Kahan scratch)
costs instructions in a kernel that should be memory-bound, and leaving them unrounded is more
accurate. Rules that put an intermediate into the gradient buffer before a state reads it
(Adam/RAdam's L2 term, Lion's ``g - m``) therefore round once where the for-loop rounds twice.
And the compilers may order float32 arithmetic differently. Measured per step from the same
state (``tests/test_fused.py``): fp32 agrees to 1e-6 relative over whole runs; bf16+Kahan agrees
to one ulp on >= 99.98% of elements (mostly bit-identical; Kahan pairs compared as ``p + c``),
99.7% for Adam/RAdam with L2 and Lion.

[Note: packed bf16 columns]
On CPU a bf16 kernel spends more instructions converting than computing: each load widens bf16
to float32 and each store rounds back to nearest-even with a NaN check (seven integer
instructions per 16 values: Inductor does not target AVX512-BF16's conversion instruction), on
top of the exact roundings above. When every tensor of a row is bf16 with an even length and an
even storage offset, the fused step instead views each column as int32 words that each hold two
bf16 values. A bf16 value is the upper half of the float32 with the same value, so one shift
(even element) or one mask (odd element) turns a word into two float32 values. The update rule
runs twice, on the even and on the odd halves, under :class:`PackedOps`, which rounds each store
exactly as :class:`FusedOps` rounds a bf16 store; every value written is then exactly
representable in bf16, and a pair goes back into its word with one shift and one bitwise select.
Only the columns the rule wrote are stored (a rule that leaves a state untouched does not
rewrite it). The result is bit-identical to the plain fused kernel
(``tests/test_fused.py``) and the bf16+Kahan AdamW step runs 1.2-1.3x faster on a 2-core AVX-512
CPU (docs/benchmarks.md). Rows with an odd length or offset, other dtypes, and CUDA (where
Inductor's conversions are cheap) run the plain kernel.

[Note: reductions and collectives]
An update rule may reduce over its tensor into a 0-d tensor it is given (``ops.sum_into_``):
Inductor then emits a reduction loop. StableAdamW splits its step into two rules, a pure
reduction and the update ([Note: StableAdamW's two passes] in ``stableadamw.py``), and combines
the sums eagerly in between, so that its optional ``reduce_sums`` (an all-reduce across DTensor
shards) never enters a graph. A callable passed among a rule's scalars would be wrapped in
``torch.compiler.disable``, so Dynamo splits the compiled region around it.
"""

from __future__ import annotations

import functools
import logging
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from optimi._cpp_hoist import hoist_invariant_scalars, vector_bitcasts
from optimi._kernels import FALLBACK_BACKEND, FOREACH_OPS, TENSOR_OPS, TensorOps, bucket_by_device_dtype
from optimi._torch_internals import (
    SCALARS,
    TRICKS,
    compile_capturing_graphs,
    compile_isolation_options,
    disable_for_speed,
    enabled,
    inductor_fma,
    note_engaged,
    precision_cast_options,
    rewriting_cpp_kernels,
    switch_off,
)

__all__ = [
    "FusedCompileError",
    "FusedOps",
    "compiled_configurations",
    "fallen_back_configurations",
    "run_fused",
]


_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _opmath(x: Tensor) -> Tensor:
    """``x`` in the dtype eager kernels compute in: float32 for bf16/fp16, else unchanged."""
    return x.float() if x.dtype in _LOW_PRECISION else x


def _scalar(value: float | Tensor, like: Tensor) -> float | Tensor:
    """A hyperparameter in ``like``'s compute dtype, as eager kernels convert a Python scalar.

    Left as float64, Inductor would first round it to a bf16 tensor's own dtype.
    """
    return value.to(_opmath(like).dtype) if isinstance(value, Tensor) else value


def _fma(fma: Callable[..., Tensor] | None, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """``a * b + c``, rounded once where Inductor's ``fma`` prim is available (``inductor_fma``)."""
    return a * b + c if fma is None else fma(a, b, c)


#: Veltkamp's splitting constants 2**(24 - p) + 1: rounding a float32 to p significant bits
_SPLIT = {torch.bfloat16: float(2**16 + 1), torch.float16: float(2**13 + 1)}


def _round_to(value: Tensor, split: float | Tensor) -> Tensor:
    """float32 ``value`` rounded to nearest with the precision of ``split``'s dtype, still as float32.

    Veltkamp splitting: ``t = v * (2**k + 1)``, then ``t - (t - v)`` keeps the top ``24 - k``
    bits, rounded to nearest: three float32 operations that the compiler may not reassociate or
    contract (Inductor builds its C++ without unsafe math and with ``-ffp-contract=off``).
    Inductor drops an explicit ``.to(bf16).float()`` inside a fused kernel, which is why the
    rounding is arithmetic ([Note: fused numerics]). ``split`` (one of :data:`_SPLIT`) reaches
    the kernel as a runtime input among the packed scalars: written as a literal it let GCC build
    a 1.4x slower CPU kernel (measured, AdamW bf16+Kahan).
    """
    scaled = value * split
    return scaled - (scaled - value)


_HIGH_HALF = -65536  # 0xFFFF0000 as an int32


def _scalar_rounded_to(value: Tensor, dtype: torch.dtype) -> Tensor:
    """A float32 0-d ``value`` rounded to nearest-even in ``dtype``'s precision, still float32.

    For bf16 with integer operations on the float32's bits: Inductor before torch 2.13 drops a
    scalar's ``.to(bf16).float()`` round trip, and a scalar's float arithmetic may run in double
    precision, where Veltkamp splitting (:func:`_round_to`) rounds to the wrong precision.
    """
    if dtype != torch.bfloat16:
        return value.to(dtype).float()
    bits = value.view(torch.int32)
    # add just under half of bf16's last place, plus the kept last bit for ties, then truncate
    return ((bits + (0x7FFF + ((bits >> 16) & 1))) & _HIGH_HALF).view(torch.float32)


class FusedOps(TensorOps):
    """:class:`TensorOps` for code compiled by ``torch.compile`` (see [Note: fused numerics]).

    Scalars arrive as 0-d float64 tensors; each primitive converts them as the eager kernel
    converts a Python scalar and computes in float32 for bf16/fp16 tensors. With ``round_stores``
    each result written into a bf16/fp16 tensor is rounded to that dtype inside the kernel, so a
    later primitive reading it sees what eager would have stored (Inductor otherwise keeps the
    float32 value); without it the compiler is asked to emulate eager's casts instead (CUDA: Triton
    contracts ``a * b - c`` into a fused multiply-add, which would defeat the splitting). ``splits``
    holds the splitting constants of :data:`_SPLIT` as the kernel receives them.
    ``scratch(grad)`` is still the gradient, but the fused step hands the rule a private copy of it
    ([Note: the fused backend leaves gradients intact]).
    """

    def __init__(
        self,
        round_stores: bool,
        splits: dict[torch.dtype, float | Tensor],
        fma: Callable[..., Tensor] | None = None,
    ):
        self.round_stores = round_stores
        self.splits = splits
        self.fma = fma

    def dtype_of(self, x: Tensor) -> torch.dtype:
        """The dtype ``x`` stands for: its own here, bf16 for a half of a packed column."""
        return x.dtype

    def _rounded_for(self, x: Tensor, value: Tensor) -> Tensor:
        """``value`` rounded in the kernel to the dtype ``x`` stands for, where stores round."""
        dtype = self.dtype_of(x)
        return _round_to(value, self.splits[dtype]) if self.round_stores and dtype in self.splits else value

    def _store(self, x: Tensor, value: Tensor) -> Tensor:
        return x.copy_(self._rounded_for(x, value))

    def copy_(self, dst: Tensor, src: Tensor) -> Tensor:
        return self._store(dst, _opmath(src))

    def add_(self, x: Tensor, y: Tensor, alpha: float | Tensor = 1.0) -> Tensor:
        if not isinstance(alpha, Tensor):
            if alpha == 1:
                return self._store(x, _opmath(x) + _opmath(y))
            alpha = torch.full((), float(alpha), dtype=torch.float64, device=x.device)
        alpha = alpha.to(_opmath(x).dtype)
        dtype = self.dtype_of(x)
        if dtype in _LOW_PRECISION and x.device.type == "cpu":
            # eager's CPU kernel rounds alpha to the tensor's dtype for bf16/fp16 ...
            return self._store(x, _opmath(x) + _opmath(y) * _scalar_rounded_to(alpha, dtype))
        # ... and computes x + alpha * y as one fused multiply-add otherwise
        return self._store(x, _fma(self.fma, _opmath(y), alpha, _opmath(x)))

    def add_scalar_(self, x: Tensor, value: float | Tensor) -> Tensor:
        return self._store(x, _opmath(x) + _scalar(value, x))

    def sub_(self, x: Tensor, y: Tensor) -> Tensor:
        return self._store(x, _opmath(x) - _opmath(y))

    def mul_(self, x: Tensor, value: float | Tensor) -> Tensor:
        return self._store(x, _opmath(x) * _scalar(value, x))

    def div_(self, x: Tensor, value: float | Tensor) -> Tensor:
        return self._store(x, _opmath(x) / _scalar(value, x))

    def mul_tensor_(self, x: Tensor, y: Tensor) -> Tensor:
        return self._store(x, _opmath(x) * _opmath(y))

    def div_tensor_(self, x: Tensor, y: Tensor) -> Tensor:
        return self._store(x, _opmath(x) / _opmath(y))

    def lerp_(self, x: Tensor, y: Tensor, weight: float | Tensor) -> Tensor:
        return self._store(x, torch.lerp(_opmath(x), _opmath(y), _scalar(weight, x)))

    def addcmul_(self, x: Tensor, a: Tensor, b: Tensor, value: float | Tensor = 1.0) -> Tensor:
        return self._store(x, _opmath(x) + _scalar(value, x) * _opmath(a) * _opmath(b))

    def addcdiv_(self, x: Tensor, a: Tensor, b: Tensor, value: float | Tensor = 1.0) -> Tensor:
        return self._store(x, _opmath(x) + _scalar(value, x) * _opmath(a) / _opmath(b))

    def sqrt_(self, x: Tensor) -> Tensor:
        return self._store(x, _opmath(x).sqrt())

    def sqrt_into_(self, dst: Tensor, src: Tensor) -> Tensor:
        return self._store(dst, self._rounded_for(dst, _opmath(src)).sqrt())

    def sign_(self, x: Tensor) -> Tensor:
        return self._store(x, _opmath(x).sign())

    def abs_(self, x: Tensor) -> Tensor:
        return self._store(x, _opmath(x).abs())

    def clamp_min_(self, x: Tensor, value: float | Tensor) -> Tensor:
        return self._store(x, _opmath(x).clamp_min(_scalar(value, x)))

    def clamp_min(self, x: Tensor, value: float | Tensor) -> Tensor:
        return self._rounded_for(x, _opmath(x).clamp_min(_scalar(value, x))).to(x.dtype)


class PackedOps(FusedOps):
    """:class:`FusedOps` over the float32 halves of bf16 columns packed two to an int32.

    Every tensor the rule sees is a float32 half (see [Note: packed bf16 columns]) and stands for
    a bf16 tensor, except those in ``exact``: the gradient's private copy and the Kahan buffer,
    whose values stay unrounded float32 as in :class:`FusedOps`. The tensors the rule writes are
    recorded in ``written``, so that only those are packed and stored back.
    """

    def __init__(
        self,
        exact: Sequence[Tensor],
        splits: dict[torch.dtype, float | Tensor],
        fma: Callable[..., Tensor] | None = None,
    ):
        super().__init__(round_stores=True, splits=splits, fma=fma)
        self.exact = tuple(exact)
        self.written: list[Tensor] = []

    def dtype_of(self, x: Tensor) -> torch.dtype:
        return x.dtype if any(x is t for t in self.exact) else torch.bfloat16

    def _store(self, x: Tensor, value: Tensor) -> Tensor:
        self.written.append(x)
        return super()._store(x, value)


def _unpack(words: Tensor) -> tuple[Tensor, Tensor]:
    """The two bf16 values of each int32 of ``words`` as float32: (even elements, odd elements)."""
    return (words << 16).view(torch.float32), (words & _HIGH_HALF).view(torch.float32)


def _pack(even: Tensor, odd: Tensor) -> Tensor:
    """The inverse of :func:`_unpack` for values already rounded to bf16: the low halves are zero."""
    return ((even.view(torch.int32) >> 16) & 0xFFFF) | (odd.view(torch.int32) & _HIGH_HALF)


# (packed, update, device type, dtypes and None pattern, static switches, scalar names, tricks on)
# -> compiled step
_COMPILED: dict[tuple, _CompiledStep] = {}
# configurations whose packed kernel failed to compile: they run the plain kernel
_PACKING_FAILED: set[tuple] = set()
# configurations whose compile failed where the optimizer chose the fused backend itself -> (the
# backend that steps them instead, the failure) ([Note: falling back from the fused backend])
_FELL_BACK: dict[tuple, tuple[str, FusedCompileError]] = {}

_log = logging.getLogger("optimi")


class FusedCompileError(RuntimeError):
    """Compiling a fused step failed where the fused backend was asked for explicitly.

    [Note: falling back from the fused backend]
    ``torch.compile`` can fail on a user's machine: no working C++ compiler, an Inductor error on
    a torch release the rule was not tested on, a dtype a lowering does not support. A compile
    fails before the step writes anything, so nothing is lost. Where the optimizer chose the fused
    backend itself (``fused=None``), that configuration falls back to the backend ``None`` flags
    pick without a compiler (the for-loop on CPU, foreach on CUDA) with one ``RuntimeWarning``
    naming the cause, and later steps of the configuration go there at once, never compiling
    again. An explicit ``fused=True`` (or ``triton=True``, or a functional call with
    ``backend="fused"``) raises this error instead, naming the torch version and the cause.
    """


def compiled_configurations() -> int:
    """How many fused configurations have been compiled in this process (for tests and docs)."""
    return len(_COMPILED)


def fallen_back_configurations() -> dict[tuple, str]:
    """Configurations whose compile failed, and the backend that steps them instead (tests, docs)."""
    return {config: backend for config, (backend, _) in _FELL_BACK.items()}


def _is_static(value: Any) -> bool:
    """Values that select the structure of the update and are baked into the compiled code."""
    return value is None or isinstance(value, (bool, str))


class _PackedCheckFailed(Exception):
    """A packed kernel disagreed with its rule run eagerly ([Note: private torch internals])."""


class _CompiledStep:
    """One configuration's step under ``torch.compile``, called without Dynamo once compiled.

    [Note: calling the compiled graph directly]
    Dynamo's dispatch (guard evaluation, frame handling, AOTAutograd's wrappers) costs about 50 µs
    per call on a warm CPU; right after a kernel has streamed tens of MB through the caches it
    costs 0.3-0.4 ms, a tenth of a 4M-element step (measured on 2 cores, docs/benchmarks.md).
    The fused backend knows more than Dynamo's guards check: every call of one configuration
    passes the same update rule, dtypes and switches (they make the configuration's key), and
    flat, contiguous, non-aliasing 1-D tensors whose lengths only vary. So the Inductor-compiled
    graph is captured when Dynamo first compiles it, and later calls build its arguments (the
    tensors, and the lengths Dynamo lifted as symbolic inputs) from the placeholders' sources and
    call it directly. Where the capture does not describe the whole call (a graph break, a
    callable switch that runs eagerly, an input Dynamo derived in a way not recognised here) or
    a call falls outside what the graph was compiled for (another device, a length Dynamo
    specializes: below 2), the call goes through Dynamo as before. The capture is private torch
    internals (the ``direct_calls`` trick, [Note: private torch internals]): before the first
    direct call, the graph called directly must write Dynamo's bits on a small scratch row.
    """

    def __init__(
        self,
        step: Callable[..., None],
        inductor_options: dict[str, Any],
        may_call_directly: bool,
        label: str,
        packed: bool,
    ):
        self.python_step = step
        self.inductor_options = inductor_options
        self.label = label
        self.packed = packed
        # packed steps: builds (or finds) the same configuration's plain step, for the speed check
        self.plain_step: Callable[[], _CompiledStep] | None = None
        self.capture = may_call_directly and enabled("direct_calls")
        # (how to build its inputs, how to call it with them; both None where it cannot be called
        # directly) per graph Dynamo compiled
        self.graphs: list[tuple[list[tuple[int, bool]] | None, Callable[[list], Any] | None]] = []
        self.direct: tuple[Callable[[list], Any], list[tuple[int, bool]], torch.device] | None = None
        self.dynamo_calls = 0
        self.hoisted_statements = 0  # over the C++ kernels this step compiled (tests, docs)
        self.rewritten_bitcasts = 0
        self.compile_seconds = 0.0
        isolation = compile_isolation_options()
        if self.capture:
            self.dynamo_step = torch.compile(step, dynamic=True, backend=self._compile, **isolation)
        else:  # the public path: what any user of torch.compile gets
            self.dynamo_step = torch.compile(
                step, dynamic=True, backend="inductor", options=inductor_options, **isolation
            )

    def _compile(self, graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        compiled, plan, call = compile_capturing_graphs(graph, example_inputs, self.inductor_options)
        self.graphs.append((plan, call))
        return compiled

    def _count_rewrites(self, trick: str, changes: int) -> None:
        if trick == "hoist_scalars":
            self.hoisted_statements += changes
        else:
            self.rewritten_bitcasts += changes

    def _through_dynamo(self, packed_scalars: Tensor, columns: Sequence[Tensor | None]) -> None:
        # a recompile (a new length Dynamo specializes) may happen on any call through Dynamo;
        # the rewrites are looked up here, at call time, so that tests can replace them
        rewrites = (("hoist_scalars", hoist_invariant_scalars), ("vector_bitcasts", vector_bitcasts))
        with rewriting_cpp_kernels(rewrites, self._count_rewrites):
            self.dynamo_step(packed_scalars, *columns)

    def direct_call(
        self, packed_scalars: Tensor, columns: Sequence[Tensor | None]
    ) -> tuple[Callable[[list], Any], list] | None:
        """The compiled graph and its inputs for this call, where it may skip Dynamo; else ``None``."""
        if self.direct is None:
            return None
        compiled, plan, device = self.direct
        # every column is as long as the parameter (Inductor's wrapper asserts each length)
        if columns[0].shape[0] < 2 or packed_scalars.device != device or not enabled("direct_calls"):
            return None
        return compiled, _graph_inputs(plan, packed_scalars, columns)

    def __call__(self, packed_scalars: Tensor, *columns: Tensor | None) -> None:
        call = self.direct_call(packed_scalars, columns)
        if call is not None:
            call[0](call[1])
            return
        if self.dynamo_calls == 0:
            self._first_call(packed_scalars, columns)
        else:
            self._through_dynamo(packed_scalars, columns)
        self.dynamo_calls += 1

    def _first_call(self, packed_scalars: Tensor, columns: Sequence[Tensor | None]) -> None:
        """Compile (logged, timed), check the tricks that need checking, then run the real row.

        A failure to compile raises :class:`FusedCompileError` before any real tensor is written.
        """
        _log.info("optimi: compiling the fused %s step (once per configuration; takes seconds)", self.label)
        start = time.perf_counter()
        try:
            if self.packed:  # compile on a scratch row first: the real row is written only if it agrees
                self._check_packed(packed_scalars, columns)
                self._check_packed_speed(packed_scalars, columns)
            self._through_dynamo(packed_scalars, columns)
        except _PackedCheckFailed:
            raise
        except Exception as error:  # any compiler's failure, reported with its cause
            raise FusedCompileError(
                f"optimi: compiling the fused {self.label} step failed on torch {torch.__version__} "
                f"({type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''})"
            ) from error
        self.compile_seconds = time.perf_counter() - start
        _log.info("optimi: compiled the fused %s step in %.1f s", self.label, self.compile_seconds)
        if self.capture and len(self.graphs) == 1 and columns[0].shape[0] >= 2:
            plan, call = self.graphs[0]
            if call is not None and plan is not None:
                self._check_direct(call, plan, packed_scalars, columns)

    def _check_direct(
        self,
        call: Callable[[list], Any],
        plan: list[tuple[int, bool]],
        packed_scalars: Tensor,
        columns: Sequence[Tensor | None],
    ) -> None:
        """Enable direct calls once the captured graph writes Dynamo's bits on a scratch row."""
        through_dynamo, direct = _scratch_row(columns, self.packed), _scratch_row(columns, self.packed)
        self._through_dynamo(packed_scalars, through_dynamo)
        call(_graph_inputs(plan, packed_scalars, direct))
        pairs = enumerate(zip(through_dynamo, direct))
        differing = [i for i, (a, b) in pairs if a is not None and not _same_bits(a, b)]
        if differing:
            switch_off("direct_calls", f"the {self.label} graph called directly wrote other bits into {differing}")
            return
        self.direct = (call, plan, packed_scalars.device)
        note_engaged("direct_calls")

    def _check_packed(self, packed_scalars: Tensor, columns: Sequence[Tensor | None]) -> None:
        """Compile the packed kernel on a scratch row and compare it with the same rule run eagerly.

        The two compute the same float32 operations, so their bf16 results agree to the bit on
        nearly every element; a column the kernel failed to store, or a misread half, would not.
        """
        compiled, eager = _scratch_row(columns, packed=True), _scratch_row(columns, packed=True)
        self._through_dynamo(packed_scalars, compiled)
        self.python_step(packed_scalars, *eager)
        for index, (a, b) in enumerate(zip(compiled, eager)):
            if a is None or index == 1:  # the gradient is the rule's scratch space, never stored
                continue
            a16, b16 = a.view(torch.int16).int(), b.view(torch.int16).int()
            same_sign = (a16 < 0) == (b16 < 0)
            ulps = torch.where(same_sign, (a16 - b16).abs(), torch.full_like(a16, 1 << 16))
            identical = (ulps == 0).float().mean().item()
            if ulps.max().item() > 2 or identical < 0.9:
                reason = f"column {index}: {identical:.0%} bit-identical, up to {ulps.max().item()} bf16 ulps apart"
                switch_off("packed_pairs", f"the packed {self.label} kernel disagreed with its eager rule, {reason}")
                raise _PackedCheckFailed(reason)
        note_engaged("packed_pairs")

    def _run_compiled(self, packed_scalars: Tensor, *columns: Tensor | None) -> None:
        """Run this step's compiled graph: directly where it was captured, else through Dynamo."""
        plan, call = self.graphs[0] if self.capture and len(self.graphs) == 1 else (None, None)
        if plan is not None and call is not None:
            call(_graph_inputs(plan, packed_scalars, columns))
        else:
            self._through_dynamo(packed_scalars, columns)

    def _check_packed_speed(self, packed_scalars: Tensor, columns: Sequence[Tensor | None]) -> None:
        """Once per process: keep packed kernels only where they beat the plain kernel on this CPU.

        Whether the int32-pair kernel pays depends on the processor, not only on torch: Inductor
        writes each bitcast as a store to the stack and a reload, which GCC folds away on some
        CPUs and not on others (measured, docs/benchmarks.md: 1.2-1.3x faster on an AMD Zen 4,
        5.8x slower on an Intel Sapphire Rapids). Both kernels run a scratch row of
        :data:`_SPEED_CHECK_WORDS` words, alternately, and the faster one is kept (the plain
        kernel is this configuration's fallback anyway, so compiling it is not wasted).
        """
        global _PACKED_SPEED_CHECKED
        if _PACKED_SPEED_CHECKED or self.plain_step is None:
            return
        _PACKED_SPEED_CHECKED = True
        plain = self.plain_step()
        words = _scratch_row(columns, packed=True, length=_SPEED_CHECK_WORDS)
        halves = [None if w is None else w.view(torch.bfloat16) for w in words]  # the same memory
        timings: dict[str, list[float]] = {"packed": [], "plain": []}
        for _ in range(7):  # the first round compiles the plain kernel and warms both
            # this step is inside its own first call: run its compiled graph, not that logic again
            for name, run in (("packed", self._run_compiled), ("plain", plain)):
                row = words if name == "packed" else halves
                start = time.perf_counter()
                run(packed_scalars, *row)
                timings[name].append(time.perf_counter() - start)
        packed_s, plain_s = min(timings["packed"][1:]), min(timings["plain"][1:])
        _log.info(
            "optimi: packed bf16 kernel %.2f ms, plain kernel %.2f ms per %d words",
            packed_s * 1e3,
            plain_s * 1e3,
            _SPEED_CHECK_WORDS,
        )
        if packed_s >= 0.95 * plain_s:  # a tie keeps the plain kernel, the simpler of the two
            disable_for_speed(
                "packed_pairs",
                f"slower than the plain kernel on this CPU ({packed_s * 1e3:.2f} vs {plain_s * 1e3:.2f} ms "
                f"per {_SPEED_CHECK_WORDS} words)",
            )
            raise _PackedCheckFailed("slower than the plain kernel")


def _graph_inputs(plan: list[tuple[int, bool]], packed_scalars: Tensor, columns: Sequence[Tensor | None]) -> list:
    """A captured graph's inputs for one call: tensors, and the lengths Dynamo lifted as inputs."""
    inputs = [packed_scalars if index == SCALARS else columns[index] for index, _ in plan]
    return [value.shape[0] if is_length else value for value, (_, is_length) in zip(inputs, plan)]


#: words of the scratch row that times packed against plain kernels: 4 MB per column, larger than a
#: core's L2, so that the timing sees memory as a large step does (about a millisecond per call)
_SPEED_CHECK_WORDS = 1 << 20
# whether this process has compared packed and plain kernels ([Note: packed bf16 columns])
_PACKED_SPEED_CHECKED = False

#: length of the scratch rows the self-checks run on (in words for packed rows); at least 2, which
#: Dynamo does not specialize, so the configuration's graph serves them
_SCRATCH_LENGTH = 64


def _scratch_row(columns: Sequence[Tensor | None], packed: bool, length: int = _SCRATCH_LENGTH) -> list[Tensor | None]:
    """Fresh tensors shaped and typed like a row's flat columns, with the same values on every call.

    Columns as long as the parameter get :data:`_SCRATCH_LENGTH` elements, others (a sum the rule
    writes) keep their length. Values lie in [0.5, 1.5): every rule's states stay finite.
    """
    generator = torch.Generator().manual_seed(0)
    parameter_length = columns[0].shape[0]
    row: list[Tensor | None] = []
    for column in columns:
        if column is None:
            row.append(None)
            continue
        size = length if column.shape[0] == parameter_length else column.shape[0]
        if packed and column.dtype == torch.int32:
            values = (torch.rand(2 * size, generator=generator) + 0.5).to(torch.bfloat16).view(torch.int32)
        else:
            values = (torch.rand(size, generator=generator, dtype=torch.float64) + 0.5).to(column.dtype)
        row.append(values.to(column.device))
    return row


def _same_bits(a: Tensor, b: Tensor) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _make_step(
    update: Callable[..., None],
    names: tuple[str, ...],
    static: dict[str, Any],
    number_columns: tuple[int, ...],
    device_type: str,
    packed: bool,
    label: str,
) -> _CompiledStep:
    """Compile ``update`` for one configuration: ``step(packed_scalars, *flat_tensors)``.

    ``packed_scalars`` holds the named scalars, then one value per number column (per-tensor
    scalars that travel among the tensors, e.g. StableAdamW's clipped learning rate), then the
    splitting constants of :data:`_SPLIT`, in its order. With ``packed`` the tensors are bf16 columns
    viewed as int32 pairs ([Note: packed bf16 columns]).
    """
    round_stores = device_type == "cpu"
    kahan_in_float32 = device_type == "cpu"
    fma = inductor_fma()
    eager = {name: torch.compiler.disable(fn) for name, fn in static.items() if callable(fn)}
    static = {**static, **eager}

    def arguments(packed_scalars: Tensor, columns: Sequence[Tensor | None]) -> tuple[list[Any], dict[str, Any]]:
        scalars = {name: packed_scalars[i] for i, name in enumerate(names)}
        args = list(columns)
        for j, column in enumerate(number_columns):
            args[column] = packed_scalars[len(names) + j]
        return args, scalars

    def splits_in(packed_scalars: Tensor) -> dict[torch.dtype, Tensor]:
        first = len(names) + len(number_columns)
        return {dtype: packed_scalars[first + i] for i, dtype in enumerate(_SPLIT)}

    def fused_step(packed_scalars: Tensor, *columns: Tensor | None) -> None:
        args, scalars = arguments(packed_scalars, columns)
        ops = FusedOps(round_stores, splits_in(packed_scalars), fma)
        # a private float32 copy of the gradient: the rule's temporaries live there unrounded and
        # the kernel never stores it ([Note: fused numerics])
        args[1] = args[1].float() if args[1].dtype in _LOW_PRECISION else args[1].clone()
        comp = args[-1]
        if kahan_in_float32 and isinstance(comp, Tensor) and comp.dtype in _LOW_PRECISION:
            # CPU: the Kahan buffer's updates are summed in a float32 copy and stored once; the
            # parameter's rounding alone keeps the compensation exact ([Note: fused numerics])
            args[-1] = comp.float()
        update(ops, *args, **scalars, **static)
        if args[-1] is not comp:
            comp.copy_(args[-1])

    def packed_step(packed_scalars: Tensor, *columns: Tensor | None) -> None:
        args, scalars = arguments(packed_scalars, columns)
        splits = splits_in(packed_scalars)
        is_word = [isinstance(c, Tensor) for c in columns]  # number columns arrive as None
        halves = [_unpack(c) if word else (c, c) for c, word in zip(args, is_word)]
        comp = args[-1]
        written = []
        for half in (0, 1):
            half_args = [pair[half] for pair in halves]
            # the gradient half is already a private float32 copy ([Note: fused numerics])
            exact = [half_args[-1]] if isinstance(comp, Tensor) else []
            exact.append(half_args[1])
            half_ops = PackedOps(exact, splits, fma)
            update(half_ops, *half_args, **scalars, **static)
            written.append(half_ops.written)
        for i, (even, odd) in enumerate(halves):
            if not is_word[i] or not any(even is t for t in written[0]):
                continue
            if i == 1:  # the rule's scratch space, never stored
                continue
            if i == len(halves) - 1:  # the Kahan buffer, summed unrounded: round it once now
                split = splits[torch.bfloat16]
                even, odd = _round_to(even, split), _round_to(odd, split)
            args[i].copy_(_pack(even, odd))

    step = packed_step if packed else fused_step
    if not compile_isolation_options():
        # older torch: a private code object gives this configuration its own recompile budget
        step.__code__ = step.__code__.replace()
    # CUDA: bf16 tensors round where eager rounds through Inductor's casts ([Note: fused numerics])
    options = precision_cast_options(emulate=not round_stores)
    # a callable switch runs eagerly between graphs: only Dynamo's dispatch calls it
    return _CompiledStep(step, options, may_call_directly=not eager, label=label, packed=packed)


def _label(update: Callable[..., None], device_type: str, dtypes: Sequence[Any], packed: bool) -> str:
    """How logs and errors name a configuration, e.g. ``_adam_update (cpu, bfloat16, packed)``."""
    dtype = next((str(d).removeprefix("torch.") for d in dtypes if isinstance(d, torch.dtype)), "?")
    return f"{update.__name__} ({device_type}, {dtype}{', packed' if packed else ''})"


def run_fused(
    update: Callable[..., None],
    tensor_lists: Sequence[Sequence[Any]],
    scalars: dict[str, Any],
) -> None:
    """Run ``update`` once per tensor as a compiled, single-pass kernel ([Note: the fused backend]).

    ``tensor_lists`` are parallel lists (parameters first, Kahan buffers last, ``None`` for an
    absent optional tensor, or a column of numbers: one scalar per tensor); ``scalars`` are the
    update's keyword arguments. Numbers (and 0-d tensors) become runtime inputs,
    ``bool``/``None``/``str``/callables are compile-time switches.

    A configuration that fails to compile falls back to :data:`FALLBACK_BACKEND` where one is set
    and raises :class:`FusedCompileError` otherwise ([Note: falling back from the fused backend]).
    """
    static = {k: v for k, v in scalars.items() if _is_static(v) or callable(v)}
    numbers = {k: v for k, v in scalars.items() if k not in static}
    names = tuple(numbers)
    static_key = tuple(sorted((k, v if _is_static(v) else id(v)) for k, v in static.items()))
    shared = [_as_float(v) for v in numbers.values()]
    packed_on: dict[torch.device, Tensor] = {}
    # the switches that change how a step compiles; packing has its own place in the key
    tricks = tuple(enabled(name) for name in TRICKS if name != "packed_pairs")
    pack_pairs = enabled("packed_pairs")

    # rows whose compiled graph is called directly run last, one after the other: the Python
    # between two kernels runs on caches the previous kernel flushed ([Note: calling the compiled
    # graph directly])
    direct_calls: list[tuple[Callable[[list], Any], list]] = []
    fallen_back: dict[str, list[int]] = {}  # backend -> rows it steps
    for index, row in enumerate(zip(*tensor_lists)):
        param = row[0]
        if param.numel() == 0:
            continue
        # one pass over the row: it runs once per parameter and step ([Note: calling the compiled
        # graph directly] on why per-call Python matters)
        dtypes: list[Any] = []
        number_columns: list[int] = []
        contiguous, packable = True, pack_pairs
        for column, t in enumerate(row):
            if isinstance(t, Tensor):
                dtypes.append(t.dtype)
                contiguous = contiguous and t.is_contiguous()
                packable = packable and _pairs_fit(t)
            elif t is None:
                dtypes.append(None)
            else:
                dtypes.append("number")
                number_columns.append(column)
        if not contiguous:
            # a strided layout cannot be flattened to a view: run the same rule eagerly
            update(TENSOR_OPS, *row, **scalars)
            continue
        device = param.device
        config = (update, device.type, tuple(dtypes), static_key, names, tricks)
        failed = _FELL_BACK.get(config)
        if failed is not None:  # compiled and failed before: never again
            if FALLBACK_BACKEND.get() is None:
                raise _explicit_failure(failed[1])
            fallen_back.setdefault(failed[0], []).append(index)
            continue
        packed = packable and device.type == "cpu" and config not in _PACKING_FAILED
        key = (packed, *config)
        step = _COMPILED.get(key)
        if step is None:
            label = _label(update, device.type, dtypes, packed)
            step = _COMPILED[key] = _make_step(update, names, static, tuple(number_columns), device.type, packed, label)
            if packed:
                plain_args = (update, names, static, tuple(number_columns), device.type, False)
                step.plain_step = functools.partial(
                    _plain_step, key, plain_args, _label(update, device.type, dtypes, False)
                )
        if number_columns:
            scalars_tensor = _pack_scalars(shared + [_as_float(row[i]) for i in number_columns], device)
        else:
            scalars_tensor = packed_on.get(device)
            if scalars_tensor is None:
                scalars_tensor = packed_on[device] = _pack_scalars(shared, device)
        columns = [_flat(t, packed) if isinstance(t, Tensor) else None for t in row]
        call = step.direct_call(scalars_tensor, columns)
        if call is not None:
            direct_calls.append(call)
            continue
        try:
            if packed:
                plain = (update, names, static, tuple(number_columns), device.type, False)
                _run_packed(step, key, scalars_tensor, row, plain, _label(update, device.type, dtypes, False))
            else:
                step(scalars_tensor, *columns)
        except FusedCompileError as error:
            backend = FALLBACK_BACKEND.get()
            if backend is None:
                raise _explicit_failure(error) from error.__cause__
            _FELL_BACK[config] = (backend, error)
            warnings.warn(
                f"{error}; this configuration now runs the {backend} backend (same math, slower)",
                RuntimeWarning,
                stacklevel=4,
            )
            fallen_back.setdefault(backend, []).append(index)
    for call_graph, arguments in direct_calls:
        call_graph(arguments)
    for backend, rows in fallen_back.items():
        _run_eagerly(update, backend, [[tensors[i] for i in rows] for tensors in tensor_lists], scalars)


def _explicit_failure(error: FusedCompileError) -> FusedCompileError:
    return FusedCompileError(
        f"{error}. The fused backend was asked for explicitly (fused=True or triton=True); "
        "leave fused=None to fall back to the for-loop/foreach backend, or pass fused=False"
    )


def _run_eagerly(update: Callable[..., None], backend: str, tensor_lists: list[list[Any]], scalars: dict) -> None:
    """Step rows with the backend a failed configuration fell back to (``for_loop`` or ``foreach``)."""
    if backend == "foreach":
        for bucket in bucket_by_device_dtype(tensor_lists):
            update(FOREACH_OPS, *bucket, **scalars)
    else:
        for row in zip(*tensor_lists):
            update(TENSOR_OPS, *row, **scalars)


def _run_packed(
    step: _CompiledStep,
    key: tuple,
    scalars: Tensor,
    row: Sequence[Any],
    plain_args: tuple,
    plain_label: str,
) -> None:
    """Run a packed configuration; where it cannot be compiled or checked, switch to the plain kernel.

    The packed kernel relies on Inductor lowering int32/float32 bitcasts and shifts, which another
    release may not do, or do differently. A failure to compile surfaces before any tensor is
    written, and so does a failed self-check (it runs on a scratch row); the plain kernel then
    computes the same bits. Should the plain kernel fail to compile too, its
    :class:`FusedCompileError` propagates.
    """
    try:
        step(scalars, *[_flat(t, True) if isinstance(t, Tensor) else None for t in row])
        return
    except FusedCompileError as error:
        packed_error: FusedCompileError | None = error
    except _PackedCheckFailed:
        packed_error = None  # switch_off has warned once for the process
    _PACKING_FAILED.add(key[1:])
    plain = _plain_step(key, plain_args, plain_label)
    # where the compiler fails altogether this raises too, and the caller's fallback warns once
    plain(scalars, *[_flat(t) if isinstance(t, Tensor) else None for t in row])
    if packed_error is not None:
        warnings.warn(
            f"optimi: the packed bf16 fused kernel failed to compile ({packed_error}); using the plain fused "
            "kernel for this configuration (same results, slower on CPU)",
            RuntimeWarning,
            stacklevel=5,
        )


def _plain_step(packed_key: tuple, plain_args: tuple, plain_label: str) -> _CompiledStep:
    """The plain kernel's compiled step for the configuration of a packed key (built once)."""
    plain_key = (False, *packed_key[1:])
    plain = _COMPILED.get(plain_key)
    if plain is None:
        plain = _COMPILED[plain_key] = _make_step(*plain_args, plain_label)
    return plain


def _pairs_fit(tensor: Tensor) -> bool:
    """Whether ``tensor`` can be viewed as int32 pairs of bf16 ([Note: packed bf16 columns])."""
    return tensor.dtype == torch.bfloat16 and tensor.numel() % 2 == 0 and tensor.storage_offset() % 2 == 0


# (id of a tensor, packed) -> (weak reference to the tensor, its flat view): parameters and states
# live across steps, and building a view costs ~3 µs, ten times a lookup
_FLAT_VIEWS: dict[tuple[int, bool], tuple[weakref.ref, Tensor]] = {}


def _flat(tensor: Tensor, packed: bool = False) -> Tensor:
    """A 1-D tensor over ``tensor``'s (contiguous) memory that is not a view of it.

    A view would carry its base's shape into Dynamo's guards (one compile per parameter rank).
    ``packed``: a bf16 tensor's memory as int32 words, element pairs ``(2i, 2i + 1)`` in word ``i``
    ([Note: packed bf16 columns]). The result is cached while ``tensor`` lives and still covers the
    same memory (``tensor.data = ...`` or a resize moves it).
    """
    key = (id(tensor), packed)
    cached = _FLAT_VIEWS.get(key)
    length = tensor.numel() // 2 if packed else tensor.numel()
    if cached is not None:
        owner, flat = cached
        if owner() is tensor and flat.data_ptr() == tensor.data_ptr() and flat.shape[0] == length:
            return flat
    if packed:
        flat = tensor.new_empty(0, dtype=torch.int32)
        flat.set_(tensor.untyped_storage(), tensor.storage_offset() // 2, (length,), (1,))
    else:
        flat = tensor.new_empty(0)
        flat.set_(tensor.untyped_storage(), tensor.storage_offset(), (length,), (1,))
    _FLAT_VIEWS[key] = (weakref.ref(tensor, lambda _, key=key: _FLAT_VIEWS.pop(key, None)), flat)
    return flat


def _as_float(value: Any) -> float | Tensor:
    if isinstance(value, Tensor):
        return value.detach().to(torch.float64).reshape(())
    return float(value)


def _pack_scalars(values: list[float | Tensor], device: torch.device) -> Tensor:
    """All numeric hyperparameters of one call, then the splitting constants, as one float64 tensor."""
    values = [*values, *_SPLIT.values()]
    if any(isinstance(v, Tensor) for v in values):
        return torch.stack([torch.as_tensor(v, dtype=torch.float64).to(device) for v in values])
    packed = torch.tensor(values, dtype=torch.float64)
    return packed if device.type == "cpu" else packed.to(device, non_blocking=True)
