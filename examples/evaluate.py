#!/usr/bin/env python
"""Evaluate an inpainting checkpoint per hole-ratio bucket, as in the paper's Table 1: L1 (%), PSNR (dB) and
SSIM of the composite (known pixels kept, holes from the network) against the ground truth.

    python examples/evaluate.py --checkpoint runs/demo/checkpoint.pt --json runs/demo/metrics.json

Images: ``--images DIR`` (each centre-cropped to a square and resized to ``--size``), or by default the
photographs held out from examples/train_inpainting.py's built-in training set. Masks: ``--per-bucket`` masks per
bucket (0.01,0.1], ..., (0.5,0.6], generated from ``--seed`` (so two checkpoints see the same masks), or sorted
into buckets by hole ratio from ``--masks DIR``. Every image is paired with every mask of every bucket.
PSNR and SSIM are scikit-image's (``data_range=1``; SSIM with its default 7x7 window, on RGB). ``--baseline
biharmonic`` adds scikit-image's biharmonic inpainting on the same pairs, a learning-free reference point.
The network runs on ``--device`` (default: CUDA when available), in batches of ``--batch-size`` image/mask pairs,
optionally under ``--amp bf16|fp16`` (torch.autocast) and ``--channels-last``; the metrics are computed on the
CPU in float64 from the composite.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from _common import (
    add_device_args, autocast, builtin_images, center_square, composite, folder_images, load_model, resolve_device,
)
from pconv_cuda.inpainting import HOLE_RATIO_BUCKETS, MaskFolder, bucket_name, make_bucketed_masks


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint of examples/train_inpainting.py")
    p.add_argument("--images", type=Path, help="folder of test images (default: held-out built-in photographs)")
    p.add_argument("--masks", type=Path, help="folder of mask images (default: generated)")
    p.add_argument("--mask-holes", choices=("black", "white"), default="black")
    p.add_argument("--per-bucket", type=int, default=10, help="masks per hole-ratio bucket (default: 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated masks")
    p.add_argument("--size", type=int, help="image size (default: the checkpoint's training size)")
    p.add_argument("--batch-size", type=int, default=8, help="image/mask pairs per forward pass (default: 8)")
    p.add_argument("--baseline", choices=("none", "biharmonic"), default="none")
    p.add_argument("--json", type=Path, help="write the results here")
    add_device_args(p)
    p.add_argument("--threads", type=int)
    p.add_argument("--quiet", action="store_true")
    return p


def metrics(pred: np.ndarray, gt: np.ndarray) -> Dict[str, float]:
    """L1 (% of the [0, 1] range, mean over pixels and channels), PSNR and SSIM of HxWx3 images in [0, 1]."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    return {
        "l1": float(np.abs(pred - gt).mean() * 100),
        "psnr": float(peak_signal_noise_ratio(gt, pred, data_range=1.0)),
        "ssim": float(structural_similarity(gt, pred, data_range=1.0, channel_axis=-1)),
    }


def _hwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy().astype(np.float64)


def _summarise(rows: List[Dict[str, float]]) -> Dict[str, float]:
    if not rows:
        return {"n": 0}
    return {"n": len(rows), **{k: float(np.mean([r[k] for r in rows])) for k in ("l1", "psnr", "ssim")}}


def format_table(results: Dict[str, Dict[str, Dict[str, float]]]) -> str:
    """Markdown table: one row per bucket, L1/PSNR/SSIM columns per method."""
    methods = list(results)
    head = "| hole ratio | n | " + " | ".join(
        f"{m} L1 (%) | {m} PSNR (dB) | {m} SSIM" for m in methods) + " |"
    sep = "|" + "---|" * (2 + 3 * len(methods))
    lines = [head, sep]
    for b in results[methods[0]]:
        n = results[methods[0]][b]["n"]
        cells = []
        for m in methods:
            r = results[m][b]
            cells += [f"{r['l1']:.2f}", f"{r['psnr']:.2f}", f"{r['ssim']:.3f}"] if r["n"] else ["-"] * 3
        lines.append(f"| {b} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Run the evaluation; returns the JSON-ready results."""
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch_size < 1:
        raise SystemExit(f"--batch-size must be >= 1, got {args.batch_size}")
    device = resolve_device(args.device)
    model, ckpt = load_model(args.checkpoint, map_location=device, channels_last=args.channels_last)
    size = args.size or int(ckpt.get("size", 256))
    if size % (2 ** model.layer_size):
        raise SystemExit(f"--size {size} must be a multiple of 2**layer_size = {2 ** model.layer_size}")

    images = folder_images(args.images) if args.images else builtin_images(held_out=True)
    gts = {name: center_square(img, size) for name, img in images.items()}
    if args.masks:
        folder = MaskFolder(args.masks, size, size, holes=args.mask_holes)
        buckets = make_bucketed_masks(args.per_bucket, size, size, source=(folder[i] for i in range(len(folder))))
    else:
        buckets = make_bucketed_masks(args.per_bucket, size, size, seed=args.seed)

    from tqdm import tqdm

    methods = ["pconv"] + (["biharmonic"] if args.baseline == "biharmonic" else [])
    per: Dict[str, Dict[str, List[Dict[str, float]]]] = {m: {bucket_name(b): [] for b in buckets} for m in methods}
    # Every (bucket, image, mask) pair, in that order, batched regardless of bucket and image.
    pairs = [(bucket_name(b), gt, m) for b, masks in buckets.items() for gt in gts.values() for m in masks]
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    bar = tqdm(total=len(pairs), disable=args.quiet, desc="evaluate", dynamic_ncols=True)
    with torch.no_grad():
        for i in range(0, len(pairs), args.batch_size):
            chunk = pairs[i : i + args.batch_size]
            x = torch.stack([gt for _, gt, _ in chunk])
            m = torch.stack([mk for _, _, mk in chunk])
            with autocast(device, args.amp):
                out, _ = model(x.to(device).contiguous(memory_format=memory_format),
                               m.to(device).contiguous(memory_format=memory_format))
            comp = composite(out.float().clamp(0, 1).cpu(), x, m)
            for j, (name, gt, mk) in enumerate(chunk):
                per["pconv"][name].append(metrics(_hwc(comp[j]), _hwc(gt)))
                if "biharmonic" in per:
                    from skimage.restoration import inpaint_biharmonic

                    holes = mk[0].numpy() < 0.5
                    filled = inpaint_biharmonic(_hwc(gt), holes, channel_axis=-1)
                    per["biharmonic"][name].append(metrics(np.clip(filled, 0, 1), _hwc(gt)))
                bar.update(1)
    bar.close()
    results = {m: {b: _summarise(rows) for b, rows in per[m].items()} for m in methods}
    summary = {
        "checkpoint": str(args.checkpoint), "stage": ckpt.get("stage"), "step": ckpt.get("step"),
        "config": ckpt.get("config"), "size": size, "images": list(gts),
        "masks": str(args.masks) if args.masks else f"generated, seed {args.seed}",
        "per_bucket": args.per_bucket, "buckets": [bucket_name(b) for b in HOLE_RATIO_BUCKETS],
        "device": str(device), "amp": args.amp, "batch_size": args.batch_size,
        "results": results,
    }
    if not args.quiet:
        print(format_table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
