#!/usr/bin/env bash
# The GPU check: `pytest -m gpu` and `python -m pnmf.benchmarks --suite gpu` on a CUDA
# machine without network access, in well under 8 minutes on one H100.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (default: $OUT, else benchmarks/gpu)
#
# pnmf runs from this checkout (PYTHONPATH), on whatever torch the machine has. Packages
# the machine lacks travel as wheels in .whl/ (or $PNMF_WHEELS), installed without the
# network into /tmp/site; for MLX on CUDA, fetch them where pip works, for the machine's
# Python (3.12 here):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_35_x86_64 -d .whl mlx mlx-cuda-13
# Without them the MLX part of the check skips, saying why. Writes the test log, the
# suite's JSON record and its text summary to OUT_DIR; exits non-zero if either failed.
# PNMF_GPU_CHECK_ARGS adds arguments to the suite (--quick: small sizes, also on a CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks/gpu}}"
mkdir -p "$out"
python="${PYTHON:-python3}"
wheels="${PNMF_WHEELS:-.whl}"
export PYTHONUNBUFFERED=1
if compgen -G "$wheels/*.whl" >/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$wheels"/*.whl || { echo "gpu_check: installing the wheels in $wheels failed" >&2; exit 2; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
"$python" - <<'PY' 2>&1 | tee "$out/gpu_environment.txt"
import platform
from pnmf.backends import available, gpu_devices
print("python", platform.python_version(), "| backends", available(), "| GPUs", gpu_devices())
try:
    import torch
    print("torch", torch.__version__, "| CUDA", torch.version.cuda, "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")
except ImportError:
    print("torch: not installed")
PY
timeout 270 "$python" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/gpu_tests.txt" | tail -25
tests=${PIPESTATUS[0]}
# shellcheck disable=SC2086  # PNMF_GPU_CHECK_ARGS is a list of arguments
timeout 330 "$python" -m pnmf.benchmarks --suite gpu --out "$out" ${PNMF_GPU_CHECK_ARGS:-} 2>&1 | tee "$out/gpu_suite.txt" | tail -30
suite=${PIPESTATUS[0]}
echo "gpu_check: tests exit $tests, suite exit $suite, $(($(date +%s) - start)) s" | tee -a "$out/gpu_summary.txt"
[ "$tests" -eq 0 ] && [ "$suite" -eq 0 ]
