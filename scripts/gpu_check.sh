#!/usr/bin/env bash
# The checks that need a GPU, in one run (for the first session that has one). Assumes scripts/install.sh already
# made .venv. Builds pconv_cuda for the local GPU only (fast), with the SIMT emulation; runs the whole test suite
# (skip reasons shown); then the benchmark on CUDA, written to docs/bench_cuda.json. The benchmark runs even if the
# tests fail; the exit status is non-zero if either failed. Each stage is timed.
#   scripts/gpu_check.sh     (MAX_JOBS and CUDA_HOME are passed to the build; PYTEST_ARGS, e.g. "-x", to pytest;
#                             BENCH_ARGS, e.g. "--quick", to benchmarks/bench.py)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=.venv/bin/python
[ -x "$PY" ] || { echo "gpu_check.sh: no .venv here; run scripts/install.sh first" >&2; exit 2; }

T0=$(date +%s)
stage_times=()
stage_done() {  # name, start time
    local now
    now=$(date +%s)
    stage_times+=("$1: $((now - $2)) s")
    echo "=== $1 took $((now - $2)) s"
}

echo "=== nvidia-smi"
nvidia-smi
ARCH=$("$PY" -c "import torch;print('%d.%d'%torch.cuda.get_device_capability())")
echo "=== torch $("$PY" -c 'import torch;print(torch.__version__, "CUDA", torch.version.cuda)'), GPU capability $ARCH"

echo "=== build for sm ${ARCH} only (with the emulation)"
t=$(date +%s)
# FORCE_CUDA=1: fail here rather than build a CPU-only package on a GPU machine.
TORCH_CUDA_ARCH_LIST="$ARCH" PCONV_BUILD_EMU=1 FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-8} \
    .venv/bin/pip install --no-build-isolation .
# The installed package (not the source tree) must have its CUDA kernels.
(cd / && "$ROOT/$PY" -c "
import torch, pconv_cuda
from pconv_cuda import ops
print('pconv_cuda', pconv_cuda.__version__, 'from', pconv_cuda.__file__)
assert torch.cuda.is_available(), 'torch sees no GPU'
assert not ops.MISSING_CUDA_KERNELS, f'built without CUDA kernels: {ops.MISSING_CUDA_KERNELS}'
print('CUDA kernels present on', torch.cuda.get_device_name())
")
stage_done build "$t"

echo "=== tests"
t=$(date +%s)
tests_rc=0
# shellcheck disable=SC2086
.venv/bin/pytest -q -rs ${PYTEST_ARGS:-} || tests_rc=$?
stage_done "tests (rc $tests_rc)" "$t"

echo "=== benchmark"
t=$(date +%s)
bench_rc=0
# bench.py takes --devices (plural); cuda only here, once per CUDA route (its --cuda-routes default: both).
# shellcheck disable=SC2086
"$PY" benchmarks/bench.py --devices cuda --json docs/bench_cuda.json ${BENCH_ARGS:-} || bench_rc=$?
stage_done "benchmark (rc $bench_rc)" "$t"

echo "=== times"
for line in "${stage_times[@]}"; do echo "  $line"; done
echo "  total: $(($(date +%s) - T0)) s"
if [ "$tests_rc" -ne 0 ] || [ "$bench_rc" -ne 0 ]; then
    echo "gpu_check.sh: FAILED (tests rc $tests_rc, benchmark rc $bench_rc)" >&2
    exit 1
fi
echo "gpu_check.sh: all passed"
