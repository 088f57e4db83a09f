#!/usr/bin/env bash
# The checks that need a GPU, in one run. Builds pconv_cuda for the local GPU only (fast), with the cudnn_fused route
# (cudnn-frontend's headers: the nvidia-cudnn-frontend package, or CUDNN_FRONTEND_INCLUDE pointing at a carried copy
# of its include/ folder on a machine without a package index); runs the tests of the CUDA backends and of the
# cudnn_fused route (failures and errors listed); then the benchmarks on CUDA: per layer fp32 and bf16 (batch 1 and
# 8, aten_conv and gemm routes), bf16 channels_last (aten_conv and cudnn_fused), the GPU time of each layer from
# CUDA-graph replays (bf16 and fp32-TF32 channels_last, 256 px batch 1 and 8 with NVIDIA's layer and the peer under
# torch.compile, 512 px layer_size 8 batch 8), the per-call host overhead, the whole U-Net (eager, and inference
# replayed from a CUDA graph; each against the same network on plain convolutions) and the 3-D layers. Results go to
# $RESULTS (default docs/): bench_cuda_<dtype>.{json,md,png}, bench_cuda_bfloat16_cl.{json,md},
# bench_cuda_graph_{bfloat16,float32}_cl.{json,md,png}, bench_cuda_graph_512.{json,md}, bench_cuda_3d.{json,md},
# overhead_cuda.json, bench_model_cuda.json, bench_model_cuda_bf16_cl_fused.json (the U-Net in bf16 channels_last
# on the cudnn_fused route, with NVIDIA's layer under torch.compile), tests.log (pack them into one archive where a
# lease returns few). Every stage is timed and bounded; later stages run even if earlier ones fail.
#   scripts/gpu_check.sh     PY (default .venv/bin/python, else python3: a machine whose torch is already there),
#                            MAX_JOBS, CUDA_HOME, PCONV_BUILD_EMU (default 0 here: the emulation is CPU-tested),
#                            PYTEST_ARGS (e.g. "-n 16 --timeout 120" with pytest-xdist and pytest-timeout: the
#                            suite's CUDA gradchecks take 10-20 s each), PCONV_TEST_BACKENDS (default the CUDA
#                            backends; empty for the whole suite), TESTS_LIMIT / BENCH_LIMIT (seconds),
#                            CUDNN_FRONTEND_INCLUDE, PCONV_CUDNN_FUSED=0 (build and check without the route)
# Lent H200s (torch 2.11, 16 cores): the build took 45 s, then 100 s once the tensor-core kernels were in; 21-23 s per
# benchmark dtype; the whole suite with "-n 16" did not finish in 330 s (68%, CPU gradchecks timing out under 256
# threads), hence the defaults above. Its CXX (/opt/gcc/bin/g++) links libstdc++ statically, which setup.py refuses
# (two C++ runtimes in one process crash on the first error message): the build is then retried with the system
# compiler when there is one.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PY:-.venv/bin/python}
if [ -x "$PY" ] || [ -x "$ROOT/$PY" ]; then
    case $PY in /*) ;; *) [ -x "$ROOT/$PY" ] && PY=$ROOT/$PY || PY=$(command -v "$PY") ;; esac
else
    PY=$(command -v "$PY" || command -v python3)
fi
RESULTS=${RESULTS:-docs}
mkdir -p "$RESULTS"
T0=$(date +%s)
stage_times=()
failed=()
stage() {  # name, limit (s), command...: run it bounded and timed, remember a failure
    local name=$1 limit=$2 t rc=0
    shift 2
    t=$(date +%s)
    echo "=== $name (limit ${limit} s)"
    timeout --kill-after=10 "$limit" "$@" || rc=$?
    stage_times+=("$name: $(($(date +%s) - t)) s, rc $rc")
    [ "$rc" -eq 0 ] || failed+=("$name (rc $rc)")
    return "$rc"
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
ARCH=$("$PY" -c "import torch;print('%d.%d'%torch.cuda.get_device_capability())")
echo "=== python $PY, torch $("$PY" -c 'import torch;print(torch.__version__, "CUDA", torch.version.cuda)'), sm $ARCH"

# FORCE_CUDA=1: fail here rather than build a CPU-only package on a GPU machine. --no-deps: use the torch that is
# there (such a machine may have no package index).
pip_install_pconv() {
    set -o pipefail  # (exported functions run in a fresh bash)
    TORCH_CUDA_ARCH_LIST="$ARCH" PCONV_BUILD_EMU=${PCONV_BUILD_EMU:-0} FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} \
        "$PY" -m pip install -q --no-build-isolation --no-deps . 2>&1 | tee /tmp/pconv_build.log
}
build() {
    if ! pip_install_pconv; then
        grep -q "libstdc++ linked in statically" /tmp/pconv_build.log && [ -x /usr/bin/g++ ] || return 1
        echo "=== retrying with the system compiler (/usr/bin/g++): ${CXX:-g++} links libstdc++ statically"
        CXX=/usr/bin/g++ CC=/usr/bin/gcc pip_install_pconv || return 1
    fi
    # The installed package (not the source tree) must have its CUDA kernels.
    (cd / && "$PY" -c "
import os, torch, pconv_cuda
from pconv_cuda import ops
print('pconv_cuda', pconv_cuda.__version__, 'from', pconv_cuda.__file__, 'torch', torch.__version__)
assert torch.cuda.is_available(), 'torch sees no GPU'
assert not ops.MISSING_CUDA_KERNELS, f'built without CUDA kernels: {ops.MISSING_CUDA_KERNELS}'
print('CUDA kernels present on', torch.cuda.get_device_name(), 'cuDNN', torch.backends.cudnn.version())
from pconv_cuda import routes
status = routes.cudnn_fused_status()
print('cudnn_fused route:', status or 'built')
assert not status or os.environ.get('PCONV_CUDNN_FUSED') == '0', status
")
}
export -f pip_install_pconv build; export ARCH PY
stage build 400 bash -c build || { echo "gpu_check.sh: build failed"; exit 1; }

export PYTHONUNBUFFERED=1
stage "bench float32" "${BENCH_LIMIT:-120}" "$PY" benchmarks/bench.py --devices cuda --batch 1 8 \
    --json "$RESULTS/bench_cuda_float32.json" --markdown "$RESULTS/bench_cuda_float32.md" \
    --plot "$RESULTS/bench_cuda_float32.png"
# The tests of the CUDA backends (and those that take no backend: model, examples, export) unless
# PCONV_TEST_BACKENDS says otherwise (empty: the whole suite; CI runs the CPU and emulated ones anyway). One torch
# thread per xdist worker: 16 workers x 16 threads made CPU gradchecks overrun their timeout. -v: a run stopped at its
# limit still names every test that failed before.
export PCONV_TEST_BACKENDS=${PCONV_TEST_BACKENDS-cuda-aten_conv,cuda-gemm,cuda-cudnn_fused}
# shellcheck disable=SC2086
stage tests "${TESTS_LIMIT:-300}" bash -c "OMP_NUM_THREADS=1 '$PY' -P -m pytest -v -rfE -p no:cacheprovider \
    ${PYTEST_ARGS:-} > '$RESULTS/tests.log' 2>&1; rc=\$?; grep -E '(FAILED|ERROR) ' '$RESULTS/tests.log' | head -n 80;
    tail -n 30 '$RESULTS/tests.log'; exit \$rc"
stage "bench bfloat16" "${BENCH_LIMIT:-120}" "$PY" benchmarks/bench.py --devices cuda --batch 1 8 --dtype bfloat16 \
    --json "$RESULTS/bench_cuda_bfloat16.json" --markdown "$RESULTS/bench_cuda_bfloat16.md"
stage "bench bfloat16 channels_last" "${BENCH_LIMIT:-120}" "$PY" benchmarks/bench.py --devices cuda --batch 1 8 \
    --dtype bfloat16 --channels-last --cuda-routes aten_conv cudnn_fused --json "$RESULTS/bench_cuda_bfloat16_cl.json" \
    --markdown "$RESULTS/bench_cuda_bfloat16_cl.md"
# GPU time per layer (CUDA-graph replays): what the cudnn_fused route is judged by (docs/architecture.md, Routes).
stage "bench GPU time bfloat16" "${BENCH_LIMIT:-240}" "$PY" benchmarks/bench.py --devices cuda --gpu-time \
    --batch 1 8 --masks single --dtype bfloat16 --channels-last --cuda-routes aten_conv cudnn_fused --compile default \
    --json "$RESULTS/bench_cuda_graph_bfloat16_cl.json" --markdown "$RESULTS/bench_cuda_graph_bfloat16_cl.md" \
    --plot "$RESULTS/bench_cuda_graph_bfloat16_cl.png"
stage "bench GPU time float32 (TF32)" "${BENCH_LIMIT:-120}" "$PY" benchmarks/bench.py --devices cuda --gpu-time \
    --batch 1 8 --masks single --channels-last --cuda-routes aten_conv cudnn_fused \
    --json "$RESULTS/bench_cuda_graph_float32_cl.json" --markdown "$RESULTS/bench_cuda_graph_float32_cl.md" \
    --plot "$RESULTS/bench_cuda_graph_float32_cl.png"
stage "bench GPU time 512 px" "${BENCH_LIMIT:-120}" "$PY" benchmarks/bench.py --devices cuda --gpu-time \
    --image 512 --layer-size 8 --batch 8 --masks single --dtype bfloat16 --channels-last \
    --cuda-routes aten_conv cudnn_fused --json "$RESULTS/bench_cuda_graph_512.json" \
    --markdown "$RESULTS/bench_cuda_graph_512.md"
stage "bench host overhead" "${BENCH_LIMIT:-120}" "$PY" benchmarks/overhead.py --devices cuda \
    --json "$RESULTS/overhead_cuda.json"
stage "bench U-Net" "${BENCH_LIMIT:-120}" "$PY" benchmarks/bench_model.py --device cuda --batch 1 8 --repeats 5 --cuda-graphs \
    --json "$RESULTS/bench_model_cuda.json"
stage "bench U-Net bf16 channels_last cudnn_fused" "${BENCH_LIMIT:-180}" "$PY" benchmarks/bench_model.py --device cuda \
    --batch 1 8 --repeats 5 --cuda-graphs --dtype bfloat16 --channels-last --cuda-route cudnn_fused --compile \
    --modes infer --json "$RESULTS/bench_model_cuda_bf16_cl_fused.json"
stage "bench 3-D" "${BENCH_LIMIT:-120}" "$PY" benchmarks/bench.py --dims 3 --devices cuda --batch 1 4 \
    --cuda-routes aten_conv --json "$RESULTS/bench_cuda_3d.json" --markdown "$RESULTS/bench_cuda_3d.md"

echo "=== times"
for line in "${stage_times[@]}"; do echo "  $line"; done
echo "  total: $(($(date +%s) - T0)) s"
if [ "${#failed[@]}" -ne 0 ]; then
    echo "gpu_check.sh: FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "gpu_check.sh: all passed"
