"""Bad input gets an error that names the argument and what was expected."""
from __future__ import annotations

import pytest
import torch

import pconv_cuda
from pconv_cuda import ops


def args(**kw):
    a = dict(input=torch.randn(2, 4, 8, 8), mask=torch.ones(2, 1, 8, 8), weight=torch.randn(6, 4, 3, 3),
             bias=torch.randn(6), stride=1, padding=1, dilation=1, groups=1, multi_channel=False)
    a.update(kw)
    return a


def call(**kw):
    return pconv_cuda.partial_conv2d(**args(**kw))


@pytest.mark.parametrize("kw, match", [
    (dict(input=torch.randn(4, 8, 8)), r"input must be a 4-D tensor"),
    (dict(weight=torch.randn(6, 4, 3)), r"weight must be a 4-D tensor"),
    (dict(mask=torch.ones(1, 8, 8)), r"mask must be a 4-D tensor"),
    (dict(mask=torch.ones(3, 1, 8, 8)), r"mask batch size 3 must be 1 or the input's batch size 2"),
    (dict(mask=torch.ones(2, 4, 8, 8)), r"single-channel mask .*got 4 channels; pass multi_channel=True"),
    (dict(mask=torch.ones(2, 1, 8, 8), multi_channel=True), r"one channel per input channel \(C_in=4\), got 1"),
    (dict(mask=torch.ones(2, 1, 8, 7)), r"mask spatial size \(8, 7\) must equal the input's \(8, 8\)"),
    (dict(mask=torch.ones(2, 1, 8, 8, dtype=torch.float64)), r"mask dtype must be the input's dtype \(Float\)"),
    (dict(weight=torch.randn(6, 4, 3, 3, dtype=torch.float64)), r"weight dtype Double does not match input dtype"),
    (dict(bias=torch.randn(5)), r"bias must have shape \(6,\)"),
    (dict(bias=torch.randn(6).half()), r"bias dtype Half does not match"),
    (dict(input=torch.randn(2, 4, 8, 8).int(), mask=None), r"input must be float32, float64, float16 or bfloat16"),
    (dict(groups=3, weight=torch.randn(6, 1, 3, 3)), r"groups=3 must divide the input channels C_in=4"),
    (dict(groups=2, weight=torch.randn(5, 2, 3, 3), bias=None), r"groups=2 must divide the output channels C_out=5"),
    (dict(weight=torch.randn(6, 3, 3, 3)), r"expects 3 input channels .* but input has C_in=4"),
    (dict(groups=0), r"groups must be >= 1"),
    (dict(stride=0), r"stride must be >= 1"),
    (dict(padding=-1), r"padding must be >= 0"),
    (dict(dilation=0), r"dilation must be >= 1"),
    (dict(padding=0, input=torch.randn(2, 4, 2, 8), mask=None), r"too small for kernel \(3, 3\)"),
    (dict(stride=(1, 2, 3)), r"stride must be an int or a pair of ints"),
    (dict(stride=1.5), r"stride must be an int or a pair of ints, got float"),
    (dict(padding="full"), r"padding must be 'valid', 'same', an int or a pair"),
])
def test_bad_arguments(kw, match):
    with pytest.raises((RuntimeError, ValueError, TypeError), match=match):
        call(**kw)


@pytest.mark.parametrize("bad", [-0.5, 1.5, float("nan")], ids=["negative", "above_one", "nan"])
@pytest.mark.parametrize("multi", [False, True], ids=["single", "multi"])
def test_mask_values_outside_unit_interval(bad, multi):
    m = torch.ones(2, 4 if multi else 1, 8, 8)
    m[1, 0, 3, 5] = bad
    with pytest.raises(RuntimeError, match=r"mask values must lie in \[0, 1\] .* 1 value\(s\) outside"):
        call(mask=m, multi_channel=multi)
    with pytest.raises(RuntimeError, match=r"mask values must lie in \[0, 1\]"):
        pconv_cuda.mask_update(m, 3, padding=1, multi_channel=multi)


def test_uint8_mask_above_one():
    with pytest.raises(RuntimeError, match=r"mask values must lie in \[0, 1\] .* e\.g\. 255"):
        call(mask=torch.full((2, 1, 8, 8), 255, dtype=torch.uint8))


def test_device_mismatch_message():
    # No GPU here: the meta device stands in for "another device" in the check that compares devices.
    with pytest.raises(RuntimeError, match=r"weight is on meta but input is on cpu"):
        torch.ops.pconv_cuda.partial_conv2d(torch.randn(1, 4, 8, 8), None, torch.randn(6, 4, 3, 3, device="meta"),
                                            None, [1, 1], [1, 1], [1, 1], 1, False)


def test_padding_mode():
    with pytest.raises(ValueError, match=r"padding_mode must be 'zeros' for a partial convolution .*got 'reflect'"):
        pconv_cuda.PartialConv2d(3, 4, 3, padding=1, padding_mode="reflect")


def test_padding_same_needs_symmetric_padding():
    with pytest.raises(ValueError, match=r"padding='same' needs an odd dilated kernel extent"):
        pconv_cuda.PartialConv2d(3, 4, 4, padding="same")


def test_cuda_tensor_without_cuda_kernels():
    # Every op has a CUDA registration: the real kernel, or (in a build without one) an error that says how to
    # rebuild. Without a GPU the message is checked through the function that the registration raises with.
    for op in ops.OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pconv_cuda::{op}", "CUDA")
    if not ops.MISSING_CUDA_KERNELS:
        pytest.skip("this build has CUDA kernels for every op")
    msg = ops.missing_kernel_message("partial_conv2d", "cuda")
    if pconv_cuda._C.WITH_CUDA:
        assert "no CUDA kernel in this version" in msg
    else:
        assert "built CPU-only" in msg and "FORCE_CUDA=1 pip install" in msg
    if torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="pconv_cuda::partial_conv2d"):
            call(input=torch.randn(2, 4, 8, 8, device="cuda"), mask=None, weight=torch.randn(6, 4, 3, 3, device="cuda"),
                 bias=None)


@pytest.mark.parametrize("route", ["aten_conv", "gemm"])
def test_cuda_kernels_poison_bad_mask_values_with_nan(route, monkeypatch):
    # The CUDA kernels cannot raise without a host sync, so a mask value outside [0, 1] makes the ratio, U and
    # output of every window that reads it NaN: visible, never a silent wrong answer. Other pixels are unaffected.
    from helpers import emu_unavailable

    if emu_unavailable():
        pytest.skip(emu_unavailable())
    monkeypatch.setenv("PCONV_CUDA_ROUTE", route)
    a = args(mask=torch.ones(2, 1, 8, 8))
    a["mask"][1, 0, 4, 4] = 1.5
    out, upd, ratio, _ = torch.ops.pconv_cuda_emu.partial_conv2d(
        a["input"], a["mask"], a["weight"], a["bias"], [1, 1], [1, 1], [1, 1], 1, False)
    bad = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    bad[1, 0, 3:6, 3:6] = True  # the 3x3 windows that contain the bad pixel
    assert torch.isnan(upd[bad]).all() and torch.isnan(ratio[bad]).all()
    assert torch.isnan(out[bad.expand_as(out)]).all()
    assert torch.isfinite(out[~bad.expand_as(out)]).all() and torch.isfinite(upd[~bad]).all()
