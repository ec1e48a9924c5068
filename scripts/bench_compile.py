"""How long the fused backend's first step compiles: cold and warm Inductor cache, one process and torchrun ranks.

Command lines (the table in docs/versions.md comes from the first, run under each torch)::

    python scripts/bench_compile.py                  # cold and warm, 1 process and 2 torchrun ranks
    python scripts/bench_compile.py --ranks 1        # one process only

Each measurement is a new Python process stepping AdamW (fp32, and bf16 with Kahan summation, each
its own configuration) once with ``fused=True``, so the first step compiles; the seconds are the
fused backend's own count from the start of each compile to its end (also logged on the
``optimi`` logger). *Cold* runs get an empty Inductor cache directory (``TORCHINDUCTOR_CACHE_DIR``),
*warm* runs the directory the cold run filled. Under ``torchrun`` every rank on a machine uses the
same directory, the default ``/tmp/torchinductor_$USER`` unless the variable is set, so a 2-rank
cold start shows whether the ranks compile side by side (both pay) and a warm one whether each
rank then loads what was built.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker(out: Path) -> None:
    """One process (or rank): time the first fused step of each configuration; write JSON."""
    import torch

    import optimi
    from optimi._fused import dispatch

    torch.set_num_threads(1 if "LOCAL_RANK" in os.environ else 2)
    seconds = {}
    for dtype in (torch.float32, torch.bfloat16):
        params = [torch.nn.Parameter(torch.randn(256, 1024, dtype=dtype)) for _ in range(4)]
        optimizer = optimi.AdamW(params, lr=1e-3, fused=True)
        for p in params:
            p.grad = torch.randn_like(p)
        before = set(dispatch.COMPILED)
        start = time.perf_counter()
        optimizer.step()
        wall = time.perf_counter() - start
        compiled = [dispatch.COMPILED[key] for key in set(dispatch.COMPILED) - before]
        seconds[str(dtype).removeprefix("torch.")] = {
            "compile_s": sum(step.compile_seconds for step in compiled),
            "first_step_s": wall,
        }
    rank = os.environ.get("RANK", "0")
    (out / f"rank{rank}.json").write_text(json.dumps({"torch": torch.__version__, "seconds": seconds}))


def measure(ranks: int, cache: Path) -> list[dict]:
    """Run the worker as ``ranks`` processes (torchrun when more than one) on Inductor cache ``cache``."""
    with tempfile.TemporaryDirectory() as out:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache), PYTHONPATH=str(REPO))
        if ranks == 1:
            command = [sys.executable, __file__, "--worker", out]
        else:
            command = [
                sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                __file__, "--worker", out,
            ]  # fmt: skip
        subprocess.run(command, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
        return [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2, help="also measure this many torchrun ranks (1: skip)")
    parser.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(Path(args.worker))
        return 0
    if args.ranks < 1:
        parser.error(f"--ranks must be at least 1, got {args.ranks}")

    print("| processes | cache | dtype | compile s (per process) | first step s |")
    print("|---|---|---|---|---|")
    version = None
    for ranks in sorted({1, args.ranks}):
        cache = Path(tempfile.mkdtemp(prefix="optimi-inductor-cache-"))
        try:
            for state in ("cold", "warm"):
                print(f"# {ranks} process(es), {state} cache: running", file=sys.stderr, flush=True)
                results = measure(ranks, cache)
                version = results[0]["torch"]
                for dtype in ("float32", "bfloat16"):
                    compile_s = [r["seconds"][dtype]["compile_s"] for r in results]
                    first = [r["seconds"][dtype]["first_step_s"] for r in results]
                    print(
                        f"| {ranks} | {state} | {dtype} | {' / '.join(f'{s:.1f}' for s in compile_s)} | "
                        f"{statistics.median(first):.1f} |",
                        flush=True,
                    )
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    print(f"# torch {version}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
