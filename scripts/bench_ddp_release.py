"""DDP with and without gradient release, and the release hook chained on the all-reduce vs waiting for it.

Two gloo ranks on CPU, one thread each (the numbers in docs/distributed.md)::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 scripts/bench_ddp_release.py

A larger model or other buckets::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 scripts/bench_ddp_release.py \\
        --n-layer 6 --n-embd 256 --bucket-cap-mb 2 --rounds 6

Three modes train the byte-level GPT of ``scripts/gpt.py`` from the same weights on the same batches,
in one process group, taking turns round by round so that machine load hits them alike:

- ``ddp``: DDP without release: ``backward()`` (all-reduces overlap it), then ``opt.step()``;
- ``release-wait``: gradient release whose DDP hook waits for each bucket's all-reduce and steps
  inside the hook, as optimi's hook did before (``_DDPReleaseState.wait_for_all_reduce``);
- ``release``: gradient release with each bucket's steps chained on its all-reduce's future.

For each mode rank 0 prints the median forward, backward and step time of the timed steps, and the
global tokens per second of the median step. The two release modes must end bit-identical (the
script checks it). Nothing runs at import.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/gpt.py, also under torchrun

from gpt import GPT, ByteDataset, GPTConfig, load_stdlib_text  # noqa: E402

import optimi  # noqa: E402

MODES = ("ddp", "release-wait", "release")


@dataclass
class Run:
    """One mode's model, optimizer, batch stream and timings (milliseconds per step)."""

    #: ``ddp``, ``release-wait`` or ``release``
    mode: str
    #: the DDP-wrapped GPT
    model: DistributedDataParallel
    #: optimi AdamW, with ``gradient_release`` for the release modes
    optimizer: optimi.AdamW
    #: draws this rank's batch starts; seeded alike for every mode, so all modes see the same batches
    generator: torch.Generator
    forward: list[float] = field(default_factory=list)
    backward: list[float] = field(default_factory=list)
    step: list[float] = field(default_factory=list)

    @property
    def total(self) -> list[float]:
        return [f + b + s for f, b, s in zip(self.forward, self.backward, self.step)]


def build(mode: str, init: dict, config: GPTConfig, bucket_cap_mb: float, seed: int) -> Run:
    model = GPT(config)
    model.load_state_dict(init)
    ddp = DistributedDataParallel(model, bucket_cap_mb=bucket_cap_mb)
    release = mode != "ddp"
    # foreach=False: every mode runs the same per-parameter for-loop kernels, so only the scheduling differs
    optimizer = optimi.AdamW(ddp.parameters(), lr=3e-4, weight_decay=0.1, foreach=False, gradient_release=release)
    if release:
        optimi.prepare_for_gradient_release(ddp, optimizer)
        ddp._optimi_ddp_gradient_release.wait_for_all_reduce = mode == "release-wait"
    return Run(mode, ddp, optimizer, torch.Generator().manual_seed(seed))


def train_steps(run: Run, data: ByteDataset, batch_size: int, steps: int, record: bool) -> None:
    for _ in range(steps):
        inputs, targets = data.batch(data.starts(batch_size, run.generator))
        start = time.perf_counter()
        loss = run.model(inputs, targets)
        forwarded = time.perf_counter()
        loss.backward()  # under release: every bucket's all-reduce and steps, finished before it returns
        backwarded = time.perf_counter()
        run.optimizer.step()  # no-op under release
        run.optimizer.zero_grad()
        stepped = time.perf_counter()
        if record:
            run.forward.append(1e3 * (forwarded - start))
            run.backward.append(1e3 * (backwarded - forwarded))
            run.step.append(1e3 * (stepped - backwarded))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8, help="per rank")
    parser.add_argument("--bucket-cap-mb", type=float, default=1.0, help="DDP bucket size (torch default: 25)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per mode before the rounds")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per mode and round")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per rank")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    config = GPTConfig(block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    train_text, _ = load_stdlib_text()
    data = ByteDataset(train_text, config.block_size)
    torch.manual_seed(0)
    init = GPT(config).state_dict()
    runs = [build(mode, init, config, args.bucket_cap_mb, seed=1000 + rank) for mode in MODES]

    for run in runs:
        train_steps(run, data, args.batch_size, args.warmup, record=False)
    for _ in range(args.rounds):
        for run in runs:
            dist.barrier()
            train_steps(run, data, args.batch_size, args.steps, record=True)

    # same weights, batches and kernels: waiting for the all-reduce or chaining on it gives the same bits
    wait, chained = (dict(run.model.module.named_parameters()) for run in runs[1:])
    identical = all(torch.equal(wait[name], chained[name]) for name in wait)

    tokens = args.batch_size * config.block_size * world_size
    n_params = sum(p.numel() for p in runs[0].model.parameters())
    buckets = len(runs[0].model.reducer._get_zeros_like_grad_buckets())
    if rank == 0:
        print(
            f"GPT {config.n_layer}x{config.n_embd} ({n_params / 1e6:.2f}M params, {buckets} DDP buckets of "
            f"<= {args.bucket_cap_mb} MiB), {world_size} gloo ranks x {args.threads} thread(s), "
            f"{tokens} tokens per step, torch {torch.__version__}; median of {args.rounds} x {args.steps} steps"
        )
        print("| mode | forward ms | backward ms | step ms | total ms | tokens/s |")
        print("|---|---|---|---|---|---|")
        for run in runs:
            median = statistics.median
            print(
                f"| {run.mode} | {median(run.forward):.1f} | {median(run.backward):.1f} | {median(run.step):.1f} | "
                f"{median(run.total):.1f} | {tokens / (median(run.total) / 1e3):,.0f} |"
            )
        print(f"release-wait and release bit-identical: {identical}")
    dist.barrier()
    dist.destroy_process_group()
    if not identical:
        raise SystemExit("release-wait and release diverged")


if __name__ == "__main__":
    main()
