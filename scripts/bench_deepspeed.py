"""DeepSpeed ZeRO with optimi AdamW: per-rank memory and loss, fp32 master vs bf16 master + Kahan.

    DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node 2 scripts/bench_deepspeed.py
    DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node 2 scripts/bench_deepspeed.py --stages 1 2 3 --steps 300

On GPUs drop ``DS_ACCELERATOR`` and pass ``--backend nccl``. For each ZeRO stage it trains the same
small byte-level transformer language model on the Python standard library's own source (every
machine has it) in three DeepSpeed bf16 modes:

* ``fp32 master``: DeepSpeed's default bf16 mode, an fp32 master copy of the partition and fp32
  optimizer states (optimi sees fp32 partitions, so no Kahan buffer),
* ``bf16 master + Kahan``: ``bf16_master_weights_and_grads`` + ``bf16_optimizer_states``; optimi
  sees bf16 partitions, keeps bf16 moments and a bf16 Kahan compensation buffer,
* ``bf16 master, no Kahan``: the same with ``kahan_sum=False``,

and prints, per rank, the bytes per model parameter held by parameters, master partition,
gradients (measured between backward and step, when they are alive), optimizer states and Kahan
buffers (:func:`optimi.distributed.deepspeed.deepspeed_rank_memory`), then the mean training loss
of the last steps and the held-out loss of each run.
"""

from __future__ import annotations

import argparse
import json
import math
import sysconfig
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import optimi
from optimi.distributed.deepspeed import deepspeed_rank_memory, initialize


class TinyLM(nn.Module):
    """A byte-level causal transformer: embedding, ``layers`` pre-norm blocks, tied output head."""

    def __init__(self, dim: int, layers: int, heads: int, context: int):
        super().__init__()
        self.embed = nn.Embedding(256, dim)
        self.pos = nn.Parameter(torch.randn(context, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        mask = self.mask[: tokens.shape[1], : tokens.shape[1]].to(x.dtype)
        x = self.blocks(x, mask=mask, is_causal=True)
        return self.norm(x) @ self.embed.weight.T


def corpus(limit: int) -> torch.Tensor:
    """The first ``limit`` bytes of the standard library's ``.py`` files, in sorted order."""
    chunks, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        size += len(data)
        if size >= limit:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8).long()


def batch(data: torch.Tensor, rows: int, context: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(0, len(data) - context - 1, (rows,), generator=gen)
    window = torch.stack([data[s : s + context + 1] for s in starts.tolist()])
    return window[:, :-1], window[:, 1:]


BF16_MASTER = {"enabled": True, "bf16_master_weights_and_grads": True, "bf16_optimizer_states": True}
#: mode -> (DeepSpeed "bf16" config, optimi kahan_sum)
MODES = {
    "fp32 master": ({"enabled": True}, None),
    "bf16 master + Kahan": (BF16_MASTER, None),
    "bf16 master, no Kahan": (BF16_MASTER, False),
}


def run(mode: str, stage: int, args: argparse.Namespace, train: torch.Tensor, val: torch.Tensor) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    bf16, kahan_sum = MODES[mode]
    torch.manual_seed(0)
    model = TinyLM(args.dim, args.layers, args.heads, args.context)
    optimizer = optimi.AdamW(
        optimi.param_groups_weight_decay(model, weight_decay=0.1), lr=args.lr, betas=(0.9, 0.99), kahan_sum=kahan_sum
    )
    warmup = max(1, args.steps // 10)

    def schedule(step: int) -> float:  # linear warmup, cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    config = {
        "train_micro_batch_size_per_gpu": args.batch // world,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {
            "stage": stage,
            # DeepSpeed's default buckets hold 5e8 elements, allocated in full under ZeRO-3 (about
            # 1 GB here): size them to the model so that the table shows per-parameter costs
            "reduce_bucket_size": 200_000,
            "allgather_bucket_size": 200_000,
            "stage3_prefetch_bucket_size": 200_000,
            # partition every parameter (by default ZeRO-3 keeps tensors under 1e5 elements whole)
            "stage3_param_persistence_threshold": 0,
        },
        "bf16": bf16,
    }
    setup = initialize(
        model, optimizer, config, lr_scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=schedule)
    )
    engine = setup.engine
    numel = sum(p.numel() for p in model.parameters() if not hasattr(p, "ds_numel")) or sum(
        p.ds_numel for p in model.parameters()
    )
    gen = torch.Generator().manual_seed(1234)  # the same global batches in every mode
    losses, memory = [], None
    for step in range(args.steps):
        tokens, targets = batch(train, args.batch, args.context, gen)
        shard = slice(rank * (args.batch // world), (rank + 1) * (args.batch // world))
        logits = engine(tokens[shard])
        loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), targets[shard].flatten())
        engine.backward(loss)
        if step == args.steps - 1:
            memory = deepspeed_rank_memory(engine)  # gradients are alive here, before the step frees them
        engine.step()
        losses.append(loss.item())
    engine.eval()
    gen = torch.Generator().manual_seed(99)
    val_losses = []
    with torch.no_grad():
        for _ in range(args.val_batches):
            tokens, targets = batch(val, args.batch // world, args.context, gen)
            logits = engine(tokens)
            val_losses.append(nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten()).item())
    per_rank = [None] * world
    dist.all_gather_object(per_rank, memory)
    val_loss = torch.tensor(sum(val_losses) / len(val_losses))
    dist.all_reduce(val_loss)
    tail = losses[-max(1, args.steps // 10) :]
    result = {
        "mode": mode,
        "stage": stage,
        "numel": numel,
        "memory": per_rank,
        "train_loss": sum(tail) / len(tail),
        "val_loss": val_loss.item() / world,
        "changes": setup.changes,
    }
    engine.destroy()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[2])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--val-batches", type=int, default=8)
    parser.add_argument("--backend", default="gloo")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here (rank 0)")
    args = parser.parse_args()

    import deepspeed

    deepspeed.init_distributed(dist_backend=args.backend)
    data = corpus(2_000_000)
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    results = [run(mode, stage, args, train, val) for stage in args.stages for mode in MODES]

    if dist.get_rank() == 0:
        world = dist.get_world_size()
        print(f"\n{world} ranks, ZeRO stages {args.stages}, {results[0]['numel']:,} parameters, {args.steps} steps")
        print("\nper-rank bytes per model parameter (rank 0; gradients measured between backward and step)\n")
        print("| stage | mode | params | master | grads | optimizer states (of which Kahan) | total |")
        print("|---|---|---|---|---|---|---|")
        for r in results:
            b, n = r["memory"][0], r["numel"]
            total = b["params"] + b["master_params"] + b["grads"] + b["optimizer_states"]
            print(
                f"| {r['stage']} | {r['mode']} | {b['params'] / n:.2f} | {b['master_params'] / n:.2f} | "
                f"{b['grads'] / n:.2f} | {b['optimizer_states'] / n:.2f} ({b['kahan'] / n:.2f}) | {total / n:.2f} |"
            )
        print("\n| stage | mode | train loss (last 10% of steps) | held-out loss |")
        print("|---|---|---|---|")
        for r in results:
            print(f"| {r['stage']} | {r['mode']} | {r['train_loss']:.4f} | {r['val_loss']:.4f} |")
        if args.json is not None:
            args.json.write_text(json.dumps(results, indent=1))
    dist.barrier()


if __name__ == "__main__":
    main()
