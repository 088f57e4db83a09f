"""Double backward (gradient penalties) and torch.func through the op, the Function and the module."""
from __future__ import annotations

import pytest
import torch
from torch.autograd import gradgradcheck

import importlib.util
import os

import pconv_cuda
from pconv_cuda import reference
from helpers import SAMPLES, conv_args, make_inputs, make_layer, nondet_tol

# The epsilon-free pure-PyTorch layer (benchmarks/peer.py): same semantics as the op, differentiable to any order.
# NVIDIA's reference adds 1e-8 to S, which second derivatives amplify to ~1e-6 relative.
_spec = importlib.util.spec_from_file_location(
    "peer", os.path.join(os.path.dirname(__file__), "..", "benchmarks", "peer.py"))
peer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peer)


@pytest.mark.parametrize("sample", SAMPLES[::2], ids=str)
def test_gradgradcheck_op(sample, backend):
    x, m, w, b = make_inputs(sample, torch.float64, backend.device, requires_grad=True)
    args = conv_args(sample)
    assert gradgradcheck(lambda x, w, b: backend.ops.partial_conv2d(x, m, w, b, *args)[0], (x, w, b),
                         nondet_tol=nondet_tol(backend.device))


@pytest.mark.parametrize("sample", SAMPLES[1::4], ids=str)
def test_gradgradcheck_function_and_module(sample, main_backend):
    device = main_backend.device
    x, m, w, b = make_inputs(sample, torch.float64, device, requires_grad=True)
    args = conv_args(sample)
    assert gradgradcheck(lambda x, w, b: pconv_cuda.PartialConv2dFunction.apply(x, m, w, b, *args)[0], (x, w, b),
                         nondet_tol=nondet_tol(device))
    layer = make_layer(sample, device)
    assert gradgradcheck(lambda x: layer(x, m), (x,), nondet_tol=nondet_tol(device))


def _two_layers(conv, x, m, params):
    """PartialConv2d -> tanh -> PartialConv2d with the same mask path as PConvUNet's encoder."""
    w1, b1, w2, b2 = params
    h, m1 = conv(x, m, w1, b1, 1, 1, 1, 1, False)
    h = torch.tanh(h)
    out, _ = conv(h, m1[:1] if m1.shape[0] != h.shape[0] else m1, w2, b2, 2, 1, 1, 1, False)
    return out


@pytest.mark.parametrize("conv", ["op", "module"])
def test_gradient_penalty_matches_the_reference(main_backend, conv):
    # R1-style penalty: || d out.sum() / d x ||^2, differentiated w.r.t. the parameters. The oracle is plain
    # PyTorch without epsilon (twice differentiable by construction); float64, so only summation order differs.
    device = main_backend.device
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 10, 9, generator=g, dtype=torch.float64).to(device)
    m = (torch.rand(2, 1, 10, 9, generator=g) > 0.3).double().to(device)
    params = [torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64) * 0.3, torch.randn(4, generator=g).double(),
              torch.randn(5, 4, 3, 3, generator=g, dtype=torch.float64) * 0.3, torch.randn(5, generator=g).double()]
    params = [p.to(device) for p in params]

    def fused(x, m, w, b, s, p, d, groups, multi):
        if conv == "module":
            layer = pconv_cuda.PartialConv2d(w.shape[1], w.shape[0], w.shape[2:], s, p, bias=False,
                                             return_mask=True, device=device, dtype=torch.float64)
            out, upd = torch.func.functional_call(layer, {"weight": w}, (x, m))
            return out + b.view(1, -1, 1, 1) * upd, upd
        return pconv_cuda.partial_conv2d(x, m, w, b, s, p, d, groups, multi)

    def ref(x, m, w, b, s, p, d, groups, multi):
        return peer.peer_partial_conv2d(x, m, w, b, s, p, d, groups, multi)

    grads = []
    for impl in (fused, ref):
        ps = [p.clone().requires_grad_(True) for p in params]
        xi = x.clone().requires_grad_(True)
        out = _two_layers(impl, xi, m, ps)
        gx, = torch.autograd.grad(out.sum(), xi, create_graph=True)
        penalty = (gx ** 2).sum() + out.pow(2).mean()
        grads.append(torch.autograd.grad(penalty, ps))
    for a, r in zip(*grads):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)


def test_first_order_backward_does_not_build_a_graph():
    # Without create_graph the fused backward op runs (no extra graph, no differentiable re-formulation).
    x, m, w, b = make_inputs(SAMPLES[0], torch.float64, requires_grad=True)
    out, _ = pconv_cuda.partial_conv2d(x, m, w, b, *conv_args(SAMPLES[0]))
    gx, = torch.autograd.grad(out.sum(), x)
    assert gx.grad_fn is None and not gx.requires_grad


# --- torch.func ------------------------------------------------------------------------------------------------

def test_func_grad_vjp_jacrev_through_functional_and_function():
    s = SAMPLES[0]
    x, m, w, b = make_inputs(s, torch.float64)
    args = conv_args(s)

    def f_functional(x, w, b):
        return pconv_cuda.partial_conv2d(x, m, w, b, *args)[0]

    def f_function(x, w, b):
        return pconv_cuda.PartialConv2dFunction.apply(x, m, w, b, *args)[0]

    def f_ref(x, w, b):
        return reference.partial_conv2d(x, m, w, b, *args)[0]

    for f in (f_functional, f_function):
        for argnums in (0, 1, 2):
            got = torch.func.grad(lambda *a: f(*a).pow(2).sum(), argnums=argnums)(x, w, b)
            want = torch.func.grad(lambda *a: f_ref(*a).pow(2).sum(), argnums=argnums)(x, w, b)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        out, vjp_fn = torch.func.vjp(f, x, w, b)
        ref_out, ref_vjp = torch.func.vjp(f_ref, x, w, b)
        ct = torch.randn_like(out)
        for a, r in zip(vjp_fn(ct), ref_vjp(ct)):
            torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-6)
        jac = torch.func.jacrev(f, argnums=2)(x, w, b)
        torch.testing.assert_close(jac, torch.func.jacrev(f_ref, argnums=2)(x, w, b), rtol=1e-6, atol=1e-6)


def test_func_jacrev_and_vmap_through_the_module():
    s = SAMPLES[0]
    layer = pconv_cuda.PartialConv2d(s.c_in, s.c_out, 3, padding=1, dtype=torch.float64)
    x, m, _, _ = make_inputs(s, torch.float64)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    jac = torch.func.jacrev(lambda p: torch.func.functional_call(layer, p, (x, m)))(params)
    for name, p in params.items():
        want = torch.autograd.functional.jacobian(
            lambda t: torch.func.functional_call(layer, {**params, name: t}, (x, m)), p)
        torch.testing.assert_close(jac[name], want, rtol=1e-10, atol=1e-10)
    batched = torch.func.vmap(lambda xi, mi: layer(xi[None], mi[None])[0])(x, m)
    torch.testing.assert_close(batched, layer(x, m), rtol=1e-12, atol=1e-12)


def test_forward_mode_ad_is_a_clear_error():
    # Forward mode is not supported (the README says: use reverse mode). A custom jvp would name the alternative
    # but makes Dynamo refuse to trace the Function, so torch's own NotImplementedError is what users see.
    s = SAMPLES[0]
    x, m, w, b = make_inputs(s, torch.float64)
    with pytest.raises(NotImplementedError, match="jvp"):
        torch.func.jvp(lambda x: pconv_cuda.partial_conv2d(x, m, w, b, *conv_args(s))[0], (x,), (torch.ones_like(x),))
