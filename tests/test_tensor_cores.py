"""The gemm route on tensor cores (mma_conv_kernel, nvcuda::wmma), run by the SIMT emulation here and on a GPU where
one exists: TF32 for float32 only while torch.backends.cudnn.allow_tf32 is on, strict FP32 otherwise; fp16/bf16
(m16n16k16) are covered by the rounding-bound tests of tests/test_ops.py on the cuda_emu-gemm backend.

TF32 keeps 10 of float32's 23 mantissa bits: each product of rounded operands is off by up to ~2 * 2^-11 relative,
so against the exact result the TF32 output is off by ~1e-3 relative, while against float64 computed from the
TF32-rounded operands it is within float32 accumulation's bound (assert_rounding_close with float32's u)."""
from __future__ import annotations

import pytest
import torch

from helpers import (BACKENDS, Sample, assert_rounding_close, make_inputs, oracle, summed_terms, use_backend)

GEMM_BACKENDS = [b for b in BACKENDS if b.cuda_route == "gemm"]
# Every edge of the 64 x 64 x 32 tile: two output-channel tiles (the second partial), a partial pixel tile, K = 7*9
# (two stages, the second partial), groups, stride and dilation.
SAMPLES = [
    Sample("cout80_k3", n=2, c_in=7, c_out=80, h=9, w=7, mask="holes"),
    Sample("groups2_cout136_s2_d2", n=1, c_in=6, c_out=136, h=13, w=11, kernel=(3, 3), stride=(2, 2),
           padding=(2, 2), dilation=(2, 2), groups=2),
]


def tf32_round(t: torch.Tensor) -> torch.Tensor:
    """float32 to TF32 as cvt.rna.tf32.f32: nearest, ties away from zero, 13 low mantissa bits cleared."""
    bits = t.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


@pytest.fixture(params=GEMM_BACKENDS, ids=str)
def gemm_backend(request, monkeypatch):
    b = use_backend(request.param, monkeypatch)
    if b.device == "cuda" and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("TF32 needs sm_80")
    return b


@pytest.fixture
def tf32():
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    yield
    torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("s", SAMPLES, ids=str)
def test_tf32_rounds_the_operands_and_accumulates_in_float32(gemm_backend, s, tf32):
    x, m, w, b = make_inputs(s, torch.float32, gemm_backend.device)  # binary mask: TF32(X*M) = TF32(X)*M
    out, _, _, _ = gemm_backend.ops.partial_conv2d(x, m, w, b, s.stride, s.padding, s.dilation, s.groups,
                                                   s.multi_channel)
    xr, wr = tf32_round(x), tf32_round(w)
    want, _, _ = oracle(xr, m, wr, b, s)
    magnitude, _, _ = oracle(xr, m, wr, b, s, magnitude=True)
    assert_rounding_close(out, want, magnitude, torch.float32, 2, summed_terms(s)["output"], "tf32 output")
    exact, _, _ = oracle(x, m, w, b, s)
    assert (out.cpu().double() - exact).abs().max() > 1e-4 * magnitude.max()  # the operands were rounded


@pytest.mark.parametrize("s", SAMPLES, ids=str)
def test_float32_is_strict_without_tf32(gemm_backend, s):
    assert not torch.backends.cudnn.allow_tf32  # conftest turns it off for every test
    x, m, w, b = make_inputs(s, torch.float32, gemm_backend.device)
    out, _, _, _ = gemm_backend.ops.partial_conv2d(x, m, w, b, s.stride, s.padding, s.dilation, s.groups,
                                                   s.multi_channel)
    want, _, _ = oracle(x, m, w, b, s)
    magnitude, _, _ = oracle(x, m, w, b, s, magnitude=True)
    assert_rounding_close(out, want, magnitude, torch.float32, 2, summed_terms(s)["output"], "fp32 output")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("s", SAMPLES, ids=str)
def test_half_types_on_the_tile_edges(gemm_backend, s, dtype):
    # m16n16k16 fragments, float accumulators: the output within the dtype's rounding bound of float64 computed from
    # the same rounded inputs (helpers.ROUNDINGS: 4 roundings for the output, fewer happen on this route).
    x, m, w, b = make_inputs(s, dtype, gemm_backend.device)
    out, _, _, _ = gemm_backend.ops.partial_conv2d(x, m, w, b, s.stride, s.padding, s.dilation, s.groups,
                                                   s.multi_channel)
    want, _, _ = oracle(x, m, w, b, s)
    magnitude, _, _ = oracle(x, m, w, b, s, magnitude=True)
    assert_rounding_close(out, want, magnitude, dtype, 4, summed_terms(s)["output"], f"{dtype} output")


def _conv_grads(g, xm, w, s, mask):
    """(grad_input * M, grad_weight) of the convolution in float64 from the given operands."""
    dx, dw, _ = torch.ops.aten.convolution_backward(g.double(), xm.double(), w.double(), None, list(s.stride),
                                                    list(s.padding), list(s.dilation), False, [0, 0], s.groups,
                                                    [True, True, False])
    return dx * mask.double(), dw


@pytest.mark.parametrize("s", SAMPLES, ids=str)
def test_tf32_backward_runs_on_tensor_cores(gemm_backend, s, tf32):
    # The forced gemm route's backward: dX = M * (W^T G) and dW = G (X*M)^T on tensor cores, G = dY * ratio from the
    # grad_output pass (float32). With TF32 its operands are rounded: within float32 accumulation's bound of float64
    # on the rounded G, W and X*M, and measurably off the exact gradients.
    x, m, w, b = make_inputs(s, torch.float32, gemm_backend.device, requires_grad=True)
    out, _, ratio, xm = gemm_backend.ops.partial_conv2d(x, m, w, b, s.stride, s.padding, s.dilation, s.groups,
                                                        s.multi_channel)
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.device)
    gx, gw = torch.autograd.grad(out, (x, w), dy)
    g = dy * ratio
    want_dx, want_dw = _conv_grads(tf32_round(g), tf32_round(xm.detach()), tf32_round(w.detach()), s, m)
    mag_dx, mag_dw = _conv_grads(tf32_round(g).abs(), tf32_round(xm.detach()).abs(), tf32_round(w.detach()).abs(),
                                 s, m)
    terms = summed_terms(s)
    assert_rounding_close(gx, want_dx.cpu(), mag_dx.cpu(), torch.float32, 2, terms["input"], "tf32 grad_input")
    assert_rounding_close(gw, want_dw.cpu(), mag_dw.cpu(), torch.float32, 2, terms["weight"], "tf32 grad_weight")
    # The exact gradients are outside float32's bound somewhere: the operands were rounded to TF32.
    exact_dx, exact_dw = _conv_grads(g, xm.detach(), w.detach(), s, m)
    fp32 = 2.0**-24
    assert ((gx.double() - exact_dx).abs() > (2 + terms["input"]) * fp32 * mag_dx).any()
    assert ((gw.double() - exact_dw).abs() > (2 + terms["weight"]) * fp32 * mag_dw).any()
    assert (gx[(m == 0).expand_as(gx)] == 0).all()  # holes exact


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_backward_without_mask_and_deterministic(gemm_backend, dtype):
    # mask=None (no hole zeroing), and the split-K weight gradient added in a fixed order: bitwise repeatable.
    s = Sample("none", n=3, c_in=5, c_out=70, h=17, w=15, mask="none")
    x, m, w, b = make_inputs(s, dtype, gemm_backend.device, requires_grad=True)
    runs = []
    for _ in range(2):
        out, _, _, _ = gemm_backend.ops.partial_conv2d(x, m, w, b, s.stride, s.padding, s.dilation, s.groups, False)
        dy = torch.ones_like(out)
        runs.append(torch.autograd.grad(out, (x, w), dy))
    for a, c in zip(*runs):
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    want_out, _, want = oracle(x, m, w, b, s, torch.ones_like(out))
    _, _, magnitude = oracle(x, m, w, b, s, torch.ones_like(out), magnitude=True)
    terms = summed_terms(s)
    assert_rounding_close(runs[0][0], want["input"], magnitude["input"], dtype, 3, terms["input"], "grad_input")
    assert_rounding_close(runs[0][1], want["weight"], magnitude["weight"], dtype, 3, terms["weight"], "grad_weight")
