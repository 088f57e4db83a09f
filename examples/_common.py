"""Helpers shared by the inpainting examples: images, built-in photographs, checkpoints, picture grids."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# Before PIL: pconv_cuda.inpainting checks the `inpainting` extra and names a missing module and the extra.
from pconv_cuda.inpainting import PConvUNet, list_images

from PIL import Image  # noqa: I001  (after the check above)

#: Natural photographs bundled with scikit-image (no download), used when no image folder is given.
SKIMAGE_TRAIN = (
    "astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "camera", "coins", "moon",
    "brick", "grass", "gravel", "clock",
)
SKIMAGE_HELD_OUT = ("chelsea", "coffee")
#: scikit-learn's two sample photographs, used when scikit-learn is installed.
SKLEARN_TRAIN = ("china.jpg",)
SKLEARN_HELD_OUT = ("flower.jpg",)


def to_tensor(arr: np.ndarray) -> Tensor:
    """HxW or HxWxC uint8/float array -> (3, H, W) float32 in [0, 1] (grey is repeated, alpha dropped)."""
    a = np.asarray(arr)
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    elif a.dtype == bool:
        a = a.astype(np.float32)
    else:
        a = a.astype(np.float32)
        if a.max() > 1.0:  # some scikit-image arrays are uint16-like floats
            a = a / a.max()
    if a.ndim == 2:
        a = a[:, :, None]
    a = a[:, :, :3]
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


def load_image(path: os.PathLike | str) -> Tensor:
    """Read an image file as (3, H, W) float32 in [0, 1]."""
    return to_tensor(np.asarray(Image.open(path).convert("RGB")))


def save_image(img: Tensor, path: os.PathLike | str) -> None:
    """Write (3, H, W) or (1, H, W) in [0, 1] (clamped) as an 8-bit image."""
    a = (img.detach().float().clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)
    a = a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


def builtin_images(held_out: bool) -> Dict[str, Tensor]:
    """The photographs that ship with scikit-image (and scikit-learn, if installed): the training split, or the
    held-out split used for evaluation."""
    try:
        from skimage import data
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise SystemExit(
            "no image folder given and scikit-image is not installed: pip install scikit-image, or pass a folder"
        ) from e
    out: Dict[str, Tensor] = {}
    for name in SKIMAGE_HELD_OUT if held_out else SKIMAGE_TRAIN:
        out[name] = to_tensor(getattr(data, name)())
    try:
        from sklearn.datasets import load_sample_image
    except ImportError:
        pass
    else:
        for name in SKLEARN_HELD_OUT if held_out else SKLEARN_TRAIN:
            out[name.split(".")[0]] = to_tensor(load_sample_image(name))
    return out


def folder_images(root: os.PathLike | str, limit: Optional[int] = None) -> Dict[str, Tensor]:
    """Every image under ``root`` (sorted), loaded into memory."""
    paths = list_images(root)
    if not paths:
        raise SystemExit(f"no images under {str(root)!r}")
    return {str(p.relative_to(root)): load_image(p) for p in paths[:limit]}


def center_square(img: Tensor, size: int) -> Tensor:
    """The largest centred square of (C, H, W), resized to size x size."""
    _, h, w = img.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    crop = img[:, top : top + s, left : left + s]
    out = F.interpolate(crop[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out[0].clamp(0, 1)


def random_crop(img: Tensor, size: int, rng: np.random.Generator) -> Tensor:
    """A random square crop of a random side between ``size`` and the image's shorter side, resized to ``size``,
    flipped left-right half of the time. The random side multiplies the few built-in photographs into many
    scales."""
    _, h, w = img.shape
    if min(h, w) < size:
        f = size / min(h, w)
        img = F.interpolate(img[None], scale_factor=f, mode="bilinear", align_corners=False)[0]
        _, h, w = img.shape
    side = int(rng.integers(size, min(h, w) + 1))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = img[:, top : top + side, left : left + side]
    if side != size:
        crop = F.interpolate(crop[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    if rng.integers(2):
        crop = crop.flip(-1)
    return crop.clamp(0, 1)


def load_model(path: os.PathLike | str, *, pconv=None, map_location: str = "cpu") -> Tuple[PConvUNet, dict]:
    """Rebuild the model a training checkpoint describes and load its weights. Returns (model in eval mode,
    checkpoint)."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if "model" not in ckpt or "config" not in ckpt:
        raise SystemExit(f"{str(path)!r} is not a checkpoint written by examples/train_inpainting.py")
    model = PConvUNet(**ckpt["config"], pconv=pconv)
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


def composite(output: Tensor, image: Tensor, mask: Tensor) -> Tensor:
    """Known pixels from ``image``, holes from ``output``."""
    return mask * image + (1 - mask) * output


def grid_rows(image: Tensor, mask: Tensor, output: Tensor) -> Tensor:
    """(N, 5, 3, H, W): masked input (holes white), mask, raw output, composite, ground truth."""
    m3 = mask.expand_as(image)
    shown = image * m3 + (1 - m3)
    out = output.clamp(0, 1)
    return torch.stack([shown, m3, out, composite(out, image, m3), image], dim=1)


def save_grid(image: Tensor, mask: Tensor, output: Tensor, path: os.PathLike | str, pad: int = 2) -> None:
    """One row per sample, columns: input, mask, output, composite, ground truth."""
    from torchvision.utils import make_grid

    rows = grid_rows(image.cpu(), mask.cpu(), output.detach().float().cpu())
    grid = make_grid(rows.flatten(0, 1), nrow=rows.shape[1], padding=pad, pad_value=1.0)
    save_image(grid, path)


