"""PartialConv2d as a drop-in for NVIDIA's layer: parameters, return values, mask shapes, mask_in=None, dtype moves."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import pconv_cuda
from pconv_cuda import reference
from helpers import ROUNDINGS, Sample, assert_rounding_close, oracle, summed_terms


def test_is_a_conv2d_and_loads_conv_state_dicts():
    conv = nn.Conv2d(3, 8, 5, stride=2, padding=2)
    layer = pconv_cuda.PartialConv2d(3, 8, 5, stride=2, padding=2)
    assert isinstance(layer, nn.Conv2d)
    layer.load_state_dict(conv.state_dict())  # strict: same keys, same shapes
    # NVIDIA's layer keeps its ones kernel as a plain attribute: its state_dict is weight and bias, like ours.
    nvidia_like = reference.PartialConv2d(3, 8, 5, stride=2, padding=2)
    assert set(nvidia_like.state_dict()) == set(layer.state_dict()) == {"weight", "bias"}
    layer.load_state_dict(nvidia_like.state_dict())
    x = torch.randn(2, 3, 16, 16)
    m = (torch.rand(2, 1, 16, 16) > 0.3).float()
    torch.testing.assert_close(layer(x, m), nvidia_like(x, m), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("multi", [False, True], ids=["single", "multi"])
def test_return_mask_shapes_match_nvidia(multi):
    layer = pconv_cuda.PartialConv2d(4, 6, 3, padding=1, multi_channel=multi, return_mask=True)
    ref = reference.PartialConv2d(4, 6, 3, padding=1, multi_channel=multi, return_mask=True)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(3, 4, 10, 10)
    for m in (None, (torch.rand(3, 4 if multi else 1, 10, 10) > 0.4).float()):
        out, upd = layer(x, m)
        rout, rupd = ref(x, m)
        assert upd.shape == rupd.shape
        torch.testing.assert_close(out, rout, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(upd, rupd, rtol=0, atol=0)
    assert torch.is_tensor(pconv_cuda.PartialConv2d(4, 6, 3)(x))  # return_mask=False: the output alone


def test_mask_none_follows_every_call_shape():
    # NVIDIA's layer caches the mask of the last call and reuses it when the size matches; ours keeps nothing.
    layer = pconv_cuda.PartialConv2d(2, 3, 3, padding=1, return_mask=True)
    for shape in ((1, 2, 8, 8), (4, 2, 8, 8), (2, 2, 5, 7), (1, 2, 8, 8)):
        x = torch.randn(shape)
        out, upd = layer(x)
        want, want_upd = layer(x, torch.ones(1, 1, *shape[2:]))
        torch.testing.assert_close(out, want, rtol=0, atol=0)
        torch.testing.assert_close(upd, want_upd, rtol=0, atol=0)
    # A holed mask in between does not leak into the next mask_in=None call.
    x = torch.randn(2, 2, 8, 8)
    layer(x, torch.zeros(2, 1, 8, 8))
    out, upd = layer(x)
    assert (upd == 1).all()


def test_mask_batch_broadcast():
    layer = pconv_cuda.PartialConv2d(2, 3, 3, padding=1, return_mask=True)
    x = torch.randn(4, 2, 8, 8)
    m = (torch.rand(1, 1, 8, 8) > 0.5).float()
    out, upd = layer(x, m)
    assert upd.shape == (1, 1, 8, 8)
    want, _ = layer(x, m.expand(4, 1, 8, 8))
    torch.testing.assert_close(out, want, rtol=0, atol=0)


@pytest.mark.parametrize("multi", [False, True], ids=["single", "multi"])
def test_return_mask_shape_with_a_batch1_mask(multi):
    # A batch-1 mask broadcasts over the batch; the updated mask keeps the mask's batch: (1, 1, H', W')
    # single-channel, (1, C_out, H', W') multi-channel, as NVIDIA's layer (its ones-kernel conv of the mask) gives.
    layer = pconv_cuda.PartialConv2d(4, 6, 3, stride=(2, 1), padding=1, multi_channel=multi, return_mask=True)
    ref = reference.PartialConv2d(4, 6, 3, stride=(2, 1), padding=1, multi_channel=multi, return_mask=True)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(3, 4, 10, 9)
    m = (torch.rand(1, 4 if multi else 1, 10, 9, generator=torch.Generator().manual_seed(0)) > 0.4).float()
    out, upd = layer(x, m)
    rout, rupd = ref(x, m)
    assert upd.shape == rupd.shape == ((1, 6, 5, 9) if multi else (1, 1, 5, 9))
    torch.testing.assert_close(upd, rupd, rtol=0, atol=0)
    torch.testing.assert_close(out, rout, rtol=1e-5, atol=1e-5)
    want, want_upd = layer(x, m.expand(3, -1, -1, -1))
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(upd.expand_as(want_upd), want_upd, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_to_dtype(dtype):
    # Each dtype against the float64 oracle fed the values the converted layer holds: float64 to summation order
    # (1e-10), the others within the rounding bound of their own dtype (helpers.ROUNDINGS), not bf16's for all.
    layer = pconv_cuda.PartialConv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    m = (torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)) > 0.3).float()
    layer = layer.to(dtype)
    assert layer.weight.dtype == layer.bias.dtype == dtype
    xd, md = x.to(dtype), m.to(dtype)
    out = layer(xd, md)
    assert out.dtype == dtype
    s = Sample("to", n=2, c_in=3, c_out=4, h=8, w=8)
    want, _, _ = oracle(xd, md, layer.weight, layer.bias, s)
    if dtype == torch.float64:
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    else:
        size, _, _ = oracle(xd, md, layer.weight, layer.bias, s, magnitude=True)
        assert_rounding_close(out, want, size, dtype, ROUNDINGS["output"], summed_terms(s)["output"], "output")


def test_to_meta_device_gives_shapes():
    layer = pconv_cuda.PartialConv2d(3, 4, 3, stride=2, padding=1, multi_channel=True, return_mask=True).to("meta")
    out, upd = layer(torch.empty(2, 3, 9, 9, device="meta"), torch.empty(2, 3, 9, 9, device="meta"))
    assert out.shape == (2, 4, 5, 5) and upd.shape == (2, 4, 5, 5) and out.device.type == "meta"


@pytest.mark.parametrize("kernel, dilation, padding", [((3, 5), (1, 1), (1, 2)), ((1, 3), (1, 1), (0, 1)),
                                                      ((3, 5), (2, 1), (2, 2)), ((5, 3), (1, 3), (2, 3))], ids=str)
def test_padding_same_with_a_rectangular_kernel(kernel, dilation, padding):
    # 'same' pads each axis by dilation * (k - 1) / 2 of its own: the output keeps the input's size, and the values
    # are those of the explicit padding (a swap of the axes changes both).
    x = torch.randn(2, 2, 9, 11)
    m = (torch.rand(2, 1, 9, 11, generator=torch.Generator().manual_seed(0)) > 0.3).float()
    same = pconv_cuda.PartialConv2d(2, 3, kernel, padding="same", dilation=dilation, return_mask=True)
    explicit = pconv_cuda.PartialConv2d(2, 3, kernel, padding=padding, dilation=dilation, return_mask=True)
    explicit.load_state_dict(same.state_dict())
    out, upd = same(x, m)
    want, want_upd = explicit(x, m)
    assert out.shape == (2, 3, 9, 11) and upd.shape == (2, 1, 9, 11)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(upd, want_upd, rtol=0, atol=0)
    fout, fupd = pconv_cuda.partial_conv2d(x, m, same.weight, same.bias, padding="same", dilation=dilation)
    torch.testing.assert_close(fout, want, rtol=0, atol=0)
    ratio, mupd = pconv_cuda.mask_update(m, kernel, padding="same", dilation=dilation)
    want_ratio, _ = pconv_cuda.mask_update(m, kernel, padding=padding, dilation=dilation)
    torch.testing.assert_close(ratio, want_ratio, rtol=0, atol=0)
    torch.testing.assert_close(mupd, want_upd, rtol=0, atol=0)


def test_padding_strings():
    x = torch.randn(1, 2, 9, 9)
    m = (torch.rand(1, 1, 9, 9) > 0.3).float()
    same = pconv_cuda.PartialConv2d(2, 3, 5, padding="same", dilation=2)
    explicit = pconv_cuda.PartialConv2d(2, 3, 5, padding=4, dilation=2)
    explicit.load_state_dict(same.state_dict())
    torch.testing.assert_close(same(x, m), explicit(x, m), rtol=0, atol=0)
    assert pconv_cuda.PartialConv2d(2, 3, 3, padding="valid")(x, m).shape == (1, 3, 7, 7)


def test_extra_repr():
    r = repr(pconv_cuda.PartialConv2d(2, 3, 3, multi_channel=True))
    assert "multi_channel=True" in r and "return_mask=False" in r
