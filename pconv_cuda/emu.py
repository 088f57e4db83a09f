"""The CUDA backend's kernels run on the CPU by the project's SIMT emulation (csrc/cuda/emu/simt_emu.h).

Importing this module loads ``pconv_cuda._emu``, which registers ``torch.ops.pconv_cuda_emu.*``: the same schemas
as ``torch.ops.pconv_cuda.*``, on CPU tensors, computed by the very kernels and launch sequences the CUDA build
uses (the vendor convolution is ATen's CPU one). It exists so the CUDA code is executed and tested on machines
without a GPU; it is slow and not meant for real work. ``PCONV_CUDA_ROUTE`` selects the route, as on a GPU.
"""
import torch

import pconv_cuda  # noqa: F401  (the main library first)
from pconv_cuda import _emu  # noqa: F401  (registers the pconv_cuda_emu library)
from pconv_cuda.ops import register_library

register_library("pconv_cuda_emu")

ops = torch.ops.pconv_cuda_emu
