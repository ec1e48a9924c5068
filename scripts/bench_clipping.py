"""Gradient clipping with and without gradient release on the small GPT: held-out loss and tokens/s.

    OMP_NUM_THREADS=1 python scripts/bench_clipping.py --steps 600 --grad-clip 1.0
    python scripts/bench_clipping.py --steps 600 --grad-clip 1.0 --nproc 2 -- --parallel fsdp2  # or ddp

Trains ``scripts/train.py``'s byte-level GPT on the standard library's source four times with the
same seed, data order and optimizer (AdamW by default), changing only how gradients are clipped
([Note: clipping under gradient release] in ``optimi/_clipping.py``):

- exact, no release: ``max_grad_norm`` with ``step()``, i.e. ``clip_grad_norm_`` + ``step()``;
- release + previous step: gradient release, each backward clipped by the previous backward's norm;
- release + two-pass: gradient release with ``optimi.release_backward`` (the exact clip, two backward
  passes);
- release, no clipping.

Prints a Markdown table: held-out loss, tokens/s, the share of steps whose norm exceeded the
threshold, and how far previous-step clipping lands from the exact clip. Every other flag of
``scripts/train.py`` can be passed after ``--``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train  # noqa: E402
from bench_convergence import run_ranks  # noqa: E402

#: run name -> the train.py flags (``{clip}`` is the threshold)
RUNS = {
    "exact clip, no release": ["--grad-clip", "{clip}"],
    "release + previous-step clip": ["--gradient-release", "--grad-clip", "{clip}"],
    "release + two-pass clip (release_backward)": ["--gradient-release", "--grad-clip", "{clip}", "--exact-clip"],
    "release, no clip": ["--gradient-release"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--grad-clip", type=float, default=0.5, help="the clip threshold (global L2 norm)")
    parser.add_argument("--nproc", type=int, default=1, help="ranks per run (torchrun; pass --parallel after --)")
    parser.add_argument("train_args", nargs="*", help="extra scripts/train.py flags, after --")
    args = parser.parse_args()

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, flags in RUNS.items():
            flags = [flag.format(clip=args.grad_clip) for flag in flags]
            metrics = Path(tmp) / f"{len(results)}.jsonl"
            argv = ["--steps", str(args.steps), "--optimizer", args.optimizer, "--log-every", str(args.steps)]
            argv += flags + ["--metrics-file", str(metrics)] + args.train_args
            print(f"== {name}: train.py {' '.join(argv[:6] + flags + args.train_args)}", flush=True)
            config = train.parse_args(argv)
            started = time.perf_counter()
            val_loss = train.main(argv) if args.nproc == 1 else run_ranks(args.nproc, argv)
            seconds = time.perf_counter() - started
            rows = [json.loads(line) for line in metrics.read_text().splitlines()]
            results[name] = {
                "val": val_loss,
                "tokens_per_s": args.steps * config.batch_size * config.block_size / seconds,
                "norms": [row.get("grad_norm") for row in rows],
            }

    exact = results["exact clip, no release"]
    clipped_share = sum(n > args.grad_clip for n in exact["norms"]) / len(exact["norms"])
    print(f"\nthreshold {args.grad_clip}: the exact run's norm exceeded it on {clipped_share:.0%} of its steps")
    print("\n| run | held-out loss | vs exact clip | tokens/s (incl. evaluation) |")
    print("|---|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['val']:.4f} | {r['val'] - exact['val']:+.4f} | {r['tokens_per_s']:,.0f} |")
    no_clip, previous = results["release, no clip"]["val"], results["release + previous-step clip"]["val"]
    if abs(no_clip - exact["val"]) > 0:
        share = 100 * (no_clip - previous) / (no_clip - exact["val"])
        print(f"\nprevious-step clipping moves {share:.0f}% of the way from no clipping to the exact clip")


if __name__ == "__main__":
    main()
