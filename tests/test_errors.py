"""Bad input gets an error that names the argument and what was expected."""
from __future__ import annotations

import pytest
import torch

import pconv_cuda
from pconv_cuda import ops, routes
from helpers import BACKENDS, SAMPLES, conv_args, make_inputs


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
    (dict(input=torch.randn(2, 0, 8, 8), weight=torch.randn(6, 0, 3, 3), mask=None),
     r"input must have at least one channel \(C_in >= 1\), got shape \[2, 0, 8, 8\]"),
    (dict(input=torch.randn(2, 4, 0, 8), mask=None), r"input must have at least one pixel \(H, W >= 1\)"),
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


def exact(excinfo) -> str:
    """The error's message (its first line: a C++ stack trace, if enabled, follows it)."""
    return str(excinfo.value).splitlines()[0]


def test_padding_same_with_stride_is_an_error():
    # nn.Conv2d refuses it for the module; the functional API and mask_update give their own message.
    with pytest.raises(ValueError, match=r"padding='same' is not supported for strided convolutions"):
        pconv_cuda.PartialConv2d(3, 4, 3, stride=2, padding="same")
    with pytest.raises(ValueError) as e:
        call(padding="same", stride=(1, 2))
    assert exact(e) == "padding='same' is only supported with stride 1, like nn.Conv2d"
    with pytest.raises(ValueError) as e:
        pconv_cuda.mask_update(torch.ones(1, 1, 8, 8), 3, stride=(2, 1), padding="same")
    assert exact(e) == "padding='same' is only supported with stride 1, like nn.Conv2d"


def test_cuda_tensor_without_cuda_kernels(monkeypatch):
    # Every op has a CUDA registration: the real kernel, or (in a build without one) an error that says how to
    # rebuild. Both messages are checked in every build, the registrations against what the build says it has.
    for op in ops.OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pconv_cuda::{op}", "CUDA")
    if pconv_cuda._C.WITH_CUDA:
        assert ops.MISSING_CUDA_KERNELS == ()
    else:
        assert set(ops.MISSING_CUDA_KERNELS) == set(ops.OPS)

    class Build:
        WITH_CUDA = False

    monkeypatch.setattr(ops, "_C", Build)
    msg = ops.missing_kernel_message("partial_conv2d", "cuda")
    assert msg.startswith("pconv_cuda::partial_conv2d: this build of pconv_cuda has no CUDA kernels (it was built "
                          "CPU-only).")
    assert "`CUDA_HOME=/usr/local/cuda FORCE_CUDA=1 pip install --no-build-isolation .`" in msg
    Build.WITH_CUDA = True
    assert ops.missing_kernel_message("mask_update", "cuda") == (
        "pconv_cuda::mask_update: no CUDA kernel in this version of pconv_cuda; move the tensors to the CPU")
    assert ops.missing_kernel_message("partial_conv2d", "mps") == (
        "pconv_cuda::partial_conv2d: no MPS kernel in this version of pconv_cuda; move the tensors to the CPU")
    monkeypatch.undo()
    if torch.cuda.is_available() and ops.MISSING_CUDA_KERNELS:
        with pytest.raises(RuntimeError, match="pconv_cuda::partial_conv2d"):
            call(input=torch.randn(2, 4, 8, 8, device="cuda"), mask=None, weight=torch.randn(6, 4, 3, 3, device="cuda"),
                 bias=None)


# --- the backward op's argument checks ----------------------------------------------------------------------------

BACKWARD = "pconv_cuda::_partial_conv2d_backward: "


def backward_args(backend, dtype=torch.float32):
    s = SAMPLES[0]  # N 2, C_in 4, C_out 6, 9 x 8, k3 p1: maps (2, 1, 9, 8)
    x, m, w, b = make_inputs(s, dtype, backend.device)
    out, upd, ratio, xm = backend.ops.partial_conv2d(x, m, w, b, *conv_args(s))
    return dict(grad_output=torch.ones_like(out), masked_input=xm, mask=m, weight=w, ratio=ratio, updated_mask=upd)


def run_backward(backend, a):
    return backend.ops._partial_conv2d_backward(a["grad_output"], a["masked_input"], a["mask"], a["weight"],
                                                a["ratio"], a["updated_mask"], *conv_args(SAMPLES[0]),
                                                [True, True, True])


@pytest.mark.parametrize("name, change, message", [
    ("grad_output", lambda t: t[..., :7], "grad_output must have shape (2, 6, 9, 8), got [2, 6, 9, 7]"),
    ("grad_output", lambda t: t[:, :5], "grad_output must have shape (2, 6, 9, 8), got [2, 5, 9, 8]"),
    ("grad_output", lambda t: t[0], "grad_output must have shape (2, 6, 9, 8), got [6, 9, 8]"),
    ("grad_output", lambda t: t.double(), "grad_output dtype Double does not match input dtype Float"),
    ("grad_output", lambda t: t.half(), "grad_output dtype Half does not match input dtype Float"),
    ("ratio", lambda t: t[:1], "ratio must have shape (2, 1, 9, 8), got [1, 1, 9, 8]"),
    ("ratio", lambda t: t.expand(2, 3, 9, 8), "ratio must have shape (2, 1, 9, 8), got [2, 3, 9, 8]"),
    ("ratio", lambda t: t[..., 1:, :], "ratio must have shape (2, 1, 9, 8), got [2, 1, 8, 8]"),
    ("ratio", lambda t: t.double(), "ratio must be Float, got Double"),
    ("ratio", lambda t: t.half(), "ratio must be Float, got Half"),
    ("updated_mask", lambda t: t[..., :5], "updated_mask must have shape (2, 1, 9, 8), got [2, 1, 9, 5]"),
    ("updated_mask", lambda t: t[:, :, None], "updated_mask must have shape (2, 1, 9, 8), got [2, 1, 1, 9, 8]"),
    ("updated_mask", lambda t: t.half(), "updated_mask must be Float, got Half"),
    ("updated_mask", lambda t: t.bool(), "updated_mask must be Float, got Bool"),
])
def test_backward_op_argument_checks(backend, name, change, message):
    a = backward_args(backend)
    a[name] = change(a[name])
    with pytest.raises(RuntimeError) as e:
        run_backward(backend, a)
    assert exact(e) == BACKWARD + message


def test_backward_op_checks_in_float64_and_float16(backend):
    # The dtypes the maps must have follow the input's: ratio float64 for float64, float32 for the half types.
    a = backward_args(backend, torch.float64)
    a["ratio"] = a["ratio"].float()
    with pytest.raises(RuntimeError) as e:
        run_backward(backend, a)
    assert exact(e) == BACKWARD + "ratio must be Double, got Float"
    a = backward_args(backend, torch.float16)
    a["updated_mask"] = a["updated_mask"].float()
    with pytest.raises(RuntimeError) as e:
        run_backward(backend, a)
    assert exact(e) == BACKWARD + "updated_mask must be Half, got Float"
    run_backward(backend, backward_args(backend, torch.float16))  # and the right ones pass


@pytest.mark.parametrize("name", ["grad_output", "ratio", "updated_mask"])
def test_backward_op_device_checks_on_a_gpu(name):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device: on the CPU the check is only reachable through the meta device (below)")
    # Everything on the GPU but `name` (the CUDA kernel's device guard follows masked_input, so that one stays there).
    a = {k: v.cuda() for k, v in backward_args(BACKENDS[0]).items()}
    a[name] = a[name].cpu()
    with pytest.raises(RuntimeError) as e:
        run_backward(BACKENDS[0], a)
    assert exact(e) == BACKWARD + f"{name} is on cpu but input is on cuda:0"


@pytest.mark.parametrize("name", ["grad_output", "ratio", "updated_mask"])
def test_backward_op_device_checks_through_meta(name):
    a = backward_args(BACKENDS[0])
    a[name] = a[name].to("meta")
    with pytest.raises(RuntimeError) as e:
        run_backward(BACKENDS[0], a)
    assert f"{name} is on meta but input is on cpu" in exact(e)


# --- mask_update's argument checks --------------------------------------------------------------------------------

MASK_UPDATE = "pconv_cuda::mask_update: "


@pytest.mark.parametrize("args, message", [
    (dict(kernel_size=[3]), "kernel_size must have 2 elements (height, width), got 1"),
    (dict(kernel_size=[3, 3, 3]), "kernel_size must have 2 elements (height, width), got 3"),
    (dict(kernel_size=[0, 3]), "kernel_size must be >= 1, got [0, 3]"),
    (dict(kernel_size=[3, -1]), "kernel_size must be >= 1, got [3, -1]"),
    (dict(stride=[1]), "stride must have 2 elements (height, width), got 1"),
    (dict(stride=[1, 0]), "stride must be >= 1, got [1, 0]"),
    (dict(padding=[1, 1, 1]), "padding must have 2 elements (height, width), got 3"),
    (dict(padding=[-1, 1]), "padding must be >= 0, got [-1, 1]"),
    (dict(dilation=[]), "dilation must have 2 elements (height, width), got 0"),
    (dict(dilation=[1, 0]), "dilation must be >= 1, got [1, 0]"),
    (dict(mask=torch.ones(2, 3, 8, 8)), "multi_channel=False expects a single-channel mask, got 3 channels; pass "
                                        "multi_channel=True for a per-channel mask"),
    (dict(mask=torch.ones(2, 1, 8, 8, dtype=torch.int32)), "mask must be a floating, bool or uint8 tensor, got Int"),
    (dict(mask=torch.ones(2, 1, 8, 8, dtype=torch.complex64)),
     "mask must be a floating, bool or uint8 tensor, got ComplexFloat"),
    (dict(mask=torch.ones(1, 8, 8)),
     "mask must be a 4-D (N, C, H, W) or 5-D (N, C, D, H, W) tensor, got shape [1, 8, 8]"),
    (dict(mask=torch.ones(1, 1, 2, 8), padding=[0, 1]),
     "the input's spatial size (2, 8) is too small for kernel (3, 3) with padding (0, 1) and dilation (1, 1): the "
     "output would be (0, 8)"),
])
def test_mask_update_op_argument_checks(backend, args, message):
    a = dict(mask=torch.ones(2, 1, 8, 8), kernel_size=[3, 3], stride=[1, 1], padding=[1, 1], dilation=[1, 1],
             multi_channel=False)
    a.update(args)
    with pytest.raises(RuntimeError) as e:
        backend.ops.mask_update(a["mask"].to(backend.device), a["kernel_size"], a["stride"], a["padding"],
                                a["dilation"], a["multi_channel"])
    assert exact(e) == MASK_UPDATE + message


@pytest.mark.parametrize("kw, error, message", [
    (dict(kernel_size=(3, 3, 3)), TypeError, "kernel_size must be an int or a pair of ints, got (3, 3, 3)"),
    (dict(kernel_size=1.5), TypeError, "kernel_size must be an int or a pair of ints, got float"),
    (dict(stride=(1,)), TypeError, "stride must be an int or a pair of ints, got (1,)"),
    (dict(stride=(1, 2.0)), TypeError, "stride must be an int or a pair of ints, got (1, 2.0)"),
    (dict(dilation=True), TypeError, "dilation must be an int or a pair of ints, got bool"),
    (dict(padding=[1, 1, 1]), TypeError, "padding must be an int or a pair of ints, got [1, 1, 1]"),
    (dict(padding="full"), ValueError, "padding must be 'valid', 'same', an int or a pair of ints, got 'full'"),
    (dict(kernel_size=(3, 4), padding="same"), ValueError,
     "padding='same' needs an odd dilated kernel extent for symmetric padding; kernel (3, 4) with dilation (1, 1) "
     "would need asymmetric padding"),
    (dict(kernel_size=0), RuntimeError, MASK_UPDATE + "kernel_size must be >= 1, got [0, 0]"),
    (dict(stride=(2, 0)), RuntimeError, MASK_UPDATE + "stride must be >= 1, got [2, 0]"),
    (dict(padding=(0, -2)), RuntimeError, MASK_UPDATE + "padding must be >= 0, got [0, -2]"),
    (dict(dilation=(0, 1)), RuntimeError, MASK_UPDATE + "dilation must be >= 1, got [0, 1]"),
    (dict(multi_channel=False, mask=torch.ones(2, 4, 8, 8)), RuntimeError,
     MASK_UPDATE + "multi_channel=False expects a single-channel mask, got 4 channels; pass multi_channel=True for a "
                   "per-channel mask"),
    (dict(mask=torch.ones(2, 1, 8, 8, dtype=torch.int64)), RuntimeError,
     MASK_UPDATE + "mask must be a floating, bool or uint8 tensor, got Long"),
])
def test_mask_update_public_argument_checks(kw, error, message):
    a = dict(mask=torch.ones(2, 1, 8, 8), kernel_size=3, padding=1)
    a.update(kw)
    with pytest.raises(error) as e:
        pconv_cuda.mask_update(**a)
    assert exact(e) == message


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
    assert routes.last_route("cuda", _ns="pconv_cuda_emu") == route  # each case checks its own route
    bad = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    bad[1, 0, 3:6, 3:6] = True  # the 3x3 windows that contain the bad pixel
    assert torch.isnan(upd[bad]).all() and torch.isnan(ratio[bad]).all()
    assert torch.isnan(out[bad.expand_as(out)]).all()
    assert torch.isfinite(out[~bad.expand_as(out)]).all() and torch.isfinite(upd[~bad]).all()
