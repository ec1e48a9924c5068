"""scripts/train.py end to end: real runs of the script (plain, DDP and FSDP2 through torchrun), bit-identical
resume from its checkpoints, resume across world sizes, and the bad-input messages.

World-size-1 runs call the script's ``main`` in this process (fast); multi-rank runs drive the real
launcher (``python -m torch.distributed.run``) in a subprocess, as a user would.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train.py"
TIMEOUT = 240  # seconds per launched run; a hang fails instead of blocking the suite

# a tiny GPT and short runs: a few seconds per run on a busy 2-core machine
TINY = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "32", "--batch-size", "8"]
SHORT = TINY + ["--steps", "8", "--warmup-steps", "2", "--eval-batches", "2", "--log-every", "4", "--lr", "1e-2"]


def _load_train_module():
    spec = importlib.util.spec_from_file_location("optimi_train_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


train_script = _load_train_module()


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
    """The lines printed after the held-out loss: the per-rank memory table."""
    lines = output.splitlines()
    held_out = [i for i, line in enumerate(lines) if line.startswith("held-out loss")]
    assert held_out, f"no held-out loss line in:\n{output}"
    return [line for line in lines[held_out[-1] + 1 :] if line.strip()]


def assert_trained(output: str, metrics_file: Path, world_size: int) -> None:
    loss = losses(metrics_file)
    assert loss[max(loss)] < loss[1] - 0.3, f"loss did not go down: {loss}"
    table = memory_table(output)
    assert len(table) >= world_size + 1, f"memory table missing ranks:\n{output}"


# -- end to end -----------------------------------------------------------------------------------------


def test_plain_python_run_trains_and_reports_memory(tmp_path):
    out = run_ok(SHORT + ["--dtype", "fp32", "--metrics-file", "m.jsonl"], tmp_path)
    assert_trained(out, tmp_path / "m.jsonl", world_size=1)


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
        (["--gradient-release", "--grad-clip", "1.0"], "--gradient-release cannot serve --grad-clip"),
        (["--parallel", "deepspeed", "--gradient-release"], "--gradient-release cannot serve --parallel deepspeed"),
        (["--kahan", "on", "--dtype", "fp32"], "--kahan on needs bf16 parameters"),
        (["--resume"], "give --checkpoint-dir"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
    ],
)
def test_bad_arguments_exit_with_a_message(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_script.parse_args(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_schedule_warms_up_then_decays_to_a_tenth():
    config = train_script.parse_args(["--steps", "110", "--warmup-steps", "10"])
    factors = [train_script.lr_factor(step, config) for step in range(110)]
    assert factors[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert factors[10] == 1.0 and factors[60] == pytest.approx(0.55) and factors[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    constant = train_script.parse_args(["--schedule", "constant", "--warmup-steps", "10"])
    assert [train_script.lr_factor(step, constant) for step in (0, 9, 10, 500)] == [0.1, 1.0, 1.0, 1.0]


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
    monkeypatch.setattr(train_script, "init_runtime", lambda config: train_script.Runtime(0, 3, torch.device("cpu")))
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
