"""8-bit optimizer state: AdamW step time and bytes per parameter, against torchao's AdamW8bit.

Command lines (the tables in docs/state_bits.md come from the first two)::

    python scripts/bench_state_bits.py --only step --torchao $PEERS/torchao
    python scripts/bench_state_bits.py --only memory --torchao $PEERS/torchao      # 1 process and FSDP2
    python scripts/bench_state_bits.py --smoke                                      # tiny, < 1 min

torchao is installed into a directory of its own and imported from there
(``pip install --no-deps --target $PEERS/torchao torchao``).

**Step**: AdamW over ``--tensors`` bf16 matrices of ``--rows`` x ``--columns`` (default 20 x 512 x 512),
lr 1e-3, betas (0.9, 0.99), eps 1e-6, weight decay 1e-2: optimi's fused backend with bf16 moments and
with ``state_bits=8`` (Kahan and stochastic rounding), its for-loop backend with ``state_bits=8``, and
torchao's ``AdamW8bit`` (bf16 parameters, ``bf16_stochastic_round=True``). Every implementation has
its own parameters and gradients; they alternate within each round, and the median and minimum
over ``--rounds`` rounds are printed with the state bytes per parameter (for torchao, the codes and
scales inside its state tensors).

**Memory**: a stack of bias-free ``Linear(--width, --width)`` layers (4 and 16 layers of 1024) trained
one step, in a fresh process per setup and size, on one process and on 2 FSDP2 ranks (each layer
``fully_shard``-ed, built on the meta device). Per rank it prints ``memory_report``'s bytes per
parameter held (parameters, peak live gradients, optimizer state) and the operating system's
view: the slope of the peak resident set (``VmHWM`` above the resident set just before the model
is built) between the two sizes, per parameter the rank holds. Setups: fp32 AdamW, bf16 + Kahan,
bf16 + Kahan + 8-bit, bf16 + stochastic rounding + 8-bit, each with and without gradient release,
and torchao's AdamW8bit (one process, no release: it has none).
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))
from bench_low_precision import (  # noqa: E402
    HYPER,
    current_rss,
    load_peer,
    peak_rss,
    peer_version,
    reset_peak_rss,
    state_nbytes,
)
from bench_memory import MMAP_THRESHOLD  # noqa: E402
from bench_step import Implementation, machine_description, refresh_grads, time_steps  # noqa: E402

import optimi  # noqa: E402


def torchao_adamw8bit(directory: str) -> tuple[str, Any]:
    """torchao's AdamW8bit with bf16 stochastic rounding: its label and a builder over parameters."""
    load_peer(directory, "torchao")
    cls = importlib.import_module("torchao.optim").AdamW8bit
    version = peer_version(sys.modules["torchao"], "torchao")
    return f"torchao {version} AdamW8bit(bf16_stochastic_round=True)", functools.partial(
        cls, **HYPER, bf16_stochastic_round=True
    )


# -- step -------------------------------------------------------------------------------------------


def step_rows(args: argparse.Namespace) -> list[tuple[str, Any]]:
    rows = [
        ("optimi fused, bf16 moments, Kahan", dict(fused=True)),
        ("optimi fused, 8-bit moments, Kahan", dict(fused=True, state_bits=8)),
        (
            "optimi fused, 8-bit moments, stochastic rounding",
            dict(fused=True, state_bits=8, low_precision="stochastic"),
        ),
        ("optimi for-loop, bf16 moments, Kahan", dict(foreach=False, fused=False)),
        ("optimi for-loop, 8-bit moments, Kahan", dict(foreach=False, fused=False, state_bits=8)),
    ]
    if args.smoke:
        rows = [row for row in rows if not row[1].get("fused")]
    built = [(label, functools.partial(optimi.AdamW, **HYPER, **flags)) for label, flags in rows]
    if args.torchao:
        built.append(torchao_adamw8bit(args.torchao))
    return built


def step_table(args: argparse.Namespace) -> list[str]:
    timed = []
    for index, (label, make) in enumerate(step_rows(args)):
        generator = torch.Generator().manual_seed(index)
        shape = (args.rows, args.columns)
        params = [(torch.randn(shape, generator=generator) * 0.1).bfloat16() for _ in range(args.tensors)]
        params = [param.requires_grad_() for param in params]
        grads = [(torch.randn(shape, generator=generator) * 1e-2).bfloat16() for _ in range(args.tensors)]
        impl = Implementation(label, "bf16", params, grads, make(params))
        for _ in range(2):  # state allocation and compiles
            refresh_grads(impl)
            impl.optimizer.step()
        state_bytes = sum(state_nbytes(s) for s in impl.optimizer.state.values())
        timed.append((impl, state_bytes / (args.tensors * params[0].numel())))
        print(f"# ready: {label}", file=sys.stderr, flush=True)
    for _ in range(args.rounds):
        for impl, _ in timed:
            impl.samples.append(time_steps(impl, 1, torch.device("cpu")))
    base = statistics.median(timed[0][0].samples)
    lines = [
        f"AdamW, {args.tensors} bf16 parameters of {args.rows} x {args.columns}, {torch.get_num_threads()} threads, "
        f"median and minimum of {args.rounds} rounds",
        "",
        "| implementation | ms/step (median) | ms/step (min) | state B/param | time vs optimi fused bf16 moments |",
        "|---|---:|---:|---:|---:|",
    ]
    for impl, state_bytes in timed:
        median = statistics.median(impl.samples)
        lines.append(
            f"| {impl.name} | {median * 1e3:.2f} | {min(impl.samples) * 1e3:.2f} | {state_bytes:.2f} "
            f"| {median / base:.2f}x |"
        )
    return lines


# -- memory -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemorySetup:
    name: str
    dtype: str
    low_precision: str | None = None
    state_bits: int | None = None
    release: bool = False
    torchao: bool = False


def memory_setups() -> dict[str, MemorySetup]:
    setups = {}
    for release in (False, True):
        suffix = ", release" if release else ""
        key = "_release" if release else ""
        setups["fp32" + key] = MemorySetup("fp32 AdamW" + suffix, "float32", release=release)
        setups["kahan" + key] = MemorySetup("bf16 + Kahan" + suffix, "bfloat16", "kahan", release=release)
        setups["kahan_8bit" + key] = MemorySetup("bf16 + Kahan, 8-bit" + suffix, "bfloat16", "kahan", 8, release)
        setups["stochastic_8bit" + key] = MemorySetup(
            "bf16 + stochastic, 8-bit" + suffix, "bfloat16", "stochastic", 8, release
        )
    setups["torchao"] = MemorySetup("torchao AdamW8bit, bf16 stochastic", "bfloat16", torchao=True)
    return setups


SETUPS = memory_setups()


def train_one_step(setup: MemorySetup, layers: int, width: int, torchao: str | None, fsdp: bool):
    from torch import nn

    from optimi.distributed.memory import track_gradient_peak

    dtype = getattr(torch, setup.dtype)
    with torch.device("meta" if fsdp else "cpu"):
        model = nn.Sequential(*(nn.Linear(width, width, bias=False, dtype=dtype) for _ in range(layers)))
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            fully_shard(layer)
        fully_shard(model)
        model.to_empty(device="cpu")
        with torch.no_grad():
            for param in model.parameters():
                param.normal_(0.0, 0.02)
    params = list(model.parameters())
    if setup.torchao:
        optimizer = torchao_adamw8bit(torchao)[1](params)
    else:
        optimizer = optimi.AdamW(
            params,
            **HYPER,
            low_precision=setup.low_precision,
            state_bits=setup.state_bits,
            foreach=False,
            fused=False,
            gradient_release=setup.release,
        )
    track_gradient_peak(model)
    if setup.release:
        optimi.prepare_for_gradient_release(model, optimizer, ignore_existing_hooks=True)
    inputs = torch.randn(4, width, generator=torch.Generator().manual_seed(1)).to(dtype)
    model(inputs).float().pow(2).mean().backward()
    optimizer.step()
    return model, optimizer


def memory_worker(key: str, layers: int, width: int, torchao: str | None, fsdp: bool) -> dict:
    from optimi.distributed import memory_report

    setup = SETUPS[key]
    torch.manual_seed(0)
    if setup.torchao:  # its first step compiles: warm up on an identical model, then reset the peak
        warm = train_one_step(setup, layers, width, torchao, fsdp)
        del warm
        gc.collect()
        reset_peak_rss()
    base = current_rss()
    model, optimizer = train_one_step(setup, layers, width, torchao, fsdp)
    rank = memory_report(model, optimizer).ranks[int(os.environ.get("RANK", 0))]
    local_params = rank.param_numel
    state_walk = state_nbytes(optimizer.state)
    return {
        "params": local_params,
        "bytes_per_param": rank.bytes_per_param,
        "state": rank.optimizer_states / local_params,
        "state_walk": state_walk / local_params,
        "peak_rss": peak_rss() - base,
    }


def run_memory(key: str, layers: int, args: argparse.Namespace, fsdp: bool) -> list[dict]:
    cmd = [__file__, "--memory-worker", key, "--layers", str(layers), "--width", str(args.width)]
    if args.torchao:
        cmd += ["--torchao", args.torchao]
    env = dict(os.environ, **MMAP_THRESHOLD, OMP_NUM_THREADS="1")
    if fsdp:
        cmd = ["torchrun", "--standalone", "--nproc_per_node", "2", *cmd, "--fsdp"]
    else:
        cmd = [sys.executable, *cmd]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    results = [json.loads(line[len("RESULT ") :]) for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if not results:
        raise RuntimeError(f"exit {out.returncode}: {out.stderr.strip()[-2000:]}")
    return sorted(results, key=lambda r: r["rank"])


def memory_table(args: argparse.Namespace) -> list[str]:
    small, large = args.layers
    lines = [
        "| setup | parallel | rank | memory_report B/param (params + peak grads + state) | state B/param "
        "| OS: peak RSS slope, B/param |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for fsdp in (False, True):
        for key in args.setups:
            setup = SETUPS[key]
            if setup.torchao and (fsdp or not args.torchao):
                continue
            print(f"# memory: {key}, {'FSDP2' if fsdp else '1 process'}", file=sys.stderr, flush=True)
            try:
                lo, hi = run_memory(key, small, args, fsdp), run_memory(key, large, args, fsdp)
            except Exception as error:
                lines.append(f"| {setup.name} | {'FSDP2' if fsdp else '1 process'} | - | failed: {error} | | |")
                continue
            for a, b in zip(lo, hi):
                slope = (b["peak_rss"] - a["peak_rss"]) / (b["params"] - a["params"])
                state = b["state_walk"] if setup.torchao else b["state"]
                lines.append(
                    f"| {setup.name} | {'FSDP2, 2 ranks' if fsdp else '1 process'} | {b['rank']} "
                    f"| {b['bytes_per_param'] if not setup.torchao else float('nan'):.2f} | {state:.2f} | {slope:.2f} |"
                )
            sys.stdout.flush()
    lines += [
        "",
        f"Per parameter the rank holds, {large} layers of Linear({args.width}, {args.width}); RSS slope between "
        f"{small} and {large} layers. torchao: memory_report cannot see inside its 8-bit tensors, so its "
        "state column walks their codes and scales.",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["step", "memory"], default=None)
    parser.add_argument("--torchao", metavar="DIR", default=None)
    parser.add_argument("--tensors", type=int, default=20)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--columns", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", default="4,16")
    parser.add_argument("--setups", default=",".join(SETUPS))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, no fused backend, one setup")
    parser.add_argument("--memory-worker", choices=sorted(SETUPS), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--fsdp", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.layers = [int(n) for n in args.layers.split(",")]
    args.setups = args.setups.split(",")
    torch.set_num_threads(args.threads)
    if args.memory_worker:
        if args.fsdp:
            import torch.distributed as dist

            dist.init_process_group("gloo")
        result = memory_worker(args.memory_worker, args.layers[0], args.width, args.torchao, args.fsdp)
        result["rank"] = int(os.environ.get("RANK", 0))
        # one write per line: under torchrun both ranks share the output, and print's two writes interleave
        sys.stdout.write(f"RESULT {json.dumps(result)}\n")
        sys.stdout.flush()
        if args.fsdp:
            dist.barrier()
            dist.destroy_process_group()
        return
    if args.smoke:
        args.tensors, args.rows, args.columns, args.rounds = 2, 64, 128, 2
        args.width, args.layers, args.setups = 128, [1, 2], ["kahan_8bit"]
    print(f"machine: {machine_description(torch.device('cpu'))}, torch {torch.__version__}\n")
    if args.only in (None, "step"):
        print("\n".join(step_table(args)) + "\n", flush=True)
    if args.only in (None, "memory"):
        print("\n".join(memory_table(args)), flush=True)


if __name__ == "__main__":
    main()
