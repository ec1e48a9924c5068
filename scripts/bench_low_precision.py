"""Low-precision update modes: AdamW step time and bytes per parameter, against torchao and heavyball.

Command lines (the tables in docs/benchmarks.md, "Low-precision modes", come from the first)::

    python scripts/bench_low_precision.py --torchao $PEERS/torchao --heavyball $PEERS/heavyball
    python scripts/bench_low_precision.py                         # optimi only
    python scripts/bench_low_precision.py --only step --rounds 21 # the step table alone, more samples
    python scripts/bench_low_precision.py --only memory           # the bytes/param table alone
    python scripts/bench_low_precision.py --smoke                 # tiny sizes, no peers, no fused: < 1 min

The peers are installed into directories of their own, never into the environment that holds
optimi, and imported from there (each directory is put first on ``sys.path``)::

    pip install --no-deps --target $PEERS/torchao torchao
    pip install --no-deps --target $PEERS/heavyball heavyball opt_einsum

A peer that fails to import or to step is reported in the output and the others still run.

**Step** (``--only step``): AdamW over ``--tensors`` bf16 parameters of ``--tensor-numel`` elements
each (default 20 x 2^18), lr 1e-3, betas (0.9, 0.99), eps 1e-6, weight decay 1e-2, for each of
optimi's ``low_precision`` modes (nearest, kahan, stochastic, remainder) on each backend (for-loop,
foreach, fused), and beside them in the same run:

* torchao's AdamW with ``bf16_stochastic_round=True`` (``torchao.optim._AdamW``, or ``AdamW``
  where the installed version has it under that name);
* heavyball's ``AdamW`` with ``param_ecc="bf16+16"`` (the bf16 parameter plus an int16 correction
  of its rounding error), once with its default float32 moments and once with
  ``storage_dtype="bfloat16"`` (bf16 moments, as in optimi).

Every implementation has its own parameters and gradients; they alternate step by step within each
round (gradients refreshed outside the timed region) and the median and minimum over the rounds
are reported, so a neighbour's load hits all of them alike. ``state B/param`` is the bytes of every
tensor in ``optimizer.state`` (walked through nested dicts and lists, as heavyball nests its state
per parameter view) divided by the number of parameter elements.

**Memory** (``--only memory``): a stack of ``--layers`` bias-free ``Linear(--width, --width)`` layers
(default 1024 wide, at 4 and at 16 layers) trained one step on random inputs, in bf16 with optimi's
AdamW in each mode and in fp32 as the baseline, each with and without gradient release, plus the
peers without it. Every configuration runs in a fresh process at both sizes, with
``MALLOC_MMAP_THRESHOLD_=65536`` (glibc returns freed blocks at once; see ``bench_memory.py``),
and reports:

* ``optimi.distributed.memory_report`` after the step (without release every gradient is still
  alive), per parameter: parameters, the peak of live gradients (``track_gradient_peak``), optimizer
  state less its Kahan/remainder part, the Kahan/remainder part, and ``bytes_per_param`` (params +
  peak grads + state);
* the state found by walking ``optimizer.state`` through nested containers (a note where it differs
  from the report's count);
* the operating system's view: the process's peak resident set (``VmHWM``) above its resident set
  just before the measured model is built, at both sizes, and its slope
  ``(peak_large - peak_small) / (params_large - params_small)``, which cancels everything that does
  not grow with the model (one layer's temporaries, activations, allocator slack). The peers compile
  their update in their first step; they first step an identical model once, and the peak is reset
  (``/proc/self/clear_refs``) before the measured one, so the compiler's transient memory stays out.

optimi runs its for-loop backend here, whose temporaries are one tensor's and so cancel in the slope.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib
import importlib.metadata
import inspect
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))
from bench_memory import MMAP_THRESHOLD  # noqa: E402
from bench_step import build, machine_description, refresh_grads, sync, time_steps  # noqa: E402

import optimi  # noqa: E402  (bench_step has put this repository first on the path)

MODES = ("nearest", "kahan", "stochastic", "remainder")
BACKENDS = {"for_loop": dict(foreach=False, fused=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
#: the same hyperparameters for every implementation (torchao's default betas differ: pinned here)
HYPER = dict(lr=1e-3, betas=(0.9, 0.99), eps=1e-6, weight_decay=1e-2)


# -- peers ------------------------------------------------------------------------------------------


def load_peer(directory: str, module: str) -> Any:
    """``module`` imported from ``directory`` (a ``pip install --target`` directory).

    The directory stays first on ``sys.path``: the peers import their own submodules lazily.
    Raises ImportError when the module is not there (or an installed copy elsewhere came first).
    """
    sys.path.insert(0, directory)
    imported = importlib.import_module(module)
    origin = Path(imported.__file__).resolve()
    if not origin.is_relative_to(Path(directory).resolve()):
        raise ImportError(f"{module} was imported from {origin}, not from {directory}")
    return imported


def peer_version(module: Any, distribution: str) -> str:
    version = getattr(module, "__version__", None)
    if version is None:
        try:
            version = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            version = "?"
    return str(version)


def torchao_adamw(directory: str) -> tuple[str, Callable]:
    """torchao's AdamW with bf16 stochastic rounding: its label and a builder over a parameter list."""
    load_peer(directory, "torchao")
    torchao_optim = importlib.import_module("torchao.optim")
    version = peer_version(sys.modules["torchao"], "torchao")
    for name in ("_AdamW", "AdamW"):  # private name in torchao 0.1x; either must take the flag
        cls = getattr(torchao_optim, name, None)
        if cls is not None and "bf16_stochastic_round" in inspect.signature(cls).parameters:
            label = f"torchao {version} {name}(bf16_stochastic_round=True)"
            return label, functools.partial(cls, **HYPER, bf16_stochastic_round=True)
    raise ImportError(f"torchao {version}: no AdamW class taking bf16_stochastic_round in torchao.optim")


def heavyball_adamw(directory: str, storage_dtype: str, param_ecc: bool = True) -> tuple[str, Callable]:
    """heavyball's AdamW, moments stored in ``storage_dtype``; with ``param_ecc="bf16+16"`` or without."""
    heavyball = load_peer(directory, "heavyball")
    version = peer_version(heavyball, "heavyball")
    cls = getattr(heavyball, "AdamW", None)
    if cls is None or "param_ecc" not in inspect.signature(cls).parameters:
        raise ImportError(f"heavyball {version}: no AdamW taking param_ecc")
    moments = {"float32": "fp32", "bfloat16": "bf16"}[storage_dtype]
    if not param_ecc:
        label = f"heavyball {version} AdamW, {moments} moments"
        return label, functools.partial(cls, **HYPER, storage_dtype=storage_dtype)
    label = f"heavyball {version} AdamW(param_ecc='bf16+16'), {moments} moments"
    return label, functools.partial(cls, **HYPER, param_ecc="bf16+16", storage_dtype=storage_dtype)


def state_nbytes(state: Any) -> int:
    """Bytes of every tensor in an optimizer state, walking nested dicts, lists and tuples.

    torchao's 8-bit state tensors (a subclass whose ``nbytes`` is that of its logical dtype) count
    the codes and scales they hold.
    """
    if torch.is_tensor(state):
        if hasattr(state, "codes") and hasattr(state, "scale"):  # torchao's OptimState8bit
            return state.codes.nbytes + state.scale.nbytes
        return state.nbytes
    if isinstance(state, dict):
        return sum(state_nbytes(value) for value in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_nbytes(value) for value in state)
    return 0


# -- step time --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One row of the step table."""

    #: the implementation, as printed
    label: str
    #: the rounding of the bf16 writes, as printed (an optimi mode, or the peer's equivalent)
    mode: str
    #: the optimi backend ("for_loop", "foreach", "fused"), or None for a peer
    backend: str | None
    #: builds the optimizer over a list of parameters
    make: Callable[[list[torch.Tensor]], torch.optim.Optimizer]
    #: the parameters' dtype (bench_step's names): bf16, or fp32 for the torch.optim baseline
    dtype: str = "bf16"


def candidates(args: argparse.Namespace, notes: list[str]) -> list[Candidate]:
    """optimi's modes on each backend, then the peers that import (failures go to ``notes``)."""
    rows = []
    for backend in args.backends:
        for mode in args.modes:
            flags = dict(BACKENDS[backend], low_precision=mode)
            rows.append(
                Candidate(
                    f"optimi {backend.replace('_', '-')}",
                    mode,
                    backend,
                    lambda params, kw=flags: optimi.AdamW(params, **HYPER, **kw),
                )
            )
    # the baseline every mode is measured against: fp32 parameters and state, torch's fused kernel
    fused_fp32 = functools.partial(torch.optim.AdamW, **HYPER, fused=True)
    rows.append(Candidate("torch.optim.AdamW(fused=True), fp32 parameters", "none (fp32)", None, fused_fp32, "fp32"))
    peers = []
    if args.torchao:
        peers.append(("torchao", "stochastic", lambda: torchao_adamw(args.torchao)))
    if args.heavyball:
        for storage in ("float32", "bfloat16"):
            peers.append(("heavyball", "nearest + int16 ecc", lambda s=storage: heavyball_adamw(args.heavyball, s)))
        peers.append(("heavyball", "nearest", lambda: heavyball_adamw(args.heavyball, "bfloat16", param_ecc=False)))
    for name, mode, load in peers:
        try:
            label, make = load()
        except Exception as error:  # a peer that will not import is reported, the rest still run
            notes.append(f"{name}: import failed: {type(error).__name__}: {error}")
            continue
        rows.append(Candidate(label, mode, None, make))
    return rows


@dataclass
class Timed:
    """A candidate built over its own parameters and gradients (``bench_step.Implementation``)."""

    candidate: Candidate
    impl: Any
    #: bytes of optimizer state per parameter element, after the first steps
    state_bytes: float

    @property
    def median(self) -> float:
        return statistics.median(self.impl.samples)

    @property
    def fastest(self) -> float:
        """The minimum over the rounds: the least disturbed sample on a shared machine."""
        return min(self.impl.samples)


def step_table(args: argparse.Namespace, notes: list[str]) -> list[str]:
    """Time every candidate, alternating step by step over the rounds; the Markdown table's lines."""
    device = torch.device(args.device)
    numel = args.tensors * args.tensor_numel
    split = (1 / args.tensors,) * args.tensors
    timed = []
    for index, row in enumerate(candidates(args, notes)):
        try:
            impl = build(row.label, row.dtype, row.make, numel, device, seed=index, split=split)
            # the first steps allocate the state and, for compiled paths, compile
            for _ in range(2):
                refresh_grads(impl)
                impl.optimizer.step()
            sync(device)
        except Exception as error:  # e.g. a compile that fails on this machine: report, go on
            notes.append(f"{row.label} ({row.mode}): first steps failed: {type(error).__name__}: {error}")
            continue
        state_bytes = sum(state_nbytes(s) for s in impl.optimizer.state.values()) / numel
        timed.append(Timed(row, impl, state_bytes))
        print(f"# ready: {row.label}, {row.mode}", file=sys.stderr, flush=True)
    for _ in range(args.rounds):
        for t in timed:
            t.impl.samples.append(time_steps(t.impl, args.inner, device))

    nearest = {t.candidate.backend: t for t in timed if t.candidate.backend and t.candidate.mode == "nearest"}
    lines = [
        "| implementation | rounding of bf16 writes | ms/step (median) | ms/step (min) | state B/param "
        "| vs nearest, same backend (median / min) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for t in timed:
        base = nearest.get(t.candidate.backend)
        ratio = f"{t.median / base.median:.2f}x / {t.fastest / base.fastest:.2f}x" if base else "-"
        lines.append(
            f"| {t.candidate.label} | {t.candidate.mode} | {t.median * 1e3:.2f} | {t.fastest * 1e3:.2f} "
            f"| {t.state_bytes:.2f} | {ratio} |"
        )
    return lines + [""] + comparisons(timed)


def comparisons(timed: list[Timed]) -> list[str]:
    """One line per peer: its median against optimi's fastest backend in the matching mode."""
    lines = []
    for peer in (t for t in timed if t.candidate.backend is None):
        mode = {"stochastic": "stochastic", "nearest": "nearest", "none (fp32)": "nearest"}.get(
            peer.candidate.mode, "remainder"
        )
        ours = [t for t in timed if t.candidate.backend and t.candidate.mode == mode]
        if not ours:
            continue
        ours = min(ours, key=lambda t: t.median)
        lines.append(
            f"{peer.candidate.label}: {peer.median * 1e3:.2f} ms (min {peer.fastest * 1e3:.2f}), "
            f"{peer.state_bytes:.2f} B/param of state; optimi {ours.candidate.backend.replace('_', '-')} {mode}: "
            f"{ours.median * 1e3:.2f} ms (min {ours.fastest * 1e3:.2f}), {ours.state_bytes:.2f} B/param; "
            f"the peer takes {peer.median / ours.median:.2f}x the time (min: {peer.fastest / ours.fastest:.2f}x)"
        )
    # the goal: every optimi mode (on its fastest backend) faster than every peer and the fp32 baseline
    peers = [t for t in timed if t.candidate.backend is None]
    best_per_mode = {}
    for t in (t for t in timed if t.candidate.backend):
        if t.candidate.mode not in best_per_mode or t.median < best_per_mode[t.candidate.mode].median:
            best_per_mode[t.candidate.mode] = t
    if peers and best_per_mode:
        slowest = max(best_per_mode.values(), key=lambda t: t.median)
        fastest_peer = min(peers, key=lambda t: t.median)
        verdict = "faster" if slowest.median < fastest_peer.median else "NOT faster"
        lines.append(
            f"slowest optimi mode on its fastest backend: {slowest.candidate.mode} "
            f"({slowest.candidate.backend.replace('_', '-')}) {slowest.median * 1e3:.2f} ms; fastest other "
            f"implementation: {fastest_peer.candidate.label} {fastest_peer.median * 1e3:.2f} ms: every optimi mode "
            f"is {verdict} than every other implementation"
        )
    return lines


# -- memory -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemorySetup:
    """One row of the memory table."""

    #: the row's label
    name: str
    #: parameter dtype: "float32" or "bfloat16"
    dtype: str
    #: "optimi", "torchao" or "heavyball"
    library: str = "optimi"
    #: optimi's low_precision mode (None: not a low-precision run); heavyball: its storage_dtype
    mode: str | None = None
    #: gradient release (optimi only): each parameter is stepped in backward and its gradient freed
    release: bool = False


def memory_setups() -> dict[str, MemorySetup]:
    setups = {}
    for release in (False, True):
        suffix = "_release" if release else ""
        setups["fp32" + suffix] = MemorySetup("fp32 AdamW", "float32", release=release)
        for mode in MODES:
            setups[mode + suffix] = MemorySetup(f"bf16 AdamW, {mode}", "bfloat16", mode=mode, release=release)
    setups["torchao"] = MemorySetup("torchao AdamW, bf16 stochastic rounding", "bfloat16", library="torchao")
    setups["heavyball_fp32"] = MemorySetup(
        "heavyball AdamW, param_ecc bf16+16, fp32 moments", "bfloat16", library="heavyball", mode="float32"
    )
    setups["heavyball_bf16"] = MemorySetup(
        "heavyball AdamW, param_ecc bf16+16, bf16 moments", "bfloat16", library="heavyball", mode="bfloat16"
    )
    return setups


SETUPS = memory_setups()


def _status_bytes(field: str) -> int | None:
    """A ``/proc/self/status`` memory field (``VmHWM``, ``VmRSS``) in bytes; None where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss() -> int:
    """This process's peak resident set in bytes: VmHWM, else getrusage's ru_maxrss (KiB on Linux)."""
    peak = _status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    rss = _status_bytes("VmRSS")
    if rss is None:
        import psutil

        rss = psutil.Process().memory_info().rss
    return rss


def reset_peak_rss() -> bool:
    """Set VmHWM back to the current resident set (Linux >= 4.0: ``5`` into ``/proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def train_one_step(setup: MemorySetup, layers: int, width: int, peers: dict[str, str | None]):
    """A model of ``layers`` Linear layers and its optimizer, after one step; returns both."""
    from torch import nn

    from optimi.distributed.memory import track_gradient_peak

    dtype = getattr(torch, setup.dtype)
    # built directly in its dtype: a float32 model cast afterwards would put 4 B/param into the peak
    model = nn.Sequential(*(nn.Linear(width, width, bias=False, dtype=dtype) for _ in range(layers)))
    params = list(model.parameters())
    if setup.library == "torchao":
        optimizer = torchao_adamw(peers["torchao"])[1](params)
    elif setup.library == "heavyball":
        optimizer = heavyball_adamw(peers["heavyball"], setup.mode)[1](params)
    else:
        optimizer = optimi.AdamW(
            params, **HYPER, low_precision=setup.mode, foreach=False, fused=False, gradient_release=setup.release
        )
    track_gradient_peak(model)
    if setup.release:
        # track_gradient_peak's hooks run first and see each gradient before release frees it
        optimi.prepare_for_gradient_release(model, optimizer, ignore_existing_hooks=True)
    # one step: it allocates the state while every gradient is alive (without release), or steps
    # and frees each gradient inside backward (with release), so it reaches the training peak
    inputs = torch.randn(4, width, generator=torch.Generator().manual_seed(1)).to(dtype)
    model(inputs).float().pow(2).mean().backward()
    optimizer.step()  # a no-op under gradient release
    return model, optimizer


def memory_worker(key: str, layers: int, width: int, peers: dict[str, str | None]) -> dict:
    """Train setup ``key`` for one step at one size; the report and peak RSS as a dict."""
    from optimi.distributed import memory_report

    setup = SETUPS[key]
    torch.manual_seed(0)
    peak_reset = None
    if setup.library != "optimi":
        # the peers compile their update in the first step; that compile's transient memory is about
        # the same at both sizes and can exceed a small model's training peak, which would shrink
        # the slope. So the same model is stepped once first (compiling what the measured step
        # reuses), freed, and the peak is measured from there.
        # Not all of the warm-up's tensors are freed (the RSS drops by less than they hold), so the
        # peak is taken above the RSS right before the measured model, as for optimi's rows.
        warm = train_one_step(setup, layers, width, peers)
        del warm
        gc.collect()
        peak_reset = reset_peak_rss()
    base = current_rss()
    model, optimizer = train_one_step(setup, layers, width, peers)
    report = memory_report(model, optimizer)  # without release the gradients are still alive here
    return {
        "key": key,
        "params": sum(p.numel() for p in model.parameters()),
        "report": asdict(report.ranks[0]),
        "state_walk": state_nbytes(optimizer.state),
        "peak_rss": peak_rss() - base,  # above the RSS before the measured model was built
        "peak_reset": peak_reset,
    }


def run_worker(key: str, layers: int, args: argparse.Namespace) -> dict:
    """``memory_worker`` in a fresh process (its own peak RSS)."""
    cmd = [sys.executable, __file__, "--memory-worker", key, "--layers", str(layers), "--width", str(args.width)]
    cmd += [f"--threads={args.threads}"]
    for flag in ("torchao", "heavyball"):
        if getattr(args, flag):
            cmd += [f"--{flag}", getattr(args, flag)]
    out = subprocess.run(cmd, env=dict(os.environ, **MMAP_THRESHOLD), capture_output=True, text=True, timeout=600)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"exit {out.returncode}: {out.stderr.strip().splitlines()[-1:] or out.stdout[-500:]}")


def memory_table(args: argparse.Namespace, notes: list[str]) -> list[str]:
    keys = [k for k in args.setups if SETUPS[k].library == "optimi" or getattr(args, SETUPS[k].library)]
    small, large = args.layers
    lines = [
        "| setup | gradient release | params | grads (peak) | moments | kahan / remainder | memory_report total "
        f"| state by walk | peak RSS above base, {small} layers | same, {large} layers | RSS slope |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key in keys:
        setup = SETUPS[key]
        print(f"# memory: {key} at {small} and {large} layers", file=sys.stderr, flush=True)
        try:
            lo, hi = run_worker(key, small, args), run_worker(key, large, args)
        except Exception as error:
            notes.append(f"memory {key}: {type(error).__name__}: {error}")
            continue
        if False in (lo["peak_reset"], hi["peak_reset"]):
            notes.append(f"{setup.name}: could not reset the peak RSS after the compiling warm-up step")
        r, n = hi["report"], hi["params"]
        grads = max(r["grads"], r["grads_peak"] or 0)
        total = (r["params"] + grads + r["optimizer_states"]) / n
        slope = (hi["peak_rss"] - lo["peak_rss"]) / (hi["params"] - lo["params"])
        walk = hi["state_walk"] / n
        if hi["state_walk"] != r["optimizer_states"]:
            notes.append(
                f"{setup.name}: memory_report counts {r['optimizer_states'] / n:.2f} B/param of optimizer state, "
                f"walking optimizer.state (nested) finds {walk:.2f}"
            )
        lines.append(
            f"| {setup.name} | {'yes' if setup.release else 'no'} | {r['params'] / n:.2f} | {grads / n:.2f} "
            f"| {(r['optimizer_states'] - r['kahan']) / n:.2f} | {r['kahan'] / n:.2f} | {total:.2f} | {walk:.2f} "
            f"| {lo['peak_rss'] / 2**20:.0f} MiB | {hi['peak_rss'] / 2**20:.0f} MiB | {slope:.2f} |"
        )
        sys.stdout.flush()
    small_params, large_params = (layers * args.width**2 for layers in args.layers)
    lines.append("")
    lines.append(
        f"Per parameter, at {large} layers of Linear({args.width}, {args.width}) ({large_params:,} params); "
        f"RSS slope between {small_params:,} and {large_params:,} params."
    )
    return lines


# -- main -------------------------------------------------------------------------------------------


def source_version() -> str:
    """The commit of the optimi being measured, and whether ``optimi/`` differs from it."""
    package = Path(optimi.__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=package, capture_output=True, text=True, check=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--", "."], cwd=package, capture_output=True, text=True, check=True
        ).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return f"{optimi.__version__} at {package} (not a git checkout)"
    changed = [line for line in changed if line.strip()]
    dirty = f", {len(changed)} files of optimi/ changed since" if changed else ""
    return f"{optimi.__version__}, commit {commit}{dirty}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["step", "memory"], default=None, help="run one part (default: both)")
    parser.add_argument("--torchao", metavar="DIR", default=None, help="import torchao from DIR (pip --target)")
    parser.add_argument("--heavyball", metavar="DIR", default=None, help="import heavyball from DIR (pip --target)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu", help="step part: cpu or cuda (the memory part is CPU only)")
    parser.add_argument("--tensors", type=int, default=20, help="step part: number of bf16 parameters")
    parser.add_argument("--tensor-numel", type=int, default=2**18, help="step part: elements per parameter")
    parser.add_argument("--rounds", type=int, default=15, help="step part: timed samples per implementation")
    parser.add_argument("--inner", type=int, default=1, help="step part: steps per sample")
    parser.add_argument("--modes", default=",".join(MODES), help="step part: optimi low_precision modes")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="step part: optimi backends")
    parser.add_argument("--width", type=int, default=1024, help="memory part: width of each Linear layer")
    parser.add_argument("--layers", default="4,16", help="memory part: the two model depths for the RSS slope")
    parser.add_argument("--setups", default=",".join(SETUPS), help=f"memory part: any of {','.join(SETUPS)}")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 2 rounds, no fused backend, few setups")
    parser.add_argument("--memory-worker", choices=sorted(SETUPS), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_worker is not None:
        result = memory_worker(args.memory_worker, int(args.layers), args.width, vars(args))
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    if args.smoke:
        args.tensors, args.tensor_numel, args.rounds, args.backends = 2, 2**12, 2, "for_loop,foreach"
        args.width, args.layers, args.setups = 64, "2,4", "kahan,remainder_release"
        args.torchao = args.heavyball = None
    args.modes, args.backends, args.setups = args.modes.split(","), args.backends.split(","), args.setups.split(",")
    args.layers = [int(n) for n in args.layers.split(",")]
    unknown = [m for m in args.modes if m not in MODES] + [b for b in args.backends if b not in BACKENDS]
    unknown += [s for s in args.setups if s not in SETUPS]
    if unknown or len(args.layers) != 2 or args.layers[0] >= args.layers[1]:
        parser.error(f"unknown modes/backends/setups {unknown}, or --layers not two increasing depths")

    load = os.getloadavg()
    print(f"# bench_low_precision: {' '.join(sys.argv) if argv is None else ' '.join(argv)}")
    print(f"# {machine_description(torch.device(args.device))}; torch {torch.__version__}; threads {args.threads}")
    print(f"# optimi: {source_version()}")
    print(f"# load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    notes: list[str] = []
    if args.only in (None, "step"):
        numel = args.tensors * args.tensor_numel
        print(
            f"\nAdamW step, {args.tensors} bf16 tensors x {args.tensor_numel:,} elements ({numel:,}), "
            f"{args.rounds} rounds x {args.inner} step(s), implementations alternating:\n"
        )
        started = time.perf_counter()
        print("\n".join(step_table(args, notes)), flush=True)
        print(f"\n# step part: {time.perf_counter() - started:.0f} s, load average {os.getloadavg()[0]:.2f}")
        gc.collect()
    if args.only in (None, "memory"):
        started = time.perf_counter()
        print("\nBytes per parameter (AdamW, a stack of bias-free Linear layers, one step, a fresh process each):\n")
        print("\n".join(memory_table(args, notes)), flush=True)
        print(f"\n# memory part: {time.perf_counter() - started:.0f} s")
    load = os.getloadavg()
    print(f"# load average at end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    for note in notes:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
