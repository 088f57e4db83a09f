"""torch.export round trips and torch.compile with dynamic shapes, for the layer and the U-Net."""
from __future__ import annotations

import io

import pytest
import torch

import pconv_cuda
from helpers import cuda_unavailable


def _devices():
    return ["cpu"] + ([] if cuda_unavailable() else ["cuda"])


def _layer_and_inputs(device, n=2, h=12, w=10, multi=True):
    g = torch.Generator().manual_seed(0)
    layer = pconv_cuda.PartialConv2d(4, 6, 3, padding=1, multi_channel=multi, return_mask=True).to(device).eval()
    x = torch.randn(n, 4, h, w, generator=g).to(device)
    m = (torch.rand(n, 4 if multi else 1, h, w, generator=g) > 0.3).float().to(device)
    return layer, x, m


@pytest.mark.parametrize("device", _devices())
def test_export_round_trip_of_the_layer(device):
    layer, x, m = _layer_and_inputs(device)
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(layer, (x, m), dynamic_shapes=({0: batch}, {0: batch}))
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf)
    for n in (2, 5):  # the exported batch and another one
        _, xn, mn = _layer_and_inputs(device, n=n)
        got = loaded.module()(xn, mn)
        want = layer(xn, mn)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("device", _devices())
def test_export_round_trip_of_the_unet(device):
    from pconv_cuda.inpainting import PConvUNet

    model = PConvUNet(layer_size=4, base_channels=8).to(device).eval()
    g = torch.Generator().manual_seed(1)
    image = torch.rand(2, 3, 64, 64, generator=g).to(device)
    mask = (torch.rand(2, 3, 64, 64, generator=g) > 0.25).float().to(device)
    ep = torch.export.export(model, (image, mask))
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    got = torch.export.load(buf).module()(image, mask)
    want = model(image, mask)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("device", _devices())
def test_compile_fullgraph_with_dynamic_batch_and_size(device):
    layer, x, m = _layer_and_inputs(device)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for n, h, w in ((2, 12, 10), (3, 16, 9), (5, 20, 14)):  # new batch and spatial sizes: no recompilation needed
        _, xn, mn = _layer_and_inputs(device, n=n, h=h, w=w)
        torch._dynamo.mark_dynamic(xn, 0)
        torch._dynamo.mark_dynamic(xn, 2)
        torch._dynamo.mark_dynamic(xn, 3)
        torch._dynamo.mark_dynamic(mn, 0)
        torch._dynamo.mark_dynamic(mn, 2)
        torch._dynamo.mark_dynamic(mn, 3)
        xn.requires_grad_(True)
        out, upd = compiled(xn, mn)
        want, want_upd = layer(xn, mn)
        torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(upd, want_upd, rtol=0, atol=0)
        g1, = torch.autograd.grad(out.sum(), xn)
        g2, = torch.autograd.grad(want.sum(), xn)
        torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-6)
