"""Property-based: random shapes and hyper-parameters against the reference (forward, mask and gradients)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pconv_cuda
from pconv_cuda import reference
from helpers import BACKENDS, emu_unavailable, peer


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
    x, m, w, b, args, g = make_case(cfg)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    ws = [w.clone().requires_grad_(True) for _ in range(2)]
    bs = [None if b is None else b.clone().requires_grad_(True) for _ in range(2)]
    out, upd = pconv_cuda.partial_conv2d(xs[0], m, ws[0], bs[0], *args)
    rout, rupd = reference.partial_conv2d(xs[1], m, ws[1], bs[1], *args)
    # float64, and the reference's +1e-8 on S >= 0.1: a relative deviation below 1e-7.
    torch.testing.assert_close(out, rout, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(upd.expand(rupd.shape[0], 1, -1, -1), rupd[:, :1], rtol=0, atol=0)
    grad = torch.randn(out.shape, generator=g, dtype=x.dtype)
    out.backward(grad)
    rout.backward(grad)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ws[0].grad, ws[1].grad, rtol=1e-6, atol=1e-6)
    if b is not None:
        torch.testing.assert_close(bs[0].grad, bs[1].grad, rtol=1e-6, atol=1e-6)
    # The epsilon-free oracle has the op's exact semantics: only the summation order differs, 1e-10.
    check_against_oracle(pconv_cuda.partial_conv2d, x, m, w, b, args, grad, (out, upd, xs[0].grad, ws[0].grad,
                                                                             None if b is None else bs[0].grad))


def make_case(cfg):
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
    return x, m, w, b, args, g


def check_against_oracle(op, x, m, w, b, args, grad, got=None):
    """Compares op's (output, updated mask) and gradients for `grad` with the float64 peer at 1e-10."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w)] + (
        [] if b is None else [b.detach().clone().requires_grad_(True)])
    p_out, p_upd = peer.peer_partial_conv2d(leaves[0], m, leaves[1], leaves[2] if b is not None else None, *args)
    p_grads = torch.autograd.grad(p_out, leaves, grad)
    if got is None:
        ls = [t.detach().clone().requires_grad_(True) for t in (x, w)] + (
            [] if b is None else [b.detach().clone().requires_grad_(True)])
        out, upd = op(ls[0], m, ls[1], ls[2] if b is not None else None, *args)
        got = (out, upd, *torch.autograd.grad(out, ls, grad)) + ((None,) if b is None else ())
    out, upd, gx, gw, gb = got
    torch.testing.assert_close(out, p_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(upd, p_upd, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, p_grads[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gw, p_grads[1], rtol=1e-10, atol=1e-10)
    if b is not None:
        torch.testing.assert_close(gb, p_grads[2], rtol=1e-10, atol=1e-10)


EMU_BACKENDS = [b for b in BACKENDS if b.ns == "pconv_cuda_emu"]


@pytest.mark.parametrize("backend", EMU_BACKENDS, ids=str)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs())
def test_emulated_cuda_kernels_match_oracle(backend, cfg):
    # The CUDA kernels (under the SIMT emulation, each route forced) on the same random configurations.
    if emu_unavailable():
        pytest.skip(emu_unavailable())
    import os

    saved = os.environ.get("PCONV_CUDA_ROUTE")
    os.environ["PCONV_CUDA_ROUTE"] = backend.cuda_route  # restored below: a hypothesis test cannot use monkeypatch
    try:
        x, m, w, b, args, g = make_case(cfg)
        op = lambda *a: backend.ops.partial_conv2d(*a)[:2]  # noqa: E731
        out_shape = op(x, m, w, b, *args)[0].shape
        check_against_oracle(op, x, m, w, b, args, torch.randn(out_shape, generator=g, dtype=torch.float64))
        assert pconv_cuda.routes.last_route("cuda", _ns=backend.ns) == backend.cuda_route
    finally:
        if saved is None:
            del os.environ["PCONV_CUDA_ROUTE"]
        else:
            os.environ["PCONV_CUDA_ROUTE"] = saved
