"""Helpers shared by the inpainting examples: device and precision options, images, checkpoints, picture grids.
The images and datasets themselves live in pconv_cuda.inpainting.data (re-exported here under their old names)."""
from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path
from typing import ContextManager, Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

# Before PIL: pconv_cuda.inpainting checks the `inpainting` extra and names a missing module and the extra.
from pconv_cuda.inpainting import PConvUNet, list_images
from pconv_cuda.inpainting.data import (  # noqa: F401  (re-exported for the examples)
    SKIMAGE_HELD_OUT, SKIMAGE_TRAIN, SKLEARN_HELD_OUT, SKLEARN_TRAIN, builtin_images, center_square, load_image,
    random_crop, to_tensor,
)

from PIL import Image  # noqa: I001  (after the check above)


def save_image(img: Tensor, path: os.PathLike | str) -> None:
    """Write (3, H, W) or (1, H, W) in [0, 1] (clamped) as an 8-bit image."""
    a = (img.detach().float().clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)
    a = a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


def folder_images(root: os.PathLike | str, limit: Optional[int] = None) -> Dict[str, Tensor]:
    """Every image under ``root`` (sorted), loaded into memory."""
    paths = list_images(root)
    if not paths:
        raise SystemExit(f"no images under {str(root)!r}")
    return {str(p.relative_to(root)): load_image(p) for p in paths[:limit]}


#: --amp choices -> autocast dtype
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_device() -> str:
    """CUDA when available, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_device_args(p: argparse.ArgumentParser) -> None:
    """--device, --amp and --channels-last, shared by the three examples."""
    p.add_argument("--device", default=None,
                   help="torch device for the model, the loss and the data: cpu, cuda, cuda:1, ... "
                        "(default: cuda when available, else cpu)")
    p.add_argument("--amp", choices=tuple(AMP_DTYPES), default="off",
                   help="mixed precision with torch.autocast: bf16 (CPU and recent GPUs), fp16 (GPUs; training "
                        "adds a GradScaler) or off (default: off, float32)")
    p.add_argument("--channels-last", action="store_true",
                   help="model and inputs in channels_last memory format (the fast layout of cuDNN's "
                        "tensor-core convolutions; combine with --amp on a GPU)")


def resolve_device(name: Optional[str]) -> torch.device:
    """The device of --device (None: default_device()); a clear error for an unavailable CUDA device."""
    device = torch.device(name or default_device())
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available here (torch {torch.__version__}, "
                         f"CUDA build {torch.version.cuda}); use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SystemExit(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


def autocast(device: torch.device, amp: str) -> ContextManager:
    """torch.autocast for --amp on ``device``'s type, or a no-op for 'off'."""
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def load_model(path: os.PathLike | str, *, pconv=None, map_location: str | torch.device = "cpu",
               channels_last: bool = False) -> Tuple[PConvUNet, dict]:
    """Rebuild the model a training checkpoint describes and load its weights, on ``map_location`` (a checkpoint
    written on any device loads on any other). Returns (model in eval mode, checkpoint)."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if "model" not in ckpt or "config" not in ckpt:
        raise SystemExit(f"{str(path)!r} is not a checkpoint written by examples/train_inpainting.py")
    model = PConvUNet(**ckpt["config"], pconv=pconv)
    model.load_state_dict(ckpt["model"])
    model.to(map_location)
    if channels_last:
        model.to(memory_format=torch.channels_last)
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


