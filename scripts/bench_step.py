"""Optimizer step throughput: optimi's three backends against torch.optim, as % of memory bandwidth.

Command lines (the table in docs/benchmarks.md comes from the first)::

    python scripts/bench_step.py                                  # all optimizers, CPU, 10M elements, 2 threads
    python scripts/bench_step.py --optimizers adamw --rounds 15   # one optimizer, more samples
    python scripts/bench_step.py --optimizers adamw --compare-packing  # + the plain bf16 CPU kernel
    python scripts/bench_step.py --optimizers adamw --compare-hoisting # + CPU kernels as generated
    python scripts/bench_step.py --device cuda --numel 100000000  # on a GPU (synchronized timing)
    python scripts/bench_step.py --numel 200000 --rounds 2        # a quick smoke run
    python scripts/bench_step.py --optimizers adamw --torch-optimi DIR  # + torch-optimi's steps

An optimizer step is memory-bound, so every implementation is reported against the bandwidth
measured in the same run by an in-place add ``a += b`` (12 bytes per fp32 element):

* ``bytes/elem``: the minimum traffic of a step, each tensor touched once: the gradient read,
  the parameter, every optimizer state and the Kahan buffer read and written;
* ``GB/s``: ``bytes/elem * elements / time``; ``% bw``: that over the measured bandwidth;
* ``first step s``: the first step, including the one-time ``torch.compile`` of the fused path
  (Inductor's on-disk caches are disabled unless ``--warm-cache``, so it is a fresh machine's cost).

Implementations of one optimizer alternate round by round (the bandwidth probe too) and medians
are reported, so a neighbour's load hits all of them alike. Gradients are refreshed before every
sample (the for-loop and foreach backends use them as scratch space) outside the timed region.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import optimi  # noqa: E402
from optimi import _torch_internals  # noqa: E402

#: optimizer name -> (optimi class name, optimi kwargs, torch.optim class name or None, torch kwargs)
OPTIMIZERS: dict[str, tuple[str, dict, str | None, dict]] = {
    "adam": ("Adam", {}, "Adam", dict(betas=(0.9, 0.99), eps=1e-6)),
    "adamw": ("AdamW", {}, "AdamW", dict(betas=(0.9, 0.99), eps=1e-6, weight_decay=1e-2)),
    "adan": ("Adan", {}, None, {}),
    "lion": ("Lion", dict(weight_decay=1e-2), None, {}),
    "radam": ("RAdam", {}, "RAdam", dict(betas=(0.9, 0.99), eps=1e-6)),
    "ranger": ("Ranger", {}, None, {}),
    "sgd": ("SGD", dict(momentum=0.9), "SGD", dict(momentum=0.9)),
    "stableadamw": ("StableAdamW", {}, None, {}),
}
#: torch.optim classes that accept fused=True
TORCH_FUSED = {"Adam", "AdamW", "SGD"}
#: the split of the elements into parameters (a few large tensors, like a model's weights)
SPLIT = (0.4, 0.3, 0.2, 0.1)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Implementation:
    """One optimizer implementation over its own parameters and gradients."""

    name: str
    dtype_name: str
    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    optimizer: torch.optim.Optimizer
    bytes_per_element: int = 0
    first_step_s: float = float("nan")
    samples: list[float] = field(default_factory=list)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_tensors(
    numel: int, dtype: torch.dtype, device: torch.device, seed: int, split: tuple[float, ...] = SPLIT
) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    sizes = [int(numel * f) for f in split]
    sizes[-1] = numel - sum(sizes[:-1])
    return [(torch.randn(n, generator=generator) * 0.1).to(device=device, dtype=dtype) for n in sizes]


def build(
    label: str,
    dtype_name: str,
    make_optimizer: Callable,
    numel: int,
    device: torch.device,
    seed: int,
    split: tuple[float, ...] = SPLIT,
) -> Implementation:
    dtype = DTYPES[dtype_name]
    params = [p.requires_grad_() for p in make_tensors(numel, dtype, device, seed, split)]
    grads = make_tensors(numel, dtype, device, seed + 1, split)
    return Implementation(label, dtype_name, params, grads, make_optimizer(params))


def refresh_grads(impl: Implementation) -> None:
    for param, grad in zip(impl.params, impl.grads):
        if param.grad is None:
            param.grad = grad.clone()
        else:
            param.grad.copy_(grad)


def step_bytes(impl: Implementation) -> int:
    """Minimum bytes moved per element: grad read, param and each state read + written once."""
    param = impl.params[0]
    states = [v for v in impl.optimizer.state[param].values() if torch.is_tensor(v) and v.numel() == param.numel()]
    return param.element_size() + 2 * (param.element_size() + sum(s.element_size() for s in states))


def time_steps(impl: Implementation, inner: int, device: torch.device) -> float:
    refresh_grads(impl)
    sync(device)
    start = time.perf_counter()
    for _ in range(inner):
        impl.optimizer.step()
    sync(device)
    return (time.perf_counter() - start) / inner


def _timer(operation: Callable[[], object], device: torch.device) -> Callable[[], float]:
    """A function that runs ``operation`` once, synchronized, and returns its seconds."""

    def run() -> float:
        sync(device)
        start = time.perf_counter()
        operation()
        sync(device)
        return time.perf_counter() - start

    return run


def bandwidth_probe(numel: int, device: torch.device) -> tuple[Callable[[], float], int]:
    """In-place fp32 add over ``numel`` elements: returns a timer and its bytes per element."""
    a = torch.randn(numel, device=device)
    b = torch.randn(numel, device=device)
    return _timer(lambda: a.add_(b), device), 12


def copy_probe(numel: int, device: torch.device) -> Callable[[], float]:
    a = torch.randn(numel, device=device)
    b = torch.empty_like(a)
    return _timer(lambda: b.copy_(a), device)


def _stepping_with_switch_off(optimizer: torch.optim.Optimizer, switch: str, before_first_step=None):
    """``optimizer`` stepping with the fused backend's trick ``switch`` off (``optimi._torch_internals``)."""
    step = optimizer.step
    first_step_hooks = [before_first_step] if before_first_step is not None else []

    def switched_step(*args, **kwargs):
        while first_step_hooks:
            first_step_hooks.pop()()
        with _torch_internals.override(**{switch: False}):
            return step(*args, **kwargs)

    optimizer.step = switched_step
    return optimizer


def without_packed_pairs(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """``optimizer`` stepping with the plain fused CPU kernel instead of the packed bf16 one.

    See [Note: packed bf16 columns] in ``optimi/_fused/``: both give the same bits.
    """
    return _stepping_with_switch_off(optimizer, "packed_pairs")


def without_hoisting(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """``optimizer`` stepping with CPU kernels as Inductor generated them, scalars in the loop.

    See [Note: hoisting the hyperparameters] in ``optimi/_fused/cpp_rewrites.py``: both give the same bits.
    Inductor's in-memory module cache is cleared before its first step, so that step builds its
    kernels afresh instead of reusing the rewritten ones (the on-disk caches are off unless
    ``--warm-cache``).
    """

    def clear_loaded_modules() -> None:
        from torch._inductor.codecache import PyCodeCache

        PyCodeCache.cache_clear()

    return _stepping_with_switch_off(optimizer, "hoist_scalars", clear_loaded_modules)


def load_torch_optimi(directory: str) -> Any:
    """torch-optimi (the reference library, import name ``optimi`` too) loaded beside this optimi.

    Its modules import each other as ``optimi.*``: they are imported with ``directory`` first on
    the path and this project's modules out of ``sys.modules``, then both are put back as they were.
    Its classes keep references to their own modules, so both libraries run side by side.
    """
    ours = {name: module for name, module in sys.modules.items() if name == "optimi" or name.startswith("optimi.")}
    for name in ours:
        del sys.modules[name]
    sys.path.insert(0, directory)
    try:
        reference = importlib.import_module("optimi")
        if Path(reference.__file__).resolve().parent.parent != Path(directory).resolve():
            raise SystemExit(f"--torch-optimi: no 'optimi' package in {directory}")
    finally:
        sys.path.remove(directory)
        for name in [n for n in sys.modules if n == "optimi" or n.startswith("optimi.")]:
            del sys.modules[name]
        sys.modules.update(ours)
    return reference


def implementations(name: str, dtypes: list[str], backends: list[str], args, device: torch.device):
    """Builders for every implementation of optimizer ``name`` that this torch/optimi provides."""
    optimi_name, optimi_kwargs, torch_name, torch_kwargs = OPTIMIZERS[name]
    optimi_cls = getattr(optimi, optimi_name, None)
    builders = []
    for dtype_name in dtypes:
        if optimi_cls is not None:
            for backend in backends:
                flags = {"for_loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
                label = f"optimi {backend.replace('_', '-')}" + (" +Kahan" if dtype_name == "bf16" else "")
                kwargs = dict(optimi_kwargs, **flags[backend])
                builders.append((label, dtype_name, lambda ps, kw=kwargs: optimi_cls(ps, lr=1e-3, **kw)))
                if backend == "fused" and args.device == "cpu" and args.compare_hoisting:
                    builders.append(
                        (
                            label + " (scalars in loop)",
                            dtype_name,
                            lambda ps, kw=kwargs: without_hoisting(optimi_cls(ps, lr=1e-3, **kw)),
                        )
                    )
                if backend == "fused" and dtype_name == "bf16" and args.device == "cpu" and args.compare_packing:
                    builders.append(
                        (
                            label + " (plain kernel)",
                            dtype_name,
                            lambda ps, kw=kwargs: without_packed_pairs(optimi_cls(ps, lr=1e-3, **kw)),
                        )
                    )
        reference_cls = getattr(args.reference, optimi_name, None) if args.reference is not None else None
        for foreach in (False, True) if reference_cls is not None else ():
            flavour = "foreach" if foreach else "for-loop"
            label = f"torch-optimi {args.reference.__version__} {flavour}" + (" +Kahan" if dtype_name == "bf16" else "")
            kwargs = dict(optimi_kwargs, foreach=foreach)
            builders.append((label, dtype_name, lambda ps, cls=reference_cls, kw=kwargs: cls(ps, lr=1e-3, **kw)))
        torch_cls = getattr(torch.optim, torch_name, None) if torch_name else None
        if torch_cls is not None and dtype_name == "fp32" and not args.no_torch:
            flavours = ["foreach"] + (["fused"] if torch_name in TORCH_FUSED else [])
            for flavour in flavours:
                kwargs = dict(torch_kwargs, **{flavour: True})
                builders.append((f"torch.optim {flavour}", dtype_name, functools.partial(torch_cls, lr=1e-3, **kwargs)))
    return builders


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizers", default="all", help="comma-separated names, or 'all' (default)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--numel", type=int, default=10_000_000, help="elements over all parameters")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on CPU")
    parser.add_argument("--rounds", type=int, default=7, help="timed samples per implementation")
    parser.add_argument("--inner", type=int, default=None, help="steps per sample (CPU 1, CUDA 20)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="fp32 and/or bf16 (bf16 uses Kahan)")
    parser.add_argument("--backends", default="for_loop,foreach,fused", help="optimi backends to run")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch.optim rows")
    parser.add_argument(
        "--one-tensor", action="store_true", help="all elements in one tensor (no per-tensor call overhead)"
    )
    parser.add_argument(
        "--tensors", type=int, default=None, help="split the elements evenly over N tensors (default: 4, uneven)"
    )
    parser.add_argument(
        "--compare-packing",
        action="store_true",
        help="CPU: also time bf16 fused with the plain kernel instead of the packed int32-pair one",
    )
    parser.add_argument(
        "--compare-hoisting",
        action="store_true",
        help="CPU: also time fused with the hyperparameter arithmetic left inside the kernel's loop",
    )
    parser.add_argument("--warm-cache", action="store_true", help="keep Inductor's on-disk compile caches")
    parser.add_argument(
        "--torch-optimi",
        metavar="DIR",
        default=None,
        help="also time torch-optimi's for-loop and foreach steps, from DIR holding its 'optimi' package "
        "(e.g. pip install --no-deps --target DIR torch-optimi==0.3.3)",
    )
    args = parser.parse_args(argv)
    args.reference = load_torch_optimi(args.torch_optimi) if args.torch_optimi else None
    if args.tensors is not None and args.tensors < 1:
        parser.error(f"--tensors must be at least 1, got {args.tensors}")
    args.split = (1.0,) if args.one_tensor else (1 / args.tensors,) * args.tensors if args.tensors else SPLIT

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device available", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    if args.compare_packing:
        # time the packed kernel itself, even where the fused backend's speed check would keep the
        # plain one ([Note: packed bf16 columns])
        from optimi._fused import compilation

        compilation._PACKED_SPEED_CHECKED = True
    if not args.warm_cache:
        import torch._inductor.config as inductor_config

        inductor_config.force_disable_caches = True
    inner = args.inner or (20 if device.type == "cuda" else 1)
    names = list(OPTIMIZERS) if args.optimizers == "all" else args.optimizers.split(",")
    dtypes = args.dtypes.split(",")
    backends = args.backends.split(",")
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown:
        parser.error(f"unknown optimizers {unknown}; choose from {list(OPTIMIZERS)}")

    load_before = os.getloadavg()
    print(f"# bench_step: {' '.join(sys.argv)}")
    print(
        f"# {machine_description(device)}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
        f"{args.numel:,} elements in {len(args.split)} tensors; {args.rounds} rounds x {inner} step(s)"
    )
    print(f"# load average at start: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")
    sys.stdout.flush()

    print()
    print(
        "| optimizer | dtype | implementation | ms/step | bytes/elem | GB/s | % bw | vs for-loop | first step s "
        "| bw GB/s |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    sys.stdout.flush()
    rows, bandwidths, copies = [], [], []
    for name in names:
        builders = implementations(name, dtypes, backends, args, device)
        if not builders:
            print(f"# {name}: not available in this optimi build, skipped")
            continue
        impls = []
        for index, (label, dtype_name, make) in enumerate(builders):
            impl = build(label, dtype_name, make, args.numel, device, seed=index, split=args.split)
            refresh_grads(impl)
            sync(device)
            start = time.perf_counter()
            impl.optimizer.step()  # allocates state and, for the fused path, compiles
            sync(device)
            impl.first_step_s = time.perf_counter() - start
            impl.bytes_per_element = step_bytes(impl)
            time_steps(impl, 1, device)  # warm
            impls.append(impl)
        probe, probe_bytes = bandwidth_probe(args.numel, device)
        copy_run = copy_probe(args.numel, device)
        probe()
        copy_run()
        local_bw = []
        for _ in range(args.rounds):
            local_bw.append(probe_bytes * args.numel / probe() / 1e9)
            copies.append(8 * args.numel / copy_run() / 1e9)
            for impl in impls:
                impl.samples.append(time_steps(impl, inner, device))
        bandwidth = statistics.median(local_bw)
        bandwidths.extend(local_bw)
        block = []
        for impl in impls:
            seconds = statistics.median(impl.samples)
            gbps = impl.bytes_per_element * args.numel / seconds / 1e9
            block.append((name, impl, seconds, gbps, 100 * gbps / bandwidth))
        for _, impl, seconds, gbps, percent in block:
            loop = next(
                (s for _, i, s, _, _ in block if i.dtype_name == impl.dtype_name and "for-loop" in i.name), None
            )
            ratio = f"{loop / seconds:.2f}x" if loop else "-"
            print(
                f"| {name} | {impl.dtype_name} | {impl.name} | {seconds * 1e3:.2f} | {impl.bytes_per_element} | "
                f"{gbps:.1f} | {percent:.0f}% | {ratio} | {impl.first_step_s:.2f} | {bandwidth:.1f} |"
            )
        sys.stdout.flush()
        rows.extend(block)
        print(f"# {name}: done (in-place add bandwidth {bandwidth:.1f} GB/s)", file=sys.stderr)
        del impls, probe, copy_run
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    load_after = os.getloadavg()
    print()
    print(
        f"# memory bandwidth, in-place add a += b: median {statistics.median(bandwidths):.1f} GB/s "
        f"(range {min(bandwidths):.1f}-{max(bandwidths):.1f}); copy: median {statistics.median(copies):.1f} GB/s"
    )
    print(f"# load average at end: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")

    def find(name: str, label: str) -> float | None:
        return next((s for n, i, s, _, _ in rows if n == name and i.name == label), None)

    kahan, torch_fused = find("adamw", "optimi fused +Kahan"), find("adamw", "torch.optim fused")
    if kahan and torch_fused:
        print()
        print(
            f"AdamW: optimi fused bf16+Kahan {kahan * 1e3:.2f} ms vs torch.optim fused fp32 "
            f"{torch_fused * 1e3:.2f} ms per step: {torch_fused / kahan:.2f}x"
        )
    fp32 = find("adamw", "optimi fused")
    if fp32 and torch_fused:
        print(
            f"AdamW: optimi fused fp32 {fp32 * 1e3:.2f} ms vs torch.optim fused fp32 "
            f"{torch_fused * 1e3:.2f} ms per step: {torch_fused / fp32:.2f}x"
        )
    # which of the fused backend's private-internals optimizations ran ([Note: private torch internals])
    print(f"fused optimizations on torch {torch.__version__}: {_torch_internals.report()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
