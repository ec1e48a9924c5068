"""StableAdamW's RMS is a per-tensor reduction that sharded training must combine across shards."""

from __future__ import annotations

import torch

from optimi.stableadamw import stableadamw
from tests.cases import synthetic_grad

HP = dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1, eps=1e-6)
STEPS = 8


def _grad(param: torch.Tensor, step: int) -> torch.Tensor:
    # a gradient spike at step 5, which the update clipping must catch
    return synthetic_grad(param, step, 0) * (5.0 if step == 5 else 1.0)


def _run_whole(start: torch.Tensor) -> torch.Tensor:
    param = start.clone()
    exp_avg, exp_avg_sq = torch.zeros_like(param), torch.zeros_like(param)
    for step in range(1, STEPS + 1):
        stableadamw([param], [_grad(param, step)], [exp_avg], [exp_avg_sq], [None], step=step, **HP)
    return param


def _run_halves(start: torch.Tensor, reduce_sums) -> torch.Tensor:
    """The two halves of ``start`` stepped as separate tensors, like two shards of one parameter."""
    halves = [start[:32].clone(), start[32:].clone()]
    exp_avgs = [torch.zeros_like(h) for h in halves]
    exp_avg_sqs = [torch.zeros_like(h) for h in halves]
    for step in range(1, STEPS + 1):
        grad = _grad(torch.cat(halves), step)
        grads = [grad[:32].clone(), grad[32:].clone()]
        stableadamw(halves, grads, exp_avgs, exp_avg_sqs, [None, None], step=step, reduce_sums=reduce_sums, **HP)
    return torch.cat(halves)


def test_reduce_sums_makes_shards_match_the_whole_tensor():
    start = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    calls = []

    def reduce_sums(sums, counts):
        calls.append(list(counts))
        total, count = sums[0] + sums[1], counts[0] + counts[1]
        return [total, total], [count, count]

    whole = _run_whole(start)
    torch.testing.assert_close(_run_halves(start, reduce_sums), whole, rtol=1e-6, atol=1e-7)
    assert calls == [[256, 256]] * STEPS
    # without the reduction each half clips by its own RMS and the runs part ways
    assert (_run_halves(start, None) - whole).abs().max() > 1e-4
