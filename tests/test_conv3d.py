"""The 3-D partial convolution (partial_conv3d, _partial_conv3d_backward, 5-D mask_update, PartialConv3d) on every
backend, against the method's formula written directly in 3-D (float64, no epsilon), and NVIDIA's PartialConv3d
algorithm (pconv_cuda.reference) for the module's drop-in contract."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Tuple

import pytest
import torch
import torch.nn.functional as F

import pconv_cuda
from helpers import ROUNDINGS, assert_rounding_close, mask_of, nondet_tol, same
from pconv_cuda import functional, reference

Triple = Tuple[int, int, int]


@dataclass(frozen=True)
class Sample3:
    name: str
    n: int = 2
    c_in: int = 3
    c_out: int = 4
    d: int = 5
    h: int = 6
    w: int = 5
    kernel: Triple = (3, 3, 3)
    stride: Triple = (1, 1, 1)
    padding: Triple = (1, 1, 1)
    dilation: Triple = (1, 1, 1)
    groups: int = 1
    bias: bool = True
    multi_channel: bool = False
    mask: str = "random"  # random | ones | zeros | holes | soft | none
    mask_batch: Optional[int] = None  # None: same as n

    def __str__(self) -> str:
        return self.name

    def conv_args(self):
        return self.stride, self.padding, self.dilation, self.groups, self.multi_channel


SAMPLES3 = [
    Sample3("k3"),
    Sample3("k3x5x5_p1x2x2", kernel=(3, 5, 5), padding=(1, 2, 2), h=7, w=6),
    Sample3("k1x3x3_no_depth_window", kernel=(1, 3, 3), padding=(0, 1, 1)),
    Sample3("k3x1x1_depth_only", kernel=(3, 1, 1), padding=(1, 0, 0), mask="holes"),
    Sample3("stride_2x1x2", stride=(2, 1, 2), d=6),
    Sample3("dilation_2x1x2", dilation=(2, 1, 2), padding=(2, 1, 2)),
    Sample3("uneven_k2x3x1_s3x2x1_p1x0x0", kernel=(2, 3, 1), stride=(3, 2, 1), padding=(1, 0, 0), d=7),
    Sample3("groups3_multi", c_out=6, groups=3, multi_channel=True),
    Sample3("multi_holes", multi_channel=True, mask="holes"),
    Sample3("soft_multi_batch1_no_bias", mask="soft", multi_channel=True, mask_batch=1, bias=False),
    Sample3("soft", mask="soft"),
    Sample3("ones", mask="ones"),
    Sample3("zeros", mask="zeros"),
    Sample3("mask_none", mask="none"),
    Sample3("mask_none_multi_k3x3x1", mask="none", multi_channel=True, kernel=(3, 3, 1), padding=(1, 1, 0)),
    Sample3("kernel_larger_than_volume", d=2, h=3, w=2, kernel=(3, 5, 5), padding=(1, 2, 2)),
    Sample3("mask_batch1", mask_batch=1, n=3),
    Sample3("batch1", n=1),
]


def make(s: Sample3, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(s.n, s.c_in, s.d, s.h, s.w, generator=g, dtype=torch.float64)
    w = torch.randn(s.c_out, s.c_in // s.groups, *s.kernel, generator=g, dtype=torch.float64) * 0.3
    b = torch.randn(s.c_out, generator=g, dtype=torch.float64) if s.bias else None
    shape = (s.mask_batch or s.n, s.c_in if s.multi_channel else 1, s.d, s.h, s.w)
    m = mask_of(s.mask, shape, torch.float64, g, (slice(0, 4), slice(1, 6), slice(1, 5)))
    return tuple(None if t is None else t.to(device=device, dtype=dtype) for t in (x, m, w, b))


def oracle(x, m, w, b, s: Sample3):
    """The method in 3-D, float64: S = zero-padded window sum of the mask (over channels when multi-channel),
    win = kd*kh*kw (* C_in), U = clamp(S, 0, 1), ratio = win / S * U (0 where S == 0), Y = conv(X*M) * ratio + b*U.
    Returns (Y, U, ratio), differentiable in x, w, b."""
    stride, padding, dilation, groups, multi = s.conv_args()
    c_in = x.shape[1]
    m_ = torch.ones(1, c_in if multi else 1, *x.shape[2:], dtype=x.dtype, device=x.device) if m is None else m
    plane = m_.sum(1, keepdim=True)
    ones = torch.ones(1, 1, *s.kernel, dtype=x.dtype, device=x.device)
    S = F.conv3d(plane, ones, None, stride, padding, dilation)
    win = s.kernel[0] * s.kernel[1] * s.kernel[2] * (c_in if multi else 1)
    u = S.clamp(0, 1)
    ratio = torch.where(S > 0, win / torch.where(S > 0, S, torch.ones_like(S)), torch.zeros_like(S)) * u
    raw = F.conv3d(torch.where(m_ == 0, torch.zeros_like(x), x * m_), w, None, stride, padding, dilation, groups)
    return raw * ratio + (0 if b is None else b.view(1, -1, 1, 1, 1) * u), u, ratio


def leaves_of(x, w, b):
    return [t.requires_grad_(True) for t in (x, w, b) if t is not None]


@pytest.mark.parametrize("s", SAMPLES3, ids=str)
def test_op_and_gradients_match_the_3d_formula(backend, s):
    x, m, w, b = make(s, device=backend.device)
    leaves = leaves_of(x, w, b)
    out, upd, ratio, _ = backend.ops.partial_conv3d(x, m, w, b, *s.conv_args())
    want, want_upd, want_ratio = oracle(x, m, w, b, s)
    assert out.shape == want.shape and upd.shape == ratio.shape == want_upd.shape
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(upd, want_upd, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ratio, want_ratio, rtol=1e-12, atol=1e-12)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype).to(out.device)
    got = torch.autograd.grad(out, leaves, grad)
    expected = torch.autograd.grad(want, leaves, grad)
    for name, a, e in zip(("input", "weight", "bias"), got, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=lambda msg: f"grad {name}: {msg}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("s", [SAMPLES3[1], SAMPLES3[8], SAMPLES3[9]], ids=str)
def test_low_precision_within_rounding_bounds(backend, s, dtype):
    # The same element-wise bound as 2-D (helpers.assert_rounding_close): each rounding to the dtype and each
    # float32 accumulation, times the magnitude (the computation in absolute values).
    x, m, w, b = make(s, dtype=dtype, device=backend.device)
    out, upd, _, _ = backend.ops.partial_conv3d(x, m, w, b, *s.conv_args())
    f64 = [None if t is None else t.detach().cpu().double() for t in (x, m, w, b)]
    want, want_upd, _ = oracle(*f64, s)
    x64, m64, w64, b64 = f64
    magnitude, _, _ = oracle(x64.abs(), m64, w64.abs(), None if b64 is None else b64.abs(), s)
    terms = s.c_in // s.groups * s.kernel[0] * s.kernel[1] * s.kernel[2]
    assert out.dtype == dtype and upd.dtype == dtype
    assert_rounding_close(out, want, magnitude, dtype, ROUNDINGS["output"], terms, "output")
    assert_rounding_close(upd, want_upd, want_upd, dtype, 1, 0, "updated_mask")


@pytest.mark.parametrize("s", [replace(SAMPLES3[6], n=1, d=5, h=4, w=3), replace(SAMPLES3[8], n=1, d=4, h=4, w=3)],
                         ids=str)
def test_gradcheck(backend, s):
    x, m, w, b = make(s, device=backend.device)
    x, w, b = leaves_of(x, w, b)
    assert torch.autograd.gradcheck(lambda x, w, b: backend.ops.partial_conv3d(x, m, w, b, *s.conv_args())[0],
                                    (x, w, b), nondet_tol=nondet_tol(backend.device))


@pytest.mark.parametrize("s", [SAMPLES3[0], SAMPLES3[8], SAMPLES3[13]], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d"])
def test_opcheck(backend, s, layout):
    x, m, w, b = make(s, device=backend.device)
    if layout == "channels_last_3d":
        x, m = (None if t is None else t.contiguous(memory_format=torch.channels_last_3d) for t in (x, m))
    x, w, b = leaves_of(x, w, b)
    torch.library.opcheck(backend.ops.partial_conv3d.default, (x, m, w, b, *s.conv_args()))
    out, upd, ratio, xm = backend.ops.partial_conv3d(x, m, w, b, *s.conv_args())
    conv_input = (x if m is None else xm).detach()
    torch.library.opcheck(backend.ops._partial_conv3d_backward.default,
                          (torch.randn_like(out), conv_input, m, w.detach(), ratio, upd, *s.conv_args(),
                           [True, True, True]))
    if m is not None:
        torch.library.opcheck(backend.ops.mask_update.default, (m, s.kernel, s.stride, s.padding, s.dilation,
                                                                s.multi_channel))


def test_channels_last_3d_stays_channels_last_3d(backend):
    s = SAMPLES3[8]
    x, m, w, b = make(s, device=backend.device)
    xl, ml = (t.contiguous(memory_format=torch.channels_last_3d) for t in (x, m))
    x.requires_grad_(True)
    out, upd, _, xm = backend.ops.partial_conv3d(leaves_of(xl, w, b)[0], ml, w, b, *s.conv_args())
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    assert xm.is_contiguous(memory_format=torch.channels_last_3d)
    want, want_upd, _ = oracle(x, m, w, b, s)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(upd, want_upd, rtol=1e-12, atol=1e-12)
    gx, = torch.autograd.grad(out, xl, torch.ones_like(out))
    assert gx.is_contiguous(memory_format=torch.channels_last_3d)
    wx, = torch.autograd.grad(want, x, torch.ones_like(want))
    torch.testing.assert_close(gx, wx, rtol=1e-10, atol=1e-10)


def test_holes_never_leak(backend):
    s = SAMPLES3[8]  # multi-channel mask with a large hole
    x, m, w, b = make(s, device=backend.device)
    poisoned = torch.where(m == 0, torch.full_like(x, float("nan")), x)
    poisoned[:, :, 0, 1, 1] = float("inf")  # inside the hole too
    xs = leaves_of(poisoned, w, b)
    out, upd, _, _ = backend.ops.partial_conv3d(poisoned, m, w, b, *s.conv_args())
    clean = torch.where(m == 0, torch.zeros_like(x), x)
    want, _, _ = oracle(clean, m, w, b, s)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad(out, xs, torch.ones_like(out))
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[0][m.expand_as(x) == 0] == 0).all()  # exactly zero in holes


def test_empty_batch_keeps_the_mask_maps(backend):
    s = replace(SAMPLES3[0], n=0, mask_batch=1)
    x, m, w, b = make(s, device=backend.device)
    out, upd, ratio, _ = backend.ops.partial_conv3d(x, m, w, b, *s.conv_args())
    assert out.shape == (0, 4, 5, 6, 5) and upd.shape == (1, 1, 5, 6, 5)
    _, want_upd, _ = oracle(torch.zeros(1, 3, 5, 6, 5, dtype=x.dtype, device=x.device), m, w, b, s)
    torch.testing.assert_close(upd, want_upd, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bool, torch.uint8], ids=str)
@pytest.mark.parametrize("s", [SAMPLES3[1], SAMPLES3[4], SAMPLES3[8]], ids=str)
def test_mask_update_3d(backend, s, dtype):
    x, m, w, b = make(s, device=backend.device)
    if dtype != torch.float64:
        m = m.to(dtype)
    ratio, upd = backend.ops.mask_update(m, s.kernel, s.stride, s.padding, s.dilation, s.multi_channel)
    _, want_upd, want_ratio = oracle(x, m.double(), w, b, s)
    assert upd.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(upd.double(), want_upd, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ratio.double(), want_ratio, rtol=1e-6, atol=1e-6)


def test_functional_and_function_paths_agree(main_backend, deterministic):
    # partial_conv3d takes the op, the eager Function or PartialConv2dFunction by what records the call; all three
    # are the same op and backward (bitwise on the CPU; on a GPU cuDNN may pick another algorithm per call).
    s = SAMPLES3[5]
    x, m, w, b = make(s, device=main_backend.device)
    with torch.no_grad():
        plain, _ = pconv_cuda.partial_conv3d(x, m, w, b, 1, (2, 1, 2), (2, 1, 2))
    leaves = leaves_of(x, w, b)
    eager, _ = pconv_cuda.partial_conv3d(x, m, w, b, 1, (2, 1, 2), (2, 1, 2))
    function = pconv_cuda.PartialConv2dFunction.apply(x, m, w, b, 1, (2, 1, 2), (2, 1, 2), 1, False)[0]
    same(eager, plain, "op under autograd vs no_grad")
    same(function, plain, "PartialConv2dFunction vs no_grad")
    g1 = torch.autograd.grad(eager.sum(), leaves)
    g2 = torch.autograd.grad(function.sum(), leaves)
    for name, a, c in zip(("input", "weight", "bias"), g1, g2):
        same(a, c, f"grad {name}")
    jac = torch.func.jacrev(lambda b_: pconv_cuda.partial_conv3d(x.detach(), m, w.detach(), b_, 1, (2, 1, 2),
                                                                 (2, 1, 2))[0].sum())(b.detach())
    torch.testing.assert_close(jac, g1[2], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("multi_channel", [False, True], ids=["single", "multi"])
def test_module_is_nvidias_partialconv3d(main_backend, multi_channel):
    # NVIDIA's PartialConv3d algorithm (reference: a ones-kernel convolution for S, slide_winsize = kd*kh*kw times
    # C_in multi-channel, win / (S + 1e-8), clamp, the bias removed and re-added) agrees to the epsilon's 1e-8
    # relative on binary masks; same parameters, same updated-mask shapes.
    device = main_backend.device
    kw = dict(kernel_size=(3, 5, 5), stride=(1, 2, 2), padding=(1, 2, 2), multi_channel=multi_channel,
              return_mask=True)
    ours = pconv_cuda.PartialConv3d(3, 5, dtype=torch.float64, device=device, **kw)
    nvidia = reference.PartialConv3d(3, 5, dtype=torch.float64, device=device, **kw)
    nvidia.load_state_dict(ours.state_dict())
    assert isinstance(ours, torch.nn.Conv3d)
    x = torch.randn(2, 3, 6, 9, 8, dtype=torch.float64, device=device)
    m = (torch.rand(2, 3 if multi_channel else 1, 6, 9, 8, device=device) > 0.4).double()
    m[..., 1:5, 2:8, 2:7] = 0  # windows with S == 0
    out, upd = ours(x, m)
    want, want_upd = nvidia(x, m)
    assert upd.shape == want_upd.shape  # (N, C_out, ...) multi-channel, (N, 1, ...) single
    torch.testing.assert_close(out, want, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(upd, want_upd, rtol=0, atol=0)
    out_none, upd_none = ours(x)  # no mask: only the borders are renormalised
    want_none, _ = nvidia(x)
    torch.testing.assert_close(out_none, want_none, rtol=1e-7, atol=1e-7)
    plain = F.conv3d(x, ours.weight, ours.bias, ours.stride, ours.padding)
    torch.testing.assert_close(out_none[:, :, 1:-1, 1:-1, 1:-1], plain[:, :, 1:-1, 1:-1, 1:-1], rtol=1e-10,
                               atol=1e-10)
    assert upd_none.shape[0] == (2 if multi_channel else 1)


def test_module_state_dict_same_padding_and_repr():
    conv = torch.nn.Conv3d(4, 6, 3, padding=1)
    layer = pconv_cuda.PartialConv3d(4, 6, 3, padding="same")
    layer.load_state_dict(conv.state_dict())
    x = torch.randn(1, 4, 4, 5, 6)
    torch.testing.assert_close(layer(x)[:, :, 1:-1, 1:-1, 1:-1], conv(x)[:, :, 1:-1, 1:-1, 1:-1], rtol=1e-5,
                               atol=1e-5)
    assert "multi_channel=False, return_mask=False" in repr(layer)
    with pytest.raises(ValueError, match="padding_mode must be 'zeros'"):
        pconv_cuda.PartialConv3d(4, 6, 3, padding_mode="replicate")


def test_autocast_cpu_bfloat16_keeps_large_ratios_finite():
    layer = pconv_cuda.PartialConv3d(4, 6, 5, padding=2, multi_channel=True)
    x = torch.randn(1, 4, 6, 10, 10, requires_grad=True)
    m = torch.zeros(1, 4, 6, 10, 10)
    m[:, 0, 2, 4, 4] = 1  # one valid value per window at most: ratio = 4*125 = 500
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, upd = pconv_cuda.partial_conv3d(x, m, layer.weight, layer.bias, padding=2, multi_channel=True)
    assert out.dtype == torch.bfloat16 and upd.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.weight.grad).all()


@pytest.mark.parametrize("kw, error, match", [
    (dict(input=torch.randn(2, 3, 6, 5)), RuntimeError, r"input must be a 5-D tensor \(N, C_in, D, H, W\)"),
    (dict(weight=torch.randn(4, 3, 3, 3)), RuntimeError, r"weight must be a 5-D tensor \(C_out, C_in / groups, kd"),
    (dict(mask=torch.ones(2, 1, 6, 5)), RuntimeError, r"mask must be a 5-D tensor"),
    (dict(mask=torch.ones(2, 1, 5, 6, 4)), RuntimeError, r"mask spatial size \(5, 6, 4\) must equal the input's \(5, 6, 5\)"),
    (dict(stride=(1, 1)), TypeError, r"stride must be an int or a triple of ints, got \(1, 1\)"),
    (dict(padding="same", stride=2), ValueError, r"padding='same' is only supported with stride 1"),
    (dict(padding=0, input=torch.randn(2, 3, 1, 1, 1), mask=None, weight=torch.randn(4, 3, 9, 1, 1)),
     RuntimeError, r"spatial size \(1, 1, 1\) is too small for kernel \(9, 1, 1\)"),
])
def test_bad_arguments(kw, error, match):
    a = dict(input=torch.randn(2, 3, 5, 6, 5), mask=torch.ones(2, 1, 5, 6, 5), weight=torch.randn(4, 3, 3, 3, 3),
             bias=None, padding=1)
    a.update(kw)
    with pytest.raises(error, match=match):
        functional.partial_conv3d(**a)


def test_op_level_argument_lengths(backend):
    x, m, w = torch.randn(1, 2, 4, 4, 4), torch.ones(1, 1, 4, 4, 4), torch.randn(3, 2, 3, 3, 3)
    with pytest.raises(RuntimeError, match=r"stride must have 3 elements \(depth, height, width\), got 2"):
        backend.ops.partial_conv3d(x.to(backend.device), m.to(backend.device), w.to(backend.device), None, [1, 1],
                                   [1, 1, 1], [1, 1, 1], 1, False)
    with pytest.raises(RuntimeError, match=r"kernel_size must have 3 elements"):
        backend.ops.mask_update(m.to(backend.device), [3, 3], [1, 1, 1], [1, 1, 1], [1, 1, 1], False)
    with pytest.raises(RuntimeError, match=r"input must be a 4-D tensor"):  # the 2-D op refuses 5-D input
        backend.ops.partial_conv2d(x.to(backend.device), None, w.to(backend.device), None, [1, 1], [1, 1], [1, 1], 1,
                                   False)
