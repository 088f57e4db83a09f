"""Property-based: random shapes and hyper-parameters against the reference (forward, mask and gradients)."""
from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pconv_cuda
from pconv_cuda import reference


@st.composite
def configs(draw):
    groups = draw(st.sampled_from([1, 2, 3]))
    c_in = groups * draw(st.integers(1, 3))
    c_out = groups * draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    dh, dw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ph, pw = draw(st.integers(0, 3)), draw(st.integers(0, 3))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    # Inputs at least as large as the dilated kernel minus the padding, so the output is not empty.
    h_min = max(1, dh * (kh - 1) + 1 - 2 * ph)
    w_min = max(1, dw * (kw - 1) + 1 - 2 * pw)
    h = draw(st.integers(h_min, max(h_min, 12)))
    w = draw(st.integers(w_min, max(w_min, 12)))
    n = draw(st.integers(1, 3))
    multi = draw(st.booleans())
    mask_kind = draw(st.sampled_from(["binary", "soft", "none"]))
    mask_batch = draw(st.sampled_from([1, n]))
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(n=n, c_in=c_in, c_out=c_out, h=h, w=w, k=(kh, kw), s=(sh, sw), p=(ph, pw), d=(dh, dw),
                groups=groups, multi=multi, mask_kind=mask_kind, mask_batch=mask_batch, bias=bias, seed=seed)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_matches_reference(cfg):
    g = torch.Generator().manual_seed(cfg["seed"])
    dt = torch.float64
    x = torch.randn(cfg["n"], cfg["c_in"], cfg["h"], cfg["w"], generator=g, dtype=dt)
    w = torch.randn(cfg["c_out"], cfg["c_in"] // cfg["groups"], *cfg["k"], generator=g, dtype=dt)
    b = torch.randn(cfg["c_out"], generator=g, dtype=dt) if cfg["bias"] else None
    mshape = (cfg["mask_batch"], cfg["c_in"] if cfg["multi"] else 1, cfg["h"], cfg["w"])
    if cfg["mask_kind"] == "none":
        m = None
    elif cfg["mask_kind"] == "binary":
        m = (torch.rand(mshape, generator=g) > 0.4).to(dt)
    else:
        m = torch.rand(mshape, generator=g, dtype=dt)
        m = m * (m > 0.1)  # soft values >= 0.1 and exact zeros: S is 0 or >= 0.1
    args = (cfg["s"], cfg["p"], cfg["d"], cfg["groups"], cfg["multi"])
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    ws = [w.clone().requires_grad_(True) for _ in range(2)]
    bs = [None if b is None else b.clone().requires_grad_(True) for _ in range(2)]
    out, upd = pconv_cuda.partial_conv2d(xs[0], m, ws[0], bs[0], *args)
    rout, rupd = reference.partial_conv2d(xs[1], m, ws[1], bs[1], *args)
    # float64, and the reference's +1e-8 on S >= 0.1: a relative deviation below 1e-7.
    torch.testing.assert_close(out, rout, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(upd.expand(rupd.shape[0], 1, -1, -1), rupd[:, :1], rtol=0, atol=0)
    grad = torch.randn(out.shape, generator=g, dtype=dt)
    out.backward(grad)
    rout.backward(grad)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ws[0].grad, ws[1].grad, rtol=1e-6, atol=1e-6)
    if b is not None:
        torch.testing.assert_close(bs[0].grad, bs[1].grad, rtol=1e-6, atol=1e-6)
