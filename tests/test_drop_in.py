"""Drop-in behaviour a user of nn.Conv2d / NVIDIA's PartialConv2d relies on: holes are exact holes (whatever the
input holds there), autocast gives the dtype the user asked for, and the backward keeps X*M rather than X."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import pconv_cuda
from pconv_cuda import reference, routes
from helpers import Backend, Sample, conv_args, cuda_unavailable, make_inputs

NON_FINITE = (float("nan"), float("inf"), float("-inf"))


def cpu_routes(backend: Backend):
    """The CPU backend runs both of its routes; a CUDA backend (real or emulated) has its route forced already."""
    if backend.ns == "pconv_cuda" and backend.device == "cpu":
        return ["aten_conv", "gemm"]
    return [None]


def in_route(backend: Backend, route):
    return routes.use_route(route, "cpu") if route else contextlib.nullcontext()




def make_mask(shape, kind: str, device, g: torch.Generator) -> torch.Tensor:
    keep = torch.rand(shape, generator=g) > 0.35
    keep[..., 2:7, 1:6] = False  # a hole larger than the kernel: windows with S == 0
    if kind == "bool":
        m = keep
    elif kind == "float":
        m = keep.float()
    else:  # soft: values in (0, 1] where kept, exact zeros in the holes
        m = torch.where(keep, 0.05 + 0.95 * torch.rand(shape, generator=g), 0.0)
    return m.to(device)


def hole_of(mask: torch.Tensor, x_shape) -> torch.Tensor:
    """Where an input value is in a hole: every channel of a hole pixel (single-channel mask), or where that
    channel's mask is 0 (multi-channel)."""
    return (mask == 0).expand(x_shape)


# --- holes are exact holes -------------------------------------------------------------------------------------

def run_with_grads(backend: Backend, x, m, w, b, s: Sample, channels_last: bool, grad):
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    b = b.detach().clone().requires_grad_(True)
    xin, min_ = x, m
    if channels_last:
        xin = x.contiguous(memory_format=torch.channels_last)
        min_ = m.contiguous(memory_format=torch.channels_last)
    out, upd, _, _ = backend.ops.partial_conv2d(xin, min_, w, b, *conv_args(s))
    if channels_last:
        assert out.is_contiguous(memory_format=torch.channels_last)
    out.backward(grad)
    return out.detach(), upd, x.grad, w.grad, b.grad


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("mask_kind", ["float", "bool", "soft"])
@pytest.mark.parametrize("multi_channel", [False, True], ids=["single", "multi"])
def test_non_finite_values_in_holes_change_nothing(backend, multi_channel, mask_kind, channels_last, deterministic):
    device = backend.device
    s = Sample("holes", n=2, c_in=4, c_out=5, h=10, w=9, multi_channel=multi_channel)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(s.n, s.c_in, s.h, s.w, generator=g).to(device)
    w = (torch.randn(s.c_out, s.c_in, 3, 3, generator=g) * 0.3).to(device)
    b = torch.randn(s.c_out, generator=g).to(device)
    m = make_mask((s.n, s.c_in if multi_channel else 1, s.h, s.w), mask_kind, device, g)
    grad = torch.randn(s.n, s.c_out, s.h, s.w, generator=g).to(device)
    hole = hole_of(m, x.shape)
    assert hole.any() and (~hole).any()

    clean = torch.where(hole, 0.0, x)
    dirty = clean.clone()
    fill = torch.tensor(NON_FINITE, device=device)
    dirty[hole] = fill[torch.arange(int(hole.sum()), device=device) % 3]  # NaN, +inf, -inf in turn
    assert dirty.isnan().any() and dirty.isposinf().any() and dirty.isneginf().any()

    for route in cpu_routes(backend):
        with in_route(backend, route):
            want = run_with_grads(backend, clean, m, w, b, s, channels_last, grad)
            got = run_with_grads(backend, dirty, m, w, b, s, channels_last, grad)
        names = ("output", "updated mask", "grad_input", "grad_weight", "grad_bias")
        for name, a, e in zip(names, got, want):
            assert torch.equal(a, e), f"{name} differs with non-finite values in the holes (route {route})"
            assert torch.isfinite(a).all(), name
        grad_input = got[2]
        assert (grad_input[hole] == 0).all()
        assert (grad_input[~hole] != 0).any()
        assert (got[1] == 0).any()  # windows with S == 0 exist, and their output is exactly 0
        assert (got[0].masked_select((got[1] == 0).expand_as(got[0])) == 0).all()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("multi_channel", [False, True], ids=["single", "multi"])
def test_nan_in_a_valid_pixel_reaches_the_windows_that_read_it(backend, multi_channel, channels_last):
    device = backend.device
    s = Sample("nan", n=2, c_in=4, c_out=5, h=10, w=9, multi_channel=multi_channel)
    x, m, w, b = make_inputs(s, torch.float32, device)
    n, c, i, j = 0, 1, 4, 3
    m[n, c if multi_channel else 0, i, j] = 1
    x[n, c, i, j] = float("nan")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        m = m.contiguous(memory_format=torch.channels_last)
    reads = torch.zeros(s.n, s.c_out, s.h, s.w, dtype=torch.bool, device=device)
    reads[n, :, i - 1:i + 2, j - 1:j + 2] = True  # k3 s1 p1: the windows around (i, j)
    for route in cpu_routes(backend):
        with in_route(backend, route):
            out, upd, _, _ = backend.ops.partial_conv2d(x, m, w, b, *conv_args(s))
        assert out[reads].isnan().all(), f"route {route}"
        assert torch.isfinite(out[~reads]).all(), f"route {route}"
        assert torch.isfinite(upd).all()


# --- autocast follows the user ---------------------------------------------------------------------------------

AUTOCAST_DEVICES = ["cpu", "cuda"]
HALF_TYPES = [torch.bfloat16, torch.float16]


def autocast_device(device: str) -> str:
    if device == "cuda" and cuda_unavailable():
        pytest.skip(f"autocast on cuda: {cuda_unavailable()}")
    return device


@pytest.mark.parametrize("mask_kind", ["float", "bool", "none"])
@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
@pytest.mark.parametrize("device", AUTOCAST_DEVICES)
def test_autocast_dtype_is_the_users(device, dtype, mask_kind):
    device = autocast_device(device)
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, device=device)
    layer = pconv_cuda.PartialConv2d(4, 6, 3, padding=1, device=device, return_mask=True)
    x = torch.randn(2, 4, 10, 9, device=device, requires_grad=True)
    keep = torch.rand(2, 1, 10, 9, device=device) > 0.3
    m = {"float": keep.float(), "bool": keep, "none": None}[mask_kind]
    with torch.autocast(device, dtype=dtype):
        want = conv(x)
        out, upd = layer(x, m)
    assert want.dtype == dtype  # what the user asked for ...
    assert out.dtype == want.dtype == dtype  # ... and what nn.Conv2d gives
    assert upd.dtype == dtype  # the updated mask is in the op's input dtype
    with torch.no_grad(), torch.autocast(device, dtype=dtype):  # the no-grad path dispatches below autograd
        inference, _ = layer(x, m)
    assert inference.dtype == dtype
    torch.testing.assert_close(inference, out.detach(), rtol=0, atol=0)
    out.float().sum().backward()
    for t in (x, layer.weight, layer.bias):
        assert t.grad.dtype == torch.float32 and torch.isfinite(t.grad).all()
    # The values are the layer's, at the precision asked for.
    with torch.no_grad():
        full, _ = layer(x, m)
    scale = full.abs().max()
    tol = 2e-2 if dtype == torch.float16 else 8e-2
    torch.testing.assert_close(out.float() / scale, full / scale, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
def test_autocast_leaves_float64_alone_like_conv2d(dtype):
    conv = nn.Conv2d(4, 6, 3, padding=1, dtype=torch.float64)
    layer = pconv_cuda.PartialConv2d(4, 6, 3, padding=1, dtype=torch.float64)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    m = (torch.rand(2, 1, 8, 8) > 0.3).double()
    with torch.autocast("cpu", dtype=dtype):
        want = conv(x)
        out = layer(x, m)
    assert want.dtype == torch.float64
    assert out.dtype == want.dtype


@pytest.mark.parametrize("mask", ["float", "none"])
def test_autocast_inside_the_function_api_backward(mask):
    """PartialConv2dFunction under autocast: its backward must work as the module's does."""
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    m = (torch.rand(2, 1, 8, 8) > 0.3).float() if mask == "float" else None
    w = torch.randn(5, 4, 3, 3, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pconv_cuda.PartialConv2dFunction.apply(x, m, w, b, (1, 1), (1, 1), (1, 1), 1, False)[0]
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    for t in (x, w, b):
        assert t.grad is not None and t.grad.dtype == torch.float32 and torch.isfinite(t.grad).all()


def test_fp16_autocast_with_the_largest_ratio(backend):
    # ratio = C_in * k * k / S = 1024 * 9 / 1 = 9216 around the one valid value: beyond what a naive fp16
    # ratio * conv could hold (win / 1e-8 in the reference), but the output stays bounded.
    device = backend.device
    c_in, c_out = 1024, 4
    s = Sample("ratio9216", n=1, c_in=c_in, c_out=c_out, h=6, w=6, multi_channel=True)
    g = torch.Generator().manual_seed(0)
    bound = 1 / (c_in * 9) ** 0.5  # nn.Conv2d's init scale
    x = torch.randn(1, c_in, 6, 6, generator=g).to(device).requires_grad_(True)
    w = ((torch.rand(c_out, c_in, 3, 3, generator=g) * 2 - 1) * bound).to(device).requires_grad_(True)
    b = ((torch.rand(c_out, generator=g) * 2 - 1) * bound).to(device).requires_grad_(True)
    m = torch.zeros(1, c_in, 6, 6, device=device)
    m[0, 7, 2, 3] = 1
    grad = torch.randn(1, c_out, 6, 6, generator=g).to(device)

    ratio, _ = backend.ops.mask_update(m, (3, 3), (1, 1), (1, 1), (1, 1), True)
    assert ratio.max().item() == c_in * 9

    # Expected: float64 from the same fp16-rounded values.
    x64, w64, b64 = (t.detach().half().double().requires_grad_(True) for t in (x, w, b))
    rout, _ = reference.partial_conv2d(x64, m.double(), w64, b64, *conv_args(s))
    rout.backward(grad.half().double())
    want = (rout, x64.grad, w64.grad, b64.grad)
    assert (rout.abs() > 10).any()  # the 9216 ratio is at work

    for route in cpu_routes(backend):
        for t in (x, w, b):
            t.grad = None
        with in_route(backend, route), torch.autocast(device, dtype=torch.float16):
            out, upd, _, _ = backend.ops.partial_conv2d(x, m, w, b, *conv_args(s))
        assert out.dtype == torch.float16
        out.backward(grad.half())
        got = (out, x.grad, w.grad, b.grad)
        for name, a, e in zip(("output", "grad_input", "grad_weight", "grad_bias"), got, want):
            assert torch.isfinite(a).all(), f"{name} (route {route})"
            scale = e.abs().max().item()
            torch.testing.assert_close(a.double(), e, rtol=1e-2, atol=1e-2 * scale,
                                       msg=lambda msg: f"{name} (route {route}): {msg}")


# --- the backward keeps X*M ------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("multi_channel", [False, True], ids=["single", "multi"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_fourth_output_is_x_times_m(backend, dtype, multi_channel, channels_last):
    device = backend.device
    s = Sample("xm", multi_channel=multi_channel, mask="soft")
    x, m, w, b = make_inputs(s, dtype, device)
    assert (m == 0).any() and ((m > 0) & (m < 1)).any()
    x[(m == 0).expand_as(x)] = float("inf")  # even inf * 0 gives 0
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        m = m.contiguous(memory_format=torch.channels_last)
    xm = backend.ops.partial_conv2d(x, m, w, b, *conv_args(s))[3]
    assert xm.dtype == dtype and xm.shape == x.shape
    assert torch.equal(xm, torch.where(m == 0, 0, x * m))

    none = backend.ops.partial_conv2d(x, None, w, b, *conv_args(s))[3]
    assert none.numel() == 0 and none.dtype == dtype and none.device == x.device


def backward_after_inplace(apply, s: Sample, device, with_mask: bool, modify: bool):
    x, m, w, b = make_inputs(s, torch.float64, device, requires_grad=True)
    out = apply(x, m if with_mask else None, w, b)
    if modify:
        with torch.no_grad():
            x.mul_(3).add_(1)  # the user reuses the input buffer after the forward
    out.backward(torch.ones_like(out))
    return x.grad, w.grad, b.grad


def op_apply(backend: Backend, s: Sample):
    return lambda x, m, w, b: backend.ops.partial_conv2d(x, m, w, b, *conv_args(s))[0]


@pytest.mark.parametrize("multi_channel", [False, True], ids=["single", "multi"])
def test_inplace_change_of_x_after_forward(backend, multi_channel, deterministic):
    device = backend.device
    s = Sample("inplace", multi_channel=multi_channel)
    apply = op_apply(backend, s)
    # With a mask, X*M was saved, not x: no version-counter error, and the gradients are those of the forward.
    untouched = backward_after_inplace(apply, s, device, True, False)
    modified = backward_after_inplace(apply, s, device, True, True)
    for name, a, e in zip(("grad_input", "grad_weight", "grad_bias"), modified, untouched):
        assert torch.equal(a, e), name
    # With mask=None the input itself is saved, and autograd must catch its modification.
    backward_after_inplace(apply, s, device, False, False)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        backward_after_inplace(apply, s, device, False, True)


@pytest.mark.parametrize("api", ["module", "function", "functional"])
def test_inplace_change_of_x_after_forward_public_api(main_backend, api, deterministic):
    device = main_backend.device
    s = Sample("inplace_api")

    def apply(x, m, w, b):
        if api == "module":
            layer = pconv_cuda.PartialConv2d(s.c_in, s.c_out, 3, padding=1, device=device, dtype=torch.float64)
            del layer.weight, layer.bias
            layer.weight, layer.bias = w, b  # plain tensors: the caller's leaves get the gradients
            return layer(x, m)
        if api == "function":
            return pconv_cuda.PartialConv2dFunction.apply(x, m, w, b, s.stride, s.padding, s.dilation, 1, False)[0]
        return pconv_cuda.partial_conv2d(x, m, w, b, s.stride, s.padding)[0]

    untouched = backward_after_inplace(apply, s, device, True, False)
    modified = backward_after_inplace(apply, s, device, True, True)
    for name, a, e in zip(("grad_input", "grad_weight", "grad_bias"), modified, untouched):
        assert torch.equal(a, e), name
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        backward_after_inplace(apply, s, device, False, True)
