"""The fused (Triton) backend on CUDA: the same checks as ``tests/test_fused.py`` on a GPU.

Every optimizer, fp32 and bf16+Kahan, fused and ``triton=True`` against the for-loop backend on
the same device. Skipped, with the reason, where there is no CUDA device or no Triton;
``scripts/gpu_check.sh`` runs it on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch

import optimi
from tests.cases import OPTIMIZERS
from tests.test_fused import (
    check_direct_calls_equal_dynamo,
    check_fused_bf16_kahan_steps,
    check_fused_fp32_run,
    params_on,
    spec_id,
    train_on,
)


def _triton_missing() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return True
    return False


pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(_triton_missing(), reason="the fused backend on CUDA needs Triton"),
]


@pytest.mark.parametrize("spec", OPTIMIZERS, ids=spec_id)
def test_cuda_fused_equals_for_loop_fp32(spec):
    check_fused_fp32_run(spec, "cuda", dict(fused=True))


@pytest.mark.parametrize("spec", OPTIMIZERS, ids=spec_id)
def test_cuda_fused_equals_for_loop_bf16_kahan(spec):
    check_fused_bf16_kahan_steps(spec, "cuda", dict(fused=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("spec", OPTIMIZERS, ids=spec_id)
def test_cuda_direct_graph_calls_equal_dynamo_dispatch(spec, dtype, monkeypatch):
    """Inductor's Triton graph called without Dynamo gives Dynamo's bits on the GPU too."""
    check_direct_calls_equal_dynamo(spec, dtype, "cuda", monkeypatch)


def test_cuda_triton_flag_is_the_fused_path():
    """``triton=True`` selects the fused backend: bit-identical to ``fused=True``."""
    results = []
    for flags in (dict(fused=True), dict(triton=True)):
        params = params_on("cuda", torch.bfloat16)
        optimizer = optimi.AdamW(params, lr=1e-3, **flags)
        assert optimizer.backend_for(optimizer.param_groups[0], params[0].device) == "fused"
        train_on(optimizer, params, 1e-3, 6)
        results.append(params)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_cuda_default_backend_for_a_large_group():
    """``None`` flags: foreach for a small model, fused for one large enough to pay back the compile."""
    small = optimi.AdamW(params_on("cuda", torch.float32), lr=1e-3)
    assert small.backend_for(small.param_groups[0], torch.device("cuda")) == "foreach"
    from optimi.optimizer import FUSED_MIN_ELEMENTS

    large = optimi.AdamW([torch.zeros(FUSED_MIN_ELEMENTS, device="cuda", requires_grad=True)], lr=1e-3)
    assert large.backend_for(large.param_groups[0], torch.device("cuda")) == "fused"
