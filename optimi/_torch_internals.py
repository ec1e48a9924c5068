"""Every private PyTorch internal the fused backend uses, each gated by the torch versions it was tested on.

[Note: private torch internals]
The fused backend's speed comes from a few tricks that reach into ``torch._dynamo`` and
``torch._inductor``, which change without notice between releases. Each trick lives here, and
only here, behind a name in :data:`TRICKS`:

* ``direct_calls``: capture the graph Inductor compiles for a configuration (``compile_fx`` with
  an ``inner_compile`` hook, AOTAutograd's cache bypassed) and map its inputs to the step's
  arguments through the ``Source`` objects Dynamo recorded, so that later calls skip Dynamo
  ([Note: calling the compiled graph directly] in ``optimi/_fused/``).
* ``hoist_scalars``: swap ``AsyncCompile.cpp_pybinding`` while compiling, so each CPU kernel's
  C++ is rewritten before it is built ([Note: hoisting the hyperparameters] in ``optimi/_fused/cpp_rewrites.py``).
* ``packed_pairs``: run CPU bf16 rows as int32 words holding two bf16 values ([Note: packed bf16
  columns] in ``optimi/_fused/``). Public tensor operations, but it relies on how Inductor lowers
  bitcasts and shifts.
* ``vector_bitcasts``: in the same hook, rewrite each vector bitcast Inductor writes as a scalar
  loop through the stack into one store and one load ([Note: bitcasts without the stack] in
  ``optimi/_fused/cpp_rewrites.py``).
* ``inductor_fma``: Inductor's ``fma`` prim, one rounding for ``a * b + c`` as eager's
  add-with-alpha kernels compute it. Without it the fused step rounds twice there (an ulp now
  and then, well inside the tests' tolerances).

A trick is enabled where the running torch's ``major.minor`` lies in the range the test suite
passed on (:data:`TESTED_TORCH`), and each verifies itself at first use: direct calls must give
Dynamo's bits on a small scratch row, packed kernels must agree with the same rule run eagerly,
the hoisting rewrite must move statements and build. A trick that fails its check is switched
off for the rest of the process with one warning, and the configuration runs as ``torch.compile``
would run it anyway. With every trick off, the fused backend is plain public ``torch.compile``
(``backend="inductor"``): slower, still correct. :func:`report` says what engaged.

``OPTIMI_FUSED_TRICKS`` overrides the version gate, read at the first fused step (never at
import): ``none`` switches every trick off, ``all`` switches every trick on whatever the version,
and a comma-separated list of names enables exactly those.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "TESTED_TORCH",
    "TRICKS",
    "Trick",
    "bare_graph_call",
    "argument_plan",
    "at_end_of_backward",
    "compile_capturing_graphs",
    "compile_isolation_options",
    "convert_module_tensors",
    "disable_for_speed",
    "dynamo_supported",
    "enabled",
    "rewriting_cpp_kernels",
    "inductor_fma",
    "note_engaged",
    "override",
    "precision_cast_options",
    "report",
    "switch_off",
    "works_but_slower",
    "torch_version",
]

#: the oldest and newest ``(major, minor)`` torch releases the whole suite passed on (docs/versions.md)
TESTED_TORCH: tuple[tuple[int, int], tuple[int, int]] = ((2, 10), (2, 15))


@dataclass(frozen=True)
class Trick:
    """One use of private torch internals in the fused backend."""

    #: the name used by :func:`enabled`, :func:`report` and ``OPTIMI_FUSED_TRICKS``
    name: str
    #: what it does, for the report and docs
    summary: str
    #: the ``(major, minor)`` releases it was tested on, both inclusive
    tested: tuple[tuple[int, int], tuple[int, int]] = TESTED_TORCH


TRICKS: dict[str, Trick] = {
    trick.name: trick
    for trick in (
        Trick("direct_calls", "call each configuration's Inductor graph without Dynamo after its first call"),
        Trick("hoist_scalars", "compute CPU kernels' hyperparameter arithmetic once per call, not per vector"),
        Trick("packed_pairs", "run CPU bf16 rows as int32 words holding two bf16 values"),
        Trick("vector_bitcasts", "rewrite CPU kernels' bitcasts as one store and load, not a scalar loop"),
        Trick("inductor_fma", "one rounding for add-with-alpha, as eager kernels compute it"),
    )
}


def torch_version(version: str | None = None) -> tuple[int, int]:
    """``(major, minor)`` of ``version`` (default: the running torch), e.g. ``(2, 13)`` for ``2.13.0+cpu``."""
    match = re.match(r"(\d+)\.(\d+)", version or torch.__version__)
    if match is None:  # pragma: no cover - torch always has a numeric version
        return (0, 0)
    return int(match.group(1)), int(match.group(2))


# trick -> whether it is on; filled at the first call of ``enabled`` (never at import)
_ENABLED: dict[str, bool] = {}
# trick -> why it is off, or "engaged" once it has done its work and passed its check
_STATUS: dict[str, str] = {}
# tricks switched off by disable_for_speed: they passed their self-checks
_SLOWER_HERE: set[str] = set()


def _initial_switches() -> dict[str, bool]:
    version = torch_version()
    switches = {name: trick.tested[0] <= version <= trick.tested[1] for name, trick in TRICKS.items()}
    for name, on in switches.items():
        if not on:
            first, last = TRICKS[name].tested
            _STATUS[name] = (
                f"off: torch {torch.__version__} is outside the tested {first[0]}.{first[1]}-{last[0]}.{last[1]}"
            )
    requested = os.environ.get("OPTIMI_FUSED_TRICKS")
    if requested is None:
        return switches
    requested = requested.strip().lower()
    if requested == "all":
        names = set(TRICKS)
    elif requested in ("", "none"):
        names = set()
    else:
        names = {name.strip() for name in requested.split(",") if name.strip()}
        unknown = names - set(TRICKS)
        if unknown:
            raise ValueError(
                f"Invalid OPTIMI_FUSED_TRICKS: {sorted(unknown)} (must be 'all', 'none' or names from {sorted(TRICKS)})"
            )
    for name in TRICKS:
        switches[name] = name in names
        _STATUS[name] = "set by OPTIMI_FUSED_TRICKS" if name in names else "off: OPTIMI_FUSED_TRICKS"
    return switches


def enabled(name: str) -> bool:
    """Whether trick ``name`` may be used now (version gate, environment override, self-checks)."""
    if not _ENABLED:
        _ENABLED.update(_initial_switches())
    return _ENABLED[name]


def switch_off(name: str, reason: str) -> None:
    """Disable trick ``name`` for the rest of the process after it failed a self-check; warns once."""
    enabled(name)
    if not _ENABLED[name]:
        return
    _ENABLED[name] = False
    _STATUS[name] = f"off: self-check failed on torch {torch.__version__}: {reason}"
    warnings.warn(
        f"optimi: the fused backend's {name!r} optimization failed its self-check on torch {torch.__version__} "
        f"({reason}); it stays off in this process (results are correct, the step is slower)",
        RuntimeWarning,
        stacklevel=3,
    )


def disable_for_speed(name: str, reason: str) -> None:
    """Disable trick ``name`` for the rest of the process because it is slower here; logged, no warning."""
    enabled(name)
    _ENABLED[name] = False
    _SLOWER_HERE.add(name)
    _STATUS[name] = f"off: {reason}"
    logging.getLogger("optimi").info("optimi: the fused backend's %r optimization is off: %s", name, reason)


def works_but_slower(name: str) -> bool:
    """Whether trick ``name`` is on, or off only because :func:`disable_for_speed` found it slower.

    Such a trick still passed every self-check: code for which the comparison that turned it off
    does not hold may still use it (the fused float32-master rows use packed columns, whose int16
    bits the plain kernel cannot vectorize on CPU, [Note: one-pass float32 masters]).
    """
    return enabled(name) or name in _SLOWER_HERE


def note_engaged(name: str) -> None:
    """Record that trick ``name`` did its work and passed its self-check (for :func:`report`)."""
    if enabled(name):
        _STATUS[name] = "engaged"


def report() -> dict[str, str]:
    """Each trick's state in this process: ``engaged``, ``enabled`` (not used yet) or why it is off."""
    return {name: _STATUS.get(name, "enabled" if enabled(name) else "off") for name in TRICKS}


@contextlib.contextmanager
def override(**switches: bool) -> Iterator[None]:
    """Force tricks on or off inside the block (tests and benchmarks compare both)."""
    unknown = set(switches) - set(TRICKS)
    if unknown:
        raise ValueError(f"unknown fused-backend tricks {sorted(unknown)}; expected names from {sorted(TRICKS)}")
    enabled(next(iter(TRICKS)))
    saved, saved_status, saved_slower = dict(_ENABLED), dict(_STATUS), set(_SLOWER_HERE)
    _ENABLED.update(switches)
    _SLOWER_HERE.difference_update(switches)  # forced means forced, for every kind of row
    try:
        yield
    finally:
        _ENABLED.clear()
        _ENABLED.update(saved)
        _STATUS.clear()
        _STATUS.update(saved_status)
        _SLOWER_HERE.clear()
        _SLOWER_HERE.update(saved_slower)


# -- the internals themselves -------------------------------------------------------------------


def dynamo_supported() -> bool:
    """Whether Dynamo runs under this Python (asked through a private helper, so failures mean no)."""
    if not hasattr(torch, "compile"):
        return False
    try:
        return bool(torch._dynamo.is_dynamo_supported())
    except Exception:  # noqa: BLE001 - any failure to even ask means: not supported
        return False


def inductor_fma() -> Callable[..., torch.Tensor] | None:
    """Inductor's ``fma`` prim where the ``inductor_fma`` trick is on, else ``None`` (two roundings)."""
    if not enabled("inductor_fma"):
        return None
    try:
        from torch._inductor.inductor_prims import fma
    except ImportError:
        _STATUS["inductor_fma"] = f"off: torch {torch.__version__} has no torch._inductor.inductor_prims.fma"
        return None
    note_engaged("inductor_fma")
    return fma


def compile_isolation_options() -> dict[str, Any]:
    """``torch.compile`` keywords that give each compiled function its own recompile budget."""
    return {"isolate_recompiles": True} if "isolate_recompiles" in inspect.signature(torch.compile).parameters else {}


def precision_cast_options(emulate: bool) -> dict[str, Any]:
    """Inductor options asking it to round bf16/fp16 intermediates where eager rounds (if it knows how)."""
    from torch._inductor import config as inductor_config

    return {"emulate_precision_casts": emulate} if hasattr(inductor_config, "emulate_precision_casts") else {}


#: in an argument plan, the position of the packed scalars (columns count from 0)
SCALARS = -1


def argument_plan(graph: torch.fx.GraphModule) -> list[tuple[int, bool]] | None:
    """How to build each input of a Dynamo graph of ``step(packed_scalars, *columns)``.

    Dynamo records in each placeholder the source of its value: the packed scalars, a column, or
    the length of one of them (a symbolic size). Each input becomes ``(column or SCALARS, is its
    length)``; ``None`` where any other source appears.
    """
    try:
        from torch._dynamo.source import GetItemSource, LocalSource, TensorProperty, TensorPropertySource
    except ImportError:  # a torch that moved Dynamo's sources: no direct calls
        return None

    def position(source: Any) -> int | None:
        if isinstance(source, LocalSource) and source.local_name == "packed_scalars":
            return SCALARS
        if (
            isinstance(source, GetItemSource)
            and isinstance(source.base, LocalSource)
            and source.base.local_name == "columns"
            and isinstance(source.index, int)
        ):
            return source.index
        return None

    plan = []
    for node in graph.graph.nodes:
        if node.op != "placeholder":
            continue
        graph_argument = node.meta.get("grapharg")
        if graph_argument is None or getattr(graph_argument, "pass_arg_as_tensor", False):
            return None
        source = graph_argument.source
        is_length = isinstance(source, TensorPropertySource)
        if is_length:
            if source.prop != TensorProperty.SIZE or source.idx != 0:
                return None
            source = source.base
        index = position(source)
        if index is None:
            return None
        plan.append((index, is_length))
    return plan


def bare_graph_call(
    graph: torch.fx.GraphModule, lowered: list[tuple[torch.fx.GraphModule, Callable[[list], Any]]]
) -> Callable[[list], Any] | None:
    """Inductor's own compiled graph, where AOTAutograd's wrappers around it would do nothing.

    The wrappers matter where AOTAutograd changed the inputs (deduplicated aliases, lifted
    parameters) or moved work out of the graph (outputs to return, input mutations replayed after
    it). The fused step returns nothing and mutates only its own distinct, flat inputs, which the
    graph itself writes; one lowered graph with Dynamo's inputs and no outputs shows that.
    """
    if len(lowered) != 1:
        return None
    inner_graph, output_code = lowered[0]
    placeholders = [node for node in graph.graph.nodes if node.op == "placeholder"]
    inner_placeholders = [node for node in inner_graph.graph.nodes if node.op == "placeholder"]
    outputs = [node for node in inner_graph.graph.nodes if node.op == "output"]
    if len(inner_placeholders) != len(placeholders) or len(outputs) != 1 or tuple(outputs[0].args[0]) != ():
        return None
    # past its first call, Inductor's own entry point: the output code's __call__ only adds the
    # bookkeeping of autotuning caches and runtime metrics
    return getattr(output_code, "current_callable", None) or output_code


def compile_capturing_graphs(
    graph: torch.fx.GraphModule, example_inputs: list[Any], options: dict[str, Any]
) -> tuple[Callable[..., Any], list[tuple[int, bool]] | None, Callable[[list], Any] | None]:
    """Compile a Dynamo graph with Inductor as ``backend="inductor"`` would, and capture the result.

    Returns what Dynamo calls, the argument plan (:func:`argument_plan`) and a function taking the
    graph's inputs as a list: Inductor's entry point where AOTAutograd's wrappers do nothing
    (:func:`bare_graph_call`), else the wrapped graph; both ``None`` where the graph's inputs come
    from sources the plan does not recognise.
    """
    from torch._functorch import config as functorch_config
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    plan = argument_plan(graph)  # read before Inductor lowers the graph
    lowered: list[tuple[torch.fx.GraphModule, Callable[[list], Any]]] = []

    def compile_inner(inner_graph: torch.fx.GraphModule, *args: Any, **kwargs: Any) -> Any:
        output_code = compile_fx_inner(inner_graph, *args, **kwargs)
        lowered.append((inner_graph, output_code))
        return output_code

    # AOTAutograd's cache would return a wrapped graph without calling compile_inner (Inductor's own
    # FX graph cache still spares the C++ compile)
    patch = (
        functorch_config.patch(enable_autograd_cache=False)
        if hasattr(functorch_config, "enable_autograd_cache")
        else contextlib.nullcontext()
    )
    with patch:
        compiled = compile_fx(graph, example_inputs, inner_compile=compile_inner, config_patches=options)
    if plan is None:
        return compiled, None, None
    call = bare_graph_call(graph, lowered)
    if call is None:
        call = lambda arguments: compiled(*arguments)  # noqa: E731 - AOTAutograd's wrappers kept
    return compiled, plan, call


@contextlib.contextmanager
def rewriting_cpp_kernels(
    rewrites: Sequence[tuple[str, Callable[[str], tuple[str, int]]]], on_built: Callable[[str, int], None]
) -> Iterator[None]:
    """While compiling, rewrite each C++ kernel's source before it is built.

    ``rewrites`` pairs a trick's name with its rewrite (source -> (source, how many changes));
    those whose trick is on apply in order. Inductor hands every CPU kernel's source to
    ``AsyncCompile.cpp_pybinding``, also when it loads a graph from its FX graph cache, so the
    rewrites apply to both. The class attribute is swapped back on exit; a kernel another thread
    compiles meanwhile is rewritten too, which changes its speed, never its results. A rewritten
    kernel is built at once rather than in Inductor's worker pool, so that should a compiler
    reject it, the kernel as generated is built instead (with a warning, and the tricks that
    changed it switched off) and the step still runs. ``on_built`` receives each trick's count of
    changes in every rewritten kernel that built.
    """
    if not any(enabled(name) for name, _ in rewrites):
        yield
        return
    try:
        from torch._inductor.async_compile import AsyncCompile
    except ImportError:  # a torch that moved it: kernels stay as generated
        for name, _ in rewrites:
            _STATUS[name] = f"off: torch {torch.__version__} has no AsyncCompile"
        yield
        return
    build = AsyncCompile.cpp_pybinding
    if not callable(build):
        yield
        return

    # the parameter names are Inductor's, so that a call by keyword still works
    def build_rewritten(compiler: Any, argtypes: list[str], source_code: str) -> Any:
        rewritten, changes = source_code, {}
        for name, rewrite in rewrites:
            if enabled(name):
                rewritten, changes[name] = rewrite(rewritten)
        changed = [name for name, count in changes.items() if count]
        if not changed:
            return build(compiler, argtypes, source_code)
        try:
            kernel = build(compiler, argtypes, rewritten)
            kernel = kernel.result() if hasattr(kernel, "result") else kernel  # a pool's future
        except Exception as error:  # any compiler's complaint: does the generated source build?
            # where it does not either, the compiler itself is at fault: its error propagates and
            # the tricks stay on ([Note: falling back from the fused backend] in optimi/_fused/compilation.py)
            kernel = build(compiler, argtypes, source_code)
            warnings.warn(
                f"optimi: a CPU kernel rewritten by {changed} failed to build ({type(error).__name__}: "
                f"{error}); using the kernel as Inductor generated it (same results, slower)",
                RuntimeWarning,
                stacklevel=2,
            )
            for name in changed:
                _ENABLED[name] = False
                _STATUS[name] = f"off: a rewritten kernel failed to build ({type(error).__name__})"
            return kernel
        for name in changed:
            on_built(name, changes[name])
            note_engaged(name)
        return kernel

    AsyncCompile.cpp_pybinding = build_rewritten
    try:
        yield
    finally:
        AsyncCompile.cpp_pybinding = build


def convert_module_tensors(module: torch.nn.Module, convert: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Replace every parameter, gradient and buffer ``t`` of ``module`` by ``convert(t)``, in place.

    This is ``nn.Module._apply``, the private method behind ``module.to(dtype)``, used because it
    is what keeps a dtype change sound for every kind of model: parameters stay the same Python
    objects (an optimizer built on them keeps them), a tensor-subclass parameter such as an FSDP2
    DTensor is swapped whole with ``torch.utils.swap_tensors`` (assigning ``.data`` to a DTensor
    would leave its local shard in the old dtype), and FSDP2's own ``_apply`` then re-points its
    sharded storage at the new shards. Not a fused-backend trick: it has no switch.
    """
    module._apply(convert)


def at_end_of_backward(callback: Callable[[], None]) -> bool:
    """Run ``callback`` when the running backward pass ends; False where none runs on this thread.

    ``Variable._execution_engine.queue_callback``, the private hook FSDP and DDP use for the same
    purpose: the callbacks run, in the order queued, after every gradient of the backward is done.
    It raises outside the autograd engine's threads (DDP's communication hooks complete on the
    process group's threads), which is reported as False. Not a fused-backend trick: no switch.
    """
    try:
        torch.autograd.Variable._execution_engine.queue_callback(callback)
    except RuntimeError:
        return False
    return True
