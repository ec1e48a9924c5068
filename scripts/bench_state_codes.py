"""Which 8-bit code and block size for ``state_bits=8``: round-trip error on real moments, and convergence.

    OMP_NUM_THREADS=1 python scripts/bench_state_codes.py                # both parts
    OMP_NUM_THREADS=1 python scripts/bench_state_codes.py --skip-convergence

Part 1 trains ``scripts/train.py``'s byte-level GPT (``--n-embd 256``, so rows are 256 and 1024
elements long and the block size matters) for ``--snapshot-steps`` steps with ``torch.optim.AdamW``
in float32, takes its moments ``m`` and ``v``, and stores them with each candidate code:

- ``dynamic (optimi)``: optimi's code, the dynamic tree code of the 8-bit Adam paper (Dettmers et
  al. 2022; ``optimi/_quantization.py``): a sign bit, then ``E`` zero bits giving the decade
  ``10**-E``, a one bit, and the remaining bits a linear fraction in ``(0.1, 1]``; second moments
  use the unsigned variant (no sign bit, one more fraction bit) on ``sqrt(v)``;
- ``dynamic, v itself``: the same code storing ``v`` rather than ``sqrt(v)`` (half the range);
- ``e4m3, v``: float8 e4m3 of ``x / (blockmax / 448)``, one cast per element;
- ``e4m3, sqrt v``: the same, second moments stored as ``sqrt(v)`` (twice the range, half the precision);
- ``linear``: ``round(127 x / blockmax)`` (signed) and ``round(255 v / blockmax)`` (second moments).

For each it prints the median relative error of the nonzero elements of ``m`` and ``v``, the share
of nonzero elements stored as zero, and the relative L2 error of the Adam direction
``m / (sqrt(v) + eps)`` that an optimizer would step with: the number that matters.

Part 2 trains the default GPT in pure bf16 with Kahan summation and ``state_bits=8`` for ``--steps``
steps with each code (block 256), and with optimi's code at block 32, beside the bf16-state
run, and prints the held-out losses. Runs of this small model differ by a few hundredths from
small perturbations alone: compare codes by a clear margin, not by the third decimal.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train  # noqa: E402
from gpt import GPT, ByteDataset, GPTConfig, load_stdlib_text  # noqa: E402

import optimi.optimizer  # noqa: E402
from optimi import _quantization as q  # noqa: E402

EPS = 1e-6


def _rows(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).float()


def linear_code(signed: bool) -> tuple[Callable, Callable]:
    top = 127.0 if signed else 255.0

    def quantize_(codes: Tensor, scales: Tensor, value: Tensor, kind: str) -> None:
        x = _rows(value)
        block_max = q._blockwise_max(x.abs())
        scales.copy_(block_max / top)
        divisor = q._per_element(torch.where(scales > 0, scales, torch.ones_like(scales)), x.shape[1])
        scaled = (x / divisor).round_().clamp_(-top if signed else 0, top)
        stored = scaled.to(torch.int8).view(torch.uint8) if signed else scaled.to(torch.uint8)
        codes.reshape(x.shape).copy_(stored)

    def dequantize(codes: Tensor, scales: Tensor, kind: str) -> Tensor:
        c = codes.reshape(codes.shape[0], -1)
        x = (c.view(torch.int8) if signed else c).float()
        return (x * q._per_element(scales, x.shape[1])).view(codes.shape)

    return quantize_, dequantize


def e4m3_code(sqrt_second: bool) -> tuple[Callable, Callable]:
    """float8 e4m3 of ``x / (blockmax / 448)``; with ``sqrt_second`` second moments as ``sqrt(v)``."""

    def quantize_(codes: Tensor, scales: Tensor, value: Tensor, kind: str) -> None:
        x = _rows(value)
        if sqrt_second and kind == "second":
            x = x.clamp_min(0).sqrt()
        scales.copy_(q._blockwise_max(x.abs()) / 448.0)
        divisor = q._per_element(torch.where(scales > 0, scales, torch.ones_like(scales)), x.shape[1])
        scaled = (x / divisor).clamp_(-448.0, 448.0)
        codes.reshape(x.shape).copy_(scaled.to(torch.float8_e4m3fn).view(torch.uint8))

    def dequantize(codes: Tensor, scales: Tensor, kind: str) -> Tensor:
        c = codes.reshape(codes.shape[0], -1)
        x = c.view(torch.float8_e4m3fn).float() * q._per_element(scales, c.shape[1])
        if sqrt_second and kind == "second":
            x = x.square()
        return x.view(codes.shape)

    return quantize_, dequantize


def by_kind(signed: tuple[Callable, Callable], second: tuple[Callable, Callable]) -> tuple[Callable, Callable]:
    """One code for first moments, another for second moments."""

    def quantize_(codes: Tensor, scales: Tensor, value: Tensor, kind: str) -> None:
        (second if kind == "second" else signed)[0](codes, scales, value, kind)

    def dequantize(codes: Tensor, scales: Tensor, kind: str) -> Tensor:
        return (second if kind == "second" else signed)[1](codes, scales, kind)

    return quantize_, dequantize


def dynamic_of_v() -> tuple[Callable, Callable]:
    """optimi's code with second moments stored as they are (its square root of ``v**2``)."""

    def quantize_(codes: Tensor, scales: Tensor, value: Tensor, kind: str) -> None:
        q.quantize_(codes, scales, value.float().square() if kind == "second" else value, kind)

    def dequantize(codes: Tensor, scales: Tensor, kind: str) -> Tensor:
        x = q.dequantize(codes, scales, kind)
        return x.sqrt() if kind == "second" else x

    return quantize_, dequantize


CODES: dict[str, tuple[Callable, Callable]] = {
    "dynamic (optimi)": (q.quantize_, q.dequantize),
    "dynamic, v itself": dynamic_of_v(),
    "e4m3, v": e4m3_code(sqrt_second=False),
    "e4m3, sqrt v": e4m3_code(sqrt_second=True),
    "linear": by_kind(linear_code(signed=True), linear_code(signed=False)),
}


def snapshot_moments(steps: int) -> list[tuple[Tensor, Tensor]]:
    """``(m, v)`` of the quantizable weights of the GPT after ``steps`` float32 AdamW steps."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(64, 2, 4, 256))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.99), eps=EPS, weight_decay=0.01)
    text, _ = load_stdlib_text()
    data, order = ByteDataset(text, 64), torch.Generator().manual_seed(0)
    for _ in range(steps):
        inputs, targets = data.batch(data.starts(16, order))
        model(inputs, targets).backward()
        optimizer.step()
        optimizer.zero_grad()
    return [
        (optimizer.state[p]["exp_avg"], optimizer.state[p]["exp_avg_sq"])
        for p in model.parameters()
        if q.quantizable(p)
    ]


def round_trip(code: tuple[Callable, Callable], x: Tensor, kind: str) -> Tensor:
    codes = torch.zeros_like(x, dtype=torch.uint8)
    scales = torch.zeros(x.shape[0], q.blocks_per_row(x.shape))
    code[0](codes, scales, x, kind)
    return code[1](codes, scales, kind)


def errors(code: tuple[Callable, Callable], moments: list[tuple[Tensor, Tensor]]) -> dict[str, float]:
    rel_m, rel_v, flushed, total = [], [], 0, 0
    direction_error = direction_norm = 0.0
    for m, v in moments:
        m2, v2 = round_trip(code, m, "signed"), round_trip(code, v, "second")
        for x, y, out in ((m, m2, rel_m), (v, v2, rel_v)):
            nonzero = x != 0
            out.append(((y - x).abs() / x.abs())[nonzero])
            flushed += int((nonzero & (y == 0)).sum())
            total += int(nonzero.sum())
        u, u2 = m / (v.sqrt() + EPS), m2 / (v2.clamp_min(0).sqrt() + EPS)
        direction_error += float((u2 - u).square().sum())
        direction_norm += float(u.square().sum())
    return {
        "m": float(torch.cat(rel_m).median()),
        "v": float(torch.cat(rel_v).median()),
        "flushed": flushed / max(total, 1),
        "direction": math.sqrt(direction_error / direction_norm),
    }


def converge(steps: int, code: tuple[Callable, Callable] | None, block: int) -> float:
    """Held-out loss of a bf16 + Kahan run with ``state_bits=8`` in ``code`` (None: bf16 state)."""
    saved = (optimi.optimizer.quantize_, optimi.optimizer.dequantize, q.BLOCK_SIZE)
    argv = ["--steps", str(steps), "--log-every", str(steps)]
    try:
        if code is not None:
            optimi.optimizer.quantize_, optimi.optimizer.dequantize = code
            q.BLOCK_SIZE = block
            argv += ["--state-bits", "8"]
        return train.main(argv)
    finally:
        optimi.optimizer.quantize_, optimi.optimizer.dequantize, q.BLOCK_SIZE = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--snapshot-steps", type=int, default=200)
    parser.add_argument("--steps", type=int, default=600, help="steps of each convergence run")
    parser.add_argument("--skip-convergence", action="store_true")
    args = parser.parse_args()

    moments = snapshot_moments(args.snapshot_steps)
    print(f"\n## round trip of AdamW's moments after {args.snapshot_steps} fp32 steps (GPT, n_embd 256)\n")
    print("| code | block | median rel. error m | median rel. error v | nonzero stored as 0 | Adam direction error |")
    print("|---|---:|---:|---:|---:|---:|")
    saved_block = q.BLOCK_SIZE
    rows = [(name, 256) for name in CODES] + [("dynamic (optimi)", b) for b in (32, 64, 1024)]
    for name, block in rows:
        q.BLOCK_SIZE = block
        e = errors(CODES[name], moments)
        print(f"| {name} | {block} | {e['m']:.4f} | {e['v']:.4f} | {e['flushed']:.2%} | {e['direction']:.4f} |")
    q.BLOCK_SIZE = saved_block
    if args.skip_convergence:
        return

    results = {"bf16 state": converge(args.steps, None, 256)}
    for name, code in CODES.items():
        results[f"{name}, block 256"] = converge(args.steps, code, 256)
    for block in (32,):
        results[f"dynamic (optimi), block {block}"] = converge(args.steps, CODES["dynamic (optimi)"], block)
    print(f"\n## held-out loss, bf16 + Kahan AdamW, {args.steps} steps (default GPT)\n")
    print("| moments | held-out loss |")
    print("|---|---:|")
    for name, loss in results.items():
        print(f"| {name} | {loss:.4f} |")


if __name__ == "__main__":
    main()
