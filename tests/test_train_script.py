"""scripts/train.py end to end: real runs of the script (plain, DDP and FSDP2 through torchrun), bit-identical
resume from its checkpoints, resume across world sizes, the closing bytes/param table, and the bad-input
messages. The script imports its modules next to it (train_config, parallel, deepspeed_engine,
memory_table); they are reached here through the loaded script (``train_script.parallel``, ...).

World-size-1 runs call the script's ``main`` in this process (fast); multi-rank runs drive the real
launcher (``python -m torch.distributed.run``) in a subprocess, as a user would.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train.py"
TIMEOUT = 240  # seconds per launched run; a hang fails instead of blocking the suite

# a tiny GPT and short runs: a few seconds per run on a busy 2-core machine
TINY = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "32", "--batch-size", "8"]
SHORT = TINY + ["--steps", "8", "--warmup-steps", "2", "--eval-batches", "2", "--log-every", "4", "--lr", "1e-2"]


train_script = load_script("train.py", "optimi_train_script")


@pytest.fixture
def one_thread():
    """World-size-1 runs in this process use one thread, like each torchrun rank."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def launch(args: list[str], cwd: Path, nproc: int | None = None) -> subprocess.CompletedProcess:
    """Run the script: ``python scripts/train.py`` or, with ``nproc``, through torchrun."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    launcher = [sys.executable]
    if nproc is not None:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return subprocess.run(
        launcher + [str(SCRIPT)] + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT
    )


def run_ok(args: list[str], cwd: Path, nproc: int | None = None) -> str:
    result = launch(args, cwd, nproc)
    assert result.returncode == 0, f"train.py failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    return result.stdout


def losses(metrics_file: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in map(json.loads, metrics_file.read_text().splitlines())}


def memory_table(output: str) -> list[str]:
    """The lines printed after the held-out loss: the per-rank memory table, then the bytes/param table."""
    lines = output.splitlines()
    held_out = [i for i, line in enumerate(lines) if line.startswith("held-out loss")]
    assert held_out, f"no held-out loss line in:\n{output}"
    return [line for line in lines[held_out[-1] + 1 :] if line.strip()]


def bytes_per_param(output: str, world_size: int) -> tuple[list[dict[str, str]], str]:
    """The closing table (one dict per rank, keyed by the header) and the line under it."""
    lines = output.splitlines()
    title = [i for i, line in enumerate(lines) if line.startswith("bytes per parameter held, measured")]
    assert title, f"no bytes/param table in:\n{output}"
    assert "vs fp32 AdamW: 4 weight + 4 grad + 8 moments" in lines[title[-1]]
    header, *rows, footer = lines[title[-1] + 1 : title[-1] + 3 + world_size]
    # columns are right-justified and separated by two or more spaces; a cell holds at most one
    header = re.split(r"\s{2,}", header.strip())
    assert header == train_script.memory_table.HEADER, header
    table = [dict(zip(header, re.split(r"\s{2,}", row.strip()), strict=True)) for row in rows]
    assert [row["rank"] for row in table] == [str(rank) for rank in range(world_size)], rows
    return table, footer


def assert_trained(output: str, metrics_file: Path, world_size: int) -> None:
    loss = losses(metrics_file)
    assert loss[max(loss)] < loss[1] - 0.3, f"loss did not go down: {loss}"
    table = memory_table(output)
    assert len(table) >= world_size + 1, f"memory table missing ranks:\n{output}"
    assert output.rstrip().splitlines()[-1].startswith("rank 0 held "), "the bytes/param table must close the run"


# -- end to end -----------------------------------------------------------------------------------------


def test_plain_python_run_trains_and_reports_memory(tmp_path):
    out = run_ok(SHORT + ["--dtype", "fp32", "--metrics-file", "m.jsonl"], tmp_path)
    assert_trained(out, tmp_path / "m.jsonl", world_size=1)
    # fp32 AdamW measured: the table's 16 bytes/param are what memory_report counts for it (every
    # gradient alive at the end of backward)
    (row,), footer = bytes_per_param(out, world_size=1)
    assert (row["weights"], row["grads"], row["opt state"], row["(Kahan)"]) == ("4.00", "4.00", "8.00", "0.00")
    assert (row["total"], row["fp32 AdamW"], row["saved"]) == ("16.00", "16.00", "0%"), row
    assert row["peak RSS"].endswith(" MiB") and float(row["peak RSS"].split()[0]) > 0


@pytest.mark.distributed
def test_ddp_mixed_accumulation_trains(tmp_path):
    out = run_ok(
        SHORT + ["--parallel", "ddp", "--dtype", "mixed", "--accumulation-steps", "2", "--metrics-file", "m.jsonl"],
        tmp_path,
        nproc=2,
    )
    assert "parallel=ddp x2" in out
    assert_trained(out, tmp_path / "m.jsonl", world_size=2)


FSDP2_DEMO = ["--parallel", "fsdp2", "--dtype", "bf16", "--gradient-release", "--accumulation-steps", "2"]


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory):
    """One 2-rank FSDP2 bf16 + Kahan + gradient release + optimizer accumulation run, 8 steps, checkpoint at 4."""
    cwd = tmp_path_factory.mktemp("fsdp2")
    args = SHORT + FSDP2_DEMO + ["--checkpoint-dir", "ckpt", "--checkpoint-every", "4", "--metrics-file", "m.jsonl"]
    return cwd, run_ok(args, cwd, nproc=2)


@pytest.mark.distributed
def test_fsdp2_bf16_kahan_release_trains(fsdp2_run):
    cwd, out = fsdp2_run
    assert "parallel=fsdp2 x2" in out
    assert_trained(out, cwd / "m.jsonl", world_size=2)
    assert (cwd / "ckpt" / "latest").read_text().strip() == "step_00000008"


@pytest.mark.distributed
def test_demo_ends_with_bytes_per_param_against_fp32_adamw(fsdp2_run):
    """The README demo's closing table: bf16 weights and moments, Kahan buffers and released gradients,
    measured per rank on its FSDP2 shard, beside fp32 AdamW's 16 bytes/param on the same shard."""
    _, out = fsdp2_run
    table, footer = bytes_per_param(out, world_size=2)
    n_params = int(re.search(r"for all ([\d,]+) in one process", footer).group(1).replace(",", ""))
    assert sum(int(row["params"].replace(",", "")) for row in table) == n_params  # each rank holds its shard
    for row in table:
        # bf16 weight 2 + (two bf16 moments 4 + bf16 Kahan buffer 2) = 8; gradient release keeps few
        # gradients alive at once, far below a whole bf16 gradient (2 bytes/param)
        assert (row["weights"], row["opt state"], row["(Kahan)"]) == ("2.00", "6.00", "2.00"), row
        assert 0 < float(row["grads"]) < 1.0, row
        assert float(row["total"]) == pytest.approx(8 + float(row["grads"]), abs=0.011), row
        assert row["fp32 AdamW"] == "16.00" and int(row["saved"].rstrip("%")) >= 40, row
    assert "fp32 AdamW would hold" in footer, footer


# -- resume -------------------------------------------------------------------------------------------


RESUME_CASES = {
    "fp32": ["--dtype", "fp32"],
    "bf16-kahan": ["--dtype", "bf16", "--kahan", "on"],
    "bf16-kahan-release-accumulation": ["--dtype", "bf16", "--gradient-release", "--accumulation-steps", "2"],
}


@pytest.mark.parametrize("case", RESUME_CASES)
def test_resume_is_bit_identical(case, tmp_path, one_thread):
    args = SHORT + RESUME_CASES[case]
    full, resumed = tmp_path / "full.jsonl", tmp_path / "resumed.jsonl"
    val_full = train_script.main(
        args + ["--checkpoint-dir", str(tmp_path / "a"), "--checkpoint-every", "4", "--metrics-file", str(full)]
    )
    val_resumed = train_script.main(
        args
        + ["--checkpoint-dir", str(tmp_path / "b"), "--resume", str(tmp_path / "a" / "step_00000004")]
        + ["--metrics-file", str(resumed)]
    )
    full_losses, resumed_losses = losses(full), losses(resumed)
    assert sorted(resumed_losses) == [5, 6, 7, 8]
    assert resumed_losses == {step: full_losses[step] for step in range(5, 9)}
    assert val_resumed == val_full


@pytest.mark.distributed
def test_fsdp2_checkpoint_resumes_on_two_ranks_identically_and_on_one_rank(fsdp2_run, one_thread):
    cwd, _ = fsdp2_run
    full = losses(cwd / "m.jsonl")
    # same world size: bit-identical continuation
    run_ok(SHORT + FSDP2_DEMO + ["--resume", "ckpt/step_00000004", "--metrics-file", "two.jsonl"], cwd, nproc=2)
    assert losses(cwd / "two.jsonl") == {step: full[step] for step in range(5, 9)}
    # one rank reads the 2-rank sharded checkpoint, optimizer state included: the same run up to
    # reduction order (bf16 all-reduce vs one local sum)
    one = cwd / "one.jsonl"
    train_script.main(
        SHORT
        + ["--dtype", "bf16", "--gradient-release", "--accumulation-steps", "2"]
        + ["--resume", str(cwd / "ckpt" / "step_00000004"), "--metrics-file", str(one)]
    )
    one_losses = losses(one)
    assert sorted(one_losses) == [5, 6, 7, 8]
    for step, loss in one_losses.items():
        assert loss == pytest.approx(full[step], rel=2e-3, abs=0), step


@pytest.mark.distributed
def test_one_rank_checkpoint_resumes_on_fsdp2(tmp_path, one_thread):
    args = SHORT + ["--dtype", "bf16", "--gradient-release", "--accumulation-steps", "2"]
    full = tmp_path / "full.jsonl"
    train_script.main(
        args + ["--checkpoint-dir", str(tmp_path / "a"), "--checkpoint-every", "4", "--metrics-file", str(full)]
    )
    run_ok(
        args + ["--parallel", "fsdp2", "--resume", "a/step_00000004", "--metrics-file", "two.jsonl"], tmp_path, nproc=2
    )
    two, full_losses = losses(tmp_path / "two.jsonl"), losses(full)
    assert sorted(two) == [5, 6, 7, 8]
    for step, loss in two.items():
        assert loss == pytest.approx(full_losses[step], rel=2e-3, abs=0), step


# -- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--optimizer", "adamx"], "invalid choice: 'adamx'"),
        (["--gradient-release", "--exact-clip"], "--exact-clip needs --gradient-release and --grad-clip"),
        (["--exact-clip", "--grad-clip", "1.0"], "--exact-clip needs --gradient-release and --grad-clip"),
        (["--parallel", "deepspeed", "--gradient-release"], "--gradient-release cannot serve --parallel deepspeed"),
        (["--kahan", "on", "--dtype", "fp32"], "--kahan on needs bf16 parameters"),
        (["--low-precision", "remainder", "--dtype", "fp32"], "--low-precision needs bf16 parameters"),
        (["--low-precision", "stochastic", "--kahan", "on"], "--low-precision stochastic contradicts --kahan on"),
        (["--resume"], "give --checkpoint-dir"),
        (["--torchao-adamw8bit", "x", "--gradient-release"], "--torchao-adamw8bit replaces --optimizer adamw"),
        (["--torchao-adamw8bit", "x", "--parallel", "ddp"], "--torchao-adamw8bit runs on one process"),
        (["--state-bits", "4"], "invalid choice: 4"),
        (["--state-bits", "8", "--parallel", "deepspeed"], "--state-bits cannot serve --parallel deepspeed"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
    ],
)
def test_bad_arguments_exit_with_a_message(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_script.parse_args(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("exact", [False, True])
def test_grad_clip_with_gradient_release_logs_the_norm(tmp_path, exact):
    """--grad-clip under --gradient-release: previous-step clipping, or --exact-clip's two passes;
    the metrics file carries each step's gradient norm."""
    metrics = tmp_path / "metrics.jsonl"
    args = ["--steps", "4", "--log-every", "2", "--grad-clip", "0.5", "--gradient-release", "--eval-batches", "1"]
    args += ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "32", "--metrics-file", str(metrics)]
    train_script.main(args + (["--exact-clip"] if exact else []))
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert all(row["grad_norm"] > 0.5 for row in rows)  # the clip was active: every norm is above it


def test_schedule_warms_up_then_decays_to_a_tenth():
    config = train_script.parse_args(["--steps", "110", "--warmup-steps", "10"])
    factors = [train_script.lr_factor(step, config) for step in range(110)]
    assert factors[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert factors[10] == 1.0 and factors[60] == pytest.approx(0.55) and factors[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    constant = train_script.parse_args(["--schedule", "constant", "--warmup-steps", "10"])
    assert [train_script.lr_factor(step, constant) for step in (0, 9, 10, 500)] == [0.1, 1.0, 1.0, 1.0]


def test_every_flag_has_an_explicit_type_and_help():
    for field in dataclasses.fields(train_script.TrainConfig):
        assert field.metadata["help"], field.name
        assert "type" in field.metadata or field.metadata.get("action") == "store_true", field.name
    config = train_script.parse_args(["--lr", "1e-3", "--weight-decay", "0.5", "--steps", "7", "--resume", "x"])
    assert (config.lr, config.weight_decay, config.steps, config.resume) == (1e-3, 0.5, 7, "x")


def test_biases_and_norms_get_no_weight_decay():
    """optimi.param_groups_weight_decay: matrices decay, 1-d parameters (biases, LayerNorm) do not."""
    model = train_script.GPT(train_script.GPTConfig(block_size=8, n_layer=1, n_head=2, n_embd=8))
    names = {id(p): name for name, p in model.named_parameters()}
    for flags, decay in (([], 1e-2), (["--weight-decay", "0.1"], 0.1)):  # default: AdamW's own
        optimizer = train_script.build_optimizer(model, train_script.parse_args(flags))
        no_decay, decayed = optimizer.param_groups
        assert no_decay["weight_decay"] == 0.0 and decayed["weight_decay"] == decay
        assert {names[id(p)] for p in no_decay["params"]} == {n for n, p in model.named_parameters() if p.ndim == 1}
        assert "blocks.0.qkv.bias" in {names[id(p)] for p in no_decay["params"]}
        assert {names[id(p)] for p in decayed["params"]} >= {"wte.weight", "blocks.0.qkv.weight", "head.weight"}


@pytest.mark.parametrize("mode", ["kahan", "stochastic", "remainder", "nearest"])
def test_low_precision_reaches_the_optimizer(mode):
    model = train_script.GPT(train_script.GPTConfig(block_size=8, n_layer=1, n_head=2, n_embd=8))
    config = train_script.parse_args(["--low-precision", mode])
    optimizer = train_script.build_optimizer(model.to(torch.bfloat16), config)
    assert {optimizer.low_precision_of(p, g) for g in optimizer.param_groups for p in g["params"]} == {mode}
    assert config.kahan_on == (mode == "kahan")


def test_state_bits_reaches_the_optimizer():
    model = train_script.GPT(train_script.GPTConfig(block_size=8, n_layer=1, n_head=2, n_embd=64))
    optimizer = train_script.build_optimizer(model, train_script.parse_args(["--state-bits", "8"]))
    assert {g["state_bits"] for g in optimizer.param_groups} == {8}
    head = model.head.weight
    optimizer.init_param_state(head, optimizer.group_of(head))
    assert optimizer.state[head]["exp_avg"].dtype == torch.uint8


def test_losses_reach_the_host_only_on_logging_steps(tmp_path, monkeypatch, one_thread):
    """One all-reduce (and one host sync) per progress line for all its steps, plus one for the held-out loss."""
    calls = []
    mean_over_ranks = train_script.parallel.mean_over_ranks

    def counting(values, runtime):
        calls.append(tuple(values.shape))
        return mean_over_ranks(values, runtime)

    monkeypatch.setattr(train_script.parallel, "mean_over_ranks", counting)
    train_script.main(SHORT + ["--metrics-file", str(tmp_path / "m.jsonl")])  # 8 steps, a line every 4
    assert calls == [(4,), (4,), ()]
    assert sorted(losses(tmp_path / "m.jsonl")) == list(range(1, 9))  # every step still has its row


def test_optimizer_names_are_case_insensitive():
    assert train_script.parse_args(["--optimizer", "StableAdamW"]).optimizer == "stableadamw"


def run_error(args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        train_script.main(args)
    assert exit_info.value.code not in (0, None)
    return str(exit_info.value.code)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2", "deepspeed"])
def test_distributed_without_torchrun_is_an_error(parallel, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert "needs torchrun" in run_error(["--parallel", parallel])


def test_world_size_must_divide_batch(monkeypatch):
    # a 3-rank runtime without starting ranks: the check runs before any collective
    def three_ranks(parallel: str, device: str):
        return train_script.Runtime(0, 3, torch.device("cpu"))

    monkeypatch.setattr(train_script.parallel, "init_runtime", three_ranks)
    message = run_error(TINY + ["--batch-size", "8"])
    assert "--batch-size 8 must be divisible by world size 3" in message


def test_missing_checkpoint_dir_on_resume(tmp_path):
    assert "does not exist" in run_error(["--resume", "--checkpoint-dir", str(tmp_path / "nowhere")])
    assert "does not exist" in run_error(["--resume", str(tmp_path / "nowhere")])
    (tmp_path / "empty").mkdir()
    assert "no complete checkpoint" in run_error(["--resume", "--checkpoint-dir", str(tmp_path / "empty")])


def test_bad_input_exit_code_from_the_command_line(tmp_path):
    result = launch(["--optimizer", "nope"], tmp_path)
    assert result.returncode == 2
    assert "invalid choice" in result.stderr
