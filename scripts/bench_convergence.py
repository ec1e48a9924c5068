"""Convergence of the small GPT in fp32, pure bf16 (each low-precision mode, bf16 or 8-bit moments) and mixed precision.

    OMP_NUM_THREADS=1 python scripts/bench_convergence.py --steps 600 --plot docs/convergence.png
    python scripts/bench_convergence.py --steps 600 --nproc 2 -- --parallel fsdp2  # FSDP2, 2 CPU ranks

Trains ``scripts/train.py``'s byte-level GPT on the standard library's source once per run with the
same seed, data order and optimizer (AdamW by default), changing only the precision:

- fp32: fp32 parameters and optimizer state;
- bf16: pure bf16 parameters and state, Kahan summation off (``kahan_sum=False``);
- bf16 + Kahan: pure bf16 parameters and state with optimi's Kahan-compensated updates;
- bf16 + stochastic rounding / remainder: the other ``low_precision`` modes (unbiased rounding with
  no extra memory; an exact fp32 master held as the bf16 parameter and an int16 remainder);
- mixed: fp32 parameters and state, forward/backward under bf16 autocast;
- bf16 + Kahan / stochastic rounding / remainder + 8-bit state: the same modes with ``state_bits=8``
  (moments as 8-bit codes with per-block scales, docs/state_bits.md);
- with ``--torchao DIR``: torchao's ``AdamW8bit`` on the same model, pure bf16 with its stochastic
  rounding (imported from DIR: ``pip install --no-deps --target DIR torchao``).

Prints a Markdown table of the held-out loss of each run and the share of the bf16 -> fp32 gap that
each low-precision mode closes, e.g. ``(bf16 - bf16_kahan) / (bf16 - fp32)``. With matplotlib installed
(``pip install -e ".[bench]"``) ``--plot`` writes the smoothed training-loss curves as a PNG.
Every other flag of ``scripts/train.py`` (model size, lr, schedule, batch) can be passed after ``--``.
With ``--nproc N`` each run is ``torchrun --nproc_per_node N scripts/train.py ...`` (pass the
parallelism after ``--``, e.g. ``--parallel fsdp2``); the global batch and data order are those of
one process, so the runs are comparable across world sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train  # noqa: E402

#: run name -> the train.py precision flags
RUNS = {
    "fp32": ["--dtype", "fp32"],
    "bf16": ["--dtype", "bf16", "--kahan", "off"],
    "bf16 + Kahan": ["--dtype", "bf16", "--kahan", "on"],
    "bf16 + stochastic rounding": ["--dtype", "bf16", "--low-precision", "stochastic"],
    "bf16 + remainder (exact fp32 master)": ["--dtype", "bf16", "--low-precision", "remainder"],
    "mixed (bf16 autocast)": ["--dtype", "mixed"],
    # 8-bit moments (state_bits=8, docs/state_bits.md) under each way of keeping small updates
    "bf16 + Kahan + 8-bit state": ["--dtype", "bf16", "--kahan", "on", "--state-bits", "8"],
    "bf16 + stochastic rounding + 8-bit state": [
        "--dtype",
        "bf16",
        "--low-precision",
        "stochastic",
        "--state-bits",
        "8",
    ],
    "bf16 + remainder + 8-bit state": ["--dtype", "bf16", "--low-precision", "remainder", "--state-bits", "8"],
}
#: with --torchao DIR: torchao's AdamW8bit on the same model, pure bf16 with its stochastic rounding
TORCHAO_RUN = "torchao AdamW8bit (bf16, stochastic rounding)"


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def run_ranks(nproc: int, argv: list[str]) -> float:
    """``scripts/train.py argv`` under torchrun on ``nproc`` CPU ranks; returns its held-out loss."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = Path(__file__).resolve().parent / "train.py"
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    command += ["--master_addr=127.0.0.1", f"--master_port={port}", str(script), *argv]
    environment = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    finished = subprocess.run(command, env=environment, capture_output=True, text=True)
    held_out = re.findall(r"held-out loss ([0-9.]+)", finished.stdout + finished.stderr)
    if finished.returncode != 0 or not held_out:
        sys.exit(f"train.py failed (rc={finished.returncode}):\n{finished.stdout[-3000:]}\n{finished.stderr[-3000:]}")
    return float(held_out[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--plot", default=None, help="write the loss curves to this PNG (needs matplotlib)")
    parser.add_argument("--nproc", type=int, default=1, help="ranks per run (torchrun; pass --parallel after --)")
    parser.add_argument("--runs", default=None, help="comma-separated run names to keep (default: all)")
    parser.add_argument("--torchao", metavar="DIR", default=None, help="also run torchao's AdamW8bit from DIR")
    parser.add_argument("train_args", nargs="*", help="extra scripts/train.py flags, after --")
    args = parser.parse_args()
    runs = dict(RUNS)
    if args.torchao:
        runs[TORCHAO_RUN] = ["--dtype", "bf16", "--torchao-adamw8bit", args.torchao]

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        chosen = {name: flags for name, flags in runs.items() if args.runs is None or name in args.runs.split(",")}
        for name, flags in chosen.items():
            metrics = Path(tmp) / f"{len(results)}.jsonl"
            argv = ["--steps", str(args.steps), "--optimizer", args.optimizer, "--log-every", str(args.steps)]
            argv += flags + ["--metrics-file", str(metrics)] + args.train_args
            print(f"== {name}: train.py {' '.join(argv[:6] + flags + args.train_args)}", flush=True)
            started = time.perf_counter()
            val_loss = train.main(argv) if args.nproc == 1 else run_ranks(args.nproc, argv)
            losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]
            results[name] = {"val": val_loss, "train": losses, "seconds": time.perf_counter() - started}

    window = max(1, args.steps // 20)
    print(f"\n| run | final train loss (mean of last {window} steps) | held-out loss | wall s |")
    print("|---|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {sum(r['train'][-window:]) / window:.4f} | {r['val']:.4f} | {r['seconds']:.0f} |")
    if "fp32" not in results or "bf16" not in results:
        return
    fp32, bf16 = results["fp32"]["val"], results["bf16"]["val"]
    gap = bf16 - fp32
    if gap > 0:
        modes = [name for name in results if name.startswith("bf16 +") or name == TORCHAO_RUN]
        for name in (mode for mode in modes if mode in results):
            closed = 100 * (bf16 - results[name]["val"]) / gap
            print(f"{name} closes {closed:.0f}% of the bf16 -> fp32 held-out gap ({gap:.4f})")
    else:
        print(f"\nno bf16 -> fp32 gap to close (bf16 - fp32 = {gap:.4f})")

    if args.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print('matplotlib is not installed (pip install -e ".[bench]"): no plot written')
            return
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for name, r in results.items():
            ax.plot(
                range(1, len(r["train"]) + 1), smooth(r["train"], window), label=f"{name} (held-out {r['val']:.3f})"
            )
        ax.set_xlabel("step")
        ax.set_ylabel(f"training loss ({window}-step moving average)")
        ax.set_ylim(top=min(4.0, ax.get_ylim()[1]))
        ax.set_title(f"byte-level GPT on the Python stdlib, {args.optimizer}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
