"""StableAdamW's RMS is a per-tensor reduction that sharded training must combine across shards."""

from __future__ import annotations

import pytest
import torch

from optimi._ops import TENSOR_OPS
from optimi.stableadamw import _stableadamw_moments, _stableadamw_rms_sums, stableadamw
from tests.cases import synthetic_grad

BACKENDS = [
    "for_loop",
    "foreach",
    pytest.param("fused", marks=pytest.mark.skipif(not hasattr(torch, "compile"), reason="no torch.compile")),
]

HP = dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1, eps=1e-6)
STEPS = 8


def _grad(param: torch.Tensor, step: int) -> torch.Tensor:
    # a gradient spike at step 5, which the update clipping must catch
    return synthetic_grad(param, step, 0) * (5.0 if step == 5 else 1.0)


def _run_whole(start: torch.Tensor, backend: str = "for_loop") -> torch.Tensor:
    param = start.clone()
    exp_avg, exp_avg_sq = torch.zeros_like(param), torch.zeros_like(param)
    for step in range(1, STEPS + 1):
        grad = _grad(param, step)
        stableadamw([param], [grad], [exp_avg], [exp_avg_sq], [None], step=step, backend=backend, **HP)
    return param


def _run_halves(start: torch.Tensor, reduce_sums, backend: str = "for_loop") -> torch.Tensor:
    """The two halves of ``start`` stepped as separate tensors, like two shards of one parameter."""
    halves = [start[:32].clone(), start[32:].clone()]
    exp_avgs = [torch.zeros_like(h) for h in halves]
    exp_avg_sqs = [torch.zeros_like(h) for h in halves]
    for step in range(1, STEPS + 1):
        grad = _grad(torch.cat(halves), step)
        grads = [grad[:32].clone(), grad[32:].clone()]
        stableadamw(
            halves,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [None, None],
            step=step,
            reduce_sums=reduce_sums,
            backend=backend,
            **HP,
        )
    return torch.cat(halves)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reduce_sums_makes_shards_match_the_whole_tensor(backend):
    start = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    calls = []

    def reduce_sums(sums, counts):
        calls.append(list(counts))
        total, count = sums[0] + sums[1], counts[0] + counts[1]
        return [total, total], [count, count]

    whole = _run_whole(start)  # the for-loop on the whole tensor is the reference for every backend
    torch.testing.assert_close(_run_halves(start, reduce_sums, backend), whole, rtol=1e-6, atol=1e-7)
    assert calls == [[256, 256]] * STEPS
    # without the reduction each half clips by its own RMS and the runs part ways
    assert (_run_halves(start, None, backend) - whole).abs().max() > 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_first_pass_is_a_pure_reduction(dtype):
    """The fused order's first pass sums this step's RMS terms and writes nothing else.

    Its sum equals the one the for-loop order leaves in the gradient buffer after updating the
    moments ([Note: StableAdamW's two passes]); it runs eagerly too (a non-contiguous parameter).
    """
    generator = torch.Generator().manual_seed(1)
    grad = (torch.randn(300, generator=generator) * 3).to(dtype)
    exp_avg = torch.randn(300, generator=generator).to(dtype)
    exp_avg_sq = torch.rand(300, generator=generator).to(dtype)
    inputs = [grad, exp_avg, exp_avg_sq]
    before = [t.clone() for t in inputs]
    rms_sum = torch.zeros(())
    _stableadamw_rms_sums(TENSOR_OPS, None, *inputs, rms_sum, None, beta2=0.99, eps_sq=1e-12)
    for tensor, original in zip(inputs, before):
        assert torch.equal(tensor, original)

    moments = [t.clone() for t in inputs]
    _stableadamw_moments(TENSOR_OPS, None, *moments, None, beta1=0.9, beta2=0.99, eps_sq=1e-12, accumulate=False)
    # eagerly both orders round the same terms to the gradient's dtype and sum them alike
    assert torch.equal(rms_sum, TENSOR_OPS.sum(moments[0]))
    exact = (grad.double() ** 2 / moments[2].double().clamp_min(1e-12)).sum()
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    assert abs(rms_sum.item() - exact.item()) <= tolerance * exact.item()
    assert rms_sum.item() > 300  # the gradient is large against v: the clipping is active


@pytest.mark.skipif(not hasattr(torch, "compile"), reason="no torch.compile")
def test_fused_sums_accumulate_in_each_tensors_precision():
    """In a group mixing float32 and float64 parameters, a float64 tensor's RMS sums in float64.

    Summed in float32, its clipped learning rate would be off by ~1e-7 relative and its weights by
    ~1e-9, far beyond float64's agreement between the fused and for-loop backends.
    """
    generator = torch.Generator().manual_seed(2)
    starts = [torch.randn(4096, generator=generator), torch.randn(4096, generator=generator, dtype=torch.float64)]
    results = []
    for backend in ("for_loop", "fused"):
        params = [start.clone() for start in starts]
        exp_avgs = [torch.zeros_like(p) for p in params]
        exp_avg_sqs = [torch.zeros_like(p) for p in params]
        for step in range(1, 4):
            grads = [synthetic_grad(p, step, i) * 5.0 for i, p in enumerate(params)]  # RMS > 1: clipping
            stableadamw(params, grads, exp_avgs, exp_avg_sqs, [None, None], step=step, backend=backend, **HP)
        results.append(params[1])
    torch.testing.assert_close(results[1], results[0], rtol=1e-13, atol=1e-13)
