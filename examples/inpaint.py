#!/usr/bin/env python
"""Inpaint images with a trained PConv U-Net.

    python examples/inpaint.py photo.png --checkpoint runs/demo/checkpoint.pt --mask holes.png --out filled.png
    python examples/inpaint.py photo.png --checkpoint runs/demo/checkpoint.pt --hole-ratio 0.2 0.3 --seed 1
    python examples/inpaint.py a.jpg b.jpg c.jpg --checkpoint ckpt.pt --out filled/ --device cuda --amp bf16

The mask file is white where the image is valid and black in the holes (``--mask-holes white`` for the other
convention); without ``--mask`` a random irregular mask with a hole ratio in ``--hole-ratio`` is generated (from
``--seed`` + i for the i-th image) and can be saved with ``--save-mask``. One ``--mask`` serves every image
(resized to each), or give one per image. Sizes that are not multiples of 2**layer_size are reflect-padded
(image and mask alike) and cropped back. ``--out`` gets the composite: the known pixels unchanged, the holes
filled. With several images, ``--out`` and the ``--save-*`` options name folders (files named after the images).
Images of the same (padded) size go through the network together, ``--batch-size`` at a time, on ``--device``
(default: CUDA when available), optionally under ``--amp``. The model works best near the scale it was trained
at; ``--resize`` rescales the images first.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from _common import add_device_args, autocast, composite, load_image, load_model, resolve_device, save_image
from pconv_cuda.inpainting import IrregularMaskGenerator, crop_to, hole_ratio, load_mask, pad_to_multiple, save_mask


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", type=Path, nargs="+", metavar="image", help="image(s) to inpaint")
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint of examples/train_inpainting.py")
    p.add_argument("--mask", type=Path, nargs="+",
                   help="mask image, or one per image (default: generated irregular masks)")
    p.add_argument("--mask-holes", choices=("black", "white"), default="black", help="colour of the holes in --mask")
    p.add_argument("--hole-ratio", type=float, nargs=2, default=(0.2, 0.3), metavar=("LO", "HI"),
                   help="hole ratio interval of the generated masks (default: 0.2 0.3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated mask (image i: seed + i)")
    p.add_argument("--resize", type=int, metavar="SIDE", help="resize each image so its shorter side is SIDE first")
    p.add_argument("--out", type=Path,
                   help="inpainted image (default: <image>_inpainted.png); a folder with several images")
    p.add_argument("--save-mask", type=Path, help="write the mask used (white = valid)")
    p.add_argument("--save-input", type=Path, help="write the masked input (holes white)")
    p.add_argument("--save-output", type=Path, help="write the raw network output (holes and valid pixels)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: 8)")
    add_device_args(p)
    p.add_argument("--threads", type=int)
    return p


def _target(option: Optional[Path], image: Path, several: bool, default: Optional[Path] = None) -> Optional[Path]:
    """Where to write one image's file for an option: the option itself for one image, a file named after the
    image inside the option's folder for several."""
    if option is None:
        return default
    return option / f"{image.stem}.png" if several else option


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Inpaint; returns the paths written and the hole ratio of every image (``paths`` and ``hole_ratio`` of the
    first image at the top level)."""
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch_size < 1:
        raise SystemExit(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.mask and len(args.mask) not in (1, len(args.images)):
        raise SystemExit(f"--mask: give one mask or one per image ({len(args.images)}), got {len(args.mask)}")
    device = resolve_device(args.device)
    model, _ = load_model(args.checkpoint, map_location=device, channels_last=args.channels_last)
    several = len(args.images) > 1
    multiple = 2 ** model.layer_size

    # Load every image and its mask (CPU), then group by padded size for batching.
    items: List[Dict[str, object]] = []
    for i, path in enumerate(args.images):
        image = load_image(path)
        if args.resize:
            h, w = image.shape[-2:]
            f = args.resize / min(h, w)
            image = F.interpolate(image[None], size=(max(1, round(h * f)), max(1, round(w * f))), mode="bilinear",
                                  antialias=True, align_corners=False)[0].clamp(0, 1)
        h, w = image.shape[-2:]
        if args.mask:
            mask = load_mask(args.mask[i if len(args.mask) > 1 else 0], holes=args.mask_holes)
            if mask.shape[-2:] != (h, w):
                mask = F.interpolate(mask[None], size=(h, w), mode="nearest")[0]
        else:
            mask = IrregularMaskGenerator(h, w, seed=args.seed + i).sample(*args.hole_ratio)
        x, m, orig = pad_to_multiple(image[None], mask[None], multiple)
        items.append({"path": path, "image": image, "mask": mask, "x": x[0], "m": m[0], "orig": orig})

    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    groups: Dict[tuple, List[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(tuple(it["x"].shape), []).append(i)
    with torch.no_grad():
        for idx in groups.values():
            for k in range(0, len(idx), args.batch_size):
                batch = idx[k : k + args.batch_size]
                x = torch.stack([items[i]["x"] for i in batch]).to(device).contiguous(memory_format=memory_format)
                m = torch.stack([items[i]["m"] for i in batch]).to(device).contiguous(memory_format=memory_format)
                with autocast(device, args.amp):
                    out, _ = model(x, m)
                out = out.float().clamp(0, 1).cpu()
                for j, i in enumerate(batch):
                    items[i]["out"] = crop_to(out[j], items[i]["orig"])

    results = []
    for it in items:
        path, image, mask, out = it["path"], it["image"], it["mask"], it["out"]
        result = composite(out, image, mask)
        out_path = _target(args.out, path, several, path.with_name(path.stem + "_inpainted.png"))
        save_image(result, out_path)
        written = {"out": out_path}
        if args.save_mask:
            written["mask"] = _target(args.save_mask, path, several)
            written["mask"].parent.mkdir(parents=True, exist_ok=True)
            save_mask(mask, written["mask"])
        if args.save_input:
            written["input"] = _target(args.save_input, path, several)
            save_image(image * mask + (1 - mask), written["input"])
        if args.save_output:
            written["output"] = _target(args.save_output, path, several)
            save_image(out, written["output"])
        ratio = hole_ratio(mask)
        print(f"{path.name}: hole ratio {ratio:.3f}; wrote " + ", ".join(str(p) for p in written.values()))
        results.append({"image": path, "paths": written, "hole_ratio": ratio})
    return {"paths": results[0]["paths"], "hole_ratio": results[0]["hole_ratio"], "results": results,
            "device": str(device)}


if __name__ == "__main__":
    main()
