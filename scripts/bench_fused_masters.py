"""Fused AdamW bf16 step by ``low_precision`` mode: the in-kernel float32 master against the eager one it replaced.

Command lines (the numbers in docs/backends.md, "Low-precision modes in the fused kernel")::

    python scripts/bench_fused_masters.py --rounds 30 --threads 1
    python scripts/bench_fused_masters.py --rounds 30 --threads 2

``--tensors`` bf16 parameters of ``--numel`` elements (default 20 x 2^18), lr 1e-3, weight decay
1e-2, fused backend, in the modes kahan, nearest, stochastic and remainder. For stochastic and
remainder, "old eager master" runs :func:`old_step_in_precision`, a copy of
``OptimiOptimizer._step_in_precision`` before the kernel built its own masters (commit 74e2c2f): one
parameter at a time, the master built eagerly, the fused step on that float32 master, the eager
write-back. Each implementation has its own parameters; they alternate step by step within a round
(gradients refreshed outside the timed region) and the minimum over the rounds is reported, since
a neighbour's load only ever adds time.
"""

from __future__ import annotations

import argparse
import time

import torch

import optimi
from optimi._low_precision import MASTER_MODES, master_from_remainder, split_master_, stochastic_round_, stream_key
from optimi._ops import LOW_PRECISION_DTYPES


def old_step_in_precision(self, group, params, grads, states, *, step, accumulate, backend, first_indices=None):
    """``OptimiOptimizer._step_in_precision`` at 74e2c2f (copied for timing; fp16 branch left out)."""
    if accumulate or group.get("low_precision") not in MASTER_MODES:
        self._step_group(group, params, grads, states, step=step, accumulate=accumulate, backend=backend)
        return
    mode = group["low_precision"]
    for i, (param, grad, state) in enumerate(zip(params, grads, states)):
        if param.dtype not in LOW_PRECISION_DTYPES:
            continue
        master = master_from_remainder(param, state["remainder"]) if mode == "remainder" else param.float()
        self._step_group(group, [master], [grad], [state], step=step, accumulate=False, backend=backend)
        if mode == "remainder":
            split_master_(param, state["remainder"], master)
        else:
            key = stream_key(group["rounding_seed"], state["step"])
            stochastic_round_(param, master, key=key, first_index=first_indices[i] if first_indices else 0)


class OldPathAdamW(optimi.AdamW):
    _step_in_precision = old_step_in_precision


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--tensors", type=int, default=20)
    parser.add_argument("--numel", type=int, default=2**18)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setups = [("kahan", optimi.AdamW), ("nearest", optimi.AdamW)]
    setups += [(m, cls) for m in ("stochastic", "remainder") for cls in (OldPathAdamW, optimi.AdamW)]
    runs = []
    for mode, cls in setups:
        generator = torch.Generator().manual_seed(0)
        values = [torch.randn(2, args.numel, generator=generator).to(torch.bfloat16) for _ in range(args.tensors)]
        params = [torch.nn.Parameter(v[0].clone()) for v in values]
        grads = [v[1].clone() for v in values]
        opt = cls(params, lr=1e-3, weight_decay=1e-2, low_precision=mode, fused=True)
        name = f"{mode} ({'old eager master' if cls is OldPathAdamW else 'new' if mode in MASTER_MODES else 'fused'})"
        runs.append((name, params, grads, opt, []))
    for _ in range(3):  # compile and warm
        for _, params, grads, opt, _ in runs:
            for p, gr in zip(params, grads):
                p.grad = gr.clone()
            opt.step()
    for _ in range(args.rounds):
        for _, params, grads, opt, times in runs:
            for p, gr in zip(params, grads):
                p.grad = gr.clone()
            start = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - start)
    best = {name: min(times) * 1e3 for name, _, _, _, times in runs}
    for name, ms in best.items():
        print(f"{name:32s} min {ms:7.2f} ms/step")
    for mode in ("stochastic", "remainder"):
        old, new = best[f"{mode} (old eager master)"], best[f"{mode} (new)"]
        print(f"{mode}: old/new = {old / new:.2f}x; new/kahan = {new / best['kahan (fused)']:.2f}x")


if __name__ == "__main__":
    main()
