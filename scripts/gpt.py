"""A small GPT and a byte-level dataset made of the Python standard library's own source.

Used by ``scripts/train.py`` and ``scripts/bench_convergence.py``. Nothing here touches the
process group, CUDA or the environment at import.

The text exists on every machine with Python, so nothing is downloaded: the ``*.py`` files directly
in ``sysconfig.get_paths()["stdlib"]`` (no subdirectories, so installed packages never leak in),
read in sorted order and tokenized as bytes (vocabulary 256). Every tenth file (indices 0, 10,
20, ... of the sorted list) is held out for validation, so the split is fixed and documents never
straddle it. The exact bytes depend on the Python version, so compare losses across machines only
with the same Python.
"""

from __future__ import annotations

import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GPT", "GPTConfig", "ByteDataset", "load_stdlib_text"]

VOCAB_SIZE = 256  # bytes
HELD_OUT_EVERY = 10  # every tenth file of the sorted list is validation text


def load_stdlib_text(stdlib: str | Path | None = None) -> tuple[Tensor, Tensor]:
    """Return ``(train, val)``: uint8 tensors of the standard library's ``*.py`` bytes.

    Files are read in sorted order; file ``i`` goes to validation when ``i % 10 == 0``. A NUL byte
    separates files so that a window spanning two files sees a boundary.
    """
    root = Path(stdlib if stdlib is not None else sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    if len(files) < HELD_OUT_EVERY:
        raise RuntimeError(f"found only {len(files)} *.py files in {root}; need the Python standard library source")
    train, val = bytearray(), bytearray()
    for i, path in enumerate(files):
        (val if i % HELD_OUT_EVERY == 0 else train).extend(path.read_bytes() + b"\0")
    return torch.frombuffer(train, dtype=torch.uint8).clone(), torch.frombuffer(val, dtype=torch.uint8).clone()


class ByteDataset:
    """Random windows of ``block_size + 1`` bytes from a uint8 text tensor.

    Sampling draws from an explicit ``torch.Generator`` so that the data position is exactly the
    generator's state: save ``generator.get_state()`` and the run continues with the same batches.
    """

    def __init__(self, data: Tensor, block_size: int):
        if data.numel() <= block_size + 1:
            raise ValueError(f"text of {data.numel()} bytes is shorter than one window of {block_size + 1}")
        self.data = data
        self.block_size = block_size

    def starts(self, count: int, generator: torch.Generator) -> Tensor:
        """``count`` random window start offsets."""
        return torch.randint(self.data.numel() - self.block_size - 1, (count,), generator=generator)

    def batch(self, starts: Tensor) -> tuple[Tensor, Tensor]:
        """Inputs and next-byte targets (int64, shape ``(len(starts), block_size)``) for ``starts``."""
        offsets = torch.arange(self.block_size + 1)
        windows = self.data[starts[:, None] + offsets].long()
        return windows[:, :-1], windows[:, 1:]


@dataclass(frozen=True)
class GPTConfig:
    """Size of the GPT."""

    #: context length in bytes
    block_size: int = 64
    #: transformer blocks
    n_layer: int = 2
    #: attention heads per block (must divide ``n_embd``)
    n_head: int = 4
    #: embedding width
    n_embd: int = 64


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention then a 4x GELU MLP."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.fc_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(width, dim=2)
        # (batch, heads, length, head width)
        q, k, v = (t.view(batch, length, self.n_head, width // self.n_head).transpose(1, 2) for t in (q, k, v))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(batch, length, width))
        return x + self.fc_proj(F.gelu(self.fc(self.ln_2(x))))


class GPT(nn.Module):
    """A byte-level GPT: token + learned position embeddings, ``n_layer`` blocks, a final norm and
    an (untied) output head. ``forward(idx, targets)`` returns the mean cross-entropy, computed in
    fp32 whatever the parameter dtype."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.n_embd % config.n_head:
            raise ValueError(f"n_head={config.n_head} must divide n_embd={config.n_embd}")
        self.config = config
        self.wte = nn.Embedding(VOCAB_SIZE, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, VOCAB_SIZE, bias=False)
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer)
        for block in self.blocks:
            for proj in (block.proj, block.fc_proj):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: Tensor, targets: Tensor) -> Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(positions)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.float().view(-1, VOCAB_SIZE), targets.reshape(-1))
