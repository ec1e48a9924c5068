#!/usr/bin/env bash
# One prepared GPU check for the fused (Triton) backend: versions, the CUDA tests, and the step
# benchmark on CUDA. Run from the repository root on a machine with a GPU, torch and Triton
# installed (no network needed):
#
#     OUT=/some/dir bash scripts/gpu_check.sh
#
# Everything printed is also written under $OUT (default ./gpu_check_out). Each stage has its own
# time limit so the whole check stays under ~6.5 minutes (typically less); on a machine without CUDA it says so and
# exits 0 after the version line.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$SECONDS

stage() { echo; echo "=== $1 ($((SECONDS - start)) s elapsed)"; }

stage "versions" | tee "$OUT/versions.txt"
python -c 'import torch,triton; print("torch", torch.__version__, "| triton", triton.__version__, "| cuda", torch.version.cuda, "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")' 2>&1 | tee -a "$OUT/versions.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv 2>&1 | tee -a "$OUT/versions.txt"

if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "no CUDA device: the CUDA tests would all skip and there is nothing to benchmark" | tee -a "$OUT/versions.txt"
    exit 0
fi

stage "tests/test_cuda.py: fused/triton equals the for-loop on CUDA, every optimizer, fp32 and bf16+Kahan" | tee "$OUT/test_cuda.txt"
timeout 180 python -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py 2>&1 | tail -40 | tee -a "$OUT/test_cuda.txt"
echo "pytest exit status: ${PIPESTATUS[0]}" | tee -a "$OUT/test_cuda.txt"

stage "bench_step.py: AdamW on CUDA, 100M elements" | tee "$OUT/bench_adamw.md"
timeout 90 python scripts/bench_step.py --device cuda --optimizers adamw --numel 100000000 --rounds 9 2>&1 | tee -a "$OUT/bench_adamw.md"

stage "bench_step.py: every optimizer on CUDA, 50M elements, foreach vs fused (rows print as each finishes)" | tee "$OUT/bench_all.md"
timeout 120 python scripts/bench_step.py --device cuda --numel 50000000 --rounds 5 --backends foreach,fused --no-torch 2>&1 | tee -a "$OUT/bench_all.md"

stage "done" | tee -a "$OUT/bench_all.md"
