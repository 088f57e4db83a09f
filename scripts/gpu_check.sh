#!/usr/bin/env bash
# The checks that need a GPU, in one run of at most DEADLINE seconds (default 540). Builds pconv_cuda for the local
# GPU only, with the cudnn_fused route (cudnn-frontend's headers: the nvidia-cudnn-frontend package, or
# CUDNN_FRONTEND_INCLUDE pointing at a carried copy of its include/ folder on a machine without a package index);
# runs the tests of the CUDA backends and of the cudnn_fused route; then the CUDA benchmarks, most wanted first: the
# GPU time of each layer from CUDA-graph replays (bf16 and fp32-TF32 channels_last, 256 px batch 1 and 8, NVIDIA's
# layer and the peer under torch.compile), the U-Net in bf16 channels_last on cudnn_fused, the decoder layers with
# grouped masks and with masked skip links (masked_cat + input_masked, bf16 channels_last), the eager per-layer fp32
# table (aten_conv and gemm routes), the host overhead per call, the fp32 U-Net (eager and replayed from a CUDA
# graph), 512 px layer_size 8 batch 8, eager bf16 (NCHW and channels_last), the 3-D layers. A stage gets at most the
# time left; one that would get under 20 s is skipped and reported. Results go to $RESULTS (default docs/):
# gpu_check.json (scripts/gpu_check_report.py: commit, versions, GPU, test counts per backend, each failure's id and
# first error line, stage times, the benchmark medians), bench_cuda_graph_{bfloat16,float32}_cl.{json,md,png},
# bench_model_cuda_bf16_cl_fused.json, bench_cuda_graph_skip_bf16_cl.{json,md,png}, bench_cuda_float32.{json,md,png},
# overhead_cuda.json, bench_model_cuda.json, bench_cuda_graph_512.{json,md}, bench_cuda_bfloat16{,_cl}.{json,md}, bench_cuda_3d.{json,md}, tests.log and the
# raw gpu_check_{stages.tsv,outcomes.jsonl} (pack them into one archive where a lease returns few files).
#   scripts/gpu_check.sh     PY (default .venv/bin/python, else python3: a machine whose torch is already there),
#                            MAX_JOBS, CUDA_HOME, PCONV_BUILD_EMU (default 0 here: the emulation is CPU-tested),
#                            PYTEST_ARGS (default "-n <cores> --timeout 120" where pytest-xdist and pytest-timeout
#                            are installed), PCONV_TEST_BACKENDS (default the CUDA backends; empty for the whole
#                            suite), DEADLINE / BUILD_LIMIT / TESTS_LIMIT / BENCH_LIMIT (seconds), PARTS (default
#                            "build tests bench"; e.g. "build tests", then "bench" in a second command),
#                            CUDNN_FRONTEND_INCLUDE, PCONV_CUDNN_FUSED=0 (build and check without the route)
# Lent H200s (torch 2.11, 16 cores): the build took 45 s, then 100 s once the tensor-core kernels were in; 21-23 s per
# eager benchmark dtype; the whole suite with "-n 16" did not finish in 330 s (68%, CPU gradchecks timing out under
# 256 threads), hence the CUDA backends only and one thread per worker. Its CXX (/opt/gcc/bin/g++) links libstdc++
# statically, which setup.py refuses (two C++ runtimes in one process crash on the first error message): the build
# is then retried with the system compiler when there is one.
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
# The whole check ends within DEADLINE seconds (default 540: a lease's command runs at most 600 s): each stage gets
# at most what is left, a stage with under 20 s left is skipped (and reported as such), and the report is written.
DEADLINE=${DEADLINE:-540}
STAGES=$RESULTS/gpu_check_stages.tsv
OUTCOMES=$RESULTS/gpu_check_outcomes.jsonl
# PARTS: which of build, tests, bench to run (default all). A lease too short for all in one command runs
# PARTS="build tests", then PARTS=bench on the same (still warm) machine: the installed build and RESULTS' files
# from the first command are kept, and the report covers both.
PARTS=${PARTS:-build tests bench}
has() { case " $PARTS " in *" $1 "*) return 0 ;; esac; return 1; }
has build && : >"$STAGES"
failed=()
stage() {  # name, limit (s), command...: run it bounded and timed, remember a failure
    local name=$1 limit=$2 t rc=0 left
    shift 2
    left=$((DEADLINE - ($(date +%s) - T0) - 10))
    if [ "$left" -lt 20 ]; then
        echo "=== $name: skipped, ${left} s left of the check's ${DEADLINE} s"
        printf '%s\t0\t-1\n' "$name (skipped: no time left)" >>"$STAGES"
        failed+=("$name (no time left)")
        return 1
    fi
    [ "$limit" -le "$left" ] || limit=$left
    t=$(date +%s)
    echo "=== $name (limit ${limit} s, $(($(date +%s) - T0)) s into the check)"
    timeout --kill-after=5 "$limit" "$@" || rc=$?
    printf '%s\t%s\t%s\n' "$name" "$(($(date +%s) - t))" "$rc" >>"$STAGES"
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
    installed
}
installed() {  # the installed package (not the source tree) must have its CUDA kernels
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
export -f pip_install_pconv build installed; export ARCH PY
# The report takes the benchmark files written since the first part's start (a file left from an earlier run is
# never reported as this run's).
has build && echo "$T0" >"$RESULTS/gpu_check_start"
GPU_CHECK_START=$(cat "$RESULTS/gpu_check_start" 2>/dev/null || echo "$T0")
export GPU_CHECK_START
report() { "$PY" scripts/gpu_check_report.py "$OUTCOMES" "$STAGES" "$RESULTS"; }
if has build; then
    stage build "${BUILD_LIMIT:-300}" bash -c build || { echo "gpu_check.sh: build failed"; report; exit 1; }
else
    stage installed 60 bash -c installed || { echo "gpu_check.sh: pconv_cuda is not installed"; report; exit 1; }
fi

export PYTHONUNBUFFERED=1
# The tests of the CUDA backends (and those that take no backend: model, examples, export) unless
# PCONV_TEST_BACKENDS says otherwise (empty: the whole suite; CI runs the CPU and emulated ones anyway), spread over
# the cores with pytest-xdist and each bounded by pytest-timeout where those are installed. One torch thread per
# xdist worker: 16 workers x 16 threads made CPU gradchecks overrun their timeout. scripts/gpu_check_report.py
# records each verdict as it comes (a run stopped at its limit still counts what ran), -v names them in tests.log.
export PCONV_TEST_BACKENDS=${PCONV_TEST_BACKENDS-cuda-aten_conv,cuda-gemm,cuda-cudnn_fused}
if has tests && [ -z "${PYTEST_ARGS+x}" ]; then
    PYTEST_ARGS=""
    "$PY" -c "import xdist" 2>/dev/null && PYTEST_ARGS="-n $(nproc)"
    "$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST_ARGS="$PYTEST_ARGS --timeout 120"
fi
export GPU_CHECK_OUTCOMES=$OUTCOMES
# shellcheck disable=SC2086
has tests && stage tests "${TESTS_LIMIT:-270}" bash -c "OMP_NUM_THREADS=1 PYTHONPATH='$ROOT/scripts' \
    '$PY' -P -m pytest -v -rfE -p no:cacheprovider -p gpu_check_report --continue-on-collection-errors \
    ${PYTEST_ARGS} > '$RESULTS/tests.log' 2>&1; rc=\$?;
    grep -E '(FAILED|ERROR) ' '$RESULTS/tests.log' | head -n 80; tail -n 30 '$RESULTS/tests.log'; exit \$rc"
# Benchmarks, most wanted first (the deadline skips the last ones): the GPU time of each layer from CUDA-graph
# replays, which the cudnn_fused route is judged by (docs/architecture.md, Routes), with NVIDIA's layer and the peer
# under torch.compile; the U-Net on that route; then the eager per-layer tables, host overhead, fp32 U-Net, 3-D.
benchmarks() {
    stage "bench GPU time bfloat16" "${BENCH_LIMIT:-150}" "$PY" benchmarks/bench.py --devices cuda --gpu-time \
        --batch 1 8 --masks single --dtype bfloat16 --channels-last --cuda-routes aten_conv cudnn_fused \
        --compile default \
        --json "$RESULTS/bench_cuda_graph_bfloat16_cl.json" --markdown "$RESULTS/bench_cuda_graph_bfloat16_cl.md" \
        --plot "$RESULTS/bench_cuda_graph_bfloat16_cl.png"
    stage "bench U-Net bf16 channels_last cudnn_fused" "${BENCH_LIMIT:-90}" "$PY" benchmarks/bench_model.py \
        --device cuda --batch 1 8 --repeats 5 --cuda-graphs --dtype bfloat16 --channels-last --cuda-route cudnn_fused \
        --compile \
        --modes infer --json "$RESULTS/bench_model_cuda_bf16_cl_fused.json"
    stage "bench GPU time float32 (TF32)" "${BENCH_LIMIT:-60}" "$PY" benchmarks/bench.py --devices cuda --gpu-time \
        --batch 1 8 --masks single --channels-last --cuda-routes aten_conv cudnn_fused \
        --json "$RESULTS/bench_cuda_graph_float32_cl.json" --markdown "$RESULTS/bench_cuda_graph_float32_cl.md" \
        --plot "$RESULTS/bench_cuda_graph_float32_cl.png"
    stage "bench GPU time skip links bfloat16" "${BENCH_LIMIT:-45}" "$PY" benchmarks/bench.py --devices cuda \
        --gpu-time --batch 1 8 --masks groups skip --layers dec1,dec2,dec3,dec4,dec5,dec6,dec7 --dtype bfloat16 \
        --channels-last --cuda-routes aten_conv cudnn_fused --json "$RESULTS/bench_cuda_graph_skip_bf16_cl.json" \
        --markdown "$RESULTS/bench_cuda_graph_skip_bf16_cl.md" --plot "$RESULTS/bench_cuda_graph_skip_bf16_cl.png"
    stage "bench float32" "${BENCH_LIMIT:-60}" "$PY" benchmarks/bench.py --devices cuda --batch 1 8 \
        --json "$RESULTS/bench_cuda_float32.json" --markdown "$RESULTS/bench_cuda_float32.md" \
        --plot "$RESULTS/bench_cuda_float32.png"
    stage "bench host overhead" "${BENCH_LIMIT:-45}" "$PY" benchmarks/overhead.py --devices cuda \
        --json "$RESULTS/overhead_cuda.json"
    stage "bench U-Net" "${BENCH_LIMIT:-60}" "$PY" benchmarks/bench_model.py --device cuda --batch 1 8 --repeats 5 \
        --cuda-graphs --json "$RESULTS/bench_model_cuda.json"
    stage "bench GPU time 512 px" "${BENCH_LIMIT:-60}" "$PY" benchmarks/bench.py --devices cuda --gpu-time \
        --image 512 --layer-size 8 --batch 8 --masks single --dtype bfloat16 --channels-last \
        --cuda-routes aten_conv cudnn_fused --json "$RESULTS/bench_cuda_graph_512.json" \
        --markdown "$RESULTS/bench_cuda_graph_512.md"
    stage "bench bfloat16 channels_last" "${BENCH_LIMIT:-45}" "$PY" benchmarks/bench.py --devices cuda --batch 1 8 \
        --dtype bfloat16 --channels-last --cuda-routes aten_conv cudnn_fused \
        --json "$RESULTS/bench_cuda_bfloat16_cl.json" --markdown "$RESULTS/bench_cuda_bfloat16_cl.md"
    stage "bench bfloat16" "${BENCH_LIMIT:-45}" "$PY" benchmarks/bench.py --devices cuda --batch 1 8 --dtype bfloat16 \
        --json "$RESULTS/bench_cuda_bfloat16.json" --markdown "$RESULTS/bench_cuda_bfloat16.md"
    stage "bench 3-D" "${BENCH_LIMIT:-45}" "$PY" benchmarks/bench.py --dims 3 --devices cuda --batch 1 4 \
        --cuda-routes aten_conv --json "$RESULTS/bench_cuda_3d.json" --markdown "$RESULTS/bench_cuda_3d.md"
}
has bench && benchmarks

report || failed+=("report (rc $?)")
echo "=== times"
sed 's/^/  /' "$STAGES"
echo "  total: $(($(date +%s) - T0)) s"
if [ "${#failed[@]}" -ne 0 ]; then
    echo "gpu_check.sh: FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "gpu_check.sh: all passed"
