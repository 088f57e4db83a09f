"""Choosing how the forward convolution runs (docs/architecture.md, "Routes").

Routes: ``"aten_conv"`` (ATen's convolution, cuDNN or oneDNN, on X*M, then the epilogue pass; the default) and
``"gemm"`` (pconv_cuda's own GEMM over X*M: im2col + GEMM on the CPU, an implicit-GEMM kernel with the epilogue
fused on CUDA). ``"auto"`` lets the backend choose: on the CPU always aten_conv (oneDNN; measured faster on every
U-Net layer), on CUDA cuDNN unless ``torch.backends.cudnn.benchmark`` is on, in which case each eligible route is timed
once per shape (CUDA events) and the faster one is cached for the process.

Precedence: :func:`set_route` / :func:`use_route` > the ``PCONV_CPU_ROUTE`` / ``PCONV_CUDA_ROUTE`` environment
variables > ``"auto"``. A forced route a call cannot take (gemm with channels_last on either device) falls back to
aten_conv; :func:`last_route` says which ran.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List

import torch

from pconv_cuda import _C  # noqa: F401  (defines the ops)

ROUTES = ("auto", "aten_conv", "gemm")


def _ops(ns: str):
    return getattr(torch.ops, ns)


def set_route(route: str, device_type: str = "cuda", *, _ns: str = "pconv_cuda") -> None:
    """Forces `route` ('auto', 'aten_conv' or 'gemm') for every later call on `device_type` ('cpu' or 'cuda')."""
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
