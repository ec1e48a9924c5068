"""``run_fused``: each row of a param group to its compiled configuration, and back when compiling fails."""

from __future__ import annotations

import functools
import warnings
import weakref
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor

from optimi._columns import Columns
from optimi._fused.compilation import CompiledStep, FusedCompileError, PackedCheckFailed, label_of, make_step
from optimi._fused.masters import through_master
from optimi._fused.ops import SPLIT
from optimi._fused.packing import pairs_fit
from optimi._fused.quantized import CODES_IN_KERNEL, coded_row
from optimi._low_precision import MasterRows, hash_offset
from optimi._quantization import BLOCK_SIZE
from optimi._torch_internals import TRICKS, enabled, works_but_slower

__all__ = ["FALLBACK_BACKEND", "compiled_configurations", "fallen_back_configurations", "run_fused"]

#: the backend that steps a fused configuration whose compile failed, set by the optimizer while it
#: steps a group for which it chose the fused backend itself; ``None`` (an explicit ``fused=True``,
#: or a functional call with ``backend="fused"``) raises ``FusedCompileError`` instead ([Note:
#: falling back from the fused backend] in ``compilation.py``)
FALLBACK_BACKEND: ContextVar[str | None] = ContextVar("optimi_fused_fallback", default=None)


# (packed, update, device type, dtypes and None pattern, static switches, scalar names, tricks on)
# -> compiled step
COMPILED: dict[tuple, CompiledStep] = {}
# configurations whose packed kernel failed to compile: they run the plain kernel
PACKING_FAILED: set[tuple] = set()
# configurations whose compile failed where the optimizer chose the fused backend itself -> (the
# backend that steps them instead, the failure) ([Note: falling back from the fused backend])
FELL_BACK: dict[tuple, tuple[str, FusedCompileError]] = {}


def compiled_configurations() -> int:
    """How many fused configurations have been compiled in this process (for tests and docs)."""
    return len(COMPILED)


def fallen_back_configurations() -> dict[tuple, str]:
    """Configurations whose compile failed, and the backend that steps them instead (tests, docs)."""
    return {config: backend for config, (backend, _) in FELL_BACK.items()}


def _is_static(value: Any) -> bool:
    """Values that select the structure of the update and are baked into the compiled code."""
    return value is None or isinstance(value, (bool, str))


def run_fused(
    update: Callable[..., None],
    columns: Columns,
    scalars: dict[str, Any],
    masters: MasterRows | None = None,
) -> dict[str, list[int]]:
    """Run ``update`` once per tensor as a compiled, single-pass kernel ([Note: the fused backend]).

    ``columns`` are lists over the parameters (``None`` for an absent optional tensor; a state
    column may instead hold numbers, one scalar per tensor); ``scalars`` are the update's keyword
    arguments. Numbers (and 0-d tensors) become runtime inputs, ``bool``/``None``/``str`` are
    compile-time switches. The parameters in ``masters`` (bf16, ``"stochastic"``/``"remainder"``)
    are stepped through a float32 master built and written back in the kernel ([Note: one-pass
    float32 masters] in ``masters.py``). The 8-bit states listed in :data:`CODES_IN_KERNEL` arrive
    as codes and are dequantized and quantized back in the kernel ([Note: 8-bit states in the fused
    kernel] in ``quantized.py``).

    Returns the rows (indices into ``columns``) that another backend must step, by backend: a
    strided parameter, whose memory cannot be viewed flat, goes to ``"for_loop"``; a configuration
    that fails to compile goes to :data:`FALLBACK_BACKEND` where one is set and raises
    :class:`FusedCompileError` otherwise ([Note: falling back from the fused backend]).
    """
    static = {k: v for k, v in scalars.items() if _is_static(v)}
    numbers = {k: v for k, v in scalars.items() if k not in static}
    for name, value in numbers.items():
        if not isinstance(value, (int, float, Tensor)):
            raise TypeError(f"the fused backend takes numbers or bool/None/str switches as scalars; {name}={value!r}")
    names = tuple(numbers)
    static_key = tuple(sorted(static.items()))
    shared = [_as_float(v) for v in numbers.values()]
    packed_on: dict[torch.device, Tensor] = {}
    # the switches that change how a step compiles; packing has its own place in the key
    tricks = tuple(enabled(name) for name in TRICKS if name != "packed_pairs")
    pack_pairs = enabled("packed_pairs")
    # float32-master rows keep packed columns where only the speed comparison of plain rows turned
    # packing off: their plain kernel runs int16 columns as a scalar loop ([Note: one-pass float32 masters])
    pack_master_pairs = works_but_slower("packed_pairs")

    # rows whose compiled graph is called directly run last, one after the other: the Python
    # between two kernels runs on caches the previous kernel flushed ([Note: calling the compiled
    # graph directly])
    direct_calls: list[tuple[Callable[[list], Any], list]] = []
    elsewhere: dict[str, list[int]] = {}  # backend -> rows it steps
    coded = CODES_IN_KERNEL.get()
    for index, row in enumerate(zip(*columns.arguments())):
        param = row[0]
        if param.numel() == 0:
            continue
        rule, master_mode, quantized = update, None, False
        if coded is not None:  # the rule reads codes: it dequantizes and quantizes them itself
            rule, row, quantized = coded_row(update, row, coded)
        master = masters.rows.get(id(param)) if masters is not None else None
        if master is not None:
            # the master's write-back travels as one more state column: the remainder, or the
            # hash offset as a per-row number (a runtime input: no recompile per step or shard)
            master_mode = masters.mode
            rule = through_master(rule, master_mode)
            if master_mode == "remainder":
                written_with: Tensor | int | None = master.remainder
            else:
                written_with = hash_offset(master.key, master.first_index)
            row = (*row[:-1], written_with, row[-1])
        # one pass over the row: it runs once per parameter and step ([Note: calling the compiled
        # graph directly] on why per-call Python matters)
        dtypes: list[Any] = []
        number_columns: list[int] = []
        contiguous, packable = True, pack_master_pairs if master is not None else pack_pairs
        for column, t in enumerate(row):
            if isinstance(t, Tensor):
                dtypes.append(t.dtype)
                contiguous = contiguous and t.is_contiguous()
                packable = packable and pairs_fit(t)
            elif t is None:
                dtypes.append(None)
            else:
                dtypes.append("number")
                number_columns.append(column)
        if not contiguous:  # a strided layout cannot be flattened to a view
            if quantized:  # codes_in_kernel lets only contiguous tensors through
                raise ValueError("a parameter with 8-bit states in the fused kernel needs contiguous tensors")
            elsewhere.setdefault("for_loop", []).append(index)
            continue
        if master is not None:
            dtypes[0] = torch.int16  # the kernel reads and writes the parameter's bits (plain rows)
        device = param.device
        config = (rule, device.type, tuple(dtypes), static_key, names, tricks)
        failed = FELL_BACK.get(config)
        if failed is not None:  # compiled and failed before: never again
            if FALLBACK_BACKEND.get() is None:
                raise _explicit_failure(failed[1])
            if not quantized:  # a coded row runs its Python step below ([Note: 8-bit states in the fused kernel])
                elsewhere.setdefault(failed[0], []).append(index)
                continue
        packed = packable and device.type == "cpu" and config not in PACKING_FAILED
        key = (packed, *config)
        step = COMPILED.get(key)
        if step is None:
            label = label_of(update, device.type, dtypes, packed, master_mode)
            if quantized:
                label = f"{label[:-1]}, 8-bit states)"
            step = COMPILED[key] = make_step(rule, names, static, tuple(number_columns), device.type, packed, label)
            if packed:
                step.plain_step = functools.partial(
                    _plain_step_of, key, rule, dtypes, names, static, number_columns, master_mode
                )
                step.times_plain = master is None
        if number_columns:
            scalars_tensor = _pack_scalars(shared + [_as_float(row[i]) for i in number_columns], device)
        else:
            scalars_tensor = packed_on.get(device)
            if scalars_tensor is None:
                scalars_tensor = packed_on[device] = _pack_scalars(shared, device)
        flat = _blocked_row(row, master is not None) if quantized else _flat_row(row, packed, master is not None)
        if failed is not None:
            step.python_step(scalars_tensor, *flat)
            continue
        call = step.direct_call(scalars_tensor, flat)
        if call is not None:
            direct_calls.append(call)
            continue
        try:
            if packed:
                _run_packed(step, config, scalars_tensor, row, master is not None)
            else:
                step(scalars_tensor, *flat)
        except FusedCompileError as error:
            backend = FALLBACK_BACKEND.get()
            if backend is None:
                raise _explicit_failure(error) from error.__cause__
            FELL_BACK[config] = (backend, error)
            instead = "its step uncompiled" if quantized else f"the {backend} backend"
            warnings.warn(
                f"{error}; this configuration now runs {instead} (same math, slower)",
                RuntimeWarning,
                stacklevel=4,
            )
            if quantized:  # the other backends' rules cannot read codes: the same step, eagerly
                step.python_step(scalars_tensor, *flat)
            else:
                elsewhere.setdefault(backend, []).append(index)
    for call_graph, arguments in direct_calls:
        call_graph(arguments)
    return elsewhere


def _explicit_failure(error: FusedCompileError) -> FusedCompileError:
    return FusedCompileError(
        f"{error}. The fused backend was asked for explicitly (fused=True or triton=True); "
        "leave fused=None to fall back to the for-loop/foreach backend, or pass fused=False"
    )


def _flat_row(row: Sequence[Any], packed: bool, parameter_bits: bool) -> list[Tensor | None]:
    """A row's flat columns (``None`` for a number or an absent tensor) as its kernel takes them.

    ``packed``: every column as int32 pairs; ``parameter_bits``: a plain row's parameter as its
    int16 bits ([Note: one-pass float32 masters] in ``masters.py``).
    """
    flat = [_flat(t, torch.int32 if packed else None) if isinstance(t, Tensor) else None for t in row]
    if parameter_bits and not packed:
        flat[0] = _flat(row[0], torch.int16)
    return flat


def _blocked_row(row: Sequence[Any], parameter_bits: bool) -> list[Tensor | None]:
    """A row with 8-bit states as its kernel takes it ([Note: 8-bit states in the fused kernel]).

    Columns as long as the parameter as ``(blocks, BLOCK_SIZE)``, columns of one value per block
    (the scales) as ``(blocks, 1)``, others (a per-tensor sum) flat; ``parameter_bits``: the
    parameter as its int16 bits, as in :func:`_flat_row`.
    """
    numel = row[0].numel()
    blocked: list[Tensor | None] = []
    for t in row:
        if not isinstance(t, Tensor):
            blocked.append(None)
        elif t.numel() == numel:
            blocked.append(_flat(t, None, BLOCK_SIZE))
        elif t.numel() * BLOCK_SIZE == numel:
            blocked.append(_flat(t, None, 1))
        else:
            blocked.append(_flat(t))
    if parameter_bits:
        blocked[0] = _flat(row[0], torch.int16, BLOCK_SIZE)
    return blocked


def _run_packed(step: CompiledStep, config: tuple, scalars: Tensor, row: Sequence[Any], parameter_bits: bool) -> None:
    """Run a packed configuration; where it cannot be compiled or checked, switch to the plain kernel.

    The packed kernel relies on Inductor lowering int32/float32 bitcasts and shifts, which another
    release may not do, or do differently. A failure to compile surfaces before any tensor is
    written, and so does a failed self-check (it runs on a scratch row); the plain kernel then
    computes the same bits. Should the plain kernel fail to compile too, its
    :class:`FusedCompileError` propagates.
    """
    try:
        step(scalars, *_flat_row(row, True, parameter_bits))
        return
    except FusedCompileError as error:
        packed_error: FusedCompileError | None = error
    except PackedCheckFailed:
        packed_error = None  # switch_off has warned once for the process
    PACKING_FAILED.add(config)
    assert step.plain_step is not None  # every packed step is given its plain step
    plain = step.plain_step()
    # where the compiler fails altogether this raises too, and the caller's fallback warns once
    plain(scalars, *_flat_row(row, False, parameter_bits))
    if packed_error is not None:
        warnings.warn(
            f"optimi: the packed bf16 fused kernel failed to compile ({packed_error}); using the plain fused "
            "kernel for this configuration (same results, slower on CPU)",
            RuntimeWarning,
            stacklevel=5,
        )


def _plain_step_of(
    packed_key: tuple,
    update: Callable[..., None],
    dtypes: Sequence[Any],
    names: tuple[str, ...],
    static: dict[str, Any],
    number_columns: Sequence[int],
    master_mode: str | None,
) -> CompiledStep:
    """The plain kernel's compiled step for the configuration of a packed key (built once)."""
    plain_key = (False, *packed_key[1:])
    plain = COMPILED.get(plain_key)
    if plain is None:
        device_type = packed_key[2]
        label = label_of(update, device_type, dtypes, False, master_mode)
        plain = make_step(update, names, static, tuple(number_columns), device_type, False, label)
        COMPILED[plain_key] = plain
    return plain


# (id of a tensor, the dtype it is viewed as, its width) -> (weak reference to the tensor, its flat
# view): parameters and states live across steps, and building a view costs ~3 µs, ten times a lookup
_FLAT_VIEWS: dict[tuple[int, torch.dtype | None, int | None], tuple[weakref.ref, Tensor]] = {}


def _flat(tensor: Tensor, as_dtype: torch.dtype | None = None, width: int | None = None) -> Tensor:
    """A 1-D tensor (or 2-D: ``width``) over ``tensor``'s (contiguous) memory that is not a view of it.

    A view would carry its base's shape into Dynamo's guards (one compile per parameter rank).
    ``as_dtype``: the memory read as another dtype. ``torch.int32`` for a bf16 tensor gives
    element pairs ``(2i, 2i + 1)`` in word ``i`` ([Note: packed bf16 columns]); ``torch.int16``
    its bits ([Note: one-pass float32 masters] in ``masters.py``). ``width``: rows of that many
    elements instead, a static size for Dynamo (8-bit states' blocks, [Note: 8-bit states in the
    fused kernel] in ``quantized.py``). The result is cached while ``tensor`` lives and still
    covers the same memory (``tensor.data = ...`` or a resize moves it).
    """
    key = (id(tensor), as_dtype, width)
    cached = _FLAT_VIEWS.get(key)
    dtype = tensor.dtype if as_dtype is None else as_dtype
    # elements of ``dtype`` per element of the tensor's own: 1, or 1/2 for pairs in int32 words
    per_word = dtype.itemsize // tensor.dtype.itemsize
    length = tensor.numel() // per_word
    if width is not None:
        length //= width
    if cached is not None:
        owner, flat = cached
        if owner() is tensor and flat.data_ptr() == tensor.data_ptr() and flat.shape[0] == length:
            return flat
    flat = tensor.new_empty(0, dtype=dtype)
    offset = tensor.storage_offset() // per_word
    if width is None:
        flat.set_(tensor.untyped_storage(), offset, (length,), (1,))
    else:
        flat.set_(tensor.untyped_storage(), offset, (length, width), (width, 1))
        torch._dynamo.mark_static(flat, 1)
    _FLAT_VIEWS[key] = (weakref.ref(tensor, lambda _, key=key: _FLAT_VIEWS.pop(key, None)), flat)
    return flat


def _as_float(value: Any) -> float | Tensor:
    if isinstance(value, Tensor):
        return value.detach().to(torch.float64).reshape(())
    return float(value)


def _pack_scalars(values: list[float | Tensor], device: torch.device) -> Tensor:
    """All numeric hyperparameters of one call, then the splitting constants, as one float64 tensor."""
    values = [*values, *SPLIT.values()]
    if any(isinstance(v, Tensor) for v in values):
        return torch.stack([torch.as_tensor(v, dtype=torch.float64).to(device) for v in values])
    packed = torch.tensor(values, dtype=torch.float64)
    return packed if device.type == "cpu" else packed.to(device, non_blocking=True)
