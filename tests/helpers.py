"""Test helpers: the sample list and the backend list (a new case or backend is one line), and the input makers.

Imported by the tests as `from helpers import ...`; the fixtures over these lists live in conftest.py."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Tuple

import pytest
import torch

import pconv_cuda


@dataclass(frozen=True)
class Sample:
    name: str
    n: int = 2
    c_in: int = 4
    c_out: int = 6
    h: int = 9
    w: int = 8
    kernel: Tuple[int, int] = (3, 3)
    stride: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int] = (1, 1)
    dilation: Tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = True
    multi_channel: bool = False
    mask: str = "random"  # random | ones | zeros | holes | soft | none
    mask_batch: Optional[int] = None  # None: same as n

    def __str__(self) -> str:
        return self.name


SAMPLES = [
    Sample("k3"),
    Sample("k1_p0", kernel=(1, 1), padding=(0, 0)),
    Sample("k5_s2_p3", kernel=(5, 5), stride=(2, 2), padding=(3, 3), h=11, w=10),
    Sample("k7_p3", kernel=(7, 7), padding=(3, 3), c_in=2, c_out=3),
    Sample("rect_3x5_pad_1x2", kernel=(3, 5), padding=(1, 2)),
    Sample("rect_1x3_pad_0x3_s3", kernel=(1, 3), padding=(0, 3), stride=(3, 3), h=10, w=11),
    Sample("stride_2x1", stride=(2, 1)),
    Sample("dilation2", dilation=(2, 2), padding=(2, 2), h=10, w=9),
    Sample("groups2", groups=2),
    Sample("groups4_multi", groups=4, c_in=8, c_out=4, multi_channel=True),
    Sample("no_bias", bias=False),
    Sample("no_bias_soft", bias=False, mask="soft"),
    Sample("multi", multi_channel=True),
    Sample("multi_holes", multi_channel=True, mask="holes"),
    Sample("ones", mask="ones"),
    Sample("zeros", mask="zeros"),
    Sample("holes", mask="holes"),
    Sample("soft", mask="soft"),
    Sample("soft_multi", mask="soft", multi_channel=True),
    Sample("mask_none", mask="none"),
    Sample("mask_none_multi", mask="none", multi_channel=True, kernel=(5, 3), padding=(2, 1)),
    Sample("mask_batch1", mask_batch=1),
    Sample("batch1", n=1),
]

@dataclass(frozen=True)
class Backend:
    """Where an op runs: its device, its op library, and the CUDA route (PCONV_CUDA_ROUTE) where one applies."""
    name: str
    device: str
    ns: str  # torch.ops namespace: pconv_cuda, or pconv_cuda_emu for the CUDA kernels under the SIMT emulation
    cuda_route: Optional[str] = None

    @property
    def ops(self):
        return getattr(torch.ops, self.ns)

    @property
    def main_library(self) -> bool:
        """The backend runs the public API (functional, Function, module), not just the ops."""
        return self.ns == "pconv_cuda"

    def __str__(self) -> str:
        return self.name


# Every backend runs the op-level tests. cuda_emu executes the CUDA kernels on the CPU (when the emulation is
# built: scripts/install.sh and CI build it); cuda needs a GPU. Each CUDA backend forces one route.
BACKENDS = [
    Backend("cpu", "cpu", "pconv_cuda"),
    Backend("cuda_emu-aten_conv", "cpu", "pconv_cuda_emu", "aten_conv"),
    Backend("cuda_emu-gemm", "cpu", "pconv_cuda_emu", "gemm"),
    Backend("cuda-aten_conv", "cuda", "pconv_cuda", "aten_conv"),
    Backend("cuda-gemm", "cuda", "pconv_cuda", "gemm"),
]


def emu_unavailable() -> Optional[str]:
    try:
        import pconv_cuda.emu  # noqa: F401
    except ImportError as e:
        return str(e)
    return None


def cuda_unavailable() -> Optional[str]:
    if not torch.cuda.is_available():
        return "no GPU"
    from pconv_cuda import ops
    return "this build has no CUDA kernels" if ops.MISSING_CUDA_KERNELS else None


def make_mask(s: Sample, dtype: torch.dtype, g: torch.Generator) -> Optional[torch.Tensor]:
    shape = (s.mask_batch or s.n, s.c_in if s.multi_channel else 1, s.h, s.w)
    if s.mask == "none":
        return None
    if s.mask == "ones":
        return torch.ones(shape, dtype=dtype)
    if s.mask == "zeros":
        return torch.zeros(shape, dtype=dtype)
    if s.mask == "soft":
        # Non-binary values, some windows with S < 1, and exact zeros.
        m = torch.rand(shape, generator=g) * 0.6
        return (m * (m > 0.15)).to(dtype)
    m = (torch.rand(shape, generator=g) > 0.3)
    if s.mask == "holes":  # a hole larger than the kernel: windows with S == 0
        m[..., 1:8, 1:7] = False
    return m.to(dtype)


def make_inputs(s: Sample, dtype: torch.dtype = torch.float64, device: str = "cpu", requires_grad: bool = False,
                seed: int = 0):
    """(input, mask, weight, bias) for a sample; the mask never requires grad."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(s.n, s.c_in, s.h, s.w, generator=g, dtype=torch.float64)
    w = torch.randn(s.c_out, s.c_in // s.groups, *s.kernel, generator=g, dtype=torch.float64) * 0.3
    b = torch.randn(s.c_out, generator=g, dtype=torch.float64) if s.bias else None
    m = make_mask(s, torch.float64, g)
    out = []
    for t in (x, m, w, b):
        if t is not None:
            t = t.to(device=device, dtype=dtype)
        out.append(t)
    x, m, w, b = out
    if requires_grad:
        for t in (x, w, b):
            if t is not None:
                t.requires_grad_(True)
    return x, m, w, b


def conv_args(s: Sample):
    return s.stride, s.padding, s.dilation, s.groups, s.multi_channel


def with_(s: Sample, **kw) -> Sample:
    return replace(s, **kw)


def use_backend(b: Backend, monkeypatch) -> Backend:
    if b.device == "cuda" and cuda_unavailable():
        pytest.skip(f"{b.name}: {cuda_unavailable()}")
    if b.ns == "pconv_cuda_emu" and emu_unavailable():
        pytest.skip(f"{b.name}: {emu_unavailable()}")
    if b.cuda_route:
        monkeypatch.setenv("PCONV_CUDA_ROUTE", b.cuda_route)
    return b


def nondet_tol(device: str) -> float:
    """gradcheck's tolerance for run-to-run differences: cuDNN's weight-gradient algorithms may add in a
    nondeterministic order (atomics), which in float64 moves results by ~1e-15 relative; the CPU is deterministic."""
    return 1e-12 if device == "cuda" else 0.0
