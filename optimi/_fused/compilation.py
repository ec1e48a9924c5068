"""One fused configuration's step under ``torch.compile``: compiling, checking, calling.

A configuration (update rule, device type, dtypes, switches) compiles once into a
:class:`CompiledStep`. Its first call compiles (logged and timed), runs the self-checks of the
private-torch tricks it uses on scratch rows ([Note: private torch internals] in
``optimi/_torch_internals.py``), and turns any compiler failure into :class:`FusedCompileError`
before a real tensor is written. Later calls skip Dynamo where the captured graph allows it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from optimi._columns import Columns
from optimi._fused.cpp_rewrites import hoist_invariant_scalars, vector_bitcasts
from optimi._fused.ops import SPLIT, FusedOps, update_row
from optimi._fused.packing import update_packed_row
from optimi._torch_internals import (
    SCALARS,
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

__all__ = ["CompiledStep", "FusedCompileError", "PackedCheckFailed", "label_of", "make_step"]

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


class PackedCheckFailed(Exception):
    """A packed kernel disagreed with its rule run eagerly ([Note: private torch internals])."""


class CompiledStep:
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
    call it directly. Where the capture does not describe the whole call (a graph break, an
    input Dynamo derived in a way not recognised here) or
    a call falls outside what the graph was compiled for (another device, a length Dynamo
    specializes: below 2), the call goes through Dynamo as before. The capture is private torch
    internals (the ``direct_calls`` trick, [Note: private torch internals]): before the first
    direct call, the graph called directly must write Dynamo's bits on a small scratch row.
    """

    def __init__(
        self,
        step: Callable[..., None],
        inductor_options: dict[str, Any],
        label: str,
        packed: bool,
    ):
        self.python_step = step
        self.inductor_options = inductor_options
        self.label = label
        self.packed = packed
        # packed steps: builds (or finds) the same configuration's plain step, for the speed check
        self.plain_step: Callable[[], CompiledStep] | None = None
        # whether this packed step may be the one that times packed against plain kernels for the
        # process; a float32-master step may not: its plain kernel reads int16 columns, which
        # Inductor's CPU code does not vectorize ([Note: one-pass float32 masters] in masters.py)
        self.times_plain = packed
        self.capture = enabled("direct_calls")
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
        return compiled, graph_inputs(plan, packed_scalars, columns)

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
        except PackedCheckFailed:
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
        through_dynamo, direct = scratch_row(columns, self.packed), scratch_row(columns, self.packed)
        self._through_dynamo(packed_scalars, through_dynamo)
        call(graph_inputs(plan, packed_scalars, direct))
        pairs = enumerate(zip(through_dynamo, direct))
        differing = [i for i, (a, b) in pairs if a is not None and not same_bits(a, b)]
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
        compiled, eager = scratch_row(columns, packed=True), scratch_row(columns, packed=True)
        self._through_dynamo(packed_scalars, compiled)
        self.python_step(packed_scalars, *eager)
        grad = Columns.from_arguments(compiled).grad
        for index, (a, b) in enumerate(zip(compiled, eager)):
            if a is None or a is grad:  # the gradient is the rule's scratch space, never stored
                continue
            a16, b16 = a.view(torch.int16).int(), b.view(torch.int16).int()
            same_sign = (a16 < 0) == (b16 < 0)
            ulps = torch.where(same_sign, (a16 - b16).abs(), torch.full_like(a16, 1 << 16))
            identical = (ulps == 0).float().mean().item()
            if ulps.max().item() > 2 or identical < 0.9:
                reason = f"column {index}: {identical:.0%} bit-identical, up to {ulps.max().item()} bf16 ulps apart"
                switch_off("packed_pairs", f"the packed {self.label} kernel disagreed with its eager rule, {reason}")
                raise PackedCheckFailed(reason)
        note_engaged("packed_pairs")

    def _run_compiled(self, packed_scalars: Tensor, *columns: Tensor | None) -> None:
        """Run this step's compiled graph: directly where it was captured, else through Dynamo."""
        plan, call = self.graphs[0] if self.capture and len(self.graphs) == 1 else (None, None)
        if plan is not None and call is not None:
            call(graph_inputs(plan, packed_scalars, columns))
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
        if _PACKED_SPEED_CHECKED or self.plain_step is None or not self.times_plain:
            return
        _PACKED_SPEED_CHECKED = True
        plain = self.plain_step()
        words = scratch_row(columns, packed=True, length=_SPEED_CHECK_WORDS)
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
            raise PackedCheckFailed("slower than the plain kernel")


def graph_inputs(plan: list[tuple[int, bool]], packed_scalars: Tensor, columns: Sequence[Tensor | None]) -> list:
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


def scratch_row(columns: Sequence[Tensor | None], packed: bool, length: int = _SCRATCH_LENGTH) -> list[Tensor | None]:
    """Fresh tensors shaped and typed like a row's flat columns, with the same values on every call.

    Columns as long as the parameter get :data:`_SCRATCH_LENGTH` elements, others (a sum the rule
    writes) keep their length; a 2-D column (the blocks of 8-bit states, [Note: 8-bit states in
    the fused kernel] in ``quantized.py``) keeps its second dimension. Values lie in [0.5, 1.5):
    every rule's states stay finite.
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
            shape = (size, *column.shape[1:])
            values = (torch.rand(shape, generator=generator, dtype=torch.float64) + 0.5).to(column.dtype)
        row.append(values.to(column.device))
    return row


def same_bits(a: Tensor, b: Tensor) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def make_step(
    update: Callable[..., None],
    names: tuple[str, ...],
    static: dict[str, Any],
    number_columns: tuple[int, ...],
    device_type: str,
    packed: bool,
    label: str,
) -> CompiledStep:
    """Compile ``update`` for one configuration: ``step(packed_scalars, *flat_tensors)``.

    ``packed_scalars`` holds the named scalars, then one value per number column (per-tensor
    scalars that travel among the tensors, e.g. StableAdamW's clipped learning rate), then the
    splitting constants of :data:`SPLIT`, in its order. With ``packed`` the tensors are bf16 columns
    viewed as int32 pairs ([Note: packed bf16 columns]).
    """
    round_stores = device_type == "cpu"
    kahan_in_float32 = device_type == "cpu"
    fma = inductor_fma()

    def row_and_scalars(packed_scalars: Tensor, columns: Sequence[Tensor | None]) -> tuple[Columns, dict[str, Any]]:
        scalars = {name: packed_scalars[i] for i, name in enumerate(names)}
        arguments = list(columns)
        for j, column in enumerate(number_columns):
            arguments[column] = packed_scalars[len(names) + j]
        return Columns.from_arguments(arguments), {**scalars, **static}

    def splits_in(packed_scalars: Tensor) -> dict[torch.dtype, Tensor]:
        first = len(names) + len(number_columns)
        return {dtype: packed_scalars[first + i] for i, dtype in enumerate(SPLIT)}

    def fused_step(packed_scalars: Tensor, *columns: Tensor | None) -> None:
        row, scalars = row_and_scalars(packed_scalars, columns)
        ops = FusedOps(round_stores, splits_in(packed_scalars), fma)
        update_row(update, ops, row, scalars, kahan_in_float32)

    def packed_step(packed_scalars: Tensor, *columns: Tensor | None) -> None:
        row, scalars = row_and_scalars(packed_scalars, columns)
        update_packed_row(update, row, scalars, splits_in(packed_scalars), fma)

    step = packed_step if packed else fused_step
    if not compile_isolation_options():
        # older torch: a private code object gives this configuration its own recompile budget
        step.__code__ = step.__code__.replace()
    # CUDA: bf16 tensors round where eager rounds through Inductor's casts ([Note: fused numerics])
    options = precision_cast_options(emulate=not round_stores)
    return CompiledStep(step, options, label=label, packed=packed)


def label_of(
    update: Callable[..., None],
    device_type: str,
    dtypes: Sequence[Any],
    packed: bool,
    master_mode: str | None = None,
) -> str:
    """How logs and errors name a configuration, e.g. ``_adam_update (cpu, bfloat16, packed)``.

    ``master_mode``: the rule steps a bf16 parameter's float32 master in the kernel, e.g.
    ``_adam_update (cpu, bfloat16, remainder master)`` ([Note: one-pass float32 masters]).
    """
    dtype = next((str(d).removeprefix("torch.") for d in dtypes if isinstance(d, torch.dtype)), "?")
    if master_mode is not None:
        dtype = f"bfloat16, {master_mode} master"
    return f"{update.__name__} ({device_type}, {dtype}{', packed' if packed else ''})"
