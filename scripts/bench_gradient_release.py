"""Measurements behind docs/gradient_release.md (CPU is enough for all three).

    python scripts/bench_gradient_release.py grad-bytes     # peak live gradient bytes, small transformer
    python scripts/bench_gradient_release.py accumulation   # optimizer vs true gradient accumulation
    python scripts/bench_gradient_release.py rss --repeats 5   # peak RSS, ~200 MiB of bf16 gradients

``rss`` runs every mode in a fresh subprocess, because a process's peak RSS only ever grows.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import psutil
import torch
from torch import Tensor, nn

import optimi

MiB = 2**20


# -- peak live gradient bytes ---------------------------------------------------------------------


def small_transformer(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=256, nhead=4, dim_feedforward=1024, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=4, enable_nested_tensor=False).to(dtype)


def peak_live_grad_bytes(dtype: torch.dtype, release: bool, steps: int = 3) -> tuple[int, int, int]:
    """(peak live p.grad bytes during backward, total gradient bytes, largest gradient bytes)."""
    model = small_transformer(dtype)
    params = list(model.parameters())
    peak = 0

    def count(_: Tensor) -> None:
        # runs before the release hook (registered first): sees the new gradient and all others alive
        nonlocal peak
        peak = max(peak, sum(p.grad.nbytes for p in params if p.grad is not None))

    for p in params:
        p.register_post_accumulate_grad_hook(count)
    optimizer = optimi.AdamW(params, lr=1e-4, gradient_release=release)
    if release:
        optimi.prepare_for_gradient_release(model, optimizer, ignore_existing_hooks=True)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(8, 64, 256, generator=generator).to(dtype)
        model(x).float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    sizes = [p.numel() * p.element_size() for p in params]
    return peak, sum(sizes), max(sizes)


def grad_bytes() -> None:
    print("| dtype | parameters | gradients (all) | largest gradient | peak live, normal | peak live, release |")
    print("|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        normal, total, largest = peak_live_grad_bytes(dtype, release=False)
        release, _, _ = peak_live_grad_bytes(dtype, release=True)
        numel = sum(p.numel() for p in small_transformer(dtype).parameters())
        print(
            f"| {str(dtype).removeprefix('torch.')} | {numel / 1e6:.2f} M | {total / MiB:.2f} MiB | "
            f"{largest / MiB:.2f} MiB | {normal / MiB:.2f} MiB | {release / MiB:.2f} MiB "
            f"({100 * release / normal:.1f} %) |"
        )


# -- optimizer accumulation vs true gradient accumulation ----------------------------------------


def teacher_data(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    teacher = torch.randn(32, 8, generator=torch.Generator().manual_seed(0)) / 32**0.5
    x = torch.randn(n, 32, generator=generator)
    return x, torch.tanh(x @ teacher) + 0.1 * torch.randn(n, 8, generator=generator)


def student() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8))


def train_accumulating(make_optimizer, mode: str, updates: int, micro: int = 4, batch: int = 16):
    """Train with ``micro`` micro-batches per update; returns (model, first update of every parameter).

    Both scale each micro-batch loss by ``1 / micro`` as accumulation code usually does. ``true``:
    the scaled gradients sum in ``p.grad``, then one ``step()``. ``optimizer``: release hooks fold
    each micro-gradient into the optimizer state, the last micro-step updates the weights.
    """
    generator = torch.Generator().manual_seed(2)
    x, y = teacher_data(updates * micro * batch, generator)
    model = student()
    release = mode == "optimizer"
    optimizer = make_optimizer(model.parameters(), release)
    if release:
        optimi.prepare_for_gradient_release(model, optimizer)
    initial = [p.detach().clone() for p in model.parameters()]
    first_update = None
    for update in range(updates):
        for m in range(micro):
            start = (update * micro + m) * batch
            if release:
                optimizer.optimizer_accumulation = m != micro - 1
            loss = nn.functional.mse_loss(model(x[start : start + batch]), y[start : start + batch])
            (loss / micro).backward()
        optimizer.step()
        optimizer.zero_grad()
        if first_update is None:
            first_update = [p.detach() - q for p, q in zip(model.parameters(), initial)]
    return model, first_update


def held_out_loss(model: nn.Module) -> float:
    x, y = teacher_data(4096, torch.Generator().manual_seed(3))
    with torch.no_grad():
        return nn.functional.mse_loss(model(x), y).item()


def accumulation() -> None:
    updates = 300
    optimizers = {
        "AdamW lr=3e-3": lambda params, release: optimi.AdamW(params, lr=3e-3, gradient_release=release),
        "SGD lr=3e-2 momentum=0.9": lambda params, release: optimi.SGD(
            params, lr=3e-2, momentum=0.9, gradient_release=release
        ),
    }
    print(f"{updates} updates of 4 micro-batches x 16 samples; MLP 32-64-64-8 regressing a noisy tanh teacher")
    print(f"held-out MSE at initialisation: {held_out_loss(student()):.4f}")
    print(
        "| optimizer | first update: relative difference | cosine | held-out MSE, true accumulation | "
        "held-out MSE, optimizer accumulation |"
    )
    print("|---|---|---|---|---|")
    for name, make in optimizers.items():
        true_model, true_update = train_accumulating(make, "true", updates)
        opt_model, opt_update = train_accumulating(make, "optimizer", updates)
        a, b = torch.cat([u.flatten() for u in true_update]), torch.cat([u.flatten() for u in opt_update])
        relative = ((a - b).norm() / a.norm()).item()
        cosine = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
        print(
            f"| {name} | {relative:.3f} | {cosine:.3f} | {held_out_loss(true_model):.4f} | "
            f"{held_out_loss(opt_model):.4f} |"
        )


# -- peak RSS --------------------------------------------------------------------------------------


def big_model() -> nn.Module:
    """24 x Linear(2048, 2048) in bf16: 100.7 M parameters, 192 MiB of bf16 gradients."""
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(2048, 2048, bias=False) for _ in range(24)]).to(torch.bfloat16)


def rss_child(mode: str, steps: int = 3) -> dict:
    model = big_model()
    release = mode != "normal"
    optimizer = optimi.AdamW(model.parameters(), lr=1e-4, gradient_release=release)
    if release:
        optimi.prepare_for_gradient_release(model, optimizer)
        if mode == "release-lazy":
            optimizer.state.clear()  # what a lazily initialising implementation does: state created in backward
    setup_rss = psutil.Process().memory_info().rss
    x = torch.randn(8, 2048, dtype=torch.bfloat16)
    start = time.perf_counter()
    for _ in range(steps):
        model(x).float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    grads = sum(p.numel() * p.element_size() for p in model.parameters())
    return dict(mode=mode, setup_rss=setup_rss, peak_rss=peak, grad_bytes=grads, seconds=elapsed)


def rss(repeats: int = 3) -> None:
    results: dict[str, list[dict]] = {"normal": [], "release": [], "release-lazy": []}
    for _ in range(repeats):  # modes interleaved, so that machine load hits them alike
        for mode, runs in results.items():
            out = subprocess.run(
                [sys.executable, __file__, "rss-child", mode], check=True, capture_output=True, text=True
            ).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
    grads = results["normal"][0]["grad_bytes"]
    normal = sorted(r["peak_rss"] for r in results["normal"])[repeats // 2]
    print(f"bf16 AdamW + Kahan, {grads / MiB:.0f} MiB of gradients, 3 steps, batch 8; {repeats} processes per mode")
    print(
        "| mode | RSS after setup (median) | peak RSS (median) | peak RSS (min - max) | median peak saved vs normal |"
    )
    print("|---|---|---|---|---|")
    for mode, runs in results.items():
        setup = sorted(r["setup_rss"] for r in runs)[repeats // 2]
        peaks = sorted(r["peak_rss"] for r in runs)
        median = peaks[repeats // 2]
        print(
            f"| {mode} | {setup / MiB:.0f} MiB | {median / MiB:.0f} MiB | "
            f"{peaks[0] / MiB:.0f} - {peaks[-1] / MiB:.0f} MiB | {(normal - median) / MiB:.0f} MiB |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["grad-bytes", "accumulation", "rss", "rss-child"])
    parser.add_argument("mode", nargs="?", default="normal", help="rss-child only: normal|release|release-lazy")
    parser.add_argument("--repeats", type=int, default=3, help="rss only: processes per mode")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.what == "grad-bytes":
        grad_bytes()
    elif args.what == "accumulation":
        accumulation()
    elif args.what == "rss":
        rss(args.repeats)
    else:
        print(json.dumps(rss_child(args.mode)))


if __name__ == "__main__":
    main()
