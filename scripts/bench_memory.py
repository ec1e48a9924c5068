"""Memory per parameter and peak RSS: fp32 AdamW vs mixed precision vs bf16 + Kahan (+ gradient release, 8-bit state).

Command lines (CPU, no GPU needed; each setup runs in its own fresh process so peak RSS is its own):

    python scripts/bench_memory.py                      # everything: 1 process and FSDP2 on 2 ranks
    python scripts/bench_memory.py --only single        # the single-process rows
    python scripts/bench_memory.py --only fsdp2         # the FSDP2 rows (launches torchrun itself)

What each setup runs: a small GPT-style transformer (token embedding, pre-norm blocks of causal
self-attention + MLP, untied output head), 3 training steps of AdamW on random tokens, then
``optimi.distributed.memory_report`` on every rank. The FSDP2 rows build the model on the meta
device, shard every block and the root with ``fully_shard`` over 2 gloo ranks and then allocate
only the local shards; they are launched as

    torchrun --standalone --nproc_per_node 2 scripts/bench_memory.py --worker SETUP --parallel fsdp2

Reported per rank:

* bytes/param: ``(params + peak live .grad + optimizer state incl. Kahan) / parameters held``,
  where the peak of live gradients is sampled in post-accumulate-grad hooks (``track_gradient_peak``).
  Under FSDP2 every count is the rank's local shard, divided by the parameters of the *whole* model
  (so FSDP2 on N ranks should show 1/N of the single-process number).
* peak RSS above the baseline (the process after imports and process-group setup, before the
  model exists): what the operating system saw, including activations and allocator effects.
  Each setup runs twice: with glibc's defaults, and with ``MALLOC_MMAP_THRESHOLD_=65536`` so that
  freed large blocks go back to the OS at once (glibc otherwise raises its mmap threshold after
  the first large free and keeps freed gradients and communication buffers cached).

Prints a Markdown table, then each FSDP2 setup's per-rank report.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

VOCAB, D_MODEL, LAYERS, HEADS, SEQ, BATCH, STEPS = 8192, 512, 6, 8, 64, 2, 3


@dataclass(frozen=True)
class Setup:
    """One row of the table."""

    name: str
    #: parameter dtype as stored (and as sharded under FSDP2)
    param_dtype: str
    #: compute in bf16 with fp32 parameters (autocast; FSDP2: MixedPrecisionPolicy)
    mixed_precision: bool = False
    #: gradient release (optimizer steps in backward, gradients freed at once)
    release: bool = False
    #: the optimizer's low_precision mode (None: Kahan for bf16)
    low_precision: str | None = None
    #: the optimizer's state_bits (8: moments as 8-bit codes, docs/state_bits.md)
    state_bits: int | None = None


SETUPS = {
    "fp32_adamw": Setup("fp32 AdamW", "float32"),
    "mixed_precision": Setup("mixed precision (fp32 params, bf16 compute)", "float32", mixed_precision=True),
    "bf16_kahan": Setup("bf16 + Kahan", "bfloat16"),
    "bf16_kahan_release": Setup("bf16 + Kahan + gradient release", "bfloat16", release=True),
    "bf16_kahan_8bit": Setup("bf16 + Kahan + 8-bit state", "bfloat16", state_bits=8),
    "bf16_stochastic_8bit_release": Setup(
        "bf16 + stochastic rounding + 8-bit state + gradient release",
        "bfloat16",
        release=True,
        low_precision="stochastic",
        state_bits=8,
    ),
}


def build_model():
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm1 = nn.LayerNorm(D_MODEL)
            self.attn = nn.MultiheadAttention(D_MODEL, HEADS, batch_first=True)
            self.norm2 = nn.LayerNorm(D_MODEL)
            self.mlp = nn.Sequential(nn.Linear(D_MODEL, 4 * D_MODEL), nn.GELU(), nn.Linear(4 * D_MODEL, D_MODEL))

        def forward(self, x):
            h = self.norm1(x)
            mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).triu(1)
            x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
            return x + self.mlp(self.norm2(x))

    class GPT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(VOCAB, D_MODEL)
            self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
            self.norm = nn.LayerNorm(D_MODEL)
            self.head = nn.Linear(D_MODEL, VOCAB, bias=False)

        def forward(self, tokens):
            x = self.embed(tokens)
            for block in self.blocks:
                x = block(x)
            return self.head(self.norm(x))

    return GPT()


def worker(setup_key: str, parallel: str) -> None:
    """Train one setup for a few steps and print this rank's report as one JSON line."""
    import psutil
    import torch
    import torch.distributed as dist
    from torch import nn

    import optimi
    from optimi.distributed import memory_report
    from optimi.distributed.memory import track_gradient_peak

    setup = SETUPS[setup_key]
    torch.manual_seed(0)
    if parallel == "fsdp2":
        dist.init_process_group("gloo")
    baseline = psutil.Process().memory_info().rss

    dtype = getattr(torch, setup.param_dtype)
    # FSDP2: build on the meta device, shard, then allocate only this rank's shards (the usual
    # recipe; materialising the full model first would put it into every rank's peak RSS)
    with torch.device("meta" if parallel == "fsdp2" else "cpu"):
        model = build_model().to(dtype)
    total_params = sum(p.numel() for p in model.parameters())
    autocast = setup.mixed_precision and parallel == "none"
    if parallel == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        kwargs = {"mesh": mesh}
        if setup.mixed_precision:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        model.to_empty(device="cpu")
        with torch.no_grad():
            for param in model.parameters():  # values do not matter for memory, only finiteness
                param.normal_(0.0, 0.02)
    track_gradient_peak(model)
    opt = optimi.AdamW(
        model.parameters(),
        lr=1e-4,
        gradient_release=setup.release,
        low_precision=setup.low_precision,
        state_bits=setup.state_bits,
    )
    if setup.release:
        # the sampling hooks of track_gradient_peak run first and see each gradient before release frees it
        optimi.prepare_for_gradient_release(model, opt, ignore_existing_hooks=True)
    else:
        for group in opt.param_groups:  # allocate state up front here too, for a like-for-like RSS
            for param in group["params"]:
                opt.init_param_state(param, group)

    gen = torch.Generator().manual_seed(1)
    report = None
    for _ in range(STEPS):
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.float().reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        loss.backward()
        if not setup.release:
            report = memory_report(model, opt)  # gradients alive: the normal-training peak
            opt.step()
            opt.zero_grad()
    if setup.release:
        report = memory_report(model, opt)
    rank = dist.get_rank() if parallel == "fsdp2" else 0
    if rank == 0:
        print(
            "RESULT "
            + json.dumps(
                {
                    "setup": setup_key,
                    "parallel": parallel,
                    "total_params": total_params,
                    "baseline": baseline,  # rank 0's; every rank reports its own in "baselines"
                    "report": report.to_dict(),
                    "report_str": str(report),
                }
            ),
            flush=True,
        )
    if parallel == "fsdp2":
        # every rank's baseline, for peak RSS above baseline per rank
        baselines = [None] * dist.get_world_size()
        dist.all_gather_object(baselines, baseline)
        if rank == 0:
            print("BASELINES " + json.dumps(baselines), flush=True)
        dist.destroy_process_group()
    else:
        print("BASELINES " + json.dumps([baseline]), flush=True)


# glibc: return freed blocks of >= 64 KiB to the OS at once. By default glibc raises its mmap
# threshold after the first large free (up to 32 MiB), so freed gradients and communication buffers
# stay in its cache and peak RSS says more about the allocator than about the tensors alive.
MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def run(setup_key: str, parallel: str, extra_env: dict[str, str]) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.update(extra_env)
    if parallel == "fsdp2":
        cmd = ["torchrun", "--standalone", "--nproc_per_node", "2", __file__]
        cmd += ["--worker", setup_key, "--parallel", parallel]
        env["OMP_NUM_THREADS"] = "1"
    else:
        cmd = [sys.executable, __file__, "--worker", setup_key, "--parallel", parallel]
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}")
    result = None
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
        elif line.startswith("BASELINES "):
            baselines = json.loads(line[len("BASELINES ") :])
    result["baselines"] = baselines
    return result


def table(results: list[dict], results_mmap: list[dict]) -> str:
    fp32 = next(r for r in results if r["setup"] == "fp32_adamw" and r["parallel"] == "none")
    reference = _bytes_per_param(fp32["report"]["ranks"][0], fp32["total_params"])
    lines = [
        "| setup | parallel | rank | params held | bytes/param | vs fp32 AdamW (1 process) "
        "| peak RSS above baseline: glibc default | glibc mmap threshold 64 KiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r, r_mmap in zip(results, results_mmap):
        rows = zip(r["report"]["ranks"], r["baselines"], r_mmap["report"]["ranks"], r_mmap["baselines"])
        for entry, baseline, entry_mmap, baseline_mmap in rows:
            bpp = _bytes_per_param(entry, r["total_params"])
            lines.append(
                f"| {SETUPS[r['setup']].name} | {'1 process' if r['parallel'] == 'none' else 'FSDP2, 2 ranks'} "
                f"| {entry['rank']} | {entry['param_numel'] / 1e6:.2f} M | {bpp:.2f} | {100 * bpp / reference:.0f}% "
                f"| {(entry['rss_peak'] - baseline) / 2**20:.0f} MiB "
                f"| {(entry_mmap['rss_peak'] - baseline_mmap) / 2**20:.0f} MiB |"
            )
    return "\n".join(lines)


def _bytes_per_param(entry: dict, total_params: int) -> float:
    """Tensor bytes this rank holds (peak live gradients included) per parameter of the whole model."""
    grads = max(entry["grads"], entry["grads_peak"] or 0)
    return (entry["params"] + grads + entry["optimizer_states"]) / total_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["single", "fsdp2"], default=None)
    parser.add_argument("--worker", choices=sorted(SETUPS), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--parallel", choices=["none", "fsdp2"], default="none", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.parallel)
        return

    import torch

    runs = []
    if args.only in (None, "single"):
        runs += [(key, "none") for key in SETUPS]
    if args.only in (None, "fsdp2"):
        runs += [(key, "fsdp2") for key in SETUPS]
    if args.only == "fsdp2":
        runs.insert(0, ("fp32_adamw", "none"))  # the reference row
    results, results_mmap = [], []
    for key, parallel in runs:
        print(f"running {key} ({parallel}) ...", file=sys.stderr, flush=True)
        results.append(run(key, parallel, {}))
        results_mmap.append(run(key, parallel, MMAP_THRESHOLD))
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"model: GPT d_model={D_MODEL} layers={LAYERS} vocab={VOCAB} "
        f"({results[0]['total_params'] / 1e6:.1f} M params), "
        f"batch {BATCH}x{SEQ}, {STEPS} steps\n"
    )
    print(table(results, results_mmap))
    for r in results:
        if r["parallel"] == "fsdp2" and r["setup"] in ("fp32_adamw", "bf16_kahan_release"):
            print(f"\n{SETUPS[r['setup']].name}, FSDP2 on 2 ranks:\n```\n{r['report_str']}\n```")


if __name__ == "__main__":
    main()
