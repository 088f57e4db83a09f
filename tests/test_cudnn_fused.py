"""The cudnn_fused CUDA route: its support surface and graphs (no GPU needed), the flow around it under the SIMT
emulation's model of the graph, and on a GPU the route itself against the float64 oracle."""
from __future__ import annotations

import itertools

import pytest
import torch

import pconv_cuda
from pconv_cuda import routes
from helpers import (FUSED_BACKENDS, KERNEL_SAMPLES, ROUNDINGS, SAMPLES, Backend, Sample, assert_rounding_close,
                     assert_within_rounding_of_oracle, conv_args, cuda_unavailable, emu_unavailable, make_inputs,
                     oracle, summed_terms, use_backend, with_)

ALL_SAMPLES = SAMPLES + KERNEL_SAMPLES

needs_route = pytest.mark.skipif(routes.cudnn_fused_status() != "",
                                 reason=f"cudnn_fused not built: {routes.cudnn_fused_status()}")


@pytest.fixture(params=FUSED_BACKENDS, ids=str)
def fused_backend(request, monkeypatch) -> Backend:
    b = use_backend(request.param, monkeypatch)
    if not hasattr(torch.ops.pconv_cuda, "_cudnn_fused_support"):
        pytest.skip("the support query needs a CUDA build")
    if b.device == "cuda" and routes.cudnn_fused_status():
        pytest.skip(routes.cudnn_fused_status())
    return b


def channels_last(t):
    return None if t is None else t.contiguous(memory_format=torch.channels_last)


def describe(s: Sample, dtype=torch.float16, layout=torch.channels_last, device="meta"):
    """Tensors that describe a sample's call (meta: no data, no GPU)."""
    x = torch.empty(s.n, s.c_in, s.h, s.w, dtype=dtype, device=device).contiguous(memory_format=layout)
    w = torch.empty(s.c_out, s.c_in // s.groups, *s.kernel, dtype=dtype, device=device)
    b = torch.empty(s.c_out, dtype=dtype, device=device) if s.bias else None
    m = None
    if s.mask != "none":
        m = torch.empty(s.mask_batch or s.n, s.c_in if s.multi_channel else 1, s.h, s.w, dtype=dtype, device=device)
    return x, m, w, b


# The graphs the route builds for the test matrix: both layouts; float16, bfloat16, float32 (TF32 on and off: the
# same graph, the flag only filters engines at plan time); single-channel, multi-channel and no masks; stride,
# dilation, padding; bias or none.
MATRIX = [
    Sample("matrix", n=n, c_in=16, c_out=32, h=12, w=10, kernel=(k, k), stride=(st, st), padding=(p, p),
           dilation=(d, d), bias=bias, multi_channel=mc, mask=mask)
    for (n, k, st, p, d, bias, (mc, mask)) in itertools.product(
        (1, 3), (1, 3), (1, 2), (0, 1, 2), (1, 2), (True, False),
        ((False, "random"), (True, "random"), (False, "none")))
    if (12 + 2 * p - d * (k - 1)) > 0
]


@needs_route
@pytest.mark.parametrize("tf32", [False, True], ids=["strict", "tf32"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_every_matrix_graph_validates(dtype, tf32):
    torch.backends.cudnn.allow_tf32 = tf32
    for s in MATRIX:
        x, m, w, b = describe(s, dtype)
        why = routes.cudnn_fused_support(x, m, w, b, *conv_args(s), stage="validate")
        assert why == "", f"{s}: {why}"
        # The same call in NCHW is excluded before any graph is built.
        x, m, w, b = describe(s, dtype, torch.contiguous_format)
        assert "NCHW" in routes.cudnn_fused_support(x, m, w, b, *conv_args(s), stage="validate")


@pytest.mark.parametrize("case, expected", [
    (dict(dtype=torch.float64), "dtype"),
    (dict(groups=2), "grouped"),
    (dict(layout=torch.contiguous_format), "NCHW"),
    (dict(n=0), "empty"),
])
def test_surface_exclusions(case, expected):
    s = Sample("surface", n=case.get("n", 2), c_in=8, c_out=8, groups=case.get("groups", 1))
    x, m, w, b = describe(s, case.get("dtype", torch.float16), case.get("layout", torch.channels_last))
    assert expected in routes.cudnn_fused_support(x, m, w, b, *conv_args(s), stage="surface")
    x, m, w, b = describe(with_(s, groups=1, n=2), torch.float16, torch.channels_last)
    assert routes.cudnn_fused_support(x, m, w, b, *conv_args(with_(s, groups=1)), stage="surface") == ""


def test_support_errors_name_the_argument():
    s = Sample("bad")
    x, m, w, b = describe(s)
    with pytest.raises(ValueError, match="stage must be one of"):
        routes.cudnn_fused_support(x, m, w, b, *conv_args(s), stage="bogus")
    if not hasattr(torch.ops.pconv_cuda, "_cudnn_fused_support"):
        pytest.skip("no CUDA kernels in this build")
    with pytest.raises(RuntimeError, match="weight"):
        routes.cudnn_fused_support(x, m, w[:, :1], b, *conv_args(s), stage="surface")
    if routes.cudnn_fused_status() == "":
        with pytest.raises(RuntimeError, match="needs a CUDA tensor"):
            routes.cudnn_fused_support(x, m, w, b, *conv_args(s), stage="plan")


def test_cpu_refuses_the_cuda_route(monkeypatch):
    with pytest.raises(RuntimeError, match="cudnn_fused is a CUDA route"):
        routes.set_route("cudnn_fused", "cpu")
    monkeypatch.setenv("PCONV_CPU_ROUTE", "cudnn_fused")
    x, m, w, b = make_inputs(SAMPLES[0], torch.float32)
    with pytest.raises(RuntimeError, match="PCONV_CPU_ROUTE must be"):
        pconv_cuda.partial_conv2d(x, m, w, b, *conv_args(SAMPLES[0]))


def fused_expected(s: Sample, x, m, w, b) -> str:
    """The route the flow must take for this call on the fused backend."""
    stage = "plan" if x.is_cuda else "surface"  # the emulation's model knows the surface only
    return "cudnn_fused" if routes.cudnn_fused_support(x, m, w, b, *conv_args(s), stage=stage) == "" else "aten_conv"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("s", ALL_SAMPLES, ids=str)
def test_route_against_float64_oracle(s, fused_backend, dtype):
    # Every sample in channels_last (NCHW, groups and 3-D fall back, last_route says so), output and gradients
    # within the dtype's rounding bound of float64 on the same rounded inputs. The graph rounds once where the
    # aten_conv route rounds twice (conv output, then epilogue), so the aten_conv route's bound holds.
    device = fused_backend.device
    x, m, w, b = make_inputs(s, dtype, device)
    x = channels_last(x).requires_grad_(True)
    w.requires_grad_(True)
    if b is not None:
        b.requires_grad_(True)
    ops = fused_backend.ops
    out, upd, _, _ = ops.partial_conv2d(x, m, w, b, *conv_args(s))
    route = routes.last_route(_ns=fused_backend.ns)
    assert route == fused_expected(s, x, m, w, b), route
    assert out.is_contiguous(memory_format=torch.channels_last) or out.shape[1] == 1
    assert_within_rounding_of_oracle(x, m, w, b, s, out, upd, dtype)


def test_emulated_route_flow():
    # The model of the graph under the emulation: the flow writes win / S for the bias form, multiplies by ratio
    # without a bias, and falls back where the surface excludes the call.
    if emu_unavailable():
        pytest.skip(emu_unavailable())
    import pconv_cuda.emu as emu
    s = Sample("flow", n=2, c_in=8, c_out=4, h=9, w=7, mask="holes", mask_batch=1)
    for bias in (True, False):
        x, m, w, b = make_inputs(with_(s, bias=bias), torch.float32)
        x = channels_last(x)
        with routes.use_route("cudnn_fused", _ns="pconv_cuda_emu"):
            out, upd, ratio, _ = emu.ops.partial_conv2d(x, m, w, b, *conv_args(s))
            assert routes.last_route(_ns="pconv_cuda_emu") == "cudnn_fused"
            nchw, _, _, _ = emu.ops.partial_conv2d(x.contiguous(), m, w, b, *conv_args(s))
            assert routes.last_route(_ns="pconv_cuda_emu") == "aten_conv"
        with routes.use_route("aten_conv", _ns="pconv_cuda_emu"):
            want, want_upd, want_ratio, _ = emu.ops.partial_conv2d(x, m, w, b, *conv_args(s))
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)  # float32: one rounding order apart
        torch.testing.assert_close(nchw, want, rtol=0, atol=0)
        assert torch.equal(upd, want_upd) and torch.equal(ratio, want_ratio)


# --- GPU only --------------------------------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(cuda_unavailable() is not None or routes.cudnn_fused_status() != "",
                               reason=cuda_unavailable() or routes.cudnn_fused_status())

UNET_LAYERS = [  # (c_in, c_out, kernel, stride, size): encoder and decoder shapes of the 256 px U-Net
    (64, 128, 5, 2, 128), (256, 512, 3, 2, 32), (512, 512, 3, 1, 8), (768, 256, 3, 1, 32), (192, 64, 3, 1, 128),
]


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layer", UNET_LAYERS, ids=lambda l: f"{l[0]}to{l[1]}k{l[2]}s{l[3]}@{l[4]}")
def test_gpu_route_takes_unet_layers(layer, dtype, monkeypatch):
    # The route must actually run for the U-Net's layers in the half types on channels_last (a route that always
    # fell back would pass every other test).
    c_in, c_out, k, st, size = layer
    s = Sample("unet", n=2, c_in=c_in, c_out=c_out, h=size, w=size, kernel=(k, k), stride=(st, st),
               padding=(k // 2, k // 2), mask="holes")
    x, m, w, b = make_inputs(s, dtype, "cuda")
    x = channels_last(x)
    assert routes.cudnn_fused_support(x, m, w, b, *conv_args(s), stage="plan") == ""
    monkeypatch.setenv("PCONV_CUDA_ROUTE", "cudnn_fused")
    out, _ = pconv_cuda.partial_conv2d(x, m, w, b, *conv_args(s))
    assert routes.last_route() == "cudnn_fused"
    want, _, _ = oracle(x, m, w, b, s)
    size_, _, _ = oracle(x, m, w, b, s, magnitude=True)
    assert_rounding_close(out, want, size_, dtype, ROUNDINGS["output"], summed_terms(s)["output"], "output")
    assert any("-> plan" in line for line in routes.cudnn_fused_plans())


@needs_gpu
def test_gpu_route_under_cuda_graph_replays_eager_result(monkeypatch):
    monkeypatch.setenv("PCONV_CUDA_ROUTE", "cudnn_fused")
    s = Sample("graph", n=2, c_in=32, c_out=64, h=16, w=16, mask="holes")
    x, m, w, b = make_inputs(s, torch.bfloat16, "cuda")
    x = channels_last(x)
    eager, _ = pconv_cuda.partial_conv2d(x, m, w, b, *conv_args(s))  # builds the plan outside the capture
    assert routes.last_route() == "cudnn_fused"
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        pconv_cuda.partial_conv2d(static_x, m, w, b, *conv_args(s))
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured, _ = pconv_cuda.partial_conv2d(static_x, m, w, b, *conv_args(s))
    static_x.copy_(x * 2)
    graph.replay()
    twice, _ = pconv_cuda.partial_conv2d(x * 2, m, w, b, *conv_args(s))
    torch.testing.assert_close(captured, twice, rtol=0, atol=0)
    static_x.copy_(x)
    graph.replay()
    torch.testing.assert_close(captured, eager, rtol=0, atol=0)


@needs_gpu
def test_gpu_fallbacks(monkeypatch):
    monkeypatch.setenv("PCONV_CUDA_ROUTE", "cudnn_fused")
    s = Sample("fallback", n=2, c_in=16, c_out=16, h=8, w=8)
    for dtype, layout, groups in ((torch.float64, torch.channels_last, 1), (torch.float16, torch.contiguous_format, 1),
                                  (torch.float16, torch.channels_last, 2)):
        sg = with_(s, groups=groups)
        x, m, w, b = make_inputs(sg, dtype, "cuda")
        x = x.contiguous(memory_format=layout)
        pconv_cuda.partial_conv2d(x, m, w, b, *conv_args(sg))
        assert routes.last_route() == "aten_conv", (dtype, layout, groups)
