"""The pure-PyTorch peer: the best partial convolution a user writes in ~15 lines of plain PyTorch.

This is what projects such as torch_pconv do: one channel-summed mask plane, one single-channel convolution with a
ones kernel for the window sum S, the real convolution on X*M, and the renormalisation as a broadcast multiply. It
has exactly pconv_cuda's semantics (README "Exact semantics"): no epsilon; ratio = win / S * U where S > 0, else 0,
in float32 (float64 for float64 input) whatever the input dtype; U = clamp(S, 0, 1); Y = conv(X*M, W) * ratio + b*U;
mask=None is an all-ones mask (borders still renormalised); a batch-1 mask broadcasts; the updated mask is
(N_mask, 1, H', W') in the input dtype; the mask gets no gradient. Unlike the op it does not check mask values.

`benchmarks/bench.py` times it next to the fused op, the unfused reference and the plain convolution.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

IntOrPair = Union[int, Tuple[int, int]]


def peer_partial_conv2d(
    input: Tensor,
    mask: Optional[Tensor],
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    multi_channel: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Partial convolution in plain PyTorch. Returns ``(output, updated_mask)`` like ``pconv_cuda.partial_conv2d``;
    a 5-D input (N, C, D, H, W) with a (C_out, C_in / groups, kd, kh, kw) weight is the 3-D layer
    (``pconv_cuda.partial_conv3d``)."""
    c_in, kernel = input.shape[1], tuple(weight.shape[2:])
    conv = F.conv3d if len(kernel) == 3 else F.conv2d
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    win = c_in if multi_channel else 1
    for k in kernel:
        win *= k
    with torch.no_grad():  # S, ratio and U depend on the mask only, which gets no gradient
        if mask is None:
            plane = torch.full((1, 1, *input.shape[2:]), float(c_in if multi_channel else 1), dtype=acc,
                               device=input.device)
        else:
            mask = mask.detach().to(input.dtype)
            plane = mask.sum(1, keepdim=True, dtype=acc) if multi_channel else mask.to(acc)
        ones = torch.ones(1, 1, *kernel, dtype=acc, device=input.device)
        s = conv(plane, ones, None, stride, padding, dilation)
        updated = s.clamp(0, 1)
        ratio = torch.where(s > 0, win / s, 0) * updated
    raw = conv(input if mask is None else input * mask, weight, None, stride, padding, dilation, groups)
    out = raw * ratio  # in `acc`: fp16/bf16 raw is promoted, and cast back once at the end
    if bias is not None:
        out = out.addcmul_(bias.view(1, -1, *(1,) * len(kernel)), updated)  # + b*U in the same pass
    return out.to(input.dtype), updated.to(input.dtype)
