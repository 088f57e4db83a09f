"""Choosing how the forward convolution runs (docs/architecture.md, "Routes").

Routes: ``"aten_conv"`` (ATen's convolution, cuDNN or oneDNN, on X*M, then the epilogue pass; the default),
``"gemm"`` (pconv_cuda's own GEMM over X*M: im2col + GEMM on the CPU, an implicit-GEMM kernel with the epilogue
fused on CUDA) and, on CUDA only, ``"cudnn_fused"`` (one cuDNN kernel for the convolution and the renormalisation,
built through cuDNN's graph API: channels_last float16/bfloat16/float32 2-D ungrouped calls; see
:func:`cudnn_fused_support`). ``"auto"`` lets the backend choose: on the CPU always aten_conv (oneDNN; measured
faster on every U-Net layer), on CUDA cuDNN unless ``torch.backends.cudnn.benchmark`` is on, in which case each
eligible route is timed once per shape (CUDA events) and the fastest one is cached for the process.

Precedence: :func:`set_route` / :func:`use_route` > the ``PCONV_CPU_ROUTE`` / ``PCONV_CUDA_ROUTE`` environment
variables > ``"auto"``. A forced route a call cannot take (gemm with channels_last; cudnn_fused with NCHW, groups,
float64, 3-D, or a call cuDNN has no plan for) falls back to aten_conv; :func:`last_route` says which ran.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List

import torch

from pconv_cuda import _C  # noqa: F401  (defines the ops)

ROUTES = ("auto", "aten_conv", "gemm", "cudnn_fused")


def _ops(ns: str):
    return getattr(torch.ops, ns)


def set_route(route: str, device_type: str = "cuda", *, _ns: str = "pconv_cuda") -> None:
    """Forces `route` ('auto', 'aten_conv', 'gemm', or on 'cuda' 'cudnn_fused') for every later call on
    `device_type` ('cpu' or 'cuda')."""
    _ops(_ns)._set_route(device_type, route)


def get_route(device_type: str = "cuda", *, _ns: str = "pconv_cuda") -> str:
    """The route set by :func:`set_route` ('auto' when none; the environment variable is not consulted)."""
    return _ops(_ns)._get_route(device_type)


@contextlib.contextmanager
def use_route(route: str, device_type: str = "cuda", *, _ns: str = "pconv_cuda") -> Iterator[None]:
    """Context manager form of :func:`set_route`; restores the previous setting on exit."""
    previous = get_route(device_type, _ns=_ns)
    set_route(route, device_type, _ns=_ns)
    try:
        yield
    finally:
        set_route(previous, device_type, _ns=_ns)


def last_route(device_type: str = "cuda", *, _ns: str = "pconv_cuda") -> str:
    """The route the last forward on this thread took on `device_type` ('' before any)."""
    return _ops(_ns)._last_route(device_type)


def tuned_routes(*, _ns: str = "pconv_cuda") -> List[str]:
    """The autotuner's cache: one 'shape key -> route' line per tuned call shape."""
    return list(_ops(_ns)._route_cache())


def clear_tuned_routes(*, _ns: str = "pconv_cuda") -> None:
    """Forgets every tuned route (the next call of each shape is timed again)."""
    _ops(_ns)._clear_route_cache()


_FUSED_STAGES = ("surface", "validate", "plan")


def cudnn_fused_support(input: torch.Tensor, mask, weight: torch.Tensor, bias=None, stride=1, padding=0,
                        dilation=1, groups: int = 1, multi_channel: bool = False, *, stage: str = "plan") -> str:
    """Why the ``cudnn_fused`` route would not take this 2-D call, or ``""`` when it would.

    The tensors only describe the call (shapes, dtype, layout; CPU or meta tensors do for the first two stages).
    `stage`: ``"surface"`` (what the call's description excludes: NCHW, groups, float64, 3-D, empty tensors),
    ``"validate"`` (then the cuDNN graph built and validated; no GPU needed) or ``"plan"`` (then cuDNN's plan on the
    input's GPU, built once per call shape and cached, as the route itself does)."""
    from pconv_cuda.functional import _ntuple, resolve_padding
    if stage not in _FUSED_STAGES:
        raise ValueError(f"cudnn_fused_support: stage must be one of {_FUSED_STAGES}, got {stage!r}")
    if not hasattr(torch.ops.pconv_cuda, "_cudnn_fused_support"):
        return "this build of pconv_cuda has no CUDA kernels (the cudnn_fused route is CUDA only)"
    n = input.dim() - 2
    kernel = tuple(weight.shape[2:])
    stride_, dilation_ = _ntuple(stride, n, "stride"), _ntuple(dilation, n, "dilation")
    padding_ = resolve_padding(padding, kernel, dilation_, stride_)
    return torch.ops.pconv_cuda._cudnn_fused_support(input, mask, weight, bias, stride_, padding_, dilation_, groups,
                                                     bool(multi_channel), stage)


def cudnn_fused_status() -> str:
    """``""`` when this build has the ``cudnn_fused`` route, else why not (no CUDA, or no cudnn-frontend headers)."""
    if not hasattr(torch.ops.pconv_cuda, "_cudnn_fused_status"):
        return "this build of pconv_cuda has no CUDA kernels (the cudnn_fused route is CUDA only)"
    return torch.ops.pconv_cuda._cudnn_fused_status()


def cudnn_fused_plans() -> List[str]:
    """The route's plan cache, most recently used first: one ``"call key -> plan (build ms, workspace)"`` or
    ``"call key -> unsupported: why"`` line per call shape seen (at most 256 are kept)."""
    if not hasattr(torch.ops.pconv_cuda, "_cudnn_fused_plans"):
        return []
    return list(torch.ops.pconv_cuda._cudnn_fused_plans())
