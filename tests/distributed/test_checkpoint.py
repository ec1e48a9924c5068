"""optimi.distributed.checkpoint: exact round trips, atomic saves, and resharding between 1 and 2 ranks.

The 2-rank part launches this file under torchrun (``python -m torch.distributed.run ... test_checkpoint.py
worker DIR``): the ranks load a checkpoint the test wrote in one process into an FSDP2 model, take a step,
and write a sharded checkpoint that the test then loads back into one process. Both directions are
compared tensor by tensor (parameters and optimizer state, Kahan buffers and integer step counters
included) against full tensors the ranks gathered.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import optimi
from optimi.distributed import checkpoint as ckpt
from optimi.distributed import latest_checkpoint, load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).to(torch.bfloat16)


def _step(model: nn.Module, optimizer: optimi.OptimiOptimizer, seed: int) -> None:
    inputs = torch.randn(6, 8, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    model(inputs).float().square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def _full(value):
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def _full_state(model: nn.Module, optimizer: optimi.OptimiOptimizer) -> dict:
    """Parameters and optimizer state by parameter name, as full (unsharded) tensors and python values."""
    return {
        name: {"param": _full(p.detach()), **{k: _full(v) for k, v in optimizer.state[p].items()}}
        for name, p in model.named_parameters()
    }


def _assert_same(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert actual[name].keys() == expected[name].keys(), name
        for key, value in expected[name].items():
            got = actual[name][key]
            assert type(got) is type(value), (name, key, type(got), type(value))
            if torch.is_tensor(value):
                assert got.dtype == value.dtype and torch.equal(got, value), (name, key)
            else:
                assert got == value, (name, key)


def test_round_trip_is_exact_with_integer_steps_and_kahan(tmp_path):
    model, fresh = _model(), _model()
    optimizer = optimi.AdamW(model.parameters(), lr=1e-2)
    for seed in range(3):
        _step(model, optimizer, seed)
    save_checkpoint(tmp_path, 3, model, optimizer, extra={"note": "x"}, rank_extra={"rng": torch.get_rng_state()})

    restored = optimi.AdamW(fresh.parameters(), lr=5e-1)
    loaded = load_checkpoint(latest_checkpoint(tmp_path), fresh, restored)
    assert (loaded.step, loaded.world_size, loaded.extra) == (3, 1, {"note": "x"})
    assert torch.equal(loaded.rank_extra["rng"], torch.get_rng_state())
    expected = _full_state(model, optimizer)
    assert "kahan_comp" in expected["0.weight"] and expected["0.weight"]["step"] == 3
    _assert_same(_full_state(fresh, restored), expected)
    assert restored.param_groups[0]["lr"] == 1e-2 and restored.param_groups[0]["step"] == 3
    # and training continues identically
    _step(model, optimizer, 7)
    _step(fresh, restored, 7)
    _assert_same(_full_state(fresh, restored), _full_state(model, optimizer))


def test_crash_mid_save_keeps_the_latest_checkpoint(tmp_path, monkeypatch):
    model = _model()
    optimizer = optimi.AdamW(model.parameters(), lr=1e-2)
    _step(model, optimizer, 0)
    save_checkpoint(tmp_path, 1, model, optimizer)
    _step(model, optimizer, 1)

    real_save = ckpt.dcp.save

    def crash(state_dict, *, checkpoint_id, **kwargs):
        (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"half a shard")
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(ckpt.dcp, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, model, optimizer)
    assert (tmp_path / "latest").read_text().strip() == "step_00000001"
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000001"
    assert not (tmp_path / "step_00000002").exists()
    fresh = _model()
    assert load_checkpoint(latest_checkpoint(tmp_path), fresh, optimi.AdamW(fresh.parameters(), lr=1e-2)).step == 1

    # the next save removes the leftover and completes
    monkeypatch.setattr(ckpt.dcp, "save", real_save)
    save_checkpoint(tmp_path, 2, model, optimizer)
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000002"
    assert not (tmp_path / ".step_00000002.tmp").exists()


def test_latest_falls_back_to_newest_complete_directory(tmp_path):
    model = _model()
    optimizer = optimi.AdamW(model.parameters(), lr=1e-2)
    save_checkpoint(tmp_path, 1, model, optimizer)
    save_checkpoint(tmp_path, 2, model, optimizer)
    (tmp_path / "latest").write_text("step_00000009\n")  # names a checkpoint that does not exist
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000002"
    assert latest_checkpoint(tmp_path / "missing") is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "step_00000009", model, optimizer)


# -- 1 rank <-> 2 FSDP2 ranks -------------------------------------------------------------------------


def _worker(directory: Path) -> None:
    """Runs on each torchrun rank (see the module docstring)."""
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    model = _model()
    fully_shard(model[0])
    fully_shard(model[2])
    fully_shard(model)
    optimizer = optimi.AdamW(model.parameters(), lr=1e-2)
    load_checkpoint(directory / "one" / "step_00000002", model, optimizer)
    loaded = _full_state(model, optimizer)  # collective
    _step(model, optimizer, 2)
    save_checkpoint(directory / "two", 3, model, optimizer)
    after = _full_state(model, optimizer)
    if dist.get_rank() == 0:
        torch.save({"loaded": loaded, "after": after}, directory / "from_two_ranks.pt")
    del model, optimizer
    gc.collect()  # free the FSDP2 modules (and their hold on the process group) before destroying it
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.distributed
def test_checkpoints_reshard_between_one_and_two_fsdp2_ranks(tmp_path):
    model = _model()
    optimizer = optimi.AdamW(model.parameters(), lr=1e-2)
    _step(model, optimizer, 0)
    _step(model, optimizer, 1)
    save_checkpoint(tmp_path / "one", 2, model, optimizer)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        launcher + [__file__, "worker", str(tmp_path)], env=env, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    from_two = torch.load(tmp_path / "from_two_ranks.pt", weights_only=False)

    # 1 -> 2: the FSDP2 shards hold exactly the single-process state
    _assert_same(from_two["loaded"], _full_state(model, optimizer))
    # 2 -> 1: the sharded checkpoint loads into one process exactly
    fresh = _model()
    restored = optimi.AdamW(fresh.parameters(), lr=1e-2)
    loaded = load_checkpoint(latest_checkpoint(tmp_path / "two"), fresh, restored)
    assert (loaded.step, loaded.world_size, loaded.rank_extra) == (3, 2, None)
    _assert_same(_full_state(fresh, restored), from_two["after"])
    assert from_two["after"]["0.weight"]["step"] == 3


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _worker(Path(sys.argv[2]))
