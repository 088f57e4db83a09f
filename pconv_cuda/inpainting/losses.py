"""The training loss of Liu et al. 2018, section 3.4, with the errata of the updated arXiv version
(every L1 term is size-averaged: divided by the number of elements it sums over).

With I_out the network output, I_gt the ground truth, M the mask (1 = valid), I_comp = M*I_gt + (1-M)*I_out and
psi_p the VGG16 pool1/pool2/pool3 features of an image (p = 1, 2, 3)::

    valid      = mean |M * (I_out - I_gt)|                  (mean over N*C*H*W, not over the valid pixels)
    hole       = mean |(1 - M) * (I_out - I_gt)|
    perceptual = sum_p mean |psi_p(I_out) - psi_p(I_gt)| + sum_p mean |psi_p(I_comp) - psi_p(I_gt)|
    style_out  = sum_p mean |G_p(I_out) - G_p(I_gt)|,   G_p(I) = psi_p(I) psi_p(I)^T / (C_p H_p W_p)
    style_comp = sum_p mean |G_p(I_comp) - G_p(I_gt)|
    tv         = (sum over horizontally / vertically adjacent pixel pairs that both lie in P
                  of |I_comp[a] - I_comp[b]|) / (N*C*H*W),   P = hole region dilated by one pixel (3x3)
    total      = 1*valid + 6*hole + 0.05*perceptual + 120*(style_out + style_comp) + 0.1*tv

The mean over the C_p x C_p Gram entries is the paper's 1/(C_p C_p) factor; K_p = 1/(C_p H_p W_p) sits in G_p.

Images are in [0, 1]. The VGG extractor normalises them with the ImageNet mean and std itself, which is what
torchvision's pretrained VGG16 expects; feeding it [0, 1] or [-1, 1] images unnormalised is a common mistake.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: torchvision's ImageNet VGG16 weights file; looked for in torch.hub's checkpoint cache.
VGG16_FILENAME = "vgg16-397923af.pth"
#: features[:5], [5:10], [10:17] of torchvision's VGG16 end at pool1, pool2, pool3.
_VGG_SLICES = ((0, 5), (5, 10), (10, 17))

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms; the defaults are the paper's."""

    valid: float = 1.0
    hole: float = 6.0
    perceptual: float = 0.05
    style_out: float = 120.0
    style_comp: float = 120.0
    tv: float = 0.1


def _vgg16_features() -> nn.Sequential:
    from torchvision.models.vgg import cfgs, make_layers

    return make_layers(cfgs["D"], batch_norm=False)[: _VGG_SLICES[-1][1]]


def _default_vgg_path() -> Optional[Path]:
    path = Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILENAME
    return path if path.is_file() else None


class VGG16FeatureExtractor(nn.Module):
    """VGG16 pool1, pool2 and pool3 features of [0, 1] images, frozen.

    Args:
        weights: path to torchvision's ``vgg16`` state dict (``vgg16-397923af.pth``, keys ``features.N.*``)
            or to a state dict of ``vgg16().features`` (keys ``N.*``); ``None`` looks for the file in
            torch.hub's cache (``$TORCH_HOME/hub/checkpoints``) and, if it is not there, falls back to random
            weights with a warning; ``"random"`` asks for random weights (tests, benchmarks) without a warning.

    Random VGG weights keep the loss well defined and differentiable, but its perceptual and style terms then
    measure random-filter statistics instead of ImageNet features: train with the real weights.
    """

    def __init__(self, weights: Optional[PathLike] = None) -> None:
        super().__init__()
        features = _vgg16_features()
        self.pretrained = False
        path: Optional[Path]
        if weights is None:
            path = _default_vgg_path()
            if path is None:
                warnings.warn(
                    "InpaintingLoss: no pretrained VGG16 weights found (looked for "
                    f"{Path(torch.hub.get_dir()) / 'checkpoints' / VGG16_FILENAME}); the perceptual and style "
                    "losses use a RANDOMLY INITIALISED VGG16. Pass vgg_weights=PATH to torchvision's "
                    f"{VGG16_FILENAME} to train as in the paper.",
                    UserWarning,
                    stacklevel=3,
                )
        elif isinstance(weights, str) and weights == "random":
            path = None
        else:
            path = Path(weights)
            if not path.is_file():
                raise FileNotFoundError(f"vgg_weights: no such file {str(path)!r}")
        if path is None:
            # torchvision's VGG initialisation, so random features have the scale of its untrained network.
            for m in features.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    nn.init.zeros_(m.bias)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if any(k.startswith("features.") for k in state):
                state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
            wanted = features.state_dict().keys()
            missing = [k for k in wanted if k not in state]
            if missing:
                raise ValueError(
                    f"vgg_weights: {str(path)!r} is not a VGG16 state dict (missing {missing[:3]}...)"
                )
            features.load_state_dict({k: state[k] for k in wanted})
            self.pretrained = True
        self.slices = nn.ModuleList(features[a:b] for a, b in _VGG_SLICES)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "VGG16FeatureExtractor":
        # Frozen feature network: it has no BN or dropout, but stay in eval so nothing ever changes that.
        return super().train(False)

    def forward(self, image: Tensor) -> List[Tensor]:
        """``image`` (N, 3, H, W) in [0, 1] -> [pool1, pool2, pool3] features."""
        if image.shape[1] != 3:
            raise ValueError(f"the VGG16 losses need RGB images (N, 3, H, W), got {tuple(image.shape)}")
        x = (image - self.mean.to(image.dtype)) / self.std.to(image.dtype)
        out = []
        for s in self.slices:
            x = s(x)
            out.append(x)
        return out


def gram_matrix(feat: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, C, C) Gram matrix normalised by C*H*W (the paper's K_p), computed in fp32 or wider."""
    n, c, h, w = feat.shape
    f = feat.reshape(n, c, h * w)
    if f.dtype in (torch.float16, torch.bfloat16):
        f = f.float()
    return torch.bmm(f, f.transpose(1, 2)) / (c * h * w)


def total_variation_in_holes(comp: Tensor, mask: Tensor) -> Tensor:
    """The paper's L_tv: L1 differences of horizontally and vertically adjacent pixel pairs that both lie in P,
    the 1-pixel (3x3) dilation of the hole region, summed and divided by ``comp.numel()``."""
    hole = (1 - mask).expand_as(comp)
    region = F.max_pool2d(hole, kernel_size=3, stride=1, padding=1) > 0
    pair_h = region[..., :, 1:] & region[..., :, :-1]
    pair_v = region[..., 1:, :] & region[..., :-1, :]
    dh = (comp[..., :, 1:] - comp[..., :, :-1]).abs() * pair_h
    dv = (comp[..., 1:, :] - comp[..., :-1, :]).abs() * pair_v
    return (dh.sum() + dv.sum()) / comp.numel()


class InpaintingLoss(nn.Module):
    """L_total of Liu et al. 2018 (see the module docstring for every term).

    Args:
        weights: a :class:`LossWeights` or a mapping with some of its field names; missing ones keep the paper's.
        vgg_weights: see :class:`VGG16FeatureExtractor` (``None``: torch.hub's cache, else random with a warning).
        feature_extractor: replaces the VGG16 extractor: a module mapping (N, 3, H, W) images to a list of
            (N, C_p, H_p, W_p) feature maps (used by tests to check the formulas on known features).

    ``forward(output, target, mask)`` takes the network output, the ground truth (N, 3, H, W) in [0, 1] and the
    mask (N, 1 or 3, H, W), 1 = valid, and returns a dict of the six weighted-sum terms (unweighted) and
    ``"total"``.
    """

    terms = tuple(f.name for f in fields(LossWeights))

    def __init__(
        self,
        weights: Union[LossWeights, Mapping[str, float], None] = None,
        *,
        vgg_weights: Optional[PathLike] = None,
        feature_extractor: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        if weights is None:
            weights = LossWeights()
        elif not isinstance(weights, LossWeights):
            unknown = set(weights) - set(self.terms)
            if unknown:
                raise ValueError(f"weights: unknown loss terms {sorted(unknown)}; known: {list(self.terms)}")
            weights = LossWeights(**{k: float(v) for k, v in weights.items()})
        self.weights = weights
        self.extractor = feature_extractor if feature_extractor is not None else VGG16FeatureExtractor(vgg_weights)

    def forward(self, output: Tensor, target: Tensor, mask: Tensor) -> Dict[str, Tensor]:
        if output.shape != target.shape:
            raise ValueError(f"output and target shapes differ: {tuple(output.shape)} vs {tuple(target.shape)}")
        output = output.float() if output.dtype in (torch.float16, torch.bfloat16) else output
        target = target.to(output.dtype)
        mask = mask.to(output.dtype)
        comp = mask * target + (1 - mask) * output
        diff = output - target
        # Multiply then mean over the broadcast shape: size-averaged over N*C*H*W as in the errata.
        valid = (mask * diff).abs().mean()
        hole = ((1 - mask) * diff).abs().mean()

        n = output.shape[0]
        feats = self.extractor(torch.cat([output, comp], dim=0))
        with torch.no_grad():
            feats_gt = self.extractor(target)
        perceptual = output.new_zeros(())
        style_out = output.new_zeros(())
        style_comp = output.new_zeros(())
        for f, f_gt in zip(feats, feats_gt):
            f_out, f_comp = f[:n], f[n:]
            f_gt = f_gt.to(f.dtype)
            perceptual = perceptual + ((f_out - f_gt).abs().mean() + (f_comp - f_gt).abs().mean()).to(output.dtype)
            g_gt = gram_matrix(f_gt)
            style_out = style_out + (gram_matrix(f_out) - g_gt).abs().mean().to(output.dtype)
            style_comp = style_comp + (gram_matrix(f_comp) - g_gt).abs().mean().to(output.dtype)
        tv = total_variation_in_holes(comp, mask)

        losses = {
            "valid": valid, "hole": hole, "perceptual": perceptual,
            "style_out": style_out, "style_comp": style_comp, "tv": tv,
        }
        w = asdict(self.weights)
        losses["total"] = sum(w[k] * losses[k] for k in self.terms)
        return losses
