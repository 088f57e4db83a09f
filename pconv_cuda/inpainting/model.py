"""The inpainting U-Net of Liu et al. 2018 ("Image Inpainting for Irregular Holes Using Partial Convolutions",
section 3.3 and the architecture table of the supplement), on any ``PartialConv2d``-compatible layer class.

Encoder (layer i = 1..L, stride 2, ReLU, BatchNorm on all but the first)::

    kernel   7   5   5   3   3   3   3   3
    C_out   64 128 256 512 512 512 512 512

Decoder (layer i = L..1): nearest 2x upsampling of the features and of the mask, concatenation with encoder layer
i-1's features and mask (the input image and mask for i = 1), 3x3 stride-1 partial conv, BatchNorm and
LeakyReLU(0.2) on all but the last, which maps 64 + 3 channels to 3 with neither.

Masks. The paper concatenates the skip masks with the upsampled masks, so the decoder's partial convs are
multi-channel: the renormalisation counts valid inputs over the channels of both halves. The first encoder layer is
multi-channel too, so a per-channel input mask is honoured. After it, every channel of an updated mask is the same
map (the window sum S does not depend on the output channel), so the network carries one channel per mask and
expands it where a multi-channel layer needs C channels. For the deeper encoder layers, whose inputs carry such
channel-uniform masks, a single-channel partial conv gives exactly the multi-channel result for binary masks
(S and win both scale by C_in, U = clamp(S, 0, 1) is unchanged since S is 0 or >= 1); it costs a kh x kw window sum
instead of C_in x kh x kw. For soft masks (values strictly between 0 and 1) the two differ where 0 < S < 1: masks
are meant to be binary here, as in the paper.

Channel groups. With a layer class whose ``forward`` takes ``mask_groups`` (``pconv_cuda.PartialConv2d``), the
network never forms a C-channel mask: a decoder layer gets its skip link's two maps (the upsampled one and the
encoder's, or the image mask's maps) as ``mask_groups=(C_up, C_skip)``, and the first layer gets the image mask as
one group when it is one map (1 channel, or one map expanded over the image's channels). The result is that of the
concatenated C-channel masks (bitwise on the CPU; tests/test_model.py), at the cost of reading G maps instead of
C channels, and autograd keeps those maps instead of C-channel masks. Where the layer also takes ``input_masked``,
the skip link's concatenation is written already masked (``pconv_cuda.functional.masked_cat``: one pass over the
two halves) and the layer convolves it as it is, so no decoder layer forms X * M a second time. Other layer
classes get the concatenated masks (expanded views where they can be).
"""
from __future__ import annotations

import inspect
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_ENC_KERNELS = (7, 5, 5, 3)  # layers beyond the 4th keep the last entry
_ENC_WIDTHS = (1, 2, 4, 8)  # x base_channels; 64, 128, 256, 512 for the paper's network


def encoder_plan(layer_size: int, base_channels: int = 64) -> List[Tuple[int, int]]:
    """``(out_channels, kernel_size)`` of each encoder layer, shallowest first."""
    return [
        (base_channels * _ENC_WIDTHS[min(i, 3)], _ENC_KERNELS[min(i, 3)]) for i in range(layer_size)
    ]


class _PConvBlock(nn.Module):
    """Partial conv -> optional BatchNorm -> optional activation; passes the updated mask along."""

    def __init__(
        self,
        pconv: Callable[..., nn.Module],
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        *,
        multi_channel: bool,
        bn: bool,
        activation: Optional[nn.Module],
    ) -> None:
        super().__init__()
        # A bias in front of BatchNorm would be cancelled by the mean subtraction wherever the mask is 1,
        # so only the layers without BN carry one (the common re-implementations do the same).
        self.conv = pconv(
            in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=not bn,
            multi_channel=multi_channel, return_mask=True,
        )
        self.bn = nn.BatchNorm2d(out_channels) if bn else None
        self.activation = activation

        # Whether the layer takes a mask by channel groups (mask_groups), so that the network never expands one, and
        # an input already masked (input_masked), so that a skip link's concatenation is written masked.
        try:
            params = inspect.signature(self.conv.forward).parameters
        except (TypeError, ValueError):
            params = {}
        self.grouped = "mask_groups" in params
        self.takes_masked_input = self.grouped and multi_channel and "input_masked" in params

    def forward(self, x: Tensor, mask: Tensor, mask_groups: Optional[Tuple[int, ...]] = None,
                input_masked: bool = False) -> Tuple[Tensor, Tensor]:
        """``mask`` is C-channel, or (with ``mask_groups``, only for a ``grouped`` layer) G maps of channel groups;
        ``input_masked`` (a ``takes_masked_input`` layer): ``x`` already is X * mask."""
        if mask_groups is None:
            x, mask = self.conv(x, mask)
        elif input_masked:
            x, mask = self.conv(x, mask, mask_groups=mask_groups, input_masked=True)
        else:
            x, mask = self.conv(x, mask, mask_groups=mask_groups)
        if self.bn is not None:
            x = self.bn(x)
        if self.activation is not None:
            x = self.activation(x)
        return x, mask


class PConvUNet(nn.Module):
    """The PConv U-Net of Liu et al. 2018.

    Args:
        layer_size: number of encoder (and decoder) layers: 7 for 256x256 inputs, 8 for 512x512 (the paper).
            Any value >= 1 works; inputs must have height and width divisible by ``2**layer_size``.
            Values below 7 are for tests and CPU demos (the channel plan is the paper's, truncated).
        in_channels: channels of the image (3 for RGB); the output has the same number of channels.
        pconv: the partial-convolution class, with the interface of ``pconv_cuda.PartialConv2d``
            (an ``nn.Conv2d`` subclass taking ``multi_channel`` and ``return_mask``). ``None`` means
            ``pconv_cuda.PartialConv2d``; pass ``pconv_cuda.reference.PartialConv2d`` for the unfused network.
        freeze_encoder_bn: keep the encoder's BatchNorm layers in eval mode and their affine parameters
            frozen, for the paper's fine-tuning stage. See :meth:`set_freeze_encoder_bn`.
        base_channels: width of the first layer (64 in the paper); the others scale with it. Not in the paper:
            smaller values make CPU tests and demos affordable.

    ``forward(image, mask)`` takes ``image`` (N, in_channels, H, W) and ``mask`` (N, 1, H, W) or
    (N, in_channels, H, W) with 1 = valid pixel, 0 = hole, and returns ``(output, output_mask)``: the network's
    output (N, in_channels, H, W), hole pixels included, and the last layer's updated mask
    (N, in_channels, H, W). The composite ``mask * image + (1 - mask) * output`` is the inpainted image.
    The output does not depend on the image's values inside the holes.
    """

    def __init__(
        self,
        layer_size: int = 7,
        in_channels: int = 3,
        *,
        pconv: Optional[Callable[..., nn.Module]] = None,
        freeze_encoder_bn: bool = False,
        base_channels: int = 64,
    ) -> None:
        super().__init__()
        if not isinstance(layer_size, int) or layer_size < 1:
            raise ValueError(f"layer_size must be an int >= 1 (7 for 256x256, 8 for 512x512), got {layer_size!r}")
        if in_channels < 1 or base_channels < 1:
            raise ValueError(
                f"in_channels and base_channels must be >= 1, got {in_channels} and {base_channels}"
            )
        if pconv is None:
            import pconv_cuda  # lazily: the package imports its compiled ops on first use

            pconv = pconv_cuda.PartialConv2d
        self.layer_size = layer_size
        self.in_channels = in_channels
        self.base_channels = base_channels
        self.freeze_encoder_bn = False

        plan = encoder_plan(layer_size, base_channels)
        widths = [in_channels] + [c for c, _ in plan]  # widths[i] = channels of encoder layer i's output
        self.encoder = nn.ModuleList()
        for i, (c_out, k) in enumerate(plan):
            self.encoder.append(
                _PConvBlock(
                    pconv, widths[i], c_out, k, 2,
                    multi_channel=(i == 0), bn=(i > 0), activation=nn.ReLU(),
                )
            )
        # decoder[j] is the paper's decoder layer i = layer_size - j (deepest first).
        self.decoder = nn.ModuleList()
        for i in range(layer_size, 0, -1):
            last = i == 1
            self.decoder.append(
                _PConvBlock(
                    pconv, widths[i] + widths[i - 1], widths[i - 1], 3, 1,
                    multi_channel=True, bn=not last,
                    activation=None if last else nn.LeakyReLU(0.2),
                )
            )
        self._init_weights()
        if freeze_encoder_bn:
            self.set_freeze_encoder_bn(True)

    def _init_weights(self) -> None:
        # He initialisation, as the paper states; BatchNorm keeps PyTorch's (1, 0).
        for block in [*self.encoder, *self.decoder]:
            nn.init.kaiming_normal_(block.conv.weight, mode="fan_in", nonlinearity="relu")
            if block.conv.bias is not None:
                nn.init.zeros_(block.conv.bias)

    def _encoder_bns(self) -> List[nn.BatchNorm2d]:
        return [block.bn for block in self.encoder if block.bn is not None]

    def set_freeze_encoder_bn(self, freeze: bool = True) -> "PConvUNet":
        """Freeze (or unfreeze) the encoder's BatchNorm: eval mode (running statistics, no updates) and
        ``requires_grad=False`` on its affine parameters. Build the optimizer after calling this."""
        self.freeze_encoder_bn = bool(freeze)
        for bn in self._encoder_bns():
            for p in bn.parameters():
                p.requires_grad_(not freeze)
        return self.train(self.training)

    def train(self, mode: bool = True) -> "PConvUNet":
        super().train(mode)
        if self.freeze_encoder_bn:
            for bn in self._encoder_bns():
                bn.eval()
        return self

    def _check_inputs(self, image: Tensor, mask: Tensor) -> Tensor:
        if image.dim() != 4 or image.shape[1] != self.in_channels:
            raise ValueError(
                f"image must have shape (N, {self.in_channels}, H, W), got {tuple(image.shape)}"
            )
        n, c, h, w = image.shape
        multiple = 2 ** self.layer_size
        if h % multiple or w % multiple:
            raise ValueError(
                f"image height and width must be multiples of 2**layer_size = {multiple} "
                f"(layer_size={self.layer_size}), got {h}x{w}; pad the image and mask with "
                f"pconv_cuda.inpainting.pad_to_multiple and crop the result back with crop_to"
            )
        if (mask.dim() != 4 or mask.shape[1] not in (1, c) or mask.shape[2:] != image.shape[2:]
                or mask.shape[0] not in (1, n)):
            raise ValueError(
                f"mask must have shape ({n}, 1, {h}, {w}) or ({n}, {c}, {h}, {w}), got {tuple(mask.shape)}"
            )
        if not mask.is_floating_point():
            mask = mask.to(image.dtype if image.is_floating_point() else torch.float32)
        return mask.expand(n, c, h, w)

    def forward(self, image: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
        """Inpaint ``image`` where ``mask`` is 0. Returns ``(output, output_mask)``; see the class docstring."""
        mask = self._check_inputs(image, mask)
        feats: List[Tensor] = [image]
        # masks[i]: the maps of feats[i]'s mask and the channels each covers; one map for i >= 1 (see the module
        # docstring), the image mask's maps for i = 0.
        masks: List[Tuple[Tensor, Tuple[int, ...]]] = [_as_groups(mask)]
        x = image
        m, sizes = masks[0]
        for block in self.encoder:
            x, m = block(*_mask_args(block, x, m, sizes))
            m = m[:, :1]
            sizes = (x.shape[1],)
            feats.append(x)
            masks.append((m, sizes))

        h, hm = feats[-1], masks[-1][0]
        for j, block in enumerate(self.decoder):
            i = self.layer_size - j
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            hm = F.interpolate(hm, scale_factor=2.0, mode="nearest")
            skip, (skip_m, skip_sizes) = feats[i - 1], masks[i - 1]
            # Upsampled half first, then the skip (the layout of the common re-implementations' weights).
            maps = torch.cat([hm, skip_m.expand(hm.shape[0], -1, -1, -1)], dim=1)
            sizes = (h.shape[1], *skip_sizes)
            if block.takes_masked_input:  # the concatenation written masked, in one pass; not masked again
                from pconv_cuda.functional import masked_cat

                h, hm = block(masked_cat([h, skip], maps, sizes), maps, sizes, input_masked=True)
            else:
                h, hm = block(*_mask_args(block, torch.cat([h, skip], dim=1), maps, sizes))
            if i > 1:
                hm = hm[:, :1]
        return h, hm


def _as_groups(mask: Tensor) -> Tuple[Tensor, Tuple[int, ...]]:
    """A C-channel mask as (maps, channels per map): one map when it repeats one (1 channel, or one map expanded
    over the channels: stride 0), else one map per channel."""
    c = mask.shape[1]
    if c == 1 or mask.stride(1) == 0:
        return mask[:, :1], (c,)
    return mask, (1,) * c


def _mask_args(block: _PConvBlock, x: Tensor, maps: Tensor, sizes: Tuple[int, ...]):
    """block's arguments for input x with a mask of `maps` covering `sizes` channels: the maps and their groups
    for a layer that takes them; else the C-channel mask they stand for (expanded views, concatenated)."""
    if not getattr(block.conv, "multi_channel", True):  # a single-channel layer: the one map
        return x, maps
    if block.grouped:
        return x, maps, sizes
    if len(sizes) == maps.shape[1] and all(s == 1 for s in sizes):
        return x, maps
    parts = [maps[:, g:g + 1].expand(-1, s, -1, -1) for g, s in enumerate(sizes)]
    return x, (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))


def pad_to_multiple(image: Tensor, mask: Tensor, multiple: int) -> Tuple[Tensor, Tensor, Tuple[int, int]]:
    """Pad ``image`` and ``mask`` (N, C, H, W) on the bottom and right to multiples of ``multiple``.

    Both are reflected (replicated where the pad exceeds the image), so the padding continues the picture and its
    holes instead of adding a border the network has to fill. Returns ``(image, mask, (H, W))``; give the
    original size to :func:`crop_to` to undo it.
    """
    h, w = image.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return image, mask, (h, w)
    mode = "reflect" if ph < h and pw < w else "replicate"
    pad = (0, pw, 0, ph)
    return F.pad(image, pad, mode=mode), F.pad(mask, pad, mode=mode), (h, w)


def crop_to(x: Tensor, size: Sequence[int]) -> Tensor:
    """Crop (..., H', W') back to the top-left ``size`` = (H, W) given by :func:`pad_to_multiple`."""
    return x[..., : size[0], : size[1]]
