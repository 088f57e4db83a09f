"""The CUDA backend's kernels run on the CPU by the project's SIMT emulation (csrc/cuda/emu/simt_emu.h).

Test tooling, built only on request (``PCONV_BUILD_EMU=1 pip install --no-build-isolation .``; scripts/install.sh
and CI do). Importing this module loads ``pconv_cuda._emu``, which registers ``torch.ops.pconv_cuda_emu.*``: the
same schemas as ``torch.ops.pconv_cuda.*``, on CPU tensors, computed by the very kernels and primitives the CUDA
build uses in the same op flows (the convolution is ATen's CPU one). It is slow and not meant for real work.
Routes are chosen as on a GPU (``PCONV_CUDA_ROUTE``, or ``pconv_cuda.routes`` with ``_ns="pconv_cuda_emu"``).
"""
import torch

import pconv_cuda  # noqa: F401  (the main library first)

try:
    from pconv_cuda import _emu  # noqa: F401  (registers the pconv_cuda_emu library)
except ImportError as e:
    raise ImportError("pconv_cuda._emu (the SIMT emulation of the CUDA kernels, test tooling) is not built: "
                      "reinstall with `PCONV_BUILD_EMU=1 pip install --no-build-isolation .`") from e

from pconv_cuda.ops import register_library  # noqa: E402

register_library("pconv_cuda_emu")

ops = torch.ops.pconv_cuda_emu
