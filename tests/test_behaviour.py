"""Behaviours a user relies on that no value comparison covers: which gradients the backward computes, what is
differentiable, repeatability, threads, empty batches, and the double-backward path's first-order gradients."""
from __future__ import annotations

import itertools
import threading

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pconv_cuda
from pconv_cuda import routes
from helpers import BACKENDS, SAMPLES, Sample, conv_args, make_inputs, oracle, same, with_


class RecordBackwardCalls(TorchDispatchMode):
    """Records the output_mask each backward call receives: the fused op's, and ATen's convolution_backward."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.endswith("_partial_conv2d_backward.default") or name == "aten.convolution_backward.default":
            self.calls.append((name, list(args[-1])))
        return func(*args, **(kwargs or {}))


# --- the backward computes only what is asked for -----------------------------------------------------------------

@pytest.mark.parametrize("output_mask", list(itertools.product([False, True], repeat=3)), ids=str)
def test_backward_op_returns_exactly_the_requested_gradients(backend, output_mask, deterministic):
    s = with_(SAMPLES[0], mask="holes")
    x, m, w, b = make_inputs(s, torch.float64, backend.device)
    out, upd, ratio, xm = backend.ops.partial_conv2d(x, m, w, b, *conv_args(s))
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(out.device)
    full = backend.ops._partial_conv2d_backward(grad, xm, m, w, ratio, upd, *conv_args(s), [True, True, True])
    part = backend.ops._partial_conv2d_backward(grad, xm, m, w, ratio, upd, *conv_args(s), list(output_mask))
    _, _, want = oracle(x, m, w, b, s, grad)
    for name, asked, got, every in zip(("input", "weight", "bias"), output_mask, part, full):
        if not asked:
            assert got is None, f"grad_{name} computed although not asked for"
            continue
        same(got, every, name)  # the same numbers whatever else is computed
        torch.testing.assert_close(got.cpu(), want[name], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True),
                                   (True, True, False), (False, True, True), (True, True, True)],
                         ids=lambda n: "".join("xwb"[i] for i in range(3) if n[i]))
@pytest.mark.parametrize("create_graph", [False, True], ids=["fused_backward", "create_graph"])
def test_autograd_asks_only_for_the_gradients_it_needs(backend, needs, create_graph):
    # The output_mask reaching the backward (the fused op, or ATen's convolution_backward under create_graph) is
    # exactly what requires grad: no grad_weight is computed for a frozen weight, no grad_input for a first layer.
    s = SAMPLES[0]
    x, m, w, b = make_inputs(s, torch.float64, backend.device)
    leaves = [t.requires_grad_(n) for t, n in zip((x, w, b), needs)]
    out = backend.ops.partial_conv2d(x, m, w, b, *conv_args(s))[0]
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64).to(out.device)
    with RecordBackwardCalls() as rec:
        got = torch.autograd.grad(out, [t for t in leaves if t.requires_grad], grad, create_graph=create_graph)
    if create_graph:
        # grad_input and grad_weight come from one convolution_backward; grad_bias is a sum, not a convolution.
        assert rec.calls == ([("aten.convolution_backward.default", [needs[0], needs[1], False])]
                             if needs[0] or needs[1] else [])
    else:
        assert rec.calls == [(f"{backend.ns}._partial_conv2d_backward.default", list(needs))]
    _, _, want = oracle(x, m, w, b, s, grad)
    for g, name in zip(got, [n for n, need in zip(("input", "weight", "bias"), needs) if need]):
        torch.testing.assert_close(g.detach().cpu(), want[name], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("s", [with_(SAMPLES[0], mask="holes"), with_(SAMPLES[0], mask="soft", multi_channel=True),
                               with_(SAMPLES[0], mask="none", stride=(2, 1)), with_(SAMPLES[0], mask_batch=1)],
                         ids=str)
def test_create_graph_gives_the_fused_backward_gradients(backend, s):
    # Under create_graph=True (gradient penalties) the gradients come from differentiable ATen ops instead of the
    # fused backward op: the same first-order values, holes, U in the bias gradient and all.
    x, m, w, b = make_inputs(s, torch.float64, backend.device, requires_grad=True)
    out = backend.ops.partial_conv2d(x, m, w, b, *conv_args(s))[0]
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(out.device)
    fused = torch.autograd.grad(out, [x, w, b], grad, retain_graph=True)
    differentiable = torch.autograd.grad(out, [x, w, b], grad, create_graph=True)
    # grad_input and grad_weight depend on the weight and on X: differentiable. grad_bias = sum(dY * U) is constant.
    assert differentiable[0].requires_grad and differentiable[1].requires_grad
    assert not any(g.requires_grad for g in fused)
    for name, a, c in zip(("input", "weight", "bias"), differentiable, fused):
        torch.testing.assert_close(a.detach(), c, rtol=1e-12, atol=1e-12, msg=lambda e: f"grad_{name}: {e}")


# --- what is differentiable -------------------------------------------------------------------------------------

@pytest.mark.parametrize("mask", ["float", "none"])
def test_function_updated_mask_and_ratio_are_not_differentiable(main_backend, mask):
    s = SAMPLES[0] if mask == "float" else with_(SAMPLES[0], mask="none")
    x, m, w, b = make_inputs(s, torch.float64, main_backend.device, requires_grad=True)
    out, upd, ratio, xm = pconv_cuda.PartialConv2dFunction.apply(x, m, w, b, *conv_args(s))
    assert out.requires_grad
    assert not upd.requires_grad and upd.grad_fn is None
    assert not ratio.requires_grad and ratio.grad_fn is None
    with pytest.raises(RuntimeError, match="does not require grad"):
        upd.sum().backward()
    if m is None:
        assert xm.numel() == 0
        return
    # X*M is an output with a gradient (double backward reaches X through it): d(X*M)/dX = M, exactly 0 in holes.
    assert xm.requires_grad
    gx, = torch.autograd.grad(xm, x, torch.ones_like(xm))
    assert torch.equal(gx, m.expand_as(x).to(gx.dtype))


@pytest.mark.parametrize("shape, multi", [((1, 1, 0, 4), False), ((2, 0, 5, 6), True)], ids=["no_pixels", "no_channels"])
def test_mask_update_of_an_empty_mask(backend, shape, multi):
    # No pixels: every window lies in the padding; no channels: nothing is valid. Either way S = 0 everywhere.
    m = torch.ones(shape, device=backend.device)
    ratio, upd = backend.ops.mask_update(m, [1, 1], [1, 1], [1, 1], [1, 1], multi)
    assert ratio.shape == upd.shape == (shape[0], 1, shape[2] + 2, shape[3] + 2)
    assert not ratio.any() and not upd.any()


# --- the two ways partial_conv2d runs a call ---------------------------------------------------------------------

def test_each_autograd_path_is_taken_where_documented_and_gives_the_same_result(main_backend):
    # functional._needs_function: eager calls run the op, whose C++ autograd (csrc/common/autograd.h) records them;
    # torch.func and forward-mode AD run PartialConv2dFunction. Same op and backward: the same numbers.
    import torch.autograd.forward_ad as forward_ad
    from pconv_cuda import functional

    s = Sample("paths", mask="holes")
    x, m, w, b = make_inputs(s, torch.float64, main_backend.device, requires_grad=True)
    seen = []

    def run(x, w, b):
        seen.append("function" if functional._needs_function() else "op")
        return pconv_cuda.partial_conv2d(x, m, w, b, *conv_args(s))[0]

    with torch.no_grad():
        out_op = run(x, w, b)
    assert out_op.grad_fn is None
    out_eager = run(x, w, b)
    assert out_eager.grad_fn is not None and "PartialConvFunction" in out_eager.grad_fn.name()
    grad = torch.randn_like(out_eager)
    eager = torch.autograd.grad(out_eager, (x, w, b), grad)
    func = torch.func.vjp(run, x, w, b)[1](grad)
    with forward_ad.dual_level():
        with pytest.raises(NotImplementedError, match="jvp"):  # the Function refuses forward mode, clearly
            run(forward_ad.make_dual(x.detach(), torch.ones_like(x)), w.detach(), b.detach())
    assert seen == ["op", "op", "function", "function"]
    with forward_ad.dual_level():  # the op itself refuses dual tensors too, instead of dropping their tangents
        with pytest.raises(RuntimeError, match="forward-mode AD"):
            main_backend.ops.partial_conv2d(forward_ad.make_dual(x.detach(), torch.ones_like(x)), m, w.detach(),
                                            b.detach(), *conv_args(s))
    same(out_op, out_eager, "output: no grad vs recorded")
    # torch.func differentiates with the graph kept (the differentiable ATen formulation of the same backward,
    # ops._differentiable_grads): float64 summation order only.
    for name, a, c in zip(("input", "weight", "bias"), eager, func):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12, msg=lambda e: f"grad_{name}: {e}")


# --- repeatability ------------------------------------------------------------------------------------------------

def test_backward_twice_is_bitwise_equal(backend, deterministic):
    s = with_(SAMPLES[0], mask="holes", multi_channel=True, n=3, h=20, w=19)
    x, m, w, b = make_inputs(s, torch.float32, backend.device, requires_grad=True)
    out = backend.ops.partial_conv2d(x, m, w, b, *conv_args(s))[0]
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(8)).to(out.device)
    first = torch.autograd.grad(out, [x, w, b], grad, retain_graph=True)
    second = torch.autograd.grad(out, [x, w, b], grad)  # the same graph, backward again
    out2 = backend.ops.partial_conv2d(x, m, w, b, *conv_args(s))[0]
    assert torch.equal(out, out2)
    third = torch.autograd.grad(out2, [x, w, b], grad)  # a new forward and backward
    for name, a, c, d in zip(("input", "weight", "bias"), first, second, third):
        assert torch.equal(a, c) and torch.equal(a, d), name


def test_two_threads_call_the_op_concurrently(backend, deterministic):
    # Two Python threads running forwards and backwards at once (the ops release the GIL) get exactly the results
    # of running them one after the other; the last route is per thread.
    s = with_(SAMPLES[0], mask="holes", n=2, h=24, w=23)
    inputs = [make_inputs(s, torch.float32, backend.device, requires_grad=True, seed=seed) for seed in (10, 11)]

    def work(x, m, w, b):
        out = backend.ops.partial_conv2d(x, m, w, b, *conv_args(s))[0]
        grads = torch.autograd.grad(out.square().sum(), [x, w, b])
        return (out.detach(), *grads)

    serial = [work(*args) for args in inputs]
    results = [[], []]
    failures = []
    start = threading.Barrier(2)
    device_type = "cuda" if backend.cuda_route else "cpu"

    def thread(i):
        try:
            start.wait()
            for _ in range(8):
                results[i].append(work(*inputs[i]))
                if backend.cuda_route:
                    assert routes.last_route(device_type, _ns=backend.ns) == backend.cuda_route
        except BaseException as e:  # reported in the main thread
            failures.append(e)

    threads = [threading.Thread(target=thread, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hangs"
    assert not failures, failures
    for i in range(2):
        assert len(results[i]) == 8
        for res in results[i]:
            for a, c in zip(res, serial[i]):
                assert torch.equal(a, c)


# --- empty batches ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("multi_channel", [False, True], ids=["single", "multi"])
def test_empty_batch_with_mask_none(backend, multi_channel):
    s = Sample("empty", n=0, mask="none", multi_channel=multi_channel, h=7, w=10)
    x, _, w, b = make_inputs(s, torch.float32, backend.device, requires_grad=True)
    out, upd, ratio, xm = backend.ops.partial_conv2d(x, None, w, b, *conv_args(s))
    assert out.shape == (0, 6, 7, 10) and xm.numel() == 0
    assert upd.shape == ratio.shape == (1, 1, 7, 10)  # one map for "no holes", whatever the batch
    ones = torch.ones(1, s.c_in if multi_channel else 1, s.h, s.w, device=x.device)
    want_ratio, want_upd = backend.ops.mask_update(ones, s.kernel, s.stride, s.padding, s.dilation, multi_channel)
    torch.testing.assert_close(upd, want_upd, rtol=0, atol=0)
    torch.testing.assert_close(ratio, want_ratio, rtol=1e-6, atol=1e-6)
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("multi_channel", [False, True], ids=["single", "multi"])
def test_empty_batch_with_a_batch1_mask(backend, multi_channel):
    # A seed per case: a buffer freed by another case, holding that case's (correct) plane, cannot pass for this
    # one's. The size (7 x 10) is used by no other test.
    seed = 100 + 2 * [b.name for b in BACKENDS].index(backend.name) + multi_channel
    s = Sample("empty", n=0, mask_batch=1, mask="holes", multi_channel=multi_channel, h=7, w=10)
    x, m, w, b = make_inputs(s, torch.float32, backend.device, requires_grad=True, seed=seed)
    out, upd, ratio, _ = backend.ops.partial_conv2d(x, m, w, b, *conv_args(s))
    assert out.shape == (0, 6, 7, 10)
    assert upd.shape == ratio.shape == (1, 1, 7, 10)  # the mask's maps: batch 1, whatever the input's batch
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))
    # The maps are the mask's own, as for any other batch size.
    want_ratio, want_upd = backend.ops.mask_update(m, s.kernel, s.stride, s.padding, s.dilation, multi_channel)
    assert (want_upd == 0).any() and (want_upd == 1).any()
    torch.testing.assert_close(upd, want_upd, rtol=0, atol=0)
    torch.testing.assert_close(ratio, want_ratio, rtol=1e-6, atol=1e-6)


# --- the public mask_update --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kernel, stride, padding, dilation, multi", [
    ((3, 2), (2, 1), (2, 1), (1, 3), False),
    ((2, 3), (1, 3), (1, 0), (3, 1), True),
    (3, (3, 2), (0, 2), (2, 1), False),
], ids=["k3x2_s2x1_p2x1_d1x3", "k2x3_s1x3_p1x0_d3x1_multi", "k3_s3x2_p0x2_d2x1"])
def test_public_mask_update_with_unequal_stride_and_dilation(kernel, stride, padding, dilation, multi):
    # Each (height, width) pair reaches the op in its order: the values are the window sums of the mask with the
    # same pairs, worked out with a ones-kernel convolution in float64.
    g = torch.Generator().manual_seed(9)
    m = (torch.rand(2, 3 if multi else 1, 13, 12, generator=g) > 0.4).double()
    m[..., 3:9, 4:10] = 0  # a hole larger than every window here: S == 0 inside
    ratio, upd = pconv_cuda.mask_update(m, kernel, stride, padding, dilation, multi_channel=multi)
    k = (kernel, kernel) if isinstance(kernel, int) else kernel
    ones = torch.ones(1, m.shape[1], *k, dtype=torch.float64)
    s = torch.nn.functional.conv2d(m, ones, None, stride, padding, dilation)
    want_upd = s.clamp(0, 1)
    want_ratio = torch.where(s > 0, ones.numel() / s.clamp_min(1e-300), 0.0) * want_upd
    assert upd.shape == want_upd.shape and (want_upd == 0).any() and (want_upd == 1).any()
    torch.testing.assert_close(upd, want_upd, rtol=0, atol=0)
    torch.testing.assert_close(ratio, want_ratio, rtol=1e-12, atol=1e-12)
    # The same maps as partial_conv2d's with these pairs.
    x = torch.randn(2, m.shape[1], 13, 12, dtype=torch.float64)
    w = torch.randn(2, m.shape[1], *k, dtype=torch.float64)
    _, op_upd = pconv_cuda.partial_conv2d(x, m, w, None, stride, padding, dilation, multi_channel=multi)
    torch.testing.assert_close(op_upd, upd, rtol=0, atol=0)
