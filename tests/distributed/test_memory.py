"""The memory report in a single process (world size 1, no process group) and argument errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import optimi
from optimi.distributed import memory as memory_module
from optimi.distributed import memory_report, prepare_gradient_release
from optimi.distributed.memory import RankMemory, count_tensors, register_memory_accountant, track_gradient_peak


def _model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).to(dtype)


def _numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_report_world_size_one_counts_bytes():
    model = _model(torch.bfloat16)
    opt = optimi.AdamW(model.parameters(), lr=1e-3)
    tracker = track_gradient_peak(model)
    model(torch.randn(3, 8, dtype=torch.bfloat16)).sum().backward()
    opt.step()
    report = memory_report(model, opt)
    assert [r.rank for r in report.ranks] == [0]
    rank = report.ranks[0]
    n = _numel(model)
    assert rank.params == rank.grads == 2 * n  # bf16
    assert rank.grads_peak == tracker.peak == 2 * n
    assert rank.kahan == 2 * n  # bf16 Kahan buffers, auto-enabled
    assert rank.optimizer_states == 3 * 2 * n  # two moments + Kahan, all bf16
    assert rank.param_numel == n
    assert rank.bytes_per_param == 2 + 2 + 6
    assert rank.rss > 0 and rank.rss_peak >= rank.rss
    assert rank.device_allocated is None and rank.device_peak is None  # CPU
    assert json.loads(json.dumps(report.to_dict()))["ranks"][0]["kahan"] == 2 * n
    text = str(report)
    assert "optimizer_states" in text and "KiB" in text
    tracker.remove()


def test_report_without_optimizer_and_custom_accountant():
    model = _model()
    assert memory_report(model).ranks[0].optimizer_states == 0

    class Engine:  # stands in for an engine that keeps its own buffers (DeepSpeed)
        def __init__(self, module):
            self.module = module

    def account(engine, optimizer):
        counts = count_tensors(engine.module, optimizer)
        return type(counts)(counts.params, 123, counts.optimizer_states, counts.kahan, counts.param_numel)

    register_memory_accountant(lambda m: isinstance(m, Engine), account)
    try:
        rank = memory_report(Engine(model)).ranks[0]
    finally:
        memory_module._ACCOUNTANTS.pop(0)  # do not leak the test's accountant into other tests
    assert isinstance(rank, RankMemory) and rank.grads == 123 and rank.params == 4 * _numel(model)


def test_distributed_entry_points_reject_plain_modules_and_non_release_optimizers():
    model = _model()
    with pytest.raises(TypeError, match="DistributedDataParallel or FSDP2"):
        prepare_gradient_release(model, optimi.AdamW(model.parameters(), lr=1e-3, gradient_release=True))
    with pytest.raises(TypeError, match="optimi optimizer"):
        prepare_gradient_release(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
