"""The benchmark's pure-PyTorch peer (benchmarks/peer.py) has exactly the op's semantics.

bench.py times the peer against the fused op; the comparison only means something if both compute the same thing.
In float64 the two agree to rounding (1e-10), outputs, updated masks and gradients, over the shared samples
(helpers.SAMPLES: single/multi-channel, stride 2, mask None, batch-1 mask, soft masks, groups, no bias, ...).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import pconv_cuda
from helpers import SAMPLES, Sample, conv_args, make_inputs

ROOT = Path(__file__).resolve().parents[1]


def _load_peer():
    spec = importlib.util.spec_from_file_location("bench_peer", ROOT / "benchmarks" / "peer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


peer = _load_peer()

# The cases the peer must cover, by name in helpers.SAMPLES; the test fails if one goes missing there.
REQUIRED = ["k3", "multi", "k5_s2_p3", "mask_none", "mask_none_multi", "mask_batch1", "soft", "soft_multi",
            "groups2", "groups4_multi", "no_bias", "no_bias_soft", "holes", "zeros"]


def test_required_samples_exist():
    names = {s.name for s in SAMPLES}
    assert not [n for n in REQUIRED if n not in names]


@pytest.mark.parametrize("s", SAMPLES, ids=str)
def test_peer_matches_op_float64(s: Sample):
    x, m, w, b = make_inputs(s, torch.float64, requires_grad=True)
    out, upd = pconv_cuda.partial_conv2d(x, m, w, b, *conv_args(s))
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(out, [t for t in (x, w, b) if t is not None], g)

    p_out, p_upd = peer.peer_partial_conv2d(x, m, w, b, *conv_args(s))
    p_grads = torch.autograd.grad(p_out, [t for t in (x, w, b) if t is not None], g)

    assert p_out.shape == out.shape and p_out.dtype == out.dtype
    assert p_upd.shape == upd.shape and p_upd.dtype == upd.dtype
    torch.testing.assert_close(p_out, out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(p_upd, upd, rtol=1e-10, atol=1e-10)
    for pg, og in zip(p_grads, grads):
        torch.testing.assert_close(pg, og, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, dict(rtol=1e-4, atol=1e-4)),
                                        (torch.bfloat16, dict(rtol=4e-2, atol=8e-2))], ids=str)
@pytest.mark.parametrize("name", ["k3", "multi", "soft", "mask_none"])
def test_peer_dtypes(name, dtype, tol):
    s = next(s for s in SAMPLES if s.name == name)
    x, m, w, b = make_inputs(s, dtype)
    out, upd = pconv_cuda.partial_conv2d(x, m, w, b, *conv_args(s))
    p_out, p_upd = peer.peer_partial_conv2d(x, m, w, b, *conv_args(s))
    assert p_out.dtype == dtype and p_upd.dtype == dtype
    assert torch.isfinite(p_out).all()
    torch.testing.assert_close(p_out, out, **tol)
    torch.testing.assert_close(p_upd, upd, **tol)


def test_peer_mask_gets_no_gradient():
    s = next(s for s in SAMPLES if s.name == "soft")
    x, m, w, b = make_inputs(s, torch.float64, requires_grad=True)
    m.requires_grad_(True)
    out, upd = peer.peer_partial_conv2d(x, m, w, b, *conv_args(s))
    assert not upd.requires_grad
    out.sum().backward()
    assert m.grad is None
