"""optimi as a DeepSpeed client optimizer: ZeRO 1/2/3 against a single process, bf16 master + Kahan.

The checks that need DeepSpeed's engine run in ONE job of 2 gloo ranks on CPU (this file is also
the worker script: ``torchrun --nproc_per_node 2 tests/distributed/test_deepspeed.py OUT.json``);
the tests read its JSON results (about 25 s on 2 CPU cores). The worker stops DeepSpeed from
JIT-compiling its shared-memory inference all-reduce op (see ``_worker``), so nothing is compiled
and no ``TORCH_EXTENSIONS_DIR`` cache is needed. Without DeepSpeed the engine tests skip and the
config checks still run.
"""

from __future__ import annotations

import gc
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import optimi
from optimi.distributed import memory_report
from optimi.distributed.deepspeed import deepspeed_rank_memory, prepare_config

try:
    import deepspeed
except ImportError as error:  # not installed, or installed but broken against this torch
    deepspeed = None
    _MISSING = f"DeepSpeed is not importable ({error}); pip install optimi[deepspeed]"
else:
    _MISSING = ""

# the engine tests; the config checks at the end run without DeepSpeed
needs_deepspeed = pytest.mark.skipif(deepspeed is None, reason=_MISSING)

pytestmark = pytest.mark.distributed

STEPS = 6
BF16_STEPS = 40
GLOBAL_BATCH = 8
WORLD = 2


# --------------------------------------------------------------------------------------------
# worker (runs under torchrun)
# --------------------------------------------------------------------------------------------


def _model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(dtype)


def _param_groups(model: torch.nn.Module) -> list[dict]:
    # two groups with different hyperparameters: each becomes its own flat partition
    return optimi.param_groups_weight_decay(model, weight_decay=0.1)


def _batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Inputs and the targets of a fixed random teacher, so that the loss falls."""
    gen = torch.Generator().manual_seed(1)
    teacher = torch.randn(8, 4, generator=gen)
    inputs = [torch.randn(GLOBAL_BATCH, 8, generator=gen) for _ in range(steps)]
    return [(x, torch.tanh(x @ teacher)) for x in inputs]


def _make_optimizer(
    kind: str, params, *, kahan_sum: bool | None = None, low_precision: str | None = None
) -> torch.optim.Optimizer:
    if kind == "adamw":
        return optimi.AdamW(params, lr=1e-2, kahan_sum=kahan_sum, low_precision=low_precision)
    if kind == "stableadamw":
        return optimi.StableAdamW(params, lr=1e-2, kahan_sum=kahan_sum)
    return optimi.SGD(params, lr=5e-2, momentum=0.9, kahan_sum=kahan_sum)


def _schedule(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))


def _reference(kind: str) -> list[torch.Tensor]:
    """Single process, full batch, fp32."""
    model = _model()
    optimizer = _make_optimizer(kind, _param_groups(model))
    scheduler = _schedule(optimizer)
    for x, y in _batches(STEPS):
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    return [p.detach().clone() for p in model.parameters()]


def _full_params(engine, stage: int) -> list[torch.Tensor]:
    params = list(engine.module.parameters())
    if stage == 3:
        with deepspeed.zero.GatheredParameters(params):
            return [p.detach().float().clone() for p in params]
    return [p.detach().float().clone() for p in params]


def _train(
    config: dict, kind: str, steps: int, *, dtype=torch.float32, kahan_sum=None, low_precision=None, scheduler=True
):
    from optimi.distributed.deepspeed import initialize

    rank = torch.distributed.get_rank()
    model = _model()
    optimizer = _make_optimizer(kind, _param_groups(model), kahan_sum=kahan_sum, low_precision=low_precision)
    setup = initialize(model, optimizer, config, lr_scheduler=_schedule(optimizer) if scheduler else None)
    engine = setup.engine
    shard = GLOBAL_BATCH // WORLD
    losses = []
    for x, y in _batches(steps):
        x, y = x[rank * shard : (rank + 1) * shard], y[rank * shard : (rank + 1) * shard]
        loss = torch.nn.functional.mse_loss(engine(x.to(dtype)).float(), y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return setup, losses


def _config(stage: int, **extra) -> dict:
    return {
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // WORLD,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # DeepSpeed clips to norm 1.0 unless told otherwise
        "zero_optimization": {"stage": stage},
        **extra,
    }


def _checkpoint_roundtrip(setup, config: dict, directory: str, low_precision: str | None = None) -> dict:
    """Save ``setup``'s engine, load it into a fresh one, and take the same step in both."""
    from optimi.distributed.deepspeed import initialize

    setup.engine.save_checkpoint(directory, tag="t")
    model = _model()
    optimizer = _make_optimizer("adamw", _param_groups(model), low_precision=low_precision)
    fresh = initialize(model, optimizer, config, lr_scheduler=_schedule(optimizer))
    fresh.engine.load_checkpoint(directory, tag="t")
    saved, loaded = setup.engine.basic_optimizer, fresh.engine.basic_optimizer
    same_state = all(
        a.keys() == b.keys()
        and all(not torch.is_tensor(a[k]) or (a[k].dtype == b[k].dtype and torch.equal(a[k], b[k])) for k in a)
        for a, b in zip(saved.state.values(), loaded.state.values())
    )
    kahan_dtypes = sorted(
        {str(s[key].dtype) for s in loaded.state.values() for key in ("kahan_comp", "remainder") if key in s}
    )
    rank = torch.distributed.get_rank()
    x, y = _batches(BF16_STEPS + 1)[-1]
    shard = GLOBAL_BATCH // WORLD
    for engine in (setup.engine, fresh.engine):
        xs, ys = x[rank * shard : (rank + 1) * shard], y[rank * shard : (rank + 1) * shard]
        engine.backward(torch.nn.functional.mse_loss(engine(xs.to(torch.bfloat16)).float(), ys))
        engine.step()
    same_params = all(torch.equal(a, b) for a, b in zip(setup.engine.parameters(), fresh.engine.parameters()))
    result = {
        "same_state": same_state,
        "same_params_after_step": same_params,
        "kahan_dtypes": kahan_dtypes,
        "steps": [g["step"] for g in loaded.param_groups],
        "lr": [g["lr"] for g in loaded.param_groups] == [g["lr"] for g in saved.param_groups],
    }
    fresh.engine.destroy()
    return result


def _worker(out: str) -> None:
    import torch.distributed as dist

    # DeepSpeed's comm backend JIT-compiles a shared-memory all-reduce op when it starts (about 30 s,
    # minutes on a loaded machine). Only inference_all_reduce uses it, never ZeRO training, so the
    # tests switch it off through DeepSpeed's own table of compatible ops (a cached, mutable dict).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    results: dict = {"match": {}, "bf16": {}, "memory": {}, "report": {}}

    # 1. fp32 ZeRO 1/2/3 against a single process on the full batch
    for kind in ("adamw", "sgd"):
        expected = _reference(kind)
        for stage in (1, 2, 3):
            setup, _ = _train(_config(stage), kind, STEPS)
            got = _full_params(setup.engine, stage)
            err = max(((g - e).abs().max() / e.abs().max()).item() for g, e in zip(got, expected))
            moved = max(((e - p).abs().max()).item() for e, p in zip(expected, _model().parameters()))
            results["match"][f"{kind}-zero{stage}"] = {"rel_err": err, "moved": moved, "changes": setup.changes}
            setup.engine.destroy()
    # StableAdamW needs whole tensors: allowed without ZeRO, where DeepSpeed passes them through
    expected = _reference("stableadamw")
    setup, _ = _train(_config(0), "stableadamw", STEPS)
    got = _full_params(setup.engine, 0)
    err = max(((g - e).abs().max() / e.abs().max()).item() for g, e in zip(got, expected))
    moved = max(((e - p).abs().max()).item() for e, p in zip(expected, _model().parameters()))
    results["match"]["stableadamw-zero0"] = {"rel_err": err, "moved": moved, "changes": setup.changes}
    setup.engine.destroy()

    # 2. bf16: DeepSpeed's default (fp32 master + fp32 states) against bf16 master + bf16 states,
    #    with and without optimi's Kahan compensation
    bf16_default = {"enabled": True}
    bf16_master = {"enabled": True, "bf16_master_weights_and_grads": True, "bf16_optimizer_states": True}
    runs = {
        "fp32_master": dict(bf16=bf16_default, kahan_sum=None),
        "bf16_master_kahan": dict(bf16=bf16_master, kahan_sum=None),
        "bf16_master_no_kahan": dict(bf16=bf16_master, kahan_sum=False),
        "bf16_master_stochastic": dict(bf16=bf16_master, low_precision="stochastic"),
        "bf16_master_remainder": dict(bf16=bf16_master, low_precision="remainder"),
    }
    final = {}
    for name, run in runs.items():
        config = _config(2, bf16=run["bf16"])
        setup, losses = _train(
            config,
            "adamw",
            BF16_STEPS,
            dtype=torch.bfloat16,
            kahan_sum=run.get("kahan_sum"),
            low_precision=run.get("low_precision"),
        )
        final[name] = _full_params(setup.engine, 2)
        memory = deepspeed_rank_memory(setup.engine)
        report = memory_report(setup.engine, setup.optimizer)
        results["report"][name] = report.to_dict()["ranks"]
        numel = sum(p.numel() for p in setup.engine.module.parameters())
        gathered = [None] * WORLD
        dist.all_gather_object(gathered, {"bytes": memory, "numel": numel})
        results["memory"][name] = gathered
        if name == "bf16_master_kahan":
            results["checkpoint"] = _checkpoint_roundtrip(setup, config, str(Path(out).parent / "ckpt"))
        if name == "bf16_master_remainder":
            results["checkpoint_remainder"] = _checkpoint_roundtrip(
                setup, config, str(Path(out).parent / "ckpt_remainder"), low_precision="remainder"
            )
        master = setup.engine.optimizer.single_partition_of_fp32_groups[0]
        results["bf16"][name] = {
            "losses": losses,
            "master_dtype": str(master.dtype),
            "has_kahan": any("kahan_comp" in s for s in setup.engine.basic_optimizer.state.values()),
            "remainder_dtypes": sorted(
                {str(s["remainder"].dtype) for s in setup.engine.basic_optimizer.state.values() if "remainder" in s}
            ),
            "changes": setup.changes,
        }
        setup.engine.destroy()
    for name in ("bf16_master_kahan", "bf16_master_no_kahan", "bf16_master_stochastic", "bf16_master_remainder"):
        diffs = [(p - r).abs().mean().item() for p, r in zip(final[name], final["fp32_master"])]
        results["bf16"][name]["param_dist"] = sum(diffs) / len(diffs)

    if rank == 0:
        Path(out).write_text(json.dumps(results, indent=1))
    # destroy the group here, not at interpreter shutdown, where gloo intermittently aborts a rank
    # ("terminate called without an active exception"; same teardown as tests/distributed/worker.py)
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("deepspeed") / "results.json"
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    cmd = [
        "timeout",
        "420",
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={WORLD}",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        __file__,
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"DeepSpeed worker failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return json.loads(out.read_text())


@needs_deepspeed
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_matches_single_process(results, kind, stage):
    row = results["match"][f"{kind}-zero{stage}"]
    assert row["moved"] > 1e-2, "the run must actually train for the comparison to mean anything"
    assert row["rel_err"] < 1e-5, row
    assert any("zero_allow_untested_optimizer" in change for change in row["changes"])


@needs_deepspeed
def test_stableadamw_without_zero_matches_single_process(results):
    row = results["match"]["stableadamw-zero0"]
    assert row["moved"] > 1e-2 and row["rel_err"] < 1e-5, row


@needs_deepspeed
def test_bf16_master_uses_bf16_partitions_and_kahan(results):
    bf16 = results["bf16"]
    assert bf16["fp32_master"]["master_dtype"] == "torch.float32"
    assert not bf16["fp32_master"]["has_kahan"]
    assert bf16["bf16_master_kahan"]["master_dtype"] == "torch.bfloat16"
    assert bf16["bf16_master_kahan"]["has_kahan"]
    assert not bf16["bf16_master_no_kahan"]["has_kahan"]


@needs_deepspeed
def test_bf16_master_kahan_stays_closer_to_fp32_master(results):
    bf16 = results["bf16"]
    with_kahan = bf16["bf16_master_kahan"]["param_dist"]
    without = bf16["bf16_master_no_kahan"]["param_dist"]
    assert with_kahan < 0.5 * without, (with_kahan, without)
    # and every run trains: the loss of the last steps is well below that of the first ones
    for name in bf16:
        losses = bf16[name]["losses"]
        first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
        assert last < 0.8 * first, (name, first, last)


@needs_deepspeed
def test_bf16_master_kahan_memory_per_rank(results):
    default, kahan = results["memory"]["fp32_master"], results["memory"]["bf16_master_kahan"]
    for rank in range(WORLD):
        d, k, numel = default[rank]["bytes"], kahan[rank]["bytes"], kahan[rank]["numel"]
        # fp32 master partition (4 bytes / WORLD) becomes bf16 (2 / WORLD); two fp32 moments become bf16
        assert d["master_params"] >= 4 * numel // WORLD
        assert k["master_params"] < d["master_params"] * 0.6
        assert k["kahan"] >= 2 * numel // WORLD - 64
        assert k["optimizer_states"] < d["optimizer_states"]
        assert d["kahan"] == 0
        total = lambda b: b["params"] + b["master_params"] + b["grads"] + b["optimizer_states"]  # noqa: E731
        assert total(k) < total(d)


@needs_deepspeed
def test_memory_report_on_engine(results):
    """optimi.distributed.memory_report counts a DeepSpeed engine: master partition in optimizer_states."""
    for name, ranks in results["report"].items():
        assert [r["rank"] for r in ranks] == list(range(WORLD))
        for rank, counted in zip(ranks, results["memory"][name]):
            b = counted["bytes"]
            assert rank["params"] == b["params"] and rank["grads"] == b["grads"] and rank["kahan"] == b["kahan"]
            assert rank["optimizer_states"] == b["optimizer_states"] + b["master_params"]
            assert rank["param_numel"] == counted["numel"]  # ZeRO-2: every rank holds the whole model
            assert rank["rss"] > 0
    default, kahan = results["report"]["fp32_master"][0], results["report"]["bf16_master_kahan"][0]
    n = default["param_numel"]
    # fp32 master (4/2) + fp32 moments (8/2) vs bf16 master (2/2) + bf16 moments (4/2) + bf16 Kahan (2/2)
    assert default["optimizer_states"] == 6 * n
    assert kahan["optimizer_states"] == 4 * n and kahan["kahan"] == n


@needs_deepspeed
def test_checkpoint_roundtrip_keeps_kahan_state(results):
    row = results["checkpoint"]
    assert row["same_state"] and row["kahan_dtypes"] == ["torch.bfloat16"], row
    assert row["steps"] == [BF16_STEPS + 1] * 2 and row["lr"], row
    assert row["same_params_after_step"], row


@needs_deepspeed
def test_bf16_master_partition_with_stochastic_rounding_and_remainders(results):
    """ZeRO-2 with DeepSpeed's bf16 master partition: low_precision="stochastic" and "remainder"
    step the flat bf16 partitions and stay closer to the fp32-master run than round to nearest (all
    runs train: test_bf16_master_kahan_stays_closer_to_fp32_master); the remainder is int16,
    counted with the Kahan buffers, and survives DeepSpeed's checkpoint (torch.save of the
    optimizer's state_dict)."""
    bf16 = results["bf16"]
    distance = {name: row["param_dist"] for name, row in bf16.items() if "param_dist" in row}
    for name in ("bf16_master_stochastic", "bf16_master_remainder"):
        assert bf16[name]["master_dtype"] == "torch.bfloat16"
        assert not bf16[name]["has_kahan"]
    # mean |p - p_fp32_master| after 40 steps (measured: Kahan 3e-5, remainder 9e-5, stochastic 1.3e-3,
    # nearest 2.3e-3): the remainder's master stays as close as Kahan's; stochastic rounding's
    # weights carry its (unbiased) rounding noise of about half an ulp, yet lie closer than nearest's
    assert distance["bf16_master_remainder"] < 0.1 * distance["bf16_master_no_kahan"], distance
    assert distance["bf16_master_stochastic"] < 0.75 * distance["bf16_master_no_kahan"], distance
    assert bf16["bf16_master_remainder"]["remainder_dtypes"] == ["torch.int16"]
    assert bf16["bf16_master_stochastic"]["remainder_dtypes"] == []
    reports = zip(results["report"]["bf16_master_remainder"], results["report"]["bf16_master_kahan"])
    for remainder, kahan in reports:  # an int16 remainder costs what a bf16 Kahan buffer costs
        assert remainder["kahan"] == kahan["kahan"] > 0
        assert remainder["optimizer_states"] == kahan["optimizer_states"]
    row = results["checkpoint_remainder"]
    assert row["same_state"] and row["kahan_dtypes"] == ["torch.int16"], row
    assert row["same_params_after_step"], row


@needs_deepspeed
def test_train_script_deepspeed_zero3_bf16_kahan(tmp_path):
    """scripts/train.py --parallel deepspeed: ZeRO-3, bf16 master + Kahan, 2 micro-batches per step."""
    root = Path(__file__).resolve().parents[2]
    args = ["--parallel", "deepspeed", "--zero-stage", "3", "--dtype", "bf16", "--accumulation-steps", "2"]
    args += ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "32", "--batch-size", "8"]
    args += ["--steps", "8", "--warmup-steps", "2", "--eval-batches", "2", "--log-every", "4", "--lr", "1e-2"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1"]
    cmd = ["timeout", "240", *launcher, f"--master_port={_free_port()}", str(root / "scripts" / "train.py")]
    cmd += [*args, "--metrics-file", "m.jsonl"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    assert "parallel=deepspeed x2" in proc.stdout and "kahan=on" in proc.stdout
    loss = [json.loads(line)["loss"] for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert len(loss) == 8 and loss[-1] < loss[0] - 0.3, loss
    # memory_report's table: a header, then per rank the rank and one "<number> <unit>" or "-" per column
    table = proc.stdout.split("memory per rank")[1].splitlines()
    header = table[1].split()
    for line, rank in zip(table[2:4], ("0", "1")):
        first, rest = line.split(None, 1)
        values = dict(zip(header[1:], re.findall(r"-|[\d.]+ (?:B|KiB|MiB|GiB)", rest)))
        assert first == rank and values["kahan"] not in ("-", "0 B"), proc.stdout


# --------------------------------------------------------------------------------------------
# config checks: no process group needed
# --------------------------------------------------------------------------------------------


def test_prepare_config_explains_changes():
    optimizer = optimi.AdamW(_model().parameters(), lr=1e-3)
    config = {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True, "bf16_master_weights_and_grads": True}}
    new, changes = prepare_config(optimizer, config)
    assert new["zero_allow_untested_optimizer"] is True
    assert new["bf16"]["bf16_optimizer_states"] is True
    assert len(changes) == 2
    assert "bf16_optimizer_states" not in config["bf16"], "the caller's config must not be modified"
    _, none = prepare_config(optimizer, {"zero_optimization": {"stage": 0}})
    assert none == []


def test_rejects_gradient_release():
    optimizer = optimi.AdamW(_model().parameters(), lr=1e-3, gradient_release=True)
    with pytest.raises(ValueError, match="gradient_release=True"):
        prepare_config(optimizer, _config(2))


def test_rejects_state_bits():
    """ZeRO hands the optimizer flat 1-d partitions: 8-bit state would silently stay unquantized."""
    optimizer = optimi.AdamW(_model().parameters(), lr=1e-3, state_bits=8)
    with pytest.raises(ValueError, match="state_bits=8"):
        prepare_config(optimizer, _config(2))


def test_rejects_optimizer_section():
    optimizer = optimi.AdamW(_model().parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="'optimizer' section"):
        prepare_config(optimizer, {**_config(1), "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}})


def test_rejects_zero3_sub_groups_that_split_a_param_group():
    optimizer = optimi.AdamW(_model().parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="sub_group_size"):
        prepare_config(optimizer, {"zero_optimization": {"stage": 3, "sub_group_size": 10}})


def test_initialize_checks_scheduler_and_params_before_deepspeed():
    from optimi.distributed.deepspeed import initialize

    model = _model()
    optimizer = optimi.AdamW(model.parameters(), lr=1e-3)
    other = optimi.AdamW(_model().parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="different optimizer"):
        initialize(model, optimizer, _config(2), lr_scheduler=_schedule(other))
    with pytest.raises(ValueError, match="do not belong to the model"):
        initialize(_model(), optimizer, _config(2))


class _WholeTensorAdamW(optimi.AdamW):
    needs_whole_tensors = True


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_rejects_whole_tensor_statistics_on_flat_partitions(stage, bf16):
    optimizer = _WholeTensorAdamW(_model().parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="whole tensors"):
        prepare_config(optimizer, _config(stage, bf16={"enabled": bf16}))
    # without ZeRO DeepSpeed steps whole tensors: allowed
    prepare_config(optimizer, _config(0, bf16={"enabled": bf16}))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_rejects_stableadamw_under_zero(stage):
    optimizer = optimi.StableAdamW(_model().parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="StableAdamW.*flat partitions"):
        prepare_config(optimizer, _config(stage, bf16={"enabled": True}))


if __name__ == "__main__":
    _worker(sys.argv[1])
