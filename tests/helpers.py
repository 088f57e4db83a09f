"""Test helpers: the sample list and the backend list (a new case or backend is one line), and the input makers.

Imported by the tests as `from helpers import ...`; the fixtures over these lists live in conftest.py."""
from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, Optional, Tuple

import pytest
import torch
from torch import nn

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

# Shapes that reach kernel code SAMPLES leave alone; too large for gradcheck, they are checked against the
# float64 oracle below (tests/test_kernel_paths.py, tests/test_ops.py). C_out/groups > 32: the gemm kernel's second
# 32-channel tile (kTileM) and the rows r > 0 of each thread; a kernel larger than the image; dilation > 1 together
# with stride > 1, unequal per axis.
KERNEL_SAMPLES = [
    Sample("cout40_tile2", n=2, c_in=3, c_out=40, h=6, w=5),
    Sample("groups2_cout72_multi", n=1, c_in=4, c_out=72, h=5, w=6, groups=2, multi_channel=True, mask="holes"),
    Sample("kernel_5x7_on_3x4", n=2, c_in=3, c_out=5, h=3, w=4, kernel=(5, 7), padding=(2, 3)),
    Sample("kernel_7x7_on_2x3_soft_multi", n=2, c_in=2, c_out=3, h=2, w=3, kernel=(7, 7), padding=(3, 3),
           multi_channel=True, mask="soft", mask_batch=1),
    Sample("dilation2x3_stride2", c_out=5, h=11, w=13, stride=(2, 2), dilation=(2, 3), padding=(2, 3)),
    Sample("dilation3_stride3x2_k2x3", c_out=5, h=12, w=11, kernel=(2, 3), stride=(3, 2), dilation=(3, 2),
           padding=(1, 0), mask="holes"),
    # Many channels on a small image: the NCHW mask pass spreads them over threads and, for a single-channel mask,
    # over channel groups in the grid (300 = 5 uneven groups here); a multi-channel mask sums its plane across
    # 16 thread rows (130 channels, 15 pixels: the scalar path), and NHWC across 32 lanes.
    Sample("cin300_on_4x4_channel_groups", c_in=300, c_out=4, h=4, w=4, mask="holes", mask_batch=1),
    Sample("cin130_on_3x5_soft_multi", n=1, c_in=130, c_out=3, h=3, w=5, multi_channel=True, mask="soft"),
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

# The cudnn_fused route's backends, for its own tests (tests/test_cudnn_fused.py): every channels_last sample; the
# emulation runs a model of the cuDNN graph (the flow and its fallbacks are what it tests), the GPU cuDNN itself.
FUSED_BACKENDS = [
    Backend("cuda_emu-cudnn_fused", "cpu", "pconv_cuda_emu", "cudnn_fused"),
    Backend("cuda-cudnn_fused", "cuda", "pconv_cuda", "cudnn_fused"),
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


def mask_of(kind: str, shape: Tuple[int, ...], dtype: torch.dtype, g: torch.Generator,
            hole: Tuple[slice, ...]) -> Optional[torch.Tensor]:
    """A mask of a sample's kind (random | ones | zeros | holes | soft | none); `hole`, the spatial region that
    "holes" clears: larger than the kernel, so some windows have S == 0."""
    if kind == "none":
        return None
    if kind == "ones":
        return torch.ones(shape, dtype=dtype)
    if kind == "zeros":
        return torch.zeros(shape, dtype=dtype)
    if kind == "soft":
        # Non-binary values, some windows with S < 1, and exact zeros.
        m = torch.rand(shape, generator=g) * 0.6
        return (m * (m > 0.15)).to(dtype)
    m = (torch.rand(shape, generator=g) > 0.3)
    if kind == "holes":
        m[(Ellipsis, *hole)] = False
    return m.to(dtype)


def make_mask(s: Sample, dtype: torch.dtype, g: torch.Generator) -> Optional[torch.Tensor]:
    shape = (s.mask_batch or s.n, s.c_in if s.multi_channel else 1, s.h, s.w)
    return mask_of(s.mask, shape, dtype, g, (slice(1, 8), slice(1, 7)))


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


def load_peer():
    """benchmarks/peer.py: the epsilon-free pure-PyTorch partial convolution with the op's exact semantics (README,
    "Exact semantics"), the float64 oracle of the tests (the reference keeps NVIDIA's +1e-8 on S)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "peer.py"
    spec = importlib.util.spec_from_file_location("bench_peer_oracle", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


peer = load_peer()


def _f64(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().to("cpu", torch.float64)


def oracle(x, m, w, b, s: Sample, grad: Optional[torch.Tensor] = None, magnitude: bool = False):
    """The float64 epsilon-free result for the values of (x, m, w, b), whatever their dtype and device:
    (output, updated_mask, {"input", "weight", "bias"} gradients for `grad`). With magnitude=True, the same for
    |x|, |w|, |b| and |grad|: conv(|X*M|, |W|) * ratio + |b| * U and the gradients of that form, the scale
    that bounds the rounding error of each element (every product and sum taken in absolute value)."""
    x64, w64, b64, m64 = _f64(x), _f64(w), _f64(b), _f64(m)
    g64 = _f64(grad)
    if magnitude:
        x64, w64 = x64.abs(), w64.abs()
        b64 = None if b64 is None else b64.abs()
        g64 = None if g64 is None else g64.abs()
    leaves = {"input": x64.requires_grad_(True), "weight": w64.requires_grad_(True)}
    if b64 is not None:
        leaves["bias"] = b64.requires_grad_(True)
    out, upd = peer.peer_partial_conv2d(x64, m64, w64, b64, *conv_args(s))
    grads = {}
    if g64 is not None:
        grads = dict(zip(leaves, torch.autograd.grad(out, list(leaves.values()), g64)))
    return out.detach(), upd, grads


# Unit roundoff of each dtype: half the spacing of the numbers in [1, 2). The kernels accumulate float16 and
# bfloat16 in float32 (acc_type_t), float64 in float64; ATen's convolutions are taken to do the same (the measured
# errors below stay within that).
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24, torch.float64: 2.0**-53}
ACC_ROUNDOFF = {torch.float16: 2.0**-24, torch.bfloat16: 2.0**-24, torch.float32: 2.0**-24, torch.float64: 2.0**-53}
# Below the smallest normal number the spacing is absolute: float16's subnormals are 2^-24 apart.
ABS_ROUNDOFF = {torch.float16: 2.0**-25, torch.bfloat16: 2.0**-134, torch.float32: 2.0**-150, torch.float64: 0.0}


def assert_rounding_close(got: torch.Tensor, want: torch.Tensor, magnitude: torch.Tensor, dtype: torch.dtype,
                          roundings: int, terms: int, what: str = "") -> None:
    """Element by element: |got - want| <= (roundings * u + terms * u_acc) * magnitude + roundings * u_abs.

    `want` is exact (float64 from the same rounded inputs), `magnitude` the same computation in absolute values
    (oracle(magnitude=True)). Each rounding of an intermediate to `dtype` moves a value by at most u relative,
    hence by u * magnitude; a sum of `terms` products accumulated in acc_type moves by at most terms * u_acc *
    magnitude in any order (the standard recursive-summation bound). A uniformly 2%-wrong fp16 value fails."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got.detach().to("cpu", torch.float64) - want).abs()
    relative = roundings * UNIT_ROUNDOFF[dtype] + terms * ACC_ROUNDOFF[dtype]
    tol = relative * magnitude + roundings * ABS_ROUNDOFF[dtype]
    bad = ~(err <= tol)  # NaN fails too
    if bad.any():
        i = int(torch.argmax(torch.where(bad, err / tol.clamp_min(1e-300), torch.zeros_like(err))))
        idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), err.shape))
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.numel()} elements beyond {roundings} roundings of {dtype} and "
            f"{terms} accumulated terms; worst at {idx}: got {float(got.flatten()[i])}, "
            f"want {float(want.flatten()[i])}, error {float(err.flatten()[i]):.3g} > "
            f"tolerance {float(tol.flatten()[i]):.3g}")


# Element-by-element bounds against float64 computed from the same rounded inputs (assert_rounding_close):
# |error| <= (r * u + terms * u_acc) * magnitude, magnitude = the same computation in absolute values, u the unit
# roundoff of the dtype (fp16 2^-11 ~ 4.9e-4, bf16 2^-8 ~ 3.9e-3, fp32 2^-24), u_acc that of the float32
# accumulation (acc_type_t) over `terms` products (summed_terms). r counts the roundings to the dtype:
#   output      4: X*M (soft masks), the convolution's result (aten_conv stores it before the epilogue),
#                  the epilogue's result, U feeding b * U (soft masks)
#   grad_input  3: dY * ratio (stored before the transposed convolution), its result, * M (soft masks)
#   grad_weight 3: X*M (soft masks), dY * ratio, the result
#   grad_bias   2: U (soft masks), the result
#   updated_mask 1: U = clamp(S, 0, 1) stored in the dtype (S summed in float32)
# The ratio is float32 (or float64): its rounding is inside u_acc. Measured worst ratios of error / (u * magnitude)
# on these samples: fp16 1.4 (output), 2.2 (grad_input); bf16 1.3; fp32 4.4 (with up to 100 accumulated terms).
ROUNDINGS = {"output": 4, "input": 3, "weight": 3, "bias": 2}


def output_size(s: Sample) -> Tuple[int, int]:
    return tuple((size + 2 * p - d * (k - 1) - 1) // st + 1
                 for size, k, st, p, d in zip((s.h, s.w), s.kernel, s.stride, s.padding, s.dilation))


def summed_terms(s: Sample) -> Dict[str, int]:
    """How many products each result sums (the `terms` of assert_rounding_close)."""
    kh, kw = s.kernel
    ho, wo = output_size(s)
    return {"output": s.c_in // s.groups * kh * kw, "input": s.c_out // s.groups * kh * kw,
            "weight": s.n * ho * wo, "bias": s.n * ho * wo}


def assert_within_rounding_of_oracle(x, m, w, b, s: Sample, out, upd, dtype: torch.dtype) -> None:
    """`out`, `upd` and the gradients of `out` for x, w (and b) element by element against float64 computed from the
    same rounded inputs, within the rounding bounds of `dtype` (ROUNDINGS, assert_rounding_close)."""
    device = out.device
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    leaves = {"input": x, "weight": w, **({"bias": b} if b is not None else {})}
    got = dict(zip(leaves, torch.autograd.grad(out, list(leaves.values()), grad)))
    want_out, want_upd, want = oracle(x, m, w, b, s, grad)
    size, _, magnitude = oracle(x, m, w, b, s, grad, magnitude=True)
    terms = summed_terms(s)
    assert_rounding_close(out, want_out, size, dtype, ROUNDINGS["output"], terms["output"], "output")
    kh, kw = s.kernel
    assert_rounding_close(upd, want_upd, want_upd, dtype, 1, (s.c_in if s.multi_channel else 1) * kh * kw,
                          "updated_mask")
    for name, g in got.items():
        assert g.dtype == dtype
        assert_rounding_close(g, want[name], magnitude[name], dtype, ROUNDINGS[name], terms[name], f"grad_{name}")


class PeerPartialConv2d(nn.Conv2d):
    """The oracle as a layer with PartialConv2d's interface and NVIDIA's mask shapes (for PConvUNet(pconv=...))."""

    def __init__(self, *args, multi_channel: bool = False, return_mask: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.multi_channel = multi_channel
        self.return_mask = return_mask

    def forward(self, input, mask_in=None):  # type: ignore[override]
        out, upd = peer.peer_partial_conv2d(input, mask_in, self.weight, self.bias, self.stride, self.padding,
                                            self.dilation, self.groups, self.multi_channel)
        if self.multi_channel:
            upd = upd.expand(input.shape[0] if mask_in is None else upd.shape[0], self.out_channels, -1, -1)
        return (out, upd) if self.return_mask else out


def same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Bitwise on the CPU; on a GPU cuDNN may pick other (deterministic) algorithms per call: float64 rounding."""
    if a.device.type == "cpu":
        assert torch.equal(a, b), what
    else:
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda e: f"{what}: {e}")


def nondet_tol(device: str) -> float:
    """gradcheck's tolerance for run-to-run differences: cuDNN's weight-gradient algorithms may add in a
    nondeterministic order (atomics), which in float64 moves results by ~1e-15 relative; the CPU is deterministic."""
    return 1e-12 if device == "cuda" else 0.0


REPO = Path(__file__).resolve().parents[1]


def load_example(relpath: str):
    """A script of the repository (examples/, benchmarks/) loaded as a module. As `python examples/x.py` does, the
    script's folder comes first on sys.path while it loads (the examples import their helper modules from it);
    pconv_cuda itself is the installed package."""
    path = REPO / relpath
    spec = importlib.util.spec_from_file_location(f"_script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up there)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def make_layer(s: Sample, device: str = "cpu", dtype: torch.dtype = torch.float64) -> "pconv_cuda.PartialConv2d":
    """The PartialConv2d module of a sample's hyper-parameters."""
    return pconv_cuda.PartialConv2d(s.c_in, s.c_out, s.kernel, s.stride, s.padding, s.dilation, s.groups, s.bias,
                                    device=device, dtype=dtype, multi_channel=s.multi_channel)
