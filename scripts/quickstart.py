"""Single-process quickstart: a small bf16 MLP trained with optimi AdamW and Kahan summation.

    python scripts/quickstart.py

Trains the same model in fp32, pure bf16 and pure bf16 with Kahan summation on a fixed regression
task and prints the final losses and the optimizer's memory per parameter.
"""

from __future__ import annotations

import torch
from torch import nn

import optimi


def train(dtype: torch.dtype, kahan_sum: bool | None, steps: int = 300) -> tuple[float, float]:
    torch.manual_seed(0)
    inputs = torch.randn(512, 32)
    targets = torch.sin(inputs @ torch.randn(32, 1))
    model = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 1)).to(dtype)
    optimizer = optimi.AdamW(model.parameters(), lr=2e-4, weight_decay=1e-2, kahan_sum=kahan_sum)
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(inputs.to(dtype)).float(), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    state_bytes = sum(
        t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)
    )
    n_params = sum(p.numel() for p in model.parameters())
    return loss.item(), state_bytes / n_params


def main() -> None:
    print(f"{'run':<16}{'final loss':>12}{'state bytes/param':>20}")
    for name, dtype, kahan in [
        ("fp32", torch.float32, None),
        ("bf16", torch.bfloat16, False),
        ("bf16 + Kahan", torch.bfloat16, None),
    ]:
        loss, per_param = train(dtype, kahan)
        print(f"{name:<16}{loss:>12.5f}{per_param:>20.1f}")


if __name__ == "__main__":
    main()
