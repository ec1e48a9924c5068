"""Gradient release, accumulation and memory accounting on 2 gloo ranks (CPU), against one process.

Each module-scoped fixture spawns the 2 ranks once (``harness.run_ranks``) and runs a whole
scenario of ``worker.py``; the tests below assert on what the ranks returned. Every distributed
run is compared with a single-process run on the full global batch (each rank takes half).
"""

from __future__ import annotations

import math
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


# -- 8-bit optimizer state (state_bits=8) -----------------------------------------------------------


@pytest.fixture(scope="module")
def state_bits() -> list[dict[str, Any]]:
    return run_ranks("state_bits")


# worker.WideNet's parameters: global shape and the rows FSDP2 gives each of 2 ranks (torch.chunk: the
# first rank takes the extra row); the two weights are quantized, with this many blocks per row
WIDE_NET = {
    "l1.weight": ([400, 12], [200, 200], 1),
    "l1.bias": ([400], [200, 200], None),
    "l2.weight": ([15, 400], [8, 7], 2),  # uneven shards, and a short second block (144 elements)
    "l2.bias": ([15], [8, 7], None),
    "out.weight": ([7, 15], [4, 3], None),
    "out.bias": ([7], [4, 3], None),
}
MOMENTS = ["exp_avg", "exp_avg_sq"]


def _assert_quantized_layout(layout: dict[str, Any], rank: int, sharded: bool = True) -> None:
    """Codes (uint8, the parameter's shape) and float32 scales (rows x blocks), both sharded by the
    parameter's rows; parameters below 4096 elements or 1-d keep unquantized moments."""
    assert layout.keys() == WIDE_NET.keys()
    for name, (shape, rows, blocks) in WIDE_NET.items():
        entry = layout[name]
        if blocks is None:
            assert entry["codes"] == [], name
            continue
        assert entry["codes"] == MOMENTS, name
        local_rows = rows[rank] if sharded else shape[0]
        for key in MOMENTS:
            got = entry[key]
            assert got["shape"] == shape and got["local_shape"] == [local_rows, *shape[1:]], (name, got)
            assert got["scales_dtype"] == "torch.float32", (name, got)
            assert got["scales_shape"] == [shape[0], blocks], (name, got)
            assert got["scales_local_shape"] == [local_rows, blocks], (name, got)
            assert got["param_local_rows"] == local_rows and got["sharded"], (name, got)


@pytest.mark.parametrize("case", ["adamw/fp32", "adamw/bf16_stochastic"])
def test_state_bits_fsdp2_bit_identical_to_one_process(state_bits, case):
    """4 steps on the one-process run's global gradients (each rank gets its rows): weights, gathered
    codes and gathered scales are bit-identical, because a block never straddles two shards (bf16 +
    stochastic rounding too: the random bits hash each element's index in the whole tensor)."""
    for rank, result in enumerate(state_bits):
        entry = result[f"fsdp/{case}"]
        assert entry["mismatches"] == [] and entry["param_rel_err"] == 0.0, entry["mismatches"]
        _assert_quantized_layout(entry["layout"], rank)
        _assert_quantized_layout(entry["reference_layout"], rank, sharded=False)


def test_state_bits_fsdp2_stableadamw_reduces_each_tensors_rms(state_bits):
    """StableAdamW's per-tensor RMS is reduced across the shards of each parameter: the moments (codes
    and scales included) are bit-identical, and the weights agree to the last bit of the update (one
    process sums a whole tensor in float32, the ranks add their shards' float32 sums in float64; the
    same difference as without state_bits)."""
    for rank, result in enumerate(state_bits):
        entry = result["fsdp/stableadamw/fp32"]
        assert all(key.endswith("/param") for key in entry["mismatches"]), entry["mismatches"]
        assert entry["param_rel_err"] <= 1e-6, entry
        _assert_quantized_layout(entry["layout"], rank)


#: half a batch per rank reduces the gradients in another order than one process (differences of
#: ~1e-7 relative), and a moment that lies next to the boundary between two 8-bit codes can land on
#: the other code: one step of the code is up to 0.7% of its block's largest moment. Measured: 1.4e-4
#: after 4 steps (the bit-exact comparisons above replay one process's gradients instead).
STATE_BITS_RTOL = 1e-3


def test_state_bits_fsdp2_gradient_release_matches_one_process(state_bits):
    """4 steps on half the batch per rank: release and step() agree with one process (to
    ``STATE_BITS_RTOL``), and with each other bit for bit (the same reduce-scattered gradients)."""
    for rank, result in enumerate(state_bits):
        for mode in ("step", "release"):
            entry = result[f"fsdp_train/{mode}"]
            assert entry["rel_err"] <= STATE_BITS_RTOL, entry
            assert entry["grads_left"] == 0
            _assert_quantized_layout(entry["layout"], rank)
        assert result["fsdp_train/release_vs_step_mismatches"] == []


@pytest.mark.parametrize("mode", ["step", "release"])
def test_state_bits_ddp_replicas_identical_and_match_one_process(state_bits, mode):
    for result in state_bits:
        entry = result[f"ddp/{mode}"]
        assert entry["rel_err"] <= STATE_BITS_RTOL, entry
        assert entry["params_identical"] and entry["state_identical"]  # weights, codes, scales: same bits
        _assert_quantized_layout(entry["layout"], 0, sharded=False)
        assert result["ddp/release_vs_step_mismatches"] == []


@pytest.mark.parametrize("direction", ["2to1", "1to2", "2to2"])
def test_state_bits_checkpoints_reshard_exactly(state_bits, direction):
    """2 steps, a DCP checkpoint, 2 more steps: bit-identical to 4 uninterrupted steps of one process.
    2to1: optimi.distributed.save_checkpoint on 2 FSDP2 ranks, loaded by one process alone (dcp.load,
    no_dist); 1to2: one process's dcp.save loaded into 2 FSDP2 ranks; 2to2: load_checkpoint on 2 ranks."""
    for rank, result in enumerate(state_bits):
        entry = result[f"checkpoint/{direction}"]
        assert entry["loaded_mismatches"] == [], entry
        assert entry["continued_mismatches"] == [], entry
        if direction == "1to2":
            _assert_quantized_layout(entry["layout"], rank)


def test_state_bits_full_state_dict_gathers_codes_and_restores_them(state_bits):
    """get_optimizer_state_dict(full_state_dict=True) all-gathers the uint8 codes and float32 scales
    over gloo (bit-identical to one process), and that dict loads exactly into one process
    (load_state_dict) and into 2 FSDP2 ranks (set_optimizer_state_dict), which then train on exactly."""
    for rank, result in enumerate(state_bits):
        assert result["full_state_dict/gathered_mismatches"] == []
        entry = result["full_state_dict"]
        for key in ("one_process_loaded", "one_process_continued", "resharded_loaded", "resharded_continued"):
            assert entry[key] == [], (key, entry[key])
        _assert_quantized_layout(entry["resharded_layout"], rank)


def test_state_bits_memory_report_counts_local_codes_and_scales(state_bits):
    """Each rank reports its own codes + scales (+ the small unquantized moments): about half of one
    process's state bytes, and the ranks' reports add up to it exactly."""
    reported = state_bits[0]["memory"]["report_states_per_rank"]
    assert len(reported) == 2
    for rank, result in enumerate(state_bits):
        memory = result["memory"]
        assert memory["report_states_per_rank"] == reported  # the same report on every rank
        # what the rank holds, counted from the shapes: 1 byte per code, 4 per scale, 4 per fp32 moment
        expected = 0
        for shape, rows, blocks in WIDE_NET.values():
            per_row = math.prod(shape[1:])
            if blocks is None:
                expected += len(MOMENTS) * rows[rank] * per_row * 4
            else:
                expected += len(MOMENTS) * rows[rank] * (per_row + 4 * blocks)
        assert reported[rank] == memory["local_state_bytes"] == expected
        assert 0.45 <= reported[rank] / memory["single_state_bytes"] <= 0.55
        assert 0.45 <= memory["local_code_and_scale_bytes"] / memory["single_code_and_scale_bytes"] <= 0.55
    assert sum(reported) == state_bits[0]["memory"]["single_state_bytes"]
