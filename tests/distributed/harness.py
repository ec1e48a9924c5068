"""Spawn N gloo ranks on CPU from inside pytest and collect what each rank returns.

``run_ranks("scenario")`` starts ``python -m tests.distributed.worker scenario`` once per rank with
the usual torchrun environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` on a free
port), waits with a timeout, and returns each rank's JSON result. A rank that fails or hangs fails
the test with its output; the other ranks are killed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(scenario: str, world_size: int = 2, timeout: float = 300.0) -> list[dict[str, Any]]:
    """Run ``scenario`` of ``tests/distributed/worker.py`` on ``world_size`` gloo ranks."""
    port = free_port()
    with tempfile.TemporaryDirectory() as out:
        procs = []
        for rank in range(world_size):
            env = dict(
                os.environ,
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(world_size),
                LOCAL_WORLD_SIZE=str(world_size),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            )
            log = open(Path(out) / f"rank{rank}.log", "w+")  # noqa: SIM115 (closed below)
            procs.append(
                (
                    subprocess.Popen(
                        [sys.executable, "-m", "tests.distributed.worker", scenario, out],
                        cwd=REPO,
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    ),
                    log,
                )
            )
        deadline = time.monotonic() + timeout
        failed = None
        try:
            for rank, (proc, _) in enumerate(procs):
                try:
                    code = proc.wait(timeout=max(deadline - time.monotonic(), 1))
                except subprocess.TimeoutExpired:
                    failed = f"rank {rank} timed out after {timeout:.0f}s"
                    break
                if code != 0:
                    failed = f"rank {rank} exited with {code}"
                    break
        finally:
            for proc, _ in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        logs = []
        for rank, (_, log) in enumerate(procs):
            log.seek(0)
            logs.append(f"--- rank {rank} ---\n{log.read()[-6000:]}")
            log.close()
        if failed is not None:
            raise AssertionError(f"{scenario}: {failed}\n" + "\n".join(logs))
        return [json.loads((Path(out) / f"rank{rank}.json").read_text()) for rank in range(world_size)]
