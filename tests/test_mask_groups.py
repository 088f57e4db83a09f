"""Masks by channel group (mask_groups): a mask of G maps, map g covering mask_groups[g] consecutive input channels,
against the same mask expanded to C_in channels (multi-channel), on every backend: outputs, updated masks, ratio,
X*M and every gradient, gradcheck and gradgradcheck, opcheck, 3-D, channels_last, half types, the module, the
Function path, torch.compile, the stride-0 expanded view taken as one group without a copy, the errors.

Binary masks make S a sum of integers, exact in every order, so the grouped and expanded results are equal bitwise
on the CPU (the convolution reads the same X*M). Soft masks: the grouped plane adds c_g * M_g, the expanded one c_g
copies of M_g; in float64 these differ by at most ~C_in ulp of S, well inside rtol 1e-12.
"""
from __future__ import annotations

from typing import Sequence

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import pconv_cuda
from helpers import nondet_tol

# (name, C_in, mask_groups, mask kind): one group, one per channel, uneven groups, many groups (past the CUDA
# kernels' 16: the CUDA primitives expand those to one map per channel first).
GROUPS = [
    ("one_group", 5, (5,), "random"),
    ("per_channel", 3, (1, 1, 1), "random"),
    ("two_groups", 7, (3, 4), "holes"),
    ("three_uneven", 9, (1, 6, 2), "random"),
    ("soft_two_groups", 6, (2, 4), "soft"),
    ("many_groups", 40, (2,) * 20, "random"),
]
GROUP_IDS = [g[0] for g in GROUPS]


def _maps(n: int, g: int, spatial: Sequence[int], kind: str, gen: torch.Generator) -> torch.Tensor:
    if kind == "soft":
        m = torch.rand(n, g, *spatial, generator=gen, dtype=torch.float64) * 0.6
        return m * (m > 0.15)
    m = torch.rand(n, g, *spatial, generator=gen) > 0.35
    if kind == "holes":
        m[(Ellipsis, *(slice(1, 6) for _ in spatial))] = False  # windows with S == 0
    return m.to(torch.float64)


def expand(maps: torch.Tensor, mask_groups: Sequence[int]) -> torch.Tensor:
    """The C_in-channel mask the groups stand for (what the op never forms)."""
    return maps.repeat_interleave(torch.tensor(mask_groups, device=maps.device), dim=1).contiguous()


def _case(c_in, mask_groups, kind, dims=2, device="cpu", n=2, mask_batch=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    spatial = (4, 7, 6) if dims == 3 else (9, 8)
    x = torch.randn(n, c_in, *spatial, generator=gen, dtype=torch.float64)
    w = torch.randn(5, c_in, *(3,) * dims, generator=gen, dtype=torch.float64) * 0.3
    b = torch.randn(5, generator=gen, dtype=torch.float64)
    maps = _maps(mask_batch or n, len(mask_groups), spatial, kind, gen)
    x = x.masked_fill(expand(maps, mask_groups) == 0, float("nan"))  # holes are exact: NaN there never matters
    return [t.to(device) for t in (x, maps, w, b)]


def _args(dims):
    return ([1] * dims, [1] * dims, [1] * dims, 1, True)


def _equal(got, want, what, exact=True):
    if exact and got.device.type == "cpu":
        assert torch.equal(got, want), what
    else:
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, equal_nan=True, msg=lambda e: f"{what}: {e}")


def _op(backend, dims):
    return getattr(backend.ops, f"partial_conv{dims}d")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dims", [2, 3], ids=["2d", "3d"])
@pytest.mark.parametrize("name, c_in, mask_groups, kind", GROUPS, ids=GROUP_IDS)
def test_grouped_equals_expanded(backend, name, c_in, mask_groups, kind, dims, layout):
    if dims == 3 and name == "many_groups":
        pytest.skip("covered in 2-D")
    x, maps, w, b = _case(c_in, mask_groups, kind, dims, backend.device)
    full = expand(maps, mask_groups)
    if layout == "channels_last":
        fmt = torch.channels_last_3d if dims == 3 else torch.channels_last
        x, maps, full = (t.contiguous(memory_format=fmt) for t in (x, maps, full))
    exact = kind != "soft"
    grads = []
    for m, groups in ((maps, mask_groups), (full, None)):
        xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
        outs = _op(backend, dims)(xr, m, wr, br, *_args(dims), groups)
        grads.append((outs, torch.autograd.grad(outs[0], (xr, wr, br), torch.ones_like(outs[0]))))
    (got, got_g), (want, want_g) = grads
    for what, a, e in zip(("output", "updated_mask", "ratio", "masked_input"), got, want):
        _equal(a.detach(), e.detach(), what, exact)
    assert torch.isfinite(got[0]).all()
    for what, a, e in zip(("grad_input", "grad_weight", "grad_bias"), got_g, want_g):
        _equal(a, e, what, exact)
    assert torch.isfinite(got_g[0]).all() and (got_g[0][full.expand_as(got_g[0]) == 0] == 0).all()
    ratio, upd = backend.ops.mask_update(maps, [3] * dims, [1] * dims, [1] * dims, [1] * dims, True, mask_groups)
    ratio_e, upd_e = backend.ops.mask_update(full, [3] * dims, [1] * dims, [1] * dims, [1] * dims, True)
    _equal(upd, upd_e, "mask_update updated_mask", exact)
    _equal(ratio, ratio_e, "mask_update ratio", exact)
    _equal(upd, got[1].detach(), "mask_update vs the op's updated_mask", exact)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_grouped_equals_expanded_dtypes(backend, dtype):
    # float32 and the half types: the same X*M, so the same convolution and gradients, bitwise (binary mask, bool
    # and uint8 maps too); on cuda_emu-gemm the half types run the tensor-core gemm route, whose backward
    # (mma_dgrad_kernel) applies each channel's map.
    mask_groups = (3, 5)
    x, maps, w, b = (t.to(dtype) for t in _case(8, mask_groups, "holes", device=backend.device))
    full = expand(maps, mask_groups)
    for mask_dtype in (dtype, torch.bool, torch.uint8):
        res = []
        for m, groups in ((maps.to(mask_dtype), mask_groups), (full.to(mask_dtype), None)):
            xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
            outs = backend.ops.partial_conv2d(xr, m, wr, br, *_args(2), groups)
            res.append((outs, torch.autograd.grad(outs[0], (xr, wr, br), torch.ones_like(outs[0]))))
        (got, got_g), (want, want_g) = res
        for what, a, e in zip(("output", "updated_mask", "ratio", "masked_input", "dx", "dw", "db"),
                              (*got, *got_g), (*want, *want_g)):
            if backend.device == "cpu":
                assert torch.equal(a.detach(), e.detach()), f"{dtype} {mask_dtype} {what}"
            else:
                torch.testing.assert_close(a.detach(), e.detach(), msg=lambda m: f"{dtype} {what}: {m}")


def test_mask_batch_one_broadcasts(backend):
    mask_groups = (2, 3)
    x, maps, w, b = _case(5, mask_groups, "random", device=backend.device, n=3, mask_batch=1)
    got = backend.ops.partial_conv2d(x, maps, w, b, *_args(2), mask_groups)
    want = backend.ops.partial_conv2d(x, expand(maps, mask_groups), w, b, *_args(2))
    assert got[1].shape == (1, 1, 9, 8)
    for what, a, e in zip(("output", "updated_mask", "ratio", "masked_input"), got, want):
        _equal(a, e, what)


@pytest.mark.parametrize("name, c_in, mask_groups, kind", [GROUPS[2], GROUPS[4]], ids=[GROUPS[2][0], GROUPS[4][0]])
def test_gradcheck_and_gradgradcheck(backend, name, c_in, mask_groups, kind):
    x, maps, w, b = _case(c_in, mask_groups, kind, device=backend.device, n=1)
    x = x.nan_to_num(0.0)  # finite differences perturb every element, holes included
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    fn = lambda x, w, b: backend.ops.partial_conv2d(x, maps, w, b, *_args(2), mask_groups)[0]  # noqa: E731
    tol = nondet_tol(backend.device)
    assert gradcheck(fn, (x, w, b), nondet_tol=tol)
    assert gradgradcheck(fn, (x, w, b), nondet_tol=tol)
    # Double backward through the weight gradient, which reads X*M (grad reaching masked_input): same as expanded.
    full = expand(maps, mask_groups)
    res = []
    for m, groups in ((maps, mask_groups), (full, None)):
        out = backend.ops.partial_conv2d(x, m, w, b, *_args(2), groups)[0]
        gw, = torch.autograd.grad(out.pow(2).sum(), w, create_graph=True)
        res.append(torch.autograd.grad(gw.pow(2).sum(), (x, w, b)))
    for what, a, e in zip(("x", "w", "b"), *res):
        _equal(a, e, f"second-order {what}", exact=False)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(backend, layout):
    mask_groups = [3, 1, 2]
    x, maps, w, b = _case(6, mask_groups, "holes", device=backend.device)
    x = x.nan_to_num(0.0)
    if layout == "channels_last":
        x, maps = x.contiguous(memory_format=torch.channels_last), maps.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w.requires_grad_()
    torch.library.opcheck(backend.ops.partial_conv2d.default, (x, maps, w, b, *_args(2), mask_groups))
    out, upd, ratio, xm = backend.ops.partial_conv2d(x, maps, w, b, *_args(2), mask_groups)
    torch.library.opcheck(backend.ops._partial_conv2d_backward.default,
                          (torch.randn_like(out), xm.detach(), maps, w.detach(), ratio, upd, *_args(2),
                           [True, True, True], mask_groups))
    torch.library.opcheck(backend.ops.mask_update.default, (maps, [3, 3], [1, 1], [1, 1], [1, 1], True, mask_groups))


def test_expanded_view_is_one_group_without_a_copy(backend):
    # A single map expanded over the channels (stride 0), passed as a plain multi-channel mask: read as one group,
    # never copied to C_in channels, and autograd keeps the one map.
    x, m1, w, b = _case(6, (6,), "holes", device=backend.device)
    view = m1.expand(-1, 6, -1, -1)
    assert view.stride(1) == 0
    want = backend.ops.partial_conv2d(x, view.contiguous(), w, b, *_args(2))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = backend.ops.partial_conv2d(x, view, w, b, *_args(2))
    copies = [e.name for e in prof.events() if e.name in ("aten::copy_", "aten::clone", "aten::index_select")]
    assert not copies, copies
    for what, a, e in zip(("output", "updated_mask", "ratio", "masked_input"), got, want):
        _equal(a, e, what)
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    xr = x.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = backend.ops.partial_conv2d(xr, view, w, b, *_args(2))[0]
    assert m1.untyped_storage().data_ptr() in kept  # the map itself, not a 6-channel copy
    assert kept[m1.untyped_storage().data_ptr()] == m1.numel() * m1.element_size()
    gx, = torch.autograd.grad(out.sum(), xr)
    xe = x.clone().requires_grad_()
    ge, = torch.autograd.grad(backend.ops.partial_conv2d(xe, view.contiguous(), w, b, *_args(2))[0].sum(), xe)
    _equal(gx, ge, "grad_input")


def test_grouped_plane_reads_the_maps_once(main_backend):
    # The grouped mask pass reads G maps: a (N, G, H, W) mask of 2 maps for 300 channels costs the traffic of 2
    # channels, and the saved mask is those 2 maps (not 300).
    device = main_backend.device
    x, maps, w, b = _case(300, (100, 200), "random", device=device)
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    xr = x.nan_to_num(0.0).requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        pconv_cuda.partial_conv2d(xr, maps, w, b, padding=1, multi_channel=True, mask_groups=(100, 200))
    assert kept[maps.untyped_storage().data_ptr()] == maps.numel() * maps.element_size()
    assert max(kept.values()) <= x.numel() * x.element_size()  # nothing larger than X*M (no 300-channel mask)


# --- the public API ----------------------------------------------------------------------------------------------

def test_functional_module_function_paths(main_backend):
    device = main_backend.device
    mask_groups = (4, 3)
    x, maps, w, b = _case(7, mask_groups, "holes", device=device)
    full = expand(maps, mask_groups)
    layer = pconv_cuda.PartialConv2d(7, 5, 3, padding=1, multi_channel=True, return_mask=True).double().to(device)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    out, upd = layer(x, maps, mask_groups=mask_groups)
    out_e, upd_e = layer(x, full)
    _equal(out, out_e, "module output")
    assert upd.shape == upd_e.shape == (2, 5, 9, 8)  # NVIDIA's multi-channel shape, kept
    _equal(upd, upd_e, "module updated mask")
    f_out, f_upd = pconv_cuda.partial_conv2d(x, maps, w, b, padding=1, multi_channel=True, mask_groups=[4, 3])
    _equal(f_out, out_e, "functional output")
    # PartialConv2dFunction (torch.func, compile): forward, backward and double backward.
    res = []
    for m, groups in ((maps, mask_groups), (full, None)):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = pconv_cuda.PartialConv2dFunction.apply(xr, m, wr, b, (1, 1), (1, 1), (1, 1), 1, True, groups)[0]
        gx, gw = torch.autograd.grad(y.pow(2).sum(), (xr, wr), create_graph=True)
        res.append((y, gx, gw, *torch.autograd.grad((gx.pow(2).sum() + gw.pow(2).sum()), (xr, wr))))
    for what, a, e in zip(("y", "gx", "gw", "ggx", "ggw"), *res):
        _equal(a.detach(), e.detach(), f"Function {what}", exact=what in ("y", "gx"))
    # torch.func: vjp through the Function path.
    _, vjp = torch.func.vjp(lambda x: pconv_cuda.partial_conv2d(x, maps, w, b, padding=1, multi_channel=True,
                                                                 mask_groups=mask_groups)[0], x.nan_to_num(0.0))
    _, vjp_e = torch.func.vjp(lambda x: pconv_cuda.partial_conv2d(x, full, w, b, padding=1,
                                                                   multi_channel=True)[0], x.nan_to_num(0.0))
    g = torch.randn_like(out)
    _equal(vjp(g)[0], vjp_e(g)[0], "torch.func vjp")


def test_conv1d_and_conv3d_modules(main_backend):
    device = main_backend.device
    torch.manual_seed(0)
    layer1 = pconv_cuda.PartialConv1d(5, 4, 3, padding=1, multi_channel=True, return_mask=True).double().to(device)
    x1 = torch.randn(2, 5, 17, dtype=torch.float64, device=device)
    m1 = (torch.rand(2, 2, 17, device=device) > 0.4).double()
    got, got_u = layer1(x1, m1, mask_groups=(2, 3))
    want, want_u = layer1(x1, m1.repeat_interleave(torch.tensor([2, 3], device=device), 1))
    _equal(got, want, "1-D output")
    _equal(got_u, want_u, "1-D updated mask")
    layer3 = pconv_cuda.PartialConv3d(5, 4, 3, padding=1, multi_channel=True).double().to(device)
    x3 = torch.randn(1, 5, 4, 6, 5, dtype=torch.float64, device=device)
    m3 = (torch.rand(1, 2, 4, 6, 5, device=device) > 0.4).double()
    _equal(layer3(x3, m3, mask_groups=[4, 1]),
           layer3(x3, m3.repeat_interleave(torch.tensor([4, 1], device=device), 1)), "3-D output")


def test_torch_compile_fullgraph(main_backend):
    device = main_backend.device
    layer = pconv_cuda.PartialConv2d(5, 6, 3, padding=1, multi_channel=True, return_mask=True).to(device)
    x = torch.randn(2, 5, 9, 8, device=device, requires_grad=True)
    maps = (torch.rand(2, 2, 9, 8, device=device) > 0.3).float()
    compiled = torch.compile(lambda x, m: layer(x, m, mask_groups=(2, 3)), fullgraph=True, backend="aot_eager")
    out, upd = compiled(x, maps)
    want, want_upd = layer(x, maps.repeat_interleave(torch.tensor([2, 3], device=device), 1))
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(upd, want_upd)
    g1, = torch.autograd.grad(out.sum(), x)
    g2, = torch.autograd.grad(want.sum(), x)
    torch.testing.assert_close(g1, g2)


def test_export(main_backend):
    device = main_backend.device

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = pconv_cuda.PartialConv2d(5, 6, 3, padding=1, multi_channel=True, return_mask=True)

        def forward(self, x, m):
            return self.conv(x, m, mask_groups=(2, 3))

    model = Layer().to(device)
    x = torch.randn(2, 5, 9, 8, device=device)
    maps = (torch.rand(2, 2, 9, 8, device=device) > 0.3).float()
    ep = torch.export.export(model, (x, maps))
    for got, want in zip(ep.module()(x, maps), model(x, maps)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# --- errors ------------------------------------------------------------------------------------------------------

ERRORS = [
    ((3, 3), r"mask_groups=\[3, 3\] must sum to the input channels C_in=7, got 6"),
    ((3, 2, 2), r"mask_groups=\[3, 2, 2\] names 3 group\(s\), so the mask must have one map per group \(3 channels\), "
                r"got 2 channels"),
    ((8, -1), r"mask_groups must be positive channel counts .*got \[8, -1\]"),
    ((7, 0), r"mask_groups must be positive channel counts .*got \[7, 0\]"),
    ((), r"mask_groups must name at least one group, got \[\]"),
]


@pytest.mark.parametrize("mask_groups, message", ERRORS, ids=["sum", "map_count", "negative", "zero", "empty"])
def test_bad_groups_are_clear_errors(backend, mask_groups, message):
    x, maps, w, b = _case(7, (3, 4), "random", device=backend.device)
    with pytest.raises(RuntimeError, match=message):
        backend.ops.partial_conv2d(x, maps, w, b, *_args(2), list(mask_groups))
    if mask_groups and mask_groups != (3, 2, 2):
        with pytest.raises(RuntimeError, match=message):  # checked without a mask too
            backend.ops.partial_conv2d(x, None, w, b, *_args(2), list(mask_groups))
    with pytest.raises(RuntimeError, match="mask_groups"):
        backend.ops.mask_update(maps, [3, 3], [1, 1], [1, 1], [1, 1], True,
                                list(mask_groups) if mask_groups != (3, 3) else [3, 3, 1])


def test_groups_need_multi_channel_and_ints(main_backend):
    x, maps, w, b = _case(7, (3, 4), "random", device=main_backend.device)
    with pytest.raises(RuntimeError, match=r"mask_groups=\[3, 4\] describes a multi-channel mask by channel groups; "
                                           r"pass multi_channel=True"):
        pconv_cuda.partial_conv2d(x, maps, w, b, padding=1, mask_groups=(3, 4))
    with pytest.raises(TypeError, match="mask_groups must be a sequence of ints"):
        pconv_cuda.partial_conv2d(x, maps, w, b, padding=1, multi_channel=True, mask_groups=(3.0, 4))
    with pytest.raises(TypeError, match="mask_groups must be a sequence of ints"):
        pconv_cuda.partial_conv2d(x, maps, w, b, padding=1, multi_channel=True, mask_groups=7)
    # A multi-channel mask of the wrong channel count names mask_groups as the way to pass groups.
    with pytest.raises(RuntimeError, match="one channel per input channel .*or pass mask_groups"):
        pconv_cuda.partial_conv2d(x, maps, w, b, padding=1, multi_channel=True)


# --- ONNX (the lowering: a weighted ones-Conv for S, a Gather of each channel's map for X*M) -------------------------

@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("mask_groups", [(2, 3), (5,), (1, 1, 1, 1, 1)], ids=["two", "one", "per_channel"])
def test_onnx_export_matches_the_op(mask_groups, dynamo, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    import pconv_cuda.onnx as pconv_onnx

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = pconv_cuda.PartialConv2d(5, 6, 3, padding=1, multi_channel=True, return_mask=True)

        def forward(self, x, m):
            out, upd = self.conv(x, m, mask_groups=mask_groups)
            ratio, upd2 = pconv_cuda.mask_update(m, 3, padding=1, multi_channel=True, mask_groups=mask_groups)
            return out, upd, ratio, upd2

    torch.manual_seed(0)
    layer = Layer().eval()

    def inputs(n, seed):
        gen = torch.Generator().manual_seed(seed)
        maps = (torch.rand(n, len(mask_groups), 12, 11, generator=gen) > 0.4).float()
        maps[0, :, :4, :4] = 0  # S = 0 there
        x = torch.randn(n, 5, 12, 11, generator=gen)
        return x.masked_fill(expand(maps, mask_groups) == 0, float("nan")), maps  # holes are exact holes

    path = tmp_path / "grouped.onnx"
    pconv_onnx.export(layer, inputs(2, 1), str(path), dynamo=dynamo, **({"external_data": False} if dynamo else {}))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (2, 3):
        args = inputs(n, 10 + n)
        got = [torch.from_numpy(o) for o in session.run(None, {i.name: t.numpy() for i, t in
                                                                zip(session.get_inputs(), args)})]
        with torch.no_grad():
            want = layer(*args)
            want_expanded = layer.conv(args[0], expand(args[1], mask_groups))
        # The convolution is onnxruntime's (another summation order): tests/test_onnx.py's tolerances. The mask path
        # sums 0/1 values: exact.
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(got[0], want_expanded[0], rtol=1e-5, atol=1e-4)
        assert torch.isfinite(got[0]).all()
        for g, w in zip(got[1:], want[1:]):
            torch.testing.assert_close(g, w.contiguous(), rtol=0, atol=0)
