"""masked_cat and input_masked: a skip link's concatenation written already masked (X*M of the inputs' channel
concatenation, in one pass), and the partial convolution that takes its input as X*M (reads the mask only for the
ratio map; its grad_input is the convolution's, masked_cat's backward zeroes the holes).

Against the unfused forms on every backend: masked_cat against torch.cat + the hole select (bitwise: the same
select), its gradients, gradcheck and gradgradcheck, opcheck; masked_cat -> partial_conv(input_masked=True) against
partial_conv on the concatenation (outputs, maps and every gradient: bitwise on the CPU, where the convolution
reads the same X*M), the Function path, torch.compile, ONNX, 3-D, channels_last, half types, the errors.
"""
from __future__ import annotations

from typing import Sequence

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import pconv_cuda
from helpers import nondet_tol

# (name, channels of each input, mask_groups (None: the mask has 1 map, or one per channel), mask kind)
CASES = [
    ("one_map", (3, 4), None, "holes"),
    ("per_channel", (2, 3), "per_channel", "random"),
    ("groups_are_inputs", (3, 5), (3, 5), "holes"),
    ("groups_span_inputs", (3, 4, 2), (2, 5, 2), "random"),  # map 1 covers the end of inputs[0] and all of [1]
    ("soft", (2, 4), (2, 4), "soft"),
    ("many_groups", (20, 20), (2,) * 20, "random"),  # 20 maps, 10 per input
    # 20 maps on inputs[0]: past the CUDA kernels' 16, which expand them to one per channel first
    ("many_groups_in_one_input", (40, 3), (2,) * 20 + (3,), "random"),
]
CASE_IDS = [c[0] for c in CASES]


def _groups(channels: Sequence[int], mask_groups):
    if mask_groups == "per_channel":
        return None, sum(channels)
    return mask_groups, (1 if mask_groups is None else len(mask_groups))


def _expand(maps: torch.Tensor, mask_groups, channels: int) -> torch.Tensor:
    if maps.shape[1] == 1:
        return maps.expand(-1, channels, *maps.shape[2:]).contiguous()
    if mask_groups is None:
        return maps
    return maps.repeat_interleave(torch.tensor(mask_groups, device=maps.device), dim=1).contiguous()


def _case(channels, mask_groups, kind, dims=2, device="cpu", n=2, mask_batch=None, seed=0):
    """(inputs with NaN in their holes, maps, mask_groups, the expanded C-channel mask)."""
    gen = torch.Generator().manual_seed(seed)
    spatial = (4, 7, 6) if dims == 3 else (9, 8)
    groups, g = _groups(channels, mask_groups)
    if kind == "soft":
        maps = torch.rand(mask_batch or n, g, *spatial, generator=gen, dtype=torch.float64) * 0.6
        maps = maps * (maps > 0.15)
    else:
        maps = (torch.rand(mask_batch or n, g, *spatial, generator=gen) > 0.35).to(torch.float64)
        if kind == "holes":
            maps[(Ellipsis, *(slice(1, 6) for _ in spatial))] = 0
    full = _expand(maps, groups, sum(channels))
    xs = torch.randn(n, sum(channels), *spatial, generator=gen, dtype=torch.float64)
    xs = xs.masked_fill(full.expand_as(xs) == 0, float("nan"))  # never read: holes are exact
    inputs = list(xs.split(list(channels), dim=1))
    return [t.contiguous().to(device) for t in inputs], maps.to(device), groups, full.to(device)


def _reference(inputs, full):
    x = torch.cat(inputs, dim=1)
    m = full.to(x.dtype)
    return torch.where(m == 0, torch.zeros((), dtype=x.dtype), x * m)


def _fmt(dims):
    return torch.channels_last_3d if dims == 3 else torch.channels_last


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dims", [2, 3], ids=["2d", "3d"])
@pytest.mark.parametrize("name, channels, mask_groups, kind", CASES, ids=CASE_IDS)
def test_masked_cat_equals_cat_then_select(backend, name, channels, mask_groups, kind, dims, layout):
    inputs, maps, groups, full = _case(channels, mask_groups, kind, dims, backend.device)
    if layout == "channels_last":
        inputs = [t.contiguous(memory_format=_fmt(dims)) for t in inputs]
        maps = maps.contiguous(memory_format=_fmt(dims))
    inputs = [t.requires_grad_() for t in inputs]
    got = backend.ops.masked_cat(inputs, maps, groups)
    want = _reference(inputs, full)
    assert got.shape == want.shape
    if layout == "channels_last":
        assert got.is_contiguous(memory_format=_fmt(dims))
    assert torch.equal(got, want)  # one select per element, in the same dtype: bitwise everywhere
    assert torch.isfinite(got).all()
    g = torch.randn_like(got)
    got_g = torch.autograd.grad(got, inputs, g)
    want_g = torch.autograd.grad(want, inputs, g)
    for i, (a, e) in enumerate(zip(got_g, want_g)):
        assert torch.equal(a, e), f"grad of inputs[{i}]"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mask_dtype", ["same", torch.bool, torch.uint8])
def test_masked_cat_dtypes_and_batch_one_mask(backend, dtype, mask_dtype):
    inputs, maps, groups, full = _case((3, 5), (2, 6), "holes", device=backend.device, n=3, mask_batch=1)
    inputs = [t.to(dtype) for t in inputs]
    maps = maps.to(dtype if mask_dtype == "same" else mask_dtype)
    got = backend.ops.masked_cat(inputs, maps, groups)
    assert got.dtype == dtype and got.shape == (3, 8, 9, 8)
    assert torch.equal(got, _reference(inputs, full.to(dtype)))


@pytest.mark.parametrize("name, channels, mask_groups, kind", [CASES[3], CASES[4]], ids=[CASES[3][0], CASES[4][0]])
def test_masked_cat_gradcheck_and_gradgradcheck(backend, name, channels, mask_groups, kind):
    inputs, maps, groups, _ = _case(channels, mask_groups, kind, device=backend.device, n=1)
    inputs = [t.nan_to_num(0.0).requires_grad_() for t in inputs]
    fn = lambda *xs: backend.ops.masked_cat(list(xs), maps, groups)  # noqa: E731
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(backend, layout):
    inputs, maps, groups, full = _case((3, 4), (2, 5), "holes", device=backend.device)
    inputs = [t.nan_to_num(0.0) for t in inputs]
    if layout == "channels_last":
        inputs = [t.contiguous(memory_format=torch.channels_last) for t in inputs]
        maps = maps.contiguous(memory_format=torch.channels_last)
    inputs = [t.requires_grad_() for t in inputs]
    torch.library.opcheck(backend.ops.masked_cat.default, (inputs, maps, list(groups)))
    xm = backend.ops.masked_cat(inputs, maps, groups).detach().requires_grad_()
    w = torch.randn(4, 7, 3, 3, dtype=torch.float64, device=backend.device, requires_grad=True)
    args = (xm, maps, w, None, [1, 1], [1, 1], [1, 1], 1, True, list(groups), True)
    torch.library.opcheck(backend.ops.partial_conv2d.default, args)
    out, upd, ratio, masked_input = backend.ops.partial_conv2d(*args)
    assert masked_input.numel() == 0  # the input is X*M: nothing formed, nothing returned
    torch.library.opcheck(backend.ops._partial_conv2d_backward.default,
                          (torch.randn_like(out), xm.detach(), maps, w.detach(), ratio, upd, [1, 1], [1, 1], [1, 1],
                           1, True, [True, True, False], list(groups), True))


def _conv(backend, dims, x, maps, w, b, groups, input_masked=False):
    op = getattr(backend.ops, f"partial_conv{dims}d")
    one = [1] * dims
    return op(x, maps, w, b, one, one, one, 1, True, groups, input_masked)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dims", [2, 3], ids=["2d", "3d"])
@pytest.mark.parametrize("name, channels, mask_groups, kind", CASES[:5], ids=CASE_IDS[:5])
def test_masked_cat_then_input_masked_conv_equals_the_conv(backend, deterministic, name, channels, mask_groups,
                                                           kind, dims, layout):
    # masked_cat -> conv(input_masked=True) is the conv of the concatenation: the same X*M convolved, the same
    # ratio, and grad_input M * conv_transpose(G) either way.
    inputs, maps, groups, full = _case(channels, mask_groups, kind, dims, backend.device)
    if layout == "channels_last":
        inputs = [t.contiguous(memory_format=_fmt(dims)) for t in inputs]
        maps = maps.contiguous(memory_format=_fmt(dims))
    gen = torch.Generator().manual_seed(1)
    c = sum(channels)
    conv_groups = (c,) if maps.shape[1] == 1 else groups  # the conv takes one map for all as one group
    w = (torch.randn(5, c, *(3,) * dims, generator=gen, dtype=torch.float64) * 0.3).to(backend.device)
    b = torch.randn(5, generator=gen, dtype=torch.float64).to(backend.device)
    res = []
    for fused in (True, False):
        xs = [t.clone().requires_grad_() for t in inputs]
        wr, br = w.clone().requires_grad_(), b.clone().requires_grad_()
        if fused:
            outs = _conv(backend, dims, backend.ops.masked_cat(xs, maps, groups), maps, wr, br, conv_groups, True)
        else:
            outs = _conv(backend, dims, torch.cat(xs, dim=1), maps, wr, br, conv_groups)
        res.append((outs, torch.autograd.grad(outs[0], (*xs, wr, br), torch.ones_like(outs[0]))))
    (got, got_g), (want, want_g) = res
    exact = backend.device == "cpu"
    for what, a, e in zip(("output", "updated_mask", "ratio"), got[:3], want[:3]):
        if exact:
            assert torch.equal(a, e), what
        else:
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12, msg=lambda m: f"{what}: {m}")
    assert torch.isfinite(got[0]).all()
    for i, (a, e) in enumerate(zip(got_g, want_g)):
        if exact:
            assert torch.equal(a, e), f"gradient {i}"
        else:
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12, msg=lambda m: f"gradient {i}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_composition_in_half_types(backend, deterministic, dtype):
    # fp16/bf16 run the tensor-core gemm route on cuda_emu-gemm, whose backward (mma_dgrad_kernel) applies M to its
    # accumulator, or not at all with input_masked; for a binary mask M * v is v or 0 either way: equal results.
    inputs, maps, groups, _ = _case((3, 5), (3, 5), "holes", device=backend.device)
    inputs, maps = [t.to(dtype) for t in inputs], maps.to(dtype)
    w = (torch.randn(8, 8, 3, 3, generator=torch.Generator().manual_seed(2)) * 0.3).to(backend.device, dtype)
    res = []
    for fused in (True, False):
        xs = [t.clone().requires_grad_() for t in inputs]
        wr = w.clone().requires_grad_()
        x_in = backend.ops.masked_cat(xs, maps, groups) if fused else torch.cat(xs, 1)
        outs = _conv(backend, 2, x_in, maps, wr, None, groups, fused)
        res.append((outs[0], *torch.autograd.grad(outs[0], (*xs, wr), torch.ones_like(outs[0]))))
    for i, (a, e) in enumerate(zip(*res)):
        if backend.device == "cpu":
            assert torch.equal(a, e), f"result {i}"
        else:
            torch.testing.assert_close(a, e, msg=lambda m: f"result {i}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mask_dtype", ["same", torch.bool, torch.uint8])
@pytest.mark.parametrize("n", [2, 0], ids=["batch2", "batch0"])
def test_input_masked_takes_every_mask_dtype(backend, dtype, mask_dtype, n):
    # With input_masked (and in an empty batch) the mask pass has no input to take its dtype from: it forms the
    # plane alone, in the ratio's precision (float64 beside a float64 input), for bool and uint8 masks too.
    inputs, maps, groups, full = _case((3, 4), (3, 4), "holes", device=backend.device, n=2)
    x = torch.cat(inputs, 1).nan_to_num(0.0).mul(full)[:n].to(dtype)
    maps = maps.to(dtype if mask_dtype == "same" else mask_dtype)
    w = (torch.randn(4, 7, 3, 3, generator=torch.Generator().manual_seed(3)) * 0.3).to(backend.device, dtype)
    maps = maps[:max(n, 1)]  # an empty batch takes a batch-1 mask
    got = _conv(backend, 2, x, maps, w, None, groups, True)
    want = _conv(backend, 2, x, maps, w, None, groups)
    assert got[0].dtype == dtype and got[0].shape == (n, 4, 9, 8)
    for what, a, e in zip(("output", "updated_mask", "ratio"), got[:3], want[:3]):
        assert torch.equal(a, e), what  # the same X*M, plane and ratio either way


def test_input_masked_gradient_is_the_convolutions(backend):
    # The op alone with input_masked: its grad_input is not zeroed in the holes (the producer's backward does it),
    # and the weight gradient reads the input as given.
    inputs, maps, groups, full = _case((3, 4), (3, 4), "holes", device=backend.device, n=1)
    xm = torch.cat(inputs, 1).nan_to_num(0.0) * full
    w = torch.randn(4, 7, 3, 3, dtype=torch.float64, device=backend.device)
    xr, wr = xm.clone().requires_grad_(), w.clone().requires_grad_()
    out = _conv(backend, 2, xr, maps, wr, None, groups, True)[0]
    gx, gw = torch.autograd.grad(out, (xr, wr), torch.ones_like(out))
    ratio = _conv(backend, 2, xm, maps, w, None, groups)[2]
    g = torch.ones_like(out) * ratio
    want_x, want_w, _ = torch.ops.aten.convolution_backward(g, xm, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                                            [True, True, False])
    torch.testing.assert_close(gx, want_x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, want_w, rtol=1e-12, atol=1e-12)
    assert (gx[full.expand_as(gx) == 0] != 0).any()  # holes near valid pixels get the convolution's gradient
    x = xm.clone().requires_grad_()
    assert gradcheck(lambda x: _conv(backend, 2, x, maps, w, None, groups, True)[0], (x,),
                     nondet_tol=nondet_tol(backend.device))
    assert gradgradcheck(lambda x, w: _conv(backend, 2, x, maps, w, None, groups, True)[0],
                         (x, w.clone().requires_grad_()), nondet_tol=nondet_tol(backend.device))


def test_public_api_paths(main_backend):
    # functional + module, PartialConv2dFunction (the torch.func / compile path) and torch.func's vjp: all equal
    # the conv of the concatenation.
    device = main_backend.device
    inputs, maps, groups, full = _case((4, 3), (4, 3), "holes", device=device)
    layer = pconv_cuda.PartialConv2d(7, 5, 3, padding=1, multi_channel=True, return_mask=True).double().to(device)
    xm = pconv_cuda.masked_cat(inputs, maps, groups)
    out, upd = layer(xm, maps, mask_groups=groups, input_masked=True)
    want, want_upd = layer(torch.cat(inputs, 1), maps, mask_groups=groups)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(upd, want_upd, rtol=0, atol=0)
    f_out, _ = pconv_cuda.partial_conv2d(xm, maps, layer.weight, layer.bias, padding=1, multi_channel=True,
                                         mask_groups=groups, input_masked=True)
    torch.testing.assert_close(f_out, want, rtol=0, atol=0)
    res = []
    for fused in (True, False):
        xs = [t.nan_to_num(0.0).requires_grad_() for t in inputs]
        w = layer.weight.detach().clone().requires_grad_()
        if fused:
            x_in = pconv_cuda.masked_cat(xs, maps, groups)
            y = pconv_cuda.PartialConv2dFunction.apply(x_in, maps, w, None, (1, 1), (1, 1), (1, 1), 1, True, groups,
                                                       True)[0]
        else:
            y = pconv_cuda.PartialConv2dFunction.apply(torch.cat(xs, 1), maps, w, None, (1, 1), (1, 1), (1, 1), 1,
                                                       True, groups)[0]
        grads = torch.autograd.grad(y.pow(2).sum(), (*xs, w), create_graph=True)
        second = torch.autograd.grad(sum(g.pow(2).sum() for g in grads), (*xs, w))
        res.append((y, *grads, *second))
    for i, (a, e) in enumerate(zip(*res)):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12, msg=lambda m: f"Function result {i}: {m}")

    def fused(*xs):
        return pconv_cuda.partial_conv2d(pconv_cuda.masked_cat(list(xs), maps, groups), maps, layer.weight, None,
                                         padding=1, multi_channel=True, mask_groups=groups, input_masked=True)[0]

    def unfused(*xs):
        return pconv_cuda.partial_conv2d(torch.cat(xs, 1), maps, layer.weight, None, padding=1, multi_channel=True,
                                         mask_groups=groups)[0]

    xs = [t.nan_to_num(0.0) for t in inputs]
    (y1, vjp1), (y2, vjp2) = torch.func.vjp(fused, *xs), torch.func.vjp(unfused, *xs)
    g = torch.randn_like(y1)
    torch.testing.assert_close(y1, y2, rtol=1e-12, atol=1e-12)
    for a, e in zip(vjp1(g), vjp2(g)):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_torch_compile_fullgraph(main_backend):
    device = main_backend.device
    layer = pconv_cuda.PartialConv2d(5, 6, 3, padding=1, multi_channel=True, return_mask=True).to(device)
    a = torch.randn(2, 2, 9, 8, device=device, requires_grad=True)
    c = torch.randn(2, 3, 9, 8, device=device, requires_grad=True)
    maps = (torch.rand(2, 2, 9, 8, device=device) > 0.3).float()

    def fn(a, c, m):
        return layer(pconv_cuda.masked_cat([a, c], m, (2, 3)), m, mask_groups=(2, 3), input_masked=True)

    out, upd = torch.compile(fn, fullgraph=True, backend="aot_eager")(a, c, maps)
    want, want_upd = fn(a, c, maps)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(upd, want_upd)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), (a, c)), torch.autograd.grad(want.sum(), (a, c)))


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("direct", [False, True], ids=["functional", "op"])
def test_onnx_export_matches_the_op(dynamo, direct, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    import pconv_cuda.onnx

    class Skip(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = pconv_cuda.PartialConv2d(5, 4, 3, padding=1, multi_channel=True, return_mask=True)

        def forward(self, a, c, m):
            xm = (torch.ops.pconv_cuda.masked_cat([a, c], m, [2, 3]) if direct
                  else pconv_cuda.masked_cat([a, c], m, (2, 3)))
            return self.conv(xm, m, mask_groups=(2, 3), input_masked=True)

    torch.manual_seed(0)
    model = Skip().eval()
    a, c = torch.randn(2, 2, 16, 16), torch.randn(2, 3, 16, 16)
    m = (torch.rand(2, 2, 16, 16) > 0.3).float()
    path = tmp_path / "skip.onnx"
    pconv_cuda.onnx.export(model, (a, c, m), str(path), dynamo=dynamo)  # (direct op calls need its table)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    a3, c3 = torch.randn(3, 2, 16, 16), torch.randn(3, 3, 16, 16)
    m3 = (torch.rand(3, 2, 16, 16) > 0.3).float()
    a3[:, :, :4] = float("nan")  # holes of map 0 hold NaN: never read
    m3[:, 0, :4] = 0
    names = [i.name for i in sess.get_inputs()]
    got = sess.run(None, dict(zip(names, (a3.numpy(), c3.numpy(), m3.numpy()))))
    with torch.no_grad():
        want = model(a3, c3, m3)
    torch.testing.assert_close(torch.from_numpy(got[0]), want[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.from_numpy(got[1]), want[1], rtol=0, atol=0)


ERRORS = [
    (lambda x, m: ([], m, None), "inputs must hold at least one tensor"),
    (lambda x, m: ([x, x[:, :, :4]], m, None), r"inputs\[1\] of shape .* must match inputs\[0\]"),
    (lambda x, m: ([x, x.float()], m, None), r"inputs\[1\] dtype Float does not match"),
    (lambda x, m: ([x, x], m[:, :, :4], None), "mask spatial size"),
    (lambda x, m: ([x, x], m.float(), None), "mask dtype must be the inputs' dtype"),
    (lambda x, m: ([x, x], m.repeat(1, 2, 1, 1), [3, 4]), r"must sum to the inputs' channels C=6, got 7"),
    (lambda x, m: ([x, x], m.repeat(1, 3, 1, 1), [3, 3]), r"names 2 group\(s\), so the mask must have one map"),
    (lambda x, m: ([x, x], m.repeat(1, 3, 1, 1), None),
     r"mask must have 1 map \(for every channel\) or one per channel of the inputs \(C=6\), got 3"),
    (lambda x, m: ([x], m.repeat(3, 1, 1, 1), None), "mask batch size 6 must be 1 or the inputs' batch size 2"),
]


@pytest.mark.parametrize("make, message", ERRORS, ids=[str(i) for i in range(len(ERRORS))])
def test_bad_masked_cat_arguments_are_clear_errors(backend, make, message):
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, device=backend.device)
    m = torch.ones(2, 1, 6, 6, dtype=torch.float64, device=backend.device)
    with pytest.raises(RuntimeError, match=message):
        backend.ops.masked_cat(*make(x, m))


def test_bad_mask_values_and_input_masked_without_mask(main_backend):
    device = main_backend.device
    x = torch.randn(1, 3, 6, 6, device=device)
    if device == "cpu":  # (CUDA cannot raise without a host sync: the conv's plane is NaN there)
        with pytest.raises(RuntimeError, match=r"mask values must lie in \[0, 1\]"):
            pconv_cuda.masked_cat([x], torch.full((1, 1, 6, 6), 2.0, device=device))
    with pytest.raises(TypeError, match="inputs must be a list or tuple of tensors"):
        pconv_cuda.masked_cat(x, torch.ones(1, 1, 6, 6, device=device))
    w = torch.randn(2, 3, 3, 3, device=device)
    with pytest.raises(RuntimeError, match="input_masked=True says the input is X\\*M for a mask, but mask is None"):
        pconv_cuda.partial_conv2d(x, None, w, input_masked=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cudnn_fused_route_takes_the_masked_input(dtype, monkeypatch):
    # The cudnn_fused route (its model under the emulation; cuDNN's graph on a GPU) convolves masked_cat's output
    # as it is: the route runs, and equals its result on the concatenation.
    from helpers import FUSED_BACKENDS, cuda_unavailable, emu_unavailable, use_backend
    from pconv_cuda import routes

    for backend in FUSED_BACKENDS:
        if (backend.device == "cuda" and (cuda_unavailable() or routes.cudnn_fused_status())) or \
                (backend.ns == "pconv_cuda_emu" and emu_unavailable()):
            continue
        use_backend(backend, monkeypatch)
        inputs, maps, groups, _ = _case((4, 4), (4, 4), "holes", device=backend.device)
        inputs = [t.to(dtype).contiguous(memory_format=torch.channels_last) for t in inputs]
        maps = maps.to(dtype).contiguous(memory_format=torch.channels_last)
        w = (torch.randn(8, 8, 3, 3, generator=torch.Generator().manual_seed(3)) * 0.3).to(backend.device, dtype)
        b = torch.randn(8, generator=torch.Generator().manual_seed(4)).to(backend.device, dtype)
        got = _conv(backend, 2, backend.ops.masked_cat(inputs, maps, groups), maps, w, b, groups, True)
        assert routes.last_route(_ns=backend.ns) == "cudnn_fused", backend
        want = _conv(backend, 2, torch.cat(inputs, 1), maps, w, b, groups)
        assert routes.last_route(_ns=backend.ns) == "cudnn_fused", backend
        assert torch.isfinite(got[0]).all()
        for a, e in zip(got[:3], want[:3]):
            torch.testing.assert_close(a, e, rtol=0, atol=0)  # the same X*M through the same graph


def test_traced_form_checks_shapes_and_keeps_the_mask_gradient_free(main_backend):
    # What torch.compile and torch.func run (ops.masked_cat_as_torch_ops): the op's shape errors, and no gradient
    # for the mask, as the op.
    from pconv_cuda import ops

    device = main_backend.device
    a, c = torch.randn(1, 2, 5, 5, device=device), torch.randn(1, 3, 5, 5, device=device)
    m = (torch.rand(1, 2, 5, 5, device=device) > 0.3).float().requires_grad_()
    with pytest.raises(RuntimeError, match="one per map of the mask"):
        ops.masked_cat_as_torch_ops([a, c], m, (1, 3))
    with pytest.raises(RuntimeError, match=r"1 map \(for every channel\) or one per channel"):
        ops.masked_cat_as_torch_ops([a, c], m, None)
    out = ops.masked_cat_as_torch_ops([a, c], m, (2, 3))
    assert not out.requires_grad
    torch.testing.assert_close(out, torch.ops.pconv_cuda.masked_cat([a, c], m.detach(), [2, 3]), rtol=0, atol=0)
