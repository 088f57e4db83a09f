"""PartialConv1d and functional.partial_conv1d: the 2-D ops on a height-1 view, checked against the method's formula
written directly in 1-D (float64, no epsilon), with gradients, and the module's NVIDIA-style contract."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pconv_cuda
from pconv_cuda import functional

# (name, N, C_in, C_out, L, k, stride, padding, dilation, groups, multi_channel, mask kind, mask batch, bias)
CASES = [
    ("k3_p1", 2, 4, 6, 17, 3, 1, 1, 1, 1, False, "random", 2, True),
    ("k5_s2_p2", 2, 3, 5, 20, 5, 2, 2, 1, 1, False, "holes", 1, True),
    ("k3_d2_groups2_multi", 2, 4, 6, 15, 3, 1, 2, 2, 2, True, "random", 2, False),
    ("k7_p3_soft_multi_batch1", 3, 2, 3, 12, 7, 1, 3, 1, 1, True, "soft", 1, True),
    ("mask_none_k3_p0", 2, 3, 4, 9, 3, 1, 0, 1, 1, False, "none", 1, True),
    ("same_k5", 1, 3, 2, 11, 5, 1, "same", 1, 1, False, "random", 1, True),
]


def make(case, device, dtype=torch.float64):
    name, n, c_in, c_out, length, k, stride, padding, dilation, groups, multi, kind, nm, bias = case
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c_in, length, generator=g, dtype=dtype)
    w = torch.randn(c_out, c_in // groups, k, generator=g, dtype=dtype)
    b = torch.randn(c_out, generator=g, dtype=dtype) if bias else None
    shape = (nm, c_in if multi else 1, length)
    m = {"random": lambda: (torch.rand(shape, generator=g) > 0.4).to(dtype),
         "holes": lambda: torch.ones(shape, dtype=dtype).index_fill_(2, torch.arange(3, 9), 0),
         "soft": lambda: torch.rand(shape, generator=g, dtype=dtype),
         "none": lambda: None}[kind]()
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(x), to(m), to(w), to(b), dict(stride=stride, padding=padding, dilation=dilation, groups=groups,
                                            multi_channel=multi)


def oracle(x, m, w, b, stride, padding, dilation, groups, multi_channel):
    """The method in 1-D: S = zero-padded window sum of the mask (over channels too when multi-channel),
    win = k (* C_in), U = clamp(S, 0, 1), ratio = win / S * U (0 where S == 0), out = conv(X*M) * ratio + b * U."""
    k = w.shape[2]
    if padding == "same":
        padding = dilation * (k - 1) // 2
    m_ = torch.ones(1, 1, x.shape[2], dtype=x.dtype, device=x.device) if m is None else m
    plane = m_.sum(1, keepdim=True)
    s = F.conv1d(plane, torch.ones(1, 1, k, dtype=x.dtype, device=x.device), None, stride, padding, dilation)
    win = k * (x.shape[1] if multi_channel else 1)
    u = s.clamp(0, 1)
    ratio = torch.where(s > 0, win / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s)) * u
    raw = F.conv1d(x * m_, w, None, stride, padding, dilation, groups)
    return raw * ratio + (0 if b is None else b.view(1, -1, 1) * u), u


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_and_gradients_match_the_1d_formula(main_backend, case):
    x, m, w, b, kw = make(case, main_backend.device)
    leaves = [t.requires_grad_(True) for t in (x, w, b) if t is not None]
    out, upd = pconv_cuda.partial_conv1d(x, m, w, b, **kw)
    want, want_upd = oracle(x, m, w, b, **kw)
    assert out.shape == want.shape and upd.shape == (want_upd.shape[0], 1, want.shape[2])
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(upd, want_upd.to(upd.dtype), rtol=1e-12, atol=1e-12)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype).to(out.device)
    got = torch.autograd.grad(out, leaves, grad)
    expected = torch.autograd.grad(want, leaves, grad)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_every_backend_runs_the_1d_view(backend, case):
    # What partial_conv1d calls, on each backend's op library (the CPU loops, the CUDA kernels, the CUDA kernels
    # under the emulation): the 2-D op on a height-1 view, (1, k) windows, no vertical padding.
    x, m, w, b, kw = make(case, backend.device)
    k, stride, dilation = w.shape[2], kw["stride"], kw["dilation"]
    padding = dilation * (k - 1) // 2 if kw["padding"] == "same" else kw["padding"]
    leaves = [t.requires_grad_(True) for t in (x, w, b) if t is not None]
    out, upd, _, _ = backend.ops.partial_conv2d(x.unsqueeze(2), None if m is None else m.unsqueeze(2),
                                                w.unsqueeze(2), b, (1, stride), (0, padding), (1, dilation),
                                                kw["groups"], kw["multi_channel"])
    want, want_upd = oracle(x, m, w, b, **kw)
    torch.testing.assert_close(out.squeeze(2), want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(upd.squeeze(2), want_upd.to(upd.dtype), rtol=1e-12, atol=1e-12)
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=want.dtype).to(want.device)
    for a, e in zip(torch.autograd.grad(out.squeeze(2), leaves, grad), torch.autograd.grad(want, leaves, grad)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_gradcheck(main_backend):
    x, m, w, b, kw = make(CASES[1], main_backend.device)
    x, w, b = (t.detach().requires_grad_(True) for t in (x[:1, :, :9], w, b))
    m = m[..., :9]
    assert torch.autograd.gradcheck(lambda x, w, b: pconv_cuda.partial_conv1d(x, m, w, b, **kw)[0], (x, w, b))


def test_module_is_a_conv1d_with_the_2d_layers_contract():
    conv = torch.nn.Conv1d(4, 6, 3, padding=1)
    layer = pconv_cuda.PartialConv1d(4, 6, 3, padding=1, return_mask=True)
    layer.load_state_dict(conv.state_dict())
    assert isinstance(layer, torch.nn.Conv1d)
    x = torch.randn(2, 4, 10)
    out, upd = layer(x)  # no mask: only the borders are renormalised
    assert out.shape == (2, 6, 10) and upd.shape == (1, 1, 10)
    inner = slice(1, 9)  # away from the borders the window is whole: the plain convolution
    torch.testing.assert_close(out[..., inner], conv(x)[..., inner], rtol=1e-5, atol=1e-5)
    multi = pconv_cuda.PartialConv1d(4, 6, 3, padding="same", multi_channel=True, return_mask=True)
    out, upd = multi(x, (torch.rand(2, 4, 10) > 0.5).float())
    assert out.shape == (2, 6, 10) and upd.shape == (2, 6, 10)  # NVIDIA's expanded multi-channel mask
    assert "multi_channel=True" in repr(multi)
    with pytest.raises(ValueError, match="padding_mode must be 'zeros'"):
        pconv_cuda.PartialConv1d(4, 6, 3, padding_mode="reflect")


@pytest.mark.parametrize("kw, error, match", [
    (dict(input=torch.randn(2, 4, 1, 10)), ValueError, r"input must be a 3-D tensor \(N, C_in, L\)"),
    (dict(weight=torch.randn(6, 4, 3, 3)), ValueError, r"weight must be a 3-D tensor"),
    (dict(mask=torch.ones(2, 1, 1, 10)), ValueError, r"mask must be a 3-D tensor"),
    (dict(stride=(1, 1)), TypeError, r"stride must be an int or a 1-tuple of ints, got \(1, 1\)"),
    (dict(padding="same", stride=2), ValueError, r"padding='same' is only supported with stride 1"),
    (dict(mask=torch.ones(2, 1, 9)), ValueError, r"mask length 9 must equal the input's 10"),
    (dict(mask=torch.ones(2, 3, 10)), RuntimeError, r"single-channel mask .*got 3 channels"),  # the op's own checks
])
def test_bad_arguments(kw, error, match):
    a = dict(input=torch.randn(2, 4, 10), mask=torch.ones(2, 1, 10), weight=torch.randn(6, 4, 3), bias=None,
             padding=1)
    a.update(kw)
    with pytest.raises(error, match=match):
        functional.partial_conv1d(**a)

