"""scripts/bench_low_precision.py: a smoke run of its step table and the counts of its memory worker.

Both run in this process and take about a second; the peers (torchao, heavyball) are not needed.
"""

from __future__ import annotations

import pytest
import torch

from tests.scripts import load_script

bench = load_script("bench_low_precision.py", "optimi_bench_low_precision")


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_smoke_step_table_has_every_mode_and_its_state_bytes(capsys, restore_threads):
    assert bench.main(["--smoke", "--only", "step", "--threads", "1"]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| optimi ")]
    # two backends x four modes; moments in bf16 (4 B), plus 2 B of Kahan buffer or int16 remainder
    state = {(row[0].lstrip("| "), row[1]): float(row[4]) for row in rows}
    for backend in ("optimi for-loop", "optimi foreach"):
        assert state[backend, "nearest"] == state[backend, "stochastic"] == 4.0
        assert state[backend, "kahan"] == state[backend, "remainder"] == 6.0


@pytest.mark.parametrize(
    "key, grads, moments, kahan",
    [("fp32", 4.0, 8.0, 0.0), ("kahan", 2.0, 4.0, 2.0), ("stochastic", 2.0, 4.0, 0.0)],
)
def test_memory_worker_counts_per_category(key, grads, moments, kahan, restore_threads):
    result = bench.memory_worker(key, layers=2, width=32, peers={})
    report, params = result["report"], result["params"]
    assert report["optimizer_states"] == result["state_walk"]
    assert report["grads"] / params == grads
    assert (report["optimizer_states"] - report["kahan"]) / params == pytest.approx(moments, abs=1e-3)
    assert report["kahan"] / params == kahan


def test_memory_worker_under_gradient_release_holds_one_layers_gradient(restore_threads):
    result = bench.memory_worker("remainder_release", layers=4, width=32, peers={})
    report, params = result["report"], result["params"]
    assert report["grads"] == 0
    assert report["grads_peak"] == 32 * 32 * 2  # one bf16 layer at a time
    assert report["kahan"] / params == 2.0  # the int16 remainder
