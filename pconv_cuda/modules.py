"""nn.Module front of the fused op."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from pconv_cuda.functional import partial_conv1d, partial_conv2d, partial_conv3d, resolve_padding


def _check_padding_mode(padding_mode: str) -> None:
    if padding_mode != "zeros":
        raise ValueError(
            f"padding_mode must be 'zeros' for a partial convolution (padding counts as hole; that is the "
            f"'partial convolution based padding' of the method), got {padding_mode!r}")


class _PartialConv:
    """What PartialConv1d, PartialConv2d and PartialConv3d add to their nn.ConvNd: the method's keywords, the call of
    their functional form (`_functional`) with 'same' / 'valid' resolved once, the returned mask, the repr."""

    multi_channel: bool
    return_mask: bool

    def _init_partial(self, multi_channel: bool, return_mask: bool) -> None:
        self.multi_channel = multi_channel
        self.return_mask = return_mask
        # Resolved once: 'same' / 'valid' become the symmetric padding the functional form takes.
        self._op_padding = resolve_padding(self.padding, self.kernel_size, self.dilation, self.stride)

    def forward(self, input: Tensor, mask_in: Optional[Tensor] = None, mask_groups: Optional[Sequence[int]] = None,
                input_masked: bool = False):
        """``mask_groups`` (multi-channel layers): ``mask_in`` has G maps, map g covering the next
        ``mask_groups[g]`` input channels; ``input_masked=True``: ``input`` already is X * mask (zero in holes, as
        :func:`pconv_cuda.functional.masked_cat` forms it). As the functional form describes."""
        output, updated_mask = self._functional(input, mask_in, self.weight, self.bias, self.stride, self._op_padding,
                                                self.dilation, self.groups, self.multi_channel, mask_groups,
                                                input_masked)
        return self._returned(input, mask_in, output, updated_mask)

    def _returned(self, input: Tensor, mask_in: Optional[Tensor], output: Tensor, updated_mask: Tensor):
        if not self.return_mask:
            return output
        if self.multi_channel:  # NVIDIA's shape: one map per output channel (an expanded view here)
            batch = input.shape[0] if mask_in is None else updated_mask.shape[0]
            updated_mask = updated_mask.expand(batch, self.out_channels, *(-1,) * (updated_mask.dim() - 2))
        return output, updated_mask

    def extra_repr(self) -> str:
        return super().extra_repr() + f", multi_channel={self.multi_channel}, return_mask={self.return_mask}"


class PartialConv2d(_PartialConv, nn.Conv2d):
    """Drop-in replacement for NVIDIA's ``PartialConv2d`` on the fused op.

    A subclass of ``nn.Conv2d`` with the same parameters, so a state_dict of an ``nn.Conv2d`` or of NVIDIA's layer
    loads unchanged. ``forward(input, mask_in=None, mask_groups=None, input_masked=False)`` returns the output, or
    ``(output, updated_mask)`` with ``return_mask=True``; ``mask_groups`` (with ``multi_channel=True``) gives
    ``mask_in`` as G maps of channel groups, ``input_masked`` says the input already is X * mask
    (:func:`pconv_cuda.functional.partial_conv2d`). The updated mask has NVIDIA's shape: (N_mask, 1, H', W') for a single-channel mask,
    (N, C_out, H', W') with ``multi_channel=True`` (an expanded view: every channel is the same map).
    ``mask_in=None`` means no holes: only the borders are renormalised (computed in closed form each call; no mask
    is read and nothing carries over between calls).
    See :func:`pconv_cuda.functional.partial_conv2d` for the formula.
    """

    _functional = staticmethod(partial_conv2d)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Union[int, Tuple[int, int]],
        stride: Union[int, Tuple[int, int]] = 1,
        padding: Union[str, int, Tuple[int, int]] = 0,
        dilation: Union[int, Tuple[int, int]] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        multi_channel: bool = False,
        return_mask: bool = False,
    ) -> None:
        _check_padding_mode(padding_mode)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self._init_partial(multi_channel, return_mask)


class PartialConv1d(_PartialConv, nn.Conv1d):
    """1-D partial convolution with :class:`PartialConv2d`'s contract, on the same fused ops (a height-1 view).

    A subclass of ``nn.Conv1d`` (its state_dict loads unchanged); ``multi_channel`` and ``return_mask`` as in the 2-D
    layer; ``forward(input, mask_in=None)`` takes (N, C_in, L) and a mask (N or 1, 1, L), or (N or 1, C_in, L) with
    ``multi_channel=True``. The updated mask is (N_mask, 1, L'), or an expanded (N, C_out, L') view with
    ``multi_channel=True``. See :func:`pconv_cuda.functional.partial_conv1d`.
    """

    _functional = staticmethod(partial_conv1d)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Union[int, Tuple[int]],
        stride: Union[int, Tuple[int]] = 1,
        padding: Union[str, int, Tuple[int]] = 0,
        dilation: Union[int, Tuple[int]] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        multi_channel: bool = False,
        return_mask: bool = False,
    ) -> None:
        _check_padding_mode(padding_mode)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self._init_partial(multi_channel, return_mask)


class PartialConv3d(_PartialConv, nn.Conv3d):
    """Drop-in replacement for NVIDIA's ``PartialConv3d`` (video and volumetric inpainting) on the fused 3-D op.

    A subclass of ``nn.Conv3d`` (its state_dict, and NVIDIA's layer's, loads unchanged); ``multi_channel`` and
    ``return_mask`` as in :class:`PartialConv2d`; ``forward(input, mask_in=None)`` takes (N, C_in, D, H, W) and a
    mask (N or 1, 1, D, H, W), or (N or 1, C_in, D, H, W) with ``multi_channel=True``. The updated mask is
    (N_mask, 1, D', H', W'), or an expanded (N, C_out, D', H', W') view with ``multi_channel=True``. The same
    documented deviations from NVIDIA's layer as the 2-D one. See :func:`pconv_cuda.functional.partial_conv3d`.
    """

    _functional = staticmethod(partial_conv3d)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Union[int, Tuple[int, int, int]],
        stride: Union[int, Tuple[int, int, int]] = 1,
        padding: Union[str, int, Tuple[int, int, int]] = 0,
        dilation: Union[int, Tuple[int, int, int]] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        multi_channel: bool = False,
        return_mask: bool = False,
    ) -> None:
        _check_padding_mode(padding_mode)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self._init_partial(multi_channel, return_mask)
