"""The unfused partial convolution, in plain PyTorch: the correctness oracle and the benchmark baseline.

It runs the algorithm of NVIDIA's ``PartialConv2d`` and ``PartialConv3d`` (models/partialconv2d.py and
partialconv3d.py of NVIDIA/partialconv) step by step: a second convolution with a ones kernel of shape
(C_out, C_in, kh, kw) (or (..., kd, kh, kw)) to count mask pixels, ``+ 1e-8``,
divide, clamp, multiply, the real convolution on ``input * mask``, remove and re-add the bias. It is
deliberately not optimised.

One deliberate difference from NVIDIA's layer: the bias branch there multiplies the renormalised output by the
updated mask once more (``((raw - b) * ratio + b) * U``), which for soft masks whose window sum S lies in (0, 1)
scales ``raw`` by U**2 while the no-bias branch scales it by U. Here both branches compute
``raw * ratio + b * U`` (docs/architecture.md, "The maths"). For binary masks, and wherever S >= 1 or S == 0,
the two agree.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IntOrPair = Union[int, Tuple[int, int]]

EPS = 1e-8  # NVIDIA's epsilon; it is what overflows fp16 (win / 1e-8 > 65504).


def partial_conv2d(
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
    """Unfused partial convolution. Returns ``(output, updated_mask)``.

    ``S = conv(M, ones)``, ``ratio = win / (S + 1e-8) * clamp(S, 0, 1)``,
    ``output = (conv(X * M, W) + b - b) * ratio + b * clamp(S, 0, 1)``.
    ``mask=None`` means an all-ones mask. The updated mask has NVIDIA's shape: (N_mask, 1, H', W') single-channel,
    (N_mask, C_out, H', W') multi-channel.
    """
    return _partial_conv(input, mask, weight, bias, stride, padding, dilation, groups, multi_channel)


def partial_conv3d(
    input: Tensor,
    mask: Optional[Tensor],
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: Union[int, Tuple[int, int, int]] = 1,
    padding: Union[int, Tuple[int, int, int]] = 0,
    dilation: Union[int, Tuple[int, int, int]] = 1,
    groups: int = 1,
    multi_channel: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Unfused 3-D partial convolution, NVIDIA's ``PartialConv3d`` algorithm: :func:`partial_conv2d` with
    ``F.conv3d``, a (kd, kh, kw) ones kernel and ``win = kd*kh*kw`` (``C_in*kd*kh*kw`` multi-channel)."""
    return _partial_conv(input, mask, weight, bias, stride, padding, dilation, groups, multi_channel)


def _partial_conv(input, mask, weight, bias, stride, padding, dilation, groups, multi_channel):
    conv = F.conv3d if weight.dim() == 5 else F.conv2d
    c_out, kernel = weight.shape[0], tuple(weight.shape[2:])
    c_in = input.shape[1]
    if mask is None:
        if multi_channel:
            mask = torch.ones_like(input)
        else:
            mask = torch.ones(1, 1, *input.shape[2:], dtype=input.dtype, device=input.device)
    mask = mask.to(input.dtype)
    taps = 1
    for k in kernel:
        taps *= k
    with torch.no_grad():
        if multi_channel:
            ones = torch.ones(c_out, c_in, *kernel, dtype=input.dtype, device=input.device)
            win = c_in * taps
        else:
            ones = torch.ones(1, 1, *kernel, dtype=input.dtype, device=input.device)
            win = taps
        s = conv(mask, ones, None, stride, padding, dilation, 1)
        ratio = win / (s + EPS)
        updated_mask = torch.clamp(s, 0, 1)
        ratio = ratio * updated_mask
    raw = conv(input * mask, weight, bias, stride, padding, dilation, groups)
    if bias is not None:
        b = bias.view(1, c_out, *(1,) * len(kernel))
        output = (raw - b) * ratio + b * updated_mask
    else:
        output = raw * ratio
    return output, updated_mask


class _UnfusedPartialConv:
    """NVIDIA's module interface (``multi_channel``, ``return_mask``, ``forward(input, mask_in=None)``) on the
    unfused algorithm above, for PartialConv2d and PartialConv3d here. Unlike NVIDIA's layers it keeps no state
    between calls: ``mask_in=None`` is an all-ones mask every time."""

    def __init__(self, *args, multi_channel: bool = False, return_mask: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.padding_mode != "zeros":
            raise ValueError(f"padding_mode must be 'zeros' for a partial convolution, got {self.padding_mode!r}")
        self.multi_channel = multi_channel
        self.return_mask = return_mask

    def forward(self, input: Tensor, mask_in: Optional[Tensor] = None):
        output, updated_mask = _partial_conv(input, mask_in, self.weight, self.bias, self.stride, self.padding,
                                             self.dilation, self.groups, self.multi_channel)
        if self.return_mask:
            return output, updated_mask
        return output


class PartialConv2d(_UnfusedPartialConv, nn.Conv2d):
    """NVIDIA's PartialConv2d interface on the unfused algorithm above (the baseline for benchmarks)."""


class PartialConv3d(_UnfusedPartialConv, nn.Conv3d):
    """NVIDIA's PartialConv3d interface on the unfused algorithm above (the 3-D benchmark's baseline)."""
