#!/usr/bin/env python
"""Inpaint one image with a trained PConv U-Net.

    python examples/inpaint.py photo.png --checkpoint runs/demo/checkpoint.pt --mask holes.png --out filled.png
    python examples/inpaint.py photo.png --checkpoint runs/demo/checkpoint.pt --hole-ratio 0.2 0.3 --seed 1

The mask file is white where the image is valid and black in the holes (``--mask-holes white`` for the other
convention); without ``--mask`` a random irregular mask with a hole ratio in ``--hole-ratio`` is generated and can
be saved with ``--save-mask``. Sizes that are not multiples of 2**layer_size are reflect-padded (image and mask
alike) and cropped back. ``--out`` gets the composite: the known pixels unchanged, the holes filled.
The model works best near the scale it was trained at; ``--resize`` rescales the image first.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from _common import composite, load_image, load_model, save_image
from pconv_cuda.inpainting import IrregularMaskGenerator, crop_to, hole_ratio, load_mask, pad_to_multiple, save_mask


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", type=Path, help="image to inpaint")
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint of examples/train_inpainting.py")
    p.add_argument("--mask", type=Path, help="mask image (default: a generated irregular mask)")
    p.add_argument("--mask-holes", choices=("black", "white"), default="black", help="colour of the holes in --mask")
    p.add_argument("--hole-ratio", type=float, nargs=2, default=(0.2, 0.3), metavar=("LO", "HI"),
                   help="hole ratio interval of the generated mask (default: 0.2 0.3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated mask")
    p.add_argument("--resize", type=int, metavar="SIDE", help="resize the image so its shorter side is SIDE first")
    p.add_argument("--out", type=Path, help="inpainted image (default: <image>_inpainted.png)")
    p.add_argument("--save-mask", type=Path, help="write the mask used (white = valid)")
    p.add_argument("--save-input", type=Path, help="write the masked input (holes white)")
    p.add_argument("--save-output", type=Path, help="write the raw network output (holes and valid pixels)")
    p.add_argument("--threads", type=int)
    return p


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Inpaint; returns the paths written and the hole ratio."""
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_model(args.checkpoint)
    image = load_image(args.image)
    if args.resize:
        h, w = image.shape[-2:]
        f = args.resize / min(h, w)
        image = F.interpolate(image[None], size=(max(1, round(h * f)), max(1, round(w * f))), mode="bilinear",
                              antialias=True, align_corners=False)[0].clamp(0, 1)
    h, w = image.shape[-2:]
    if args.mask:
        mask = load_mask(args.mask, holes=args.mask_holes)
        if mask.shape[-2:] != (h, w):
            mask = F.interpolate(mask[None], size=(h, w), mode="nearest")[0]
    else:
        mask = IrregularMaskGenerator(h, w, seed=args.seed).sample(*args.hole_ratio)

    x, m, orig = pad_to_multiple(image[None], mask[None], 2 ** model.layer_size)
    with torch.no_grad():
        out, _ = model(x, m)
    out = crop_to(out, orig)[0].float().clamp(0, 1)
    result = composite(out, image, mask)

    out_path = args.out or args.image.with_name(args.image.stem + "_inpainted.png")
    save_image(result, out_path)
    written = {"out": out_path}
    if args.save_mask:
        save_mask(mask, args.save_mask)
        written["mask"] = args.save_mask
    if args.save_input:
        save_image(image * mask + (1 - mask), args.save_input)
        written["input"] = args.save_input
    if args.save_output:
        save_image(out, args.save_output)
        written["output"] = args.save_output
    ratio = hole_ratio(mask)
    print(f"hole ratio {ratio:.3f}; wrote " + ", ".join(str(p) for p in written.values()))
    return {"paths": written, "hole_ratio": ratio}


if __name__ == "__main__":
    main()
