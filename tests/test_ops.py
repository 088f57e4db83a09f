"""The ops against the reference and gradcheck, over the shared samples and backends (helpers.py)."""
from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

import pconv_cuda
from pconv_cuda import reference
from helpers import (BACKENDS, KERNEL_SAMPLES, ROUNDINGS, SAMPLES, Backend, Sample, assert_rounding_close,
                     assert_within_rounding_of_oracle, conv_args,
                     make_inputs, make_layer, nondet_tol, oracle, summed_terms, use_backend, with_)

# Tolerances by dtype. The reference adds 1e-8 to S; for binary masks S >= 1 where it matters, so that is a 1e-8
# relative deviation, below float32 resolution and covered by 1e-6 in float64 (soft masks: 1e-8 / S, S >= 0.01 here).
TOL = {
    torch.float64: dict(rtol=1e-6, atol=1e-6),
    torch.float32: dict(rtol=1e-4, atol=1e-4),  # different summation orders over up to C_in*k*k ~ 100 terms
    torch.float16: dict(rtol=1e-2, atol=2e-2),  # 11-bit mantissa on inputs and on the stored output
    torch.bfloat16: dict(rtol=4e-2, atol=8e-2),  # 8-bit mantissa
}


CPU = BACKENDS[0]


def mask_update(backend: Backend, mask, k, stride=1, padding=0, dilation=1, multi_channel=False):
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    return backend.ops.mask_update(mask, pair(k), pair(stride), pair(padding), pair(dilation), multi_channel)


def run_op(backend: Backend, x, m, w, b, s: Sample):
    """(output, updated_mask) from the backend's op library, through its autograd registration. A CUDA backend's
    forced route must be the one that ran (the gemm route takes NCHW inputs only)."""
    out, upd, _, _ = backend.ops.partial_conv2d(x, m, w, b, *conv_args(s))
    if backend.cuda_route:
        nchw = pconv_cuda.ops._layout(x) == torch.contiguous_format
        want = backend.cuda_route if nchw else "aten_conv"
        assert pconv_cuda.routes.last_route("cuda", _ns=backend.ns) == want
    return out, upd


def run_reference(x, m, w, b, s: Sample):
    out, upd = reference.partial_conv2d(x, m, w, b, *conv_args(s))
    # The reference's multi-channel mask repeats one map over C_out (and over N for mask=None); ours is one map.
    return out, upd[: 1 if m is None else None, :1]


def test_samples_cover_every_required_hyperparameter():
    # The sample list is the contract of the suite: keep every required hyper-parameter in it.
    kernels = {s.kernel for s in SAMPLES}
    assert {(1, 1), (3, 3), (5, 5), (7, 7)} <= kernels and any(k[0] != k[1] for k in kernels)
    assert {1, 2, 3} <= {v for s in SAMPLES for v in s.stride}
    assert {0, 1, 3} <= {v for s in SAMPLES for v in s.padding} and any(p[0] != p[1] for p in (s.padding for s in SAMPLES))
    assert {1, 2} <= {v for s in SAMPLES for v in s.dilation}
    assert {1, 2, 4} <= {s.groups for s in SAMPLES}
    assert {True, False} == {s.bias for s in SAMPLES} == {s.multi_channel for s in SAMPLES}
    assert {"ones", "zeros", "random", "holes", "soft", "none"} <= {s.mask for s in SAMPLES}
    # KERNEL_SAMPLES reach what SAMPLES do not: the gemm kernel's second 32-channel tile, kernels larger than the
    # image, dilation > 1 together with stride > 1 (unequal per axis).
    assert any(s.c_out // s.groups > 32 for s in KERNEL_SAMPLES)
    assert any(s.c_out // s.groups > 32 and s.groups > 1 for s in KERNEL_SAMPLES)
    assert any(s.kernel[0] > s.h and s.kernel[1] > s.w for s in KERNEL_SAMPLES)
    assert any(max(s.dilation) > 1 and max(s.stride) > 1 for s in KERNEL_SAMPLES)
    assert any(s.dilation[0] != s.dilation[1] and s.stride[0] != s.stride[1] for s in KERNEL_SAMPLES)
    assert any(s.c_in > 256 and not s.multi_channel for s in KERNEL_SAMPLES)  # mask pass channel groups
    assert any(s.c_in > 32 and s.multi_channel for s in KERNEL_SAMPLES)  # plane sums across threads


ALL_SAMPLES = SAMPLES + KERNEL_SAMPLES


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_forward_and_grads_match_reference(sample, backend, dtype):
    device = backend.device
    x, m, w, b = make_inputs(sample, dtype, device, requires_grad=True)
    out, upd = run_op(backend, x, m, w, b, sample)
    x2, m2, w2, b2 = make_inputs(sample, dtype, device, requires_grad=True)
    rout, rupd = run_reference(x2, m2, w2, b2, sample)
    torch.testing.assert_close(out, rout, **TOL[dtype])
    torch.testing.assert_close(upd, rupd, rtol=0, atol=0)
    grad = torch.randn_like(out)
    out.backward(grad)
    rout.backward(grad)
    for t, r in ((x, x2), (w, w2), (b, b2)):
        if t is not None:
            torch.testing.assert_close(t.grad, r.grad, **TOL[dtype])


@pytest.mark.parametrize("s", ALL_SAMPLES, ids=str)
def test_float64_matches_epsilon_free_oracle(s, backend):
    # The reference's +1e-8 forces 1e-6 above; the epsilon-free peer (benchmarks/peer.py) has the op's exact
    # semantics, so in float64 only the summation order differs: 1e-10 on outputs, updated mask and gradients.
    x, m, w, b = make_inputs(s, torch.float64, backend.device, requires_grad=True)
    out, upd = run_op(backend, x, m, w, b, s)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    leaves = {"input": x, "weight": w, **({"bias": b} if b is not None else {})}
    got = dict(zip(leaves, torch.autograd.grad(out, list(leaves.values()), grad.to(out.device))))
    want_out, want_upd, want = oracle(x, m, w, b, s, grad)
    torch.testing.assert_close(out.cpu(), want_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(upd.cpu(), want_upd, rtol=1e-10, atol=1e-10)
    assert set(got) == set(want)
    for name in got:
        torch.testing.assert_close(got[name].cpu(), want[name], rtol=1e-10, atol=1e-10, msg=lambda e: f"{name}: {e}")


def test_gradcheck_op(sample, backend):
    device = backend.device
    x, m, w, b = make_inputs(sample, torch.float64, device, requires_grad=True)
    args = conv_args(sample)
    assert gradcheck(lambda x, w, b: backend.ops.partial_conv2d(x, m, w, b, *args)[0], (x, w, b),
                     nondet_tol=nondet_tol(device))


def test_gradcheck_function(sample, main_backend):
    device = main_backend.device
    x, m, w, b = make_inputs(sample, torch.float64, device, requires_grad=True)
    args = conv_args(sample)
    assert gradcheck(lambda x, w, b: pconv_cuda.PartialConv2dFunction.apply(x, m, w, b, *args)[0], (x, w, b),
                     nondet_tol=nondet_tol(device))


# The module adds only argument plumbing over the op: a spread of samples keeps the suite fast.
@pytest.mark.parametrize("sample", SAMPLES[::3], ids=str)
def test_gradcheck_module(sample, main_backend):
    device = main_backend.device
    layer = make_layer(sample, device)
    x, m, _, _ = make_inputs(sample, torch.float64, device, requires_grad=True)
    assert gradcheck(lambda x: layer(x, m), (x,), nondet_tol=nondet_tol(device))
    params = [p for p in layer.parameters()]

    def through_params(*ps):
        return torch.func.functional_call(layer, dict(zip([n for n, _ in layer.named_parameters()], ps)), (x, m))

    assert gradcheck(through_params, tuple(params), nondet_tol=nondet_tol(device))


def test_only_requested_gradients(backend):
    device = backend.device
    s = SAMPLES[0]
    x, m, w, b = make_inputs(s, torch.float64, device)
    w.requires_grad_(True)
    out, _ = run_op(backend, x, m, w, b, s)
    out.sum().backward()
    assert x.grad is None and b.grad is None and w.grad is not None
    _, upd, ratio, xm = backend.ops.partial_conv2d(x, m, w, b, *conv_args(s))
    gi, gw, gb = backend.ops._partial_conv2d_backward(
        torch.ones_like(out), xm, m, w, ratio, upd, *conv_args(s), [False, False, True])
    assert gi is None and gw is None and gb is not None


def test_mask_gets_no_gradient(backend):
    device = backend.device
    s = SAMPLES[0]
    x, m, w, b = make_inputs(s, torch.float64, device, requires_grad=True)
    m.requires_grad_(True)
    out, upd = run_op(backend, x, m, w, b, s)
    assert not upd.requires_grad
    out.sum().backward()
    assert m.grad is None and x.grad is not None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("s", ALL_SAMPLES, ids=str)
def test_low_precision_against_float64_oracle(s, backend, dtype):
    # Element by element against float64 computed from the same rounded inputs, within the rounding bound of the
    # dtype (helpers.ROUNDINGS and assert_rounding_close give the reasoning); gradients included, not normalised.
    device = backend.device
    x, m, w, b = make_inputs(s, dtype, device, requires_grad=True)
    out, upd = run_op(backend, x, m, w, b, s)
    assert out.dtype == dtype and upd.dtype == dtype
    assert_within_rounding_of_oracle(x, m, w, b, s, out, upd, dtype)


def test_rounding_bound_catches_a_two_percent_error():
    # The bound is tight enough that a uniformly 2% wrong fp16 gradient (what normalising by the maximum let
    # through) fails, while the correct one passes.
    s = SAMPLES[0]
    x, m, w, b = make_inputs(s, torch.float16, requires_grad=True)
    out, _ = pconv_cuda.partial_conv2d(x, m, w, b, *conv_args(s))
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).half()
    gx, = torch.autograd.grad(out, x, grad)
    _, _, want = oracle(x, m, w, b, s, grad)
    _, _, magnitude = oracle(x, m, w, b, s, grad, magnitude=True)
    t = summed_terms(s)["input"]
    assert_rounding_close(gx, want["input"], magnitude["input"], torch.float16, ROUNDINGS["input"], t)
    with pytest.raises(AssertionError, match="beyond 3 roundings"):
        assert_rounding_close(gx * 1.02, want["input"], magnitude["input"], torch.float16, ROUNDINGS["input"], t)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_no_overflow_with_large_kernel_and_tiny_window_sums(backend, dtype):
    device = backend.device
    # win = C_in * 7 * 7 = 3136 and S down to 1e-3: win / S ~ 3e6 is beyond fp16's range, and so is the reference's
    # win / 1e-8 where S == 0. The ratio is computed in float32 and multiplied into a bounded conv output.
    s = Sample("big", n=1, c_in=64, c_out=4, h=12, w=12, kernel=(7, 7), padding=(3, 3), multi_channel=True)
    x, _, w, b = make_inputs(s, dtype, device, requires_grad=True)
    m = torch.zeros(1, 64, 12, 12, dtype=dtype, device=device)
    m[0, 0, 5, 5] = 1e-3
    m[0, :, 0, 0] = 1
    out, upd = run_op(backend, x, m, w, b, s)
    out.sum().backward()
    for t in (out, upd, x.grad, w.grad, b.grad):
        assert torch.isfinite(t).all()
    # Windows that see only the 1e-3 pixel are valid (U = S) and carry ratio = win: finite, not inf.
    assert upd[0, 0, 5, 5].item() == pytest.approx(1e-3, rel=1e-2)
    assert (out[:, :, 10:, 10:] == 0).all()  # windows with S == 0 are exactly 0


def test_holes_give_exact_zero(backend):
    device = backend.device
    s = Sample("holes", mask="holes")
    x, m, w, b = make_inputs(s, torch.float32, device)
    out, upd = run_op(backend, x, m, w, b, s)
    hole = upd == 0
    assert hole.any()
    assert (out.masked_select(hole.expand_as(out)) == 0).all()


def test_all_ones_border_ratio(backend):
    device = backend.device
    # "Partial convolution based padding": a 3x3 window sees 6 pixels on an edge, 4 in a corner.
    ratio, upd = mask_update(backend, torch.ones(1, 1, 5, 5, device=device), 3, 1, 1)
    assert ratio[0, 0, 2, 2].item() == 1.0
    assert ratio[0, 0, 0, 2].item() == pytest.approx(1.5)
    assert ratio[0, 0, 0, 0].item() == pytest.approx(2.25)
    assert (upd == 1).all()


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8], ids=str)
def test_bool_and_uint8_masks(backend, mask_dtype):
    device = backend.device
    s = SAMPLES[0]
    x, m, w, b = make_inputs(s, torch.float32, device)
    out, upd = run_op(backend, x, m.to(mask_dtype), w, b, s)
    ref_out, ref_upd = run_op(backend, x, m, w, b, s)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(upd, ref_upd, rtol=0, atol=0)


@pytest.mark.parametrize("s", [Sample("layout", multi_channel=True, mask="random"), KERNEL_SAMPLES[-1]], ids=str)
@pytest.mark.parametrize("layout", ["channels_last", "non_contiguous"])
def test_layouts(backend, layout, s):
    device = backend.device
    x, m, w, b = make_inputs(s, torch.float64, device)
    want, want_upd = run_op(backend, x, m, w, b, s)
    if layout == "channels_last":
        xl, ml = x.to(memory_format=torch.channels_last), m.to(memory_format=torch.channels_last)
    else:
        xl = torch.cat([x, x], dim=3)[..., : s.w]
        ml = torch.cat([m, m], dim=3)[..., : s.w]
        assert not xl.is_contiguous() and not ml.is_contiguous()
    xl.requires_grad_(True)
    out, upd = run_op(backend, xl, ml, w, b, s)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(upd, want_upd, rtol=0, atol=0)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    out.sum().backward()
    x2 = x.clone().requires_grad_(True)
    run_op(backend, x2, m, w, b, s)[0].sum().backward()
    torch.testing.assert_close(xl.grad, x2.grad, rtol=1e-12, atol=1e-12)


def test_channels_last_grad_bias_and_weight(backend):
    device = backend.device
    s = Sample("cl", n=3, c_in=5, c_out=7, h=40, w=40, mask="holes")  # > 1 chunk of the NHWC grad pass
    x, m, w, b = make_inputs(s, torch.float64, device, requires_grad=True)
    run_op(backend, x, m, w, b, s)[0].pow(2).sum().backward()
    xl = x.detach().to(memory_format=torch.channels_last).requires_grad_(True)
    w2, b2 = w.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    run_op(backend, xl, m, w2, b2, s)[0].pow(2).sum().backward()
    torch.testing.assert_close(b2.grad, b.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(w2.grad, w.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(xl.grad, x.grad, rtol=1e-10, atol=1e-10)


def test_empty_batch(backend):
    device = backend.device
    s = Sample("empty", n=0, mask_batch=0)
    x, m, w, b = make_inputs(s, torch.float32, device, requires_grad=True)
    out, upd = run_op(backend, x, m, w, b, s)
    assert out.shape == (0, 6, 9, 8) and upd.shape == (0, 1, 9, 8)
    out.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


def test_mask_update_matches_reference(sample, backend):
    device = backend.device
    _, m, w, _ = make_inputs(sample, torch.float64, device)
    if m is None:
        pytest.skip("mask_update needs a mask")
    ratio, upd = backend.ops.mask_update(m, sample.kernel, sample.stride, sample.padding, sample.dilation,
                                        sample.multi_channel)
    ones = torch.ones(1, m.shape[1], *sample.kernel, dtype=m.dtype, device=device)
    s_ref = torch.nn.functional.conv2d(m, ones, None, sample.stride, sample.padding, sample.dilation)
    win = ones.numel()
    u_ref = s_ref.clamp(0, 1)
    ratio_ref = torch.where(s_ref > 0, win / s_ref.clamp_min(1e-300), torch.zeros_like(s_ref)) * u_ref
    torch.testing.assert_close(ratio, ratio_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(upd, u_ref, rtol=1e-12, atol=1e-12)


def test_mask_update_dtypes(backend):
    device = backend.device
    m = torch.ones(2, 1, 6, 6, dtype=torch.bool, device=device)
    ratio, upd = mask_update(backend, m, 3, padding=1)
    assert ratio.dtype == torch.float32 and upd.dtype == torch.float32
    ratio, upd = mask_update(backend, m.half(), 3, padding=1)
    assert ratio.dtype == torch.float32 and upd.dtype == torch.float16
    ratio, upd = mask_update(backend, m.double(), 3, padding=1)
    assert ratio.dtype == torch.float64 and upd.dtype == torch.float64


def test_mask_none_equals_all_ones(backend):
    device = backend.device
    for s in (Sample("n", mask="none"), Sample("nm", mask="none", multi_channel=True, padding=(2, 0), h=5)):
        x, _, w, b = make_inputs(s, torch.float64, device)
        ones = torch.ones(1, s.c_in if s.multi_channel else 1, s.h, s.w, dtype=torch.float64, device=device)
        out, upd = run_op(backend, x, None, w, b, s)
        want, want_upd = run_op(backend, x, ones, w, b, s)
        torch.testing.assert_close(out, want, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(upd, want_upd, rtol=0, atol=0)


@pytest.mark.parametrize("s", [SAMPLES[0], with_(SAMPLES[0], mask="none"), with_(SAMPLES[0], multi_channel=True)],
                         ids=str)
def test_opcheck(backend, s):
    device = backend.device
    for requires_grad in (False, True):
        x, m, w, b = make_inputs(s, torch.float64, device, requires_grad=requires_grad)
        torch.library.opcheck(backend.ops.partial_conv2d.default, (x, m, w, b, *conv_args(s)))
        out, upd, ratio, xm = backend.ops.partial_conv2d(x, m, w, b, *conv_args(s))
        conv_input = (x if m is None else xm).detach()
        torch.library.opcheck(backend.ops._partial_conv2d_backward.default,
                              (torch.randn_like(out), conv_input, m, w.detach(), ratio, upd, *conv_args(s),
                               [True, True, requires_grad]))
    if m is not None:
        torch.library.opcheck(backend.ops.mask_update.default,
                              (m, s.kernel, s.stride, s.padding, s.dilation, s.multi_channel))


def _relayout(t, layout):
    if t is None:
        return None
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    wide = torch.cat([t, t], dim=3)[..., : t.shape[3]]  # every stride kept, the rows twice as long
    assert not wide.is_contiguous() and not wide.is_contiguous(memory_format=torch.channels_last)
    return wide


OPCHECK_MASKS = {  # sample, mask dtype
    "none": (with_(SAMPLES[0], mask="none"), None),
    "single": (SAMPLES[0], None),
    "multi": (with_(SAMPLES[0], multi_channel=True), None),
    "bool": (with_(SAMPLES[0], mask="holes"), torch.bool),
    "batch1": (with_(SAMPLES[0], mask_batch=1, n=3), None),
    "batch1_multi_uint8": (with_(SAMPLES[0], mask_batch=1, multi_channel=True), torch.uint8),
}


@pytest.mark.parametrize("mask_kind, layout", [
    ("none", "channels_last"), ("single", "non_contiguous"), ("multi", "channels_last"),
    ("bool", "non_contiguous"), ("batch1", "channels_last"), ("batch1_multi_uint8", "non_contiguous"),
])
def test_opcheck_layouts_and_masks(backend, mask_kind, layout):
    # opcheck beyond contiguous float64 inputs: the fake kernels' shapes and strides (channels_last kept, grad_weight
    # in the weight's format, a batch-1 mask's (1, 1, H', W') maps) must be the real kernels'.
    s, mask_dtype = OPCHECK_MASKS[mask_kind]
    x, m, w, b = make_inputs(s, torch.float64, backend.device, requires_grad=True)
    if m is not None and mask_dtype is not None:
        m = m.to(mask_dtype)
    x, m, w = (_relayout(t, layout).detach().requires_grad_(t.requires_grad) if t is not None else None
               for t in (x, m, w))
    torch.library.opcheck(backend.ops.partial_conv2d.default, (x, m, w, b, *conv_args(s)))
    out, upd, ratio, xm = backend.ops.partial_conv2d(x, m, w, b, *conv_args(s))
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    conv_input = (x if m is None else xm).detach()
    grad = _relayout(torch.randn_like(out.contiguous()), layout)
    torch.library.opcheck(backend.ops._partial_conv2d_backward.default,
                          (grad, conv_input, m, w.detach(), ratio, upd, *conv_args(s), [True, True, True]))
    if m is not None:
        torch.library.opcheck(backend.ops.mask_update.default,
                              (m, s.kernel, s.stride, s.padding, s.dilation, s.multi_channel))


@pytest.mark.parametrize("dims", [2, 1, 3], ids=["2d", "1d", "3d"])
def test_torch_compile_fullgraph(main_backend, dims):
    device = main_backend.device
    if dims == 2:
        layer = pconv_cuda.PartialConv2d(4, 6, 3, padding=1, return_mask=True, multi_channel=True).to(device)
        x = torch.randn(2, 4, 9, 8, device=device, requires_grad=True)
        m = (torch.rand(2, 4, 9, 8, device=device) > 0.3).float()
    elif dims == 3:
        layer = pconv_cuda.PartialConv3d(4, 6, 3, padding=1, return_mask=True, multi_channel=True).to(device)
        x = torch.randn(2, 4, 5, 6, 7, device=device, requires_grad=True)
        m = (torch.rand(2, 4, 5, 6, 7, device=device) > 0.3).float()
    else:  # PartialConv1d: the 2-D op on a height-1 view
        layer = pconv_cuda.PartialConv1d(4, 6, 3, padding=1, return_mask=True).to(device)
        x = torch.randn(2, 4, 13, device=device, requires_grad=True)
        m = (torch.rand(2, 1, 13, device=device) > 0.3).float()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out, upd = compiled(x, m)
    want, want_upd = layer(x, m)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(upd, want_upd)
    g1, = torch.autograd.grad(out.sum(), x)
    g2, = torch.autograd.grad(want.sum(), x)
    torch.testing.assert_close(g1, g2)


def test_autocast_cpu_bfloat16():
    layer = pconv_cuda.PartialConv2d(4, 6, 7, padding=3)
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    m = torch.zeros(2, 1, 16, 16)
    m[:, :, 3, 3] = 1  # most windows see one pixel or none: the largest ratios
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x, m)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.weight.grad).all()
    torch.testing.assert_close(out.float(), layer(x, m), **TOL[torch.bfloat16])


ROUTES = ["aten_conv", "gemm"]


@pytest.mark.parametrize("route", ROUTES)
def test_cpu_routes_match_oracle(sample, route, monkeypatch):
    # Each CPU route (ATen conv on X*M, masked im2col + GEMM) against the float64 epsilon-free oracle on its own:
    # comparing the routes with each other would pass if both were wrong the same way.
    x, m, w, b = make_inputs(sample, torch.float64, "cpu", requires_grad=True)
    monkeypatch.setenv("PCONV_CPU_ROUTE", route)
    out, upd = run_op(CPU, x, m, w, b, sample)
    assert pconv_cuda.routes.last_route("cpu") == route
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    leaves = {"input": x, "weight": w, **({"bias": b} if b is not None else {})}
    got = dict(zip(leaves, torch.autograd.grad(out, list(leaves.values()), grad)))
    want_out, want_upd, want = oracle(x, m, w, b, sample, grad)
    torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(upd, want_upd, rtol=0, atol=0)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-10, msg=lambda e: f"{name}: {e}")


@pytest.mark.parametrize("s", SAMPLES[::4], ids=str)
def test_gradcheck_gemm_route(s, monkeypatch):
    monkeypatch.setenv("PCONV_CPU_ROUTE", "gemm")
    x, m, w, b = make_inputs(s, torch.float64, "cpu", requires_grad=True)
    assert gradcheck(lambda x, w, b: pconv_cuda.partial_conv2d(x, m, w, b, *conv_args(s))[0], (x, w, b))


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cpu_routes_half_types(dtype, route, monkeypatch):
    # Each CPU route in the half types, with a bool mask, against the float64 oracle within the rounding bound.
    s = Sample("half", multi_channel=True, mask="holes")
    x, m, w, b = make_inputs(s, dtype, "cpu", requires_grad=True)
    monkeypatch.setenv("PCONV_CPU_ROUTE", route)
    out, _ = run_op(CPU, x, m.bool(), w, b, s)
    assert pconv_cuda.routes.last_route("cpu") == route and out.dtype == dtype
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = dict(zip(("input", "weight", "bias"), torch.autograd.grad(out, [x, w, b], grad)))
    want_out, _, want = oracle(x, m, w, b, s, grad)
    size, _, magnitude = oracle(x, m, w, b, s, grad, magnitude=True)
    terms = summed_terms(s)
    assert_rounding_close(out, want_out, size, dtype, ROUNDINGS["output"], terms["output"], "output")
    for name, g in got.items():
        assert_rounding_close(g, want[name], magnitude[name], dtype, ROUNDINGS[name], terms[name], f"grad_{name}")


def test_bad_route_variable(monkeypatch):
    monkeypatch.setenv("PCONV_CPU_ROUTE", "fastest")
    with pytest.raises(RuntimeError, match=r"PCONV_CPU_ROUTE must be 'auto', 'aten_conv' or 'gemm' .*got 'fastest'"):
        run_op(CPU, *make_inputs(SAMPLES[0], torch.float32), SAMPLES[0])


def test_bad_cuda_route_variable(monkeypatch):
    use_backend(BACKENDS[1], monkeypatch)
    monkeypatch.setenv("PCONV_CUDA_ROUTE", "fastest")
    with pytest.raises(RuntimeError, match=r"PCONV_CUDA_ROUTE must be 'auto', 'aten_conv', 'gemm' or 'cudnn_fused' .*got 'fastest'"):
        torch.ops.pconv_cuda_emu.partial_conv2d(*make_inputs(SAMPLES[0], torch.float32), *conv_args(SAMPLES[0]))
