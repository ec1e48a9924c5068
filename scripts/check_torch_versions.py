"""Run the test suite (and optionally the step and compile benchmarks) on several torch releases.

Command lines (docs/versions.md comes from the first)::

    python scripts/check_torch_versions.py --bench                 # 2.10.0 2.13.0 2.14.1 2.15.0
    python scripts/check_torch_versions.py 2.10.0                  # the oldest declared release only
    python scripts/check_torch_versions.py 2.12.1 --pytest-args "tests/test_fused.py"

Each release gets its own virtual environment under ``--venvs`` (default ``.venvs/``, kept between
runs: a second run installs nothing), with torch, pytest, numpy and psutil; the project is put on
``PYTHONPATH``, so every environment tests this working tree. Releases other than 2.13.0 are CUDA
builds of several GB from the package registry (they run on the CPU); this workplace's pip cap on
torch (a constraints file) is lifted for those installs. Progress goes to stderr, each suite's
output to ``<venvs>/<version>.log``, and the summary table, with install and run times, to stdout.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VERSIONS = ("2.10.0", "2.13.0", "2.14.1", "2.15.0")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def ensure_venv(venvs: Path, version: str) -> tuple[Path, float]:
    """The environment's python for torch ``version`` and the seconds its install took (0 if present)."""
    venv = venvs / f"torch-{version}"
    python = venv / "bin" / "python"
    if python.exists():
        return python, 0.0
    start = time.perf_counter()
    log(f"torch {version}: creating {venv} (CUDA builds download several GB)")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = dict(os.environ, PIP_CONSTRAINT="/dev/null")
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, f"torch=={version}"], check=True, env=env)
    subprocess.run([*pip, "pytest>=7", "numpy", "psutil"], check=True, env=env)
    return python, time.perf_counter() - start


def run_suite(python: Path, version: str, venvs: Path, pytest_args: list[str]) -> tuple[str, float]:
    """pytest's closing summary (e.g. ``606 passed, 47 skipped``) and the suite's seconds."""
    output = venvs / f"{version}.log"
    log(f"torch {version}: test suite -> {output}")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    start = time.perf_counter()
    with output.open("w") as handle:
        subprocess.run(
            [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args],
            cwd=REPO,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    seconds = time.perf_counter() - start
    lines = output.read_text().splitlines()
    summary = next((line.strip("= ") for line in reversed(lines) if re.search(r"\d+ (passed|failed)", line)), "?")
    return re.sub(r" in [\d.]+s.*$", "", summary), seconds


def run_bench(python: Path, version: str, rounds: int) -> dict[str, str]:
    """AdamW step times against torch fused fp32 (same run) and the fused optimizations that ran."""
    log(f"torch {version}: AdamW step benchmark")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    command = [
        str(python), "scripts/bench_step.py", "--optimizers", "adamw", "--backends", "fused",
        "--rounds", str(rounds), "--tensors", "40", "--numel", str(40 * 256 * 1024),
    ]  # fmt: skip
    text = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout
    result = {}
    for key, pattern in (
        ("bf16", r"optimi fused bf16\+Kahan ([\d.]+) ms vs torch.optim fused fp32 ([\d.]+) ms per step: ([\d.]+)x"),
        ("fp32", r"optimi fused fp32 ([\d.]+) ms vs torch.optim fused fp32 ([\d.]+) ms per step: ([\d.]+)x"),
    ):
        match = re.search(pattern, text)
        result[key] = f"{match[1]} ms vs {match[2]} ms ({match[3]}x)" if match else "?"
    tricks = re.search(r"fused optimizations on torch \S+: (\{.*\})", text)
    result["tricks"] = tricks[1] if tricks else "?"
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("versions", nargs="*", default=list(DEFAULT_VERSIONS), help="torch releases to check")
    parser.add_argument("--venvs", type=Path, default=REPO / ".venvs", help="where the environments live")
    parser.add_argument("--pytest-args", default="", help="extra pytest arguments (default: the whole suite)")
    parser.add_argument("--no-tests", action="store_true", help="skip the test suite")
    parser.add_argument("--bench", action="store_true", help="also run the AdamW step benchmark")
    parser.add_argument("--rounds", type=int, default=15, help="benchmark rounds (with --bench)")
    args = parser.parse_args(argv)
    args.venvs.mkdir(parents=True, exist_ok=True)

    rows = []
    for version in args.versions:
        python, install_s = ensure_venv(args.venvs, version)
        row = {"version": version, "install": f"{install_s:.0f} s" if install_s else "present"}
        if not args.no_tests:
            row["suite"], suite_s = run_suite(python, version, args.venvs, args.pytest_args.split())
            row["suite"] += f" ({suite_s / 60:.1f} min)"
            log(f"torch {version}: {row['suite']}")
        if args.bench:
            row.update(run_bench(python, version, args.rounds))
        rows.append(row)

    columns = ["version", "install", "suite", "bf16", "fp32", "tricks"]
    titles = {
        "bf16": "fused bf16+Kahan vs torch fused fp32",
        "fp32": "fused fp32 vs torch fused fp32",
        "tricks": "fused optimizations",
    }
    shown = [c for c in columns if any(c in row for row in rows)]
    print("| " + " | ".join(titles.get(c, c) for c in shown) + " |")
    print("|" + "---|" * len(shown))
    for row in rows:
        print("| " + " | ".join(row.get(c, "") for c in shown) + " |")
    failed = [row["version"] for row in rows if re.search(r"\d+ (failed|error)", row.get("suite", ""))]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
