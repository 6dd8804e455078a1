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
# Without them the MLX part of the check skips, saying why. A wheel of PyPI's pnmf 0.1.0
# there (`pip download --no-deps pnmf==0.1.0`) goes into an environment of its own,
# /tmp/peer, and the suite times it as the peer. Writes the test log, the suite's JSON
# record and its text summary to OUT_DIR; exits non-zero if either failed.
# PNMF_GPU_CHECK_ARGS adds arguments to the suite (--quick: small sizes, also on a CPU;
# --more: torch's and MLX's alternatives and MLX's first fits in new processes, a few minutes more;
# --cpu no: the GPUs alone); PNMF_GPU_TESTS picks the tests (pytest -k, e.g. "mlx");
# PNMF_GPU_TESTS_TIMEOUT and PNMF_GPU_SUITE_TIMEOUT bound each part (270 and 330 s).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks/gpu}}"
mkdir -p "$out"
python="${PYTHON:-python3}"
wheels="${PNMF_WHEELS:-.whl}"
export PYTHONUNBUFFERED=1
install() {  # install TARGET WHEEL...
  local target=$1
  shift
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" "$@" ||
    { echo "gpu_check: installing $* failed" >&2; exit 2; }
}
mapfile -t ours < <(compgen -G "$wheels/*.whl" | grep -v '/pnmf-0\.1\.0-')
if [ "${#ours[@]}" -gt 0 ]; then
  install /tmp/site "${ours[@]}"
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  # mlx-cuda finds CUDA's libraries beside itself (rpath $ORIGIN/../../nvidia/...): point
  # there at the ones torch's environment already has.
  if nvidia=$("$python" -c "import nvidia; print(list(nvidia.__path__)[0])" 2>/dev/null) && [ ! -e /tmp/site/nvidia ]; then
    ln -s "$nvidia" /tmp/site/nvidia
  fi
fi
peer=()
if peer_wheel=$(compgen -G "$wheels/pnmf-0.1.0-*.whl"); then
  install /tmp/peer "$peer_wheel"
  printf '#!/bin/sh\nPYTHONPATH=/tmp/peer exec %s "$@"\n' "$(command -v "$python")" >/tmp/peer/python
  chmod +x /tmp/peer/python
  peer=(--peer-python /tmp/peer/python)
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
try:
    import mlx.core as mx
    print("mlx", mx.__version__, "| default device", mx.default_device(), "| GPU", mx.is_available(mx.gpu))
except Exception as err:  # the reason MLX is missing from the backends above
    print("mlx: not usable:", repr(err))
PY
pick=()
[ -n "${PNMF_GPU_TESTS:-}" ] && pick=(-k "$PNMF_GPU_TESTS")
# Workers where pytest-xdist is installed (PNMF_GPU_TEST_WORKERS, 8): the float64 references
# and MLX's first compilation of its kernels are CPU work.
"$python" -c "import xdist" 2>/dev/null && pick+=(-n "${PNMF_GPU_TEST_WORKERS:-8}")
# -v: each test's name and outcome as it ends, so that a run cut short still says which failed.
timeout "${PNMF_GPU_TESTS_TIMEOUT:-270}" "$python" -m pytest -m gpu -v --tb=short -p no:cacheprovider --durations=8 \
  "${pick[@]}" tests/test_gpu.py 2>&1 | tee "$out/gpu_tests.txt" | tail -40
tests=${PIPESTATUS[0]}
# shellcheck disable=SC2086  # PNMF_GPU_CHECK_ARGS is a list of arguments
timeout "${PNMF_GPU_SUITE_TIMEOUT:-330}" "$python" -m pnmf.benchmarks --suite gpu --out "$out" "${peer[@]}" ${PNMF_GPU_CHECK_ARGS:-} 2>&1 | tee "$out/gpu_suite.txt" | tail -30
suite=${PIPESTATUS[0]}
echo "gpu_check: tests exit $tests, suite exit $suite, $(($(date +%s) - start)) s" | tee -a "$out/gpu_summary.txt"
[ "$tests" -eq 0 ] && [ "$suite" -eq 0 ]
