"""Gradient release, accumulation and memory accounting on 2 gloo ranks (CPU), against one process.

Each module-scoped fixture spawns the 2 ranks once (``harness.run_ranks``) and runs a whole
scenario of ``worker.py``; the tests below assert on what the ranks returned. Every distributed
run is compared with a single-process run on the full global batch (each rank takes half).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch.distributed as dist

from tests.distributed.harness import run_ranks

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed"),
]

# the contract: N ranks, each on 1/N of the global batch, end with the parameters of one process on the
# whole batch to 1e-5 relative in fp32
FP32_RTOL = 1e-5
# bf16 + Kahan: the sharded/averaged gradient rounds differently from the single-process one; after
# 7 steps the parameters agree to about one bf16 ulp (relative spacing 2**-8 .. 2**-7)
BF16_RTOL = 2e-2

# the optimizer cases of worker.optimizer_cases()
OPTIMIZERS = ["adamw", "sgd_momentum", "stableadamw", "ranger"]


@pytest.fixture(scope="module")
def fsdp() -> list[dict[str, Any]]:
    return run_ranks("fsdp")


@pytest.fixture(scope="module")
def ddp() -> list[dict[str, Any]]:
    return run_ranks("ddp")


@pytest.fixture(scope="module")
def memory() -> list[dict[str, Any]]:
    return run_ranks("memory")


# -- FSDP2 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["step", "release", "release_accum"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fsdp2_matches_single_process_fp32(fsdp, name, mode):
    for rank in fsdp:
        entry = rank[f"{name}/fp32/{mode}"]
        assert entry["rel_err"] <= FP32_RTOL, entry
        assert entry["grads_left"] == 0  # release freed every gradient; step() + zero_grad() too


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fsdp2_bf16_kahan_release_accumulation_close(fsdp, name):
    entry = fsdp[0][f"{name}/bf16_kahan/release_accum"]
    assert entry["rel_err"] <= BF16_RTOL, entry
    assert entry["state_sharded"]
    # Kahan buffers exist (Ranger: also for its slow weights), are bf16 like the parameters and are
    # sharded like everything else
    assert sum(entry["kahan_bytes_per_rank"]) == entry["ref_kahan_bytes"]
    assert entry["ref_kahan_bytes"] in (entry["ref_param_bytes"], 2 * entry["ref_param_bytes"])


def test_fsdp2_bf16_kahan_normal_step_close(fsdp):
    assert fsdp[0]["sgd_momentum/bf16_kahan/step"]["rel_err"] <= BF16_RTOL


def test_fsdp2_normal_step_foreach_backend(fsdp):
    assert fsdp[0]["adamw_foreach/fp32/step"]["rel_err"] <= FP32_RTOL
    assert fsdp[0]["adamw_foreach/bf16_kahan/step"]["rel_err"] <= BF16_RTOL
    assert fsdp[0]["adamw_foreach/bf16_kahan/step"]["state_sharded"]


def test_fsdp2_fused_backend_on_local_shards(fsdp):
    """The fused backend steps DTensor local shards like one process steps whole tensors."""
    for rank in fsdp:
        assert rank["adamw_fused/fp32/step"]["rel_err"] <= FP32_RTOL
        assert rank["adamw_fused/fp32/release"]["rel_err"] <= FP32_RTOL
        assert rank["adamw_fused/bf16_kahan/release"]["rel_err"] <= BF16_RTOL
        assert rank["adamw_fused/bf16_kahan/release"]["state_sharded"]
        assert rank["adamw_fused/fp32/step"]["direct_steps"] >= 1  # compiled, then called directly
        # whole-tensor RMS through reduce_sums
        assert rank["stableadamw_fused/fp32/release"]["rel_err"] <= FP32_RTOL


def test_fsdp2_stableadamw_rms_covers_whole_tensors(fsdp):
    # with a gradient spike StableAdamW clips; N shards clip like one tensor only with the reduction
    assert fsdp[0]["stableadamw/spike/reduce=True"] <= FP32_RTOL
    assert fsdp[0]["stableadamw/spike/reduce=False"] > 1e-3


def test_fsdp2_mixed_precision(fsdp):
    # release steps the fp32 sharded params exactly like a normal step on the same bf16 compute ...
    assert fsdp[0]["mixed_precision_release_vs_step"] <= FP32_RTOL
    # ... and bf16 compute stays near the fp32 run (Adam magnifies bf16 noise in tiny gradients)
    entry = fsdp[0]["adamw/mixed_precision/release"]
    assert entry["rel_err"] <= 0.15, entry
    assert entry["state_sharded"] and sum(entry["state_bytes_per_rank"]) == entry["ref_state_bytes"]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fsdp2_state_is_sharded(fsdp, name):
    entry = fsdp[0][f"{name}/fp32/release"]
    assert entry["state_sharded"]  # DTensors with the parameter's placements
    per_rank = entry["state_bytes_per_rank"]
    assert sum(per_rank) == entry["ref_state_bytes"] > 0
    assert max(per_rank) <= 0.55 * entry["ref_state_bytes"]  # ~1/2 (7 rows split 4 + 3)
    assert sum(entry["param_bytes_per_rank"]) == entry["ref_param_bytes"]
    assert entry["release_flag_after_remove"] is False


def test_fsdp2_remove_release_restores_normal_steps(fsdp):
    assert fsdp[0]["remove_then_step"] <= FP32_RTOL


def test_fsdp2_release_details(fsdp):
    for rank in fsdp:
        assert rank["state_up_front"]  # allocated (sharded) by prepare, before any backward
        assert rank["sync_off_refused"]  # set_requires_gradient_sync(False) raises under release
        assert rank["checkpoint"]  # sharded state round-trips through torch.distributed.checkpoint


@pytest.mark.parametrize("kind", ["fsdp", "ddp"])
def test_release_steps_count_as_optimizer_steps_for_schedulers(request, kind):
    """No "lr_scheduler.step() before optimizer.step()" warning when only the release hooks stepped."""
    for rank in request.getfixturevalue(kind):
        assert rank["scheduler_order_warnings"] == []


# -- DDP ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["release", "release_accum"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_ddp_release_matches_single_process_fp32(ddp, name, mode):
    for rank in ddp:
        entry = rank[f"{name}/fp32/{mode}"]
        assert entry["rel_err"] <= FP32_RTOL, entry
        assert entry["identical"]  # replicas bit-identical (all-gathered and compared)
        assert entry["grads_left"] == 0


@pytest.mark.parametrize("variant", ["bucket_view", "tiny_buckets"])
def test_ddp_release_bucket_layouts(ddp, variant):
    entry = ddp[0][f"adamw/fp32/release/{variant}"]
    assert entry["rel_err"] <= FP32_RTOL and entry["identical"] and entry["grads_left"] == 0


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_ddp_bf16_kahan_release_accumulation(ddp, name):
    entry = ddp[0][f"{name}/bf16_kahan/release_accum"]
    assert entry["rel_err"] <= BF16_RTOL and entry["identical"]


@pytest.mark.parametrize("bucket_view", [False, True])
def test_ddp_remove_release_restores_normal_steps(ddp, bucket_view):
    entry = ddp[0][f"remove_then_step/bucket_view={bucket_view}"]
    assert entry["rel_err"] <= FP32_RTOL and entry["identical"]


def test_ddp_refuses_no_sync_and_user_comm_hooks(ddp):
    for rank in ddp:
        assert rank["no_sync_refused"]
        assert rank["user_hook_refused"]


# -- memory report --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fsdp2", "ddp"])
def test_release_lowers_peak_gradient_bytes(memory, kind):
    normal = memory[0][f"{kind}/release=False"]["ranks"]
    release = memory[0][f"{kind}/release=True"]["ranks"]
    assert len(normal) == len(release) == 2
    for before, after in zip(normal, release):
        assert before["grads"] == before["grads_peak"] == before["params"] > 0  # fp32 grads, all alive
        assert after["grads"] == 0
        assert 0 < after["grads_peak"] < before["grads_peak"]
        assert after["optimizer_states"] == before["optimizer_states"]
        assert after["rss"] > 0 and after["device_allocated"] is None and after["device_peak"] is None
    if kind == "fsdp2":  # local shards: the two ranks split the model
        assert normal[0]["params"] + normal[1]["params"] == 4348
    else:  # full replicas
        assert normal[0]["params"] == normal[1]["params"] == 4348
    assert "grads_peak" in memory[0][f"{kind}/release=True/str"]


# -- the fused backend when compiling fails ---------------------------------------------------------


@pytest.fixture(scope="module")
def fused_fallback() -> list[dict[str, Any]]:
    return run_ranks("fused_fallback")


@pytest.mark.parametrize("mode", ["step", "release"])
def test_fsdp2_fused_compile_failure_falls_back_to_the_for_loop(fused_fallback, mode):
    """``fused=None`` under FSDP2 with a failing C++ compiler: one warning per rank, for-loop results."""
    for rank in fused_fallback:
        entry = rank[f"auto/{mode}"]
        assert entry["rel_err"] <= FP32_RTOL, entry
        assert entry["fallen_back"] == ["for_loop"]
    # the configuration fell back during the first run; the second never compiled nor warned again
    first = fused_fallback[0]["auto/step"]["warnings"]
    assert len(first) == 1 and "for_loop backend" in first[0] and "torch" in first[0]
    assert fused_fallback[0]["auto/release"]["warnings"] == []


def test_fsdp2_explicit_fused_compile_failure_raises(fused_fallback):
    for rank in fused_fallback:
        assert rank["explicit_error"] is not None and "fused=True" in rank["explicit_error"]
        assert rank["explicit_unchanged"]


@pytest.fixture(scope="module")
def low_precision() -> list[dict[str, Any]]:
    return run_ranks("low_precision")


@pytest.mark.parametrize("mode", ["step", "release"])
def test_ddp_stochastic_rounding_keeps_replicas_bit_identical(low_precision, mode):
    """20 steps: the random bits hash (seed, step, index), never a per-process RNG state."""
    assert all(rank[f"ddp_stochastic_identical/{mode}"] for rank in low_precision)


def test_fsdp2_shards_draw_the_bits_of_the_whole_tensor(low_precision):
    assert all(rank["fsdp_shards_draw_the_whole_tensors_bits"] for rank in low_precision)


@pytest.mark.parametrize("mode", ["stochastic", "remainder"])
@pytest.mark.parametrize("release", ["step", "release"])
def test_fsdp2_low_precision_modes_track_one_process(low_precision, mode, release):
    """bf16 after 7 steps: the sharded gradients round differently, so agreement is to about a bf16 ulp."""
    for rank in low_precision:
        assert rank[f"fsdp_{mode}/{release}"] < BF16_RTOL


@pytest.mark.parametrize("release", ["step", "release"])
def test_fsdp2_remainder_state_is_sharded_int16_and_checkpoints(low_precision, release):
    for rank in low_precision:
        assert rank[f"fsdp_remainder/{release}/remainder_sharded"]
        assert rank[f"fsdp_remainder/{release}/dcp"]


def test_fsdp2_remainder_full_state_dict_gathers_and_loads_exactly(low_precision):
    """get_optimizer_state_dict(full_state_dict=True) all-gathers the remainders (int16 cannot be
    all-gathered by gloo or NCCL), and the gathered dict restores the exact masters in one process
    and in shards."""
    for rank in low_precision:
        assert rank["fsdp_remainder/full_state_dict"] == {"one_process": True, "resharded": True}


def test_fsdp2_to_low_precision_keeps_the_float32_values_exactly(low_precision):
    """to_low_precision(..., optimizer=) on FSDP2 shards: master_param(p) gathers to the float32 weights,
    and 7 steps later the masters still track one process cast the same way."""
    assert all(rank["fsdp_to_low_precision_exact"] for rank in low_precision)
    assert all(rank["fsdp_to_low_precision_trains"] < BF16_RTOL for rank in low_precision)


def test_fsdp2_stableadamw_remainder_reduces_each_tensors_rms(low_precision):
    """Master modes step one shard at a time; StableAdamW's RMS must still cover each whole tensor."""
    for rank in low_precision:
        assert rank["fsdp_stableadamw_remainder"] < BF16_RTOL


@pytest.fixture(scope="module")
def clipping() -> list[dict[str, Any]]:
    return run_ranks("clipping")


@pytest.mark.parametrize("name", ["adamw", "sgd", "stableadamw"])
@pytest.mark.parametrize("kind", ["fsdp2", "ddp"])
def test_max_grad_norm_step_matches_clip_grad_norm_on_one_process(clipping, kind, name):
    """6 fp32 steps, most clipped: the global norm covers every rank's shard (FSDP2: one all-reduce;
    DDP: already averaged gradients), identical on every rank, and the clip is clip_grad_norm_'s."""
    for rank in clipping:
        row = rank[f"{kind}/{name}"]
        assert row["clipped_steps"] >= 3, row
        assert row["norm_rel_err"] < 1e-6, row
        assert row["rel_err"] < 1e-6, row


@pytest.mark.parametrize("name", ["adamw", "sgd", "stableadamw"])
@pytest.mark.parametrize("kind", ["fsdp2", "ddp"])
def test_release_clips_by_the_previous_backwards_norm_on_2_ranks(clipping, kind, name):
    """Release + max_grad_norm on FSDP2 (norm completed at the end of backward, one all-reduce) and DDP
    (completed when read): the same as one process scaling each backward by the previous norm's coefficient."""
    for rank in clipping:
        row = rank[f"{kind}/{name}/release"]
        assert row["clipped_steps"] >= 3, row
        assert row["norm_rel_err"] < 1e-6, row
        assert row["rel_err"] < 1e-6, row


@pytest.mark.parametrize("kind", ["fsdp2", "ddp"])
def test_release_backward_matches_clip_grad_norm_on_one_process(clipping, kind):
    """Two passes on 2 ranks: FSDP2 reduce-scatters in each; DDP's second pass all-reduces each
    parameter itself (its reducer serves only the first). The exact clip, as clip_grad_norm_ + step()."""
    for rank in clipping:
        row = rank[f"{kind}/release_backward"]
        assert row["norm_rel_err"] < 1e-6, row
        assert row["rel_err"] < 1e-6, row


@pytest.mark.parametrize("mode", ["step", "release"])
@pytest.mark.parametrize("kind", ["fsdp2", "ddp"])
def test_a_non_finite_gradient_never_reaches_weights_or_state_on_2_ranks(clipping, kind, mode):
    """rank 0's batch makes one parameter's gradient infinite: step() skips the step on every rank (the
    norm is reduced), release skips that parameter; every weight and state stays finite."""
    for rank in clipping:
        row = rank[f"{kind}/{mode}/non_finite"]
        assert row["finite"], row
        assert row["skipped"] >= 1, row
