"""Kernel paths the shared samples do not choose: the vectorised (VEC = 16 bytes / sizeof(dtype)) and scalar (VEC = 1)
instantiations of the NCHW and NHWC elementwise kernels in every dtype, channels_last and strided weights, the
memory format of every gradient, and a forced gemm route on channels_last input. Every result is checked against
the float64 epsilon-free oracle (helpers.oracle): 1e-10 in float64, the rounding bound of test_ops otherwise."""
from __future__ import annotations

import pytest
import torch

import pconv_cuda
from pconv_cuda import routes
from helpers import (BACKENDS, ROUNDINGS, Backend, Sample, assert_rounding_close, conv_args, make_inputs, oracle,
                     summed_terms, use_backend)

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]



# csrc/cuda/cuda_primitives.h picks VEC = 16 / sizeof(dtype) (2 fp64, 4 fp32, 8 fp16/bf16) when the run it moves is
# a multiple of VEC: H*W (input) and H'*W' (output) in NCHW, C_in (mask pass) and C_out (epilogue, grad_output) in
# NHWC; else VEC = 1. "vec" is a multiple of 8 everywhere (every dtype vectorises), "scalar" of none (odd).
PATH_SAMPLES = {
    "vec": Sample("vec", n=2, c_in=8, c_out=16, h=8, w=6),  # HW = 48, C_in = 8, C_out = 16
    "scalar": Sample("scalar", n=2, c_in=5, c_out=7, h=7, w=5),  # HW = 35, C_in = 5, C_out = 7
}


def test_path_samples_choose_the_paths():
    for dtype in DTYPES:
        vec = 16 // torch.empty((), dtype=dtype).element_size()
        v, sc = PATH_SAMPLES["vec"], PATH_SAMPLES["scalar"]
        assert (v.h * v.w) % vec == 0 and v.c_in % vec == 0 and v.c_out % vec == 0
        assert (sc.h * sc.w) % 2 and sc.c_in % 2 and sc.c_out % 2  # odd: no VEC > 1 divides them


def layout(t, channels_last: bool):
    return t.contiguous(memory_format=torch.channels_last) if channels_last and t is not None else t


def expected_route(backend: Backend, x: torch.Tensor) -> str:
    nchw = pconv_cuda.ops._layout(x) == torch.contiguous_format
    return backend.cuda_route if nchw else "aten_conv"  # gemm takes NCHW only: channels_last falls back


# Masks: a batch-1 single-channel mask (the NHWC passes' per-pixel broadcast) and a full multi-channel one (their
# per-channel vector loads).
@pytest.mark.parametrize("mask", ["single_batch1", "multi"])
@pytest.mark.parametrize("width", ["vec", "scalar"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_vectorised_and_scalar_paths(backend, dtype, channels_last, width, mask):
    s = PATH_SAMPLES[width]
    s = Sample(s.name, n=s.n, c_in=s.c_in, c_out=s.c_out, h=s.h, w=s.w, multi_channel=mask.startswith("multi"),
               mask="holes" if width == "vec" else "random", mask_batch=1 if mask.endswith("batch1") else None)
    device = backend.device
    x, m, w, b = make_inputs(s, dtype, device)
    x, m = layout(x, channels_last), layout(m, channels_last)
    x.requires_grad_(True)
    w.requires_grad_(True)
    b.requires_grad_(True)
    out, upd, _, _ = backend.ops.partial_conv2d(x, m, w, b, *conv_args(s))
    if backend.cuda_route:
        assert routes.last_route("cuda", _ns=backend.ns) == expected_route(backend, x)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    grad = layout(torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(device, dtype),
                  channels_last)
    gx, gw, gb = torch.autograd.grad(out, [x, w, b], grad)
    assert gx.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    want_out, want_upd, want = oracle(x, m, w, b, s, grad)
    got = {"input": gx, "weight": gw, "bias": gb}
    if dtype == torch.float64:
        torch.testing.assert_close(out.cpu(), want_out, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(upd.cpu(), want_upd, rtol=0, atol=0)
        for name, g in got.items():
            torch.testing.assert_close(g.cpu(), want[name], rtol=1e-10, atol=1e-10, msg=lambda e: f"{name}: {e}")
        return
    size, _, magnitude = oracle(x, m, w, b, s, grad, magnitude=True)
    terms = summed_terms(s)
    assert_rounding_close(out, want_out, size, dtype, ROUNDINGS["output"], terms["output"], "output")
    torch.testing.assert_close(upd.cpu().double(), want_upd, rtol=0, atol=0)  # binary masks: U is exact
    for name, g in got.items():
        assert_rounding_close(g, want[name], magnitude[name], dtype, ROUNDINGS[name], terms[name], f"grad_{name}")


# --- weights in any layout; every gradient in its tensor's layout ---------------------------------------------

def weight_in(w: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "channels_last":
        out = w.contiguous(memory_format=torch.channels_last)
        assert not out.is_contiguous()
    elif kind == "non_contiguous":  # a strided view: every other element of a wider tensor
        out = torch.stack([w, torch.full_like(w, float("nan"))], dim=-1)[..., 0]
        assert not out.is_contiguous() and not out.is_contiguous(memory_format=torch.channels_last)
    else:
        out = w.contiguous()
    return out.detach().requires_grad_(True)


@pytest.mark.parametrize("weight_kind", ["contiguous", "channels_last", "non_contiguous"])
@pytest.mark.parametrize("input_kind", ["contiguous", "channels_last", "non_contiguous"])
def test_weight_layouts_and_gradient_formats(backend, input_kind, weight_kind, deterministic):
    # grad_input keeps the input's layout (channels_last stays channels_last, anything else is NCHW-contiguous);
    # grad_weight takes the weight's (suggest_memory_format), grad_bias is contiguous. Checked on the backward
    # op's own outputs and through autograd.grad (not .grad, which autograd re-strides to match the leaf).
    s = Sample("wl", n=2, c_in=4, c_out=6, h=7, w=6, multi_channel=True, mask="holes")
    x, m, w, b = make_inputs(s, torch.float64, backend.device)
    if input_kind == "channels_last":
        x, m = layout(x, True), layout(m, True)
    elif input_kind == "non_contiguous":
        x = torch.cat([x, x], dim=3)[..., : s.w]
        assert not x.is_contiguous()
    x = x.detach().requires_grad_(True)
    w = weight_in(w, weight_kind)
    b.requires_grad_(True)
    out, upd, ratio, xm = backend.ops.partial_conv2d(x, m, w, b, *conv_args(s))
    if backend.cuda_route:
        assert routes.last_route("cuda", _ns=backend.ns) == expected_route(backend, x)
    input_fmt = torch.channels_last if input_kind == "channels_last" else torch.contiguous_format
    weight_fmt = torch.channels_last if weight_kind == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=input_fmt)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(out.device)
    gx, gw, gb = torch.autograd.grad(out, [x, w, b], grad)
    dx, dw, db = backend.ops._partial_conv2d_backward(grad, xm.detach(), m, w.detach(), ratio, upd, *conv_args(s),
                                                      [True, True, True])
    for g in (gx, dx):
        assert g.is_contiguous(memory_format=input_fmt)
    for g in (gw, dw):
        assert g.is_contiguous(memory_format=weight_fmt)
    assert gb.is_contiguous() and db.is_contiguous()
    want_out, _, want = oracle(x, m, w, b, s, grad)
    torch.testing.assert_close(out.cpu(), want_out, rtol=1e-10, atol=1e-10)
    for name, a, c in (("input", gx, dx), ("weight", gw, dw), ("bias", gb, db)):
        torch.testing.assert_close(a.cpu(), want[name], rtol=1e-10, atol=1e-10, msg=lambda e: f"{name}: {e}")
        if a.device.type == "cpu":
            assert torch.equal(a, c), name  # autograd runs the same backward op
        else:  # cuDNN may pick another deterministic algorithm per call
            torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device_type, backend", [("cpu", BACKENDS[0]), ("cuda", BACKENDS[2])], ids=["cpu", "cuda_emu"])
def test_forced_gemm_on_channels_last_falls_back_to_aten_conv(device_type, backend, monkeypatch):
    # The gemm route takes NCHW only: forced on a channels_last call, the op runs aten_conv (last_route says so),
    # keeps channels_last and gives the oracle's result; the same call in NCHW does run gemm.
    backend = use_backend(backend, monkeypatch)
    s = Sample("cl_gemm", multi_channel=True, mask="holes")
    x, m, w, b = make_inputs(s, torch.float64, backend.device)
    want, _, _ = oracle(x, m, w, b, s)
    with routes.use_route("gemm", device_type, _ns=backend.ns):
        out = backend.ops.partial_conv2d(x, m, w, b, *conv_args(s))[0]
        assert routes.last_route(device_type, _ns=backend.ns) == "gemm"
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
        xl, ml = layout(x, True), layout(m, True)
        out = backend.ops.partial_conv2d(xl, ml, w, b, *conv_args(s))[0]
        assert routes.last_route(device_type, _ns=backend.ns) == "aten_conv"
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
