#!/usr/bin/env bash
# Creates .venv with torch and the test/example dependencies, then builds and installs pconv_cuda into it.
# The CUDA sources compile whenever a CUDA toolkit is found (CUDA_HOME, default /usr/local/cuda); no GPU needed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --upgrade pip setuptools wheel
# The CUDA build of torch: its headers let nvcc compile our CUDA sources even on a machine without a GPU.
# nvidia-cudnn-frontend: headers of cuDNN's graph API, for the cudnn_fused CUDA route (the build goes on without).
.venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1 ninja numpy "nvidia-cudnn-frontend>=1.16,<1.19"
# --no-build-isolation: compile against the torch installed above (the extension's ABI is tied to it).
log=$(mktemp)
# PCONV_BUILD_EMU=1: also build the SIMT emulation of the CUDA kernels, which the test suite runs.
if ! PCONV_BUILD_EMU=${PCONV_BUILD_EMU:-1} MAX_JOBS=${MAX_JOBS:-2} .venv/bin/pip install -v --no-build-isolation ".[test]" >"$log" 2>&1; then
    tail -60 "$log"
    echo "install.sh: building pconv_cuda failed (full log: $log)" >&2
    exit 1
fi
grep -E "pconv_cuda: (building|also)" "$log" | sed "s/^ *//" | sort -u || true
# Import the installed package, not the source tree.
(cd / && "$ROOT/.venv/bin/python" -c "import pconv_cuda; print('pconv_cuda', pconv_cuda.__version__, 'installed')")
