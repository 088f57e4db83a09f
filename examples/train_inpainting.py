#!/usr/bin/env python
"""Train the PConv U-Net (Liu et al. 2018) on a folder of images, or on the photographs that ship with
scikit-image / scikit-learn.

Two stages, as in the paper: Adam at 2e-4 with BatchNorm everywhere, then ``--finetune`` at 5e-5 with the
encoder's BatchNorm frozen, resuming from the first stage's checkpoint::

    python examples/train_inpainting.py --out runs/demo --steps 2000
    python examples/train_inpainting.py --out runs/demo --steps 500 --finetune --resume runs/demo/checkpoint.pt

Writes to ``--out``: ``checkpoint.pt`` (model, optimizer, step, RNG state: ``--resume`` continues exactly),
``log.jsonl`` (every loss term, averaged over ``--log-every`` steps) and ``grid_<stage>_<step>.png`` /
``grid_latest.png`` (rows of: input with holes in white, mask, raw output, composite, ground truth) on held-out
images with fixed masks. The paper trains at 512x512 (``--size 512 --layer-size 8``); 256x256 with
``--layer-size 7`` is the common choice; CPU demos use smaller sizes with ``--layer-size`` at most log2(size)
(see docs/inpainting.md).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch

from _common import (
    builtin_images, center_square, folder_images, random_crop, save_grid,
)
from pconv_cuda.inpainting import InpaintingLoss, IrregularMaskGenerator, MaskFolder, PConvUNet

GRID_BUCKETS = ((0.1, 0.2), (0.2, 0.3), (0.3, 0.4), (0.4, 0.5))
GRID_SEED = 20180420  # fixed masks for the preview grid, whatever --seed is


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="folder of training images (default: built-in photographs)")
    p.add_argument("--val-data", type=Path,
                   help="folder of images for the preview grid (default: held-out built-in photographs, or "
                        "the last images of --data, which are then not trained on)")
    p.add_argument("--masks", type=Path, help="folder of mask images, augmented as in the paper (default: generated)")
    p.add_argument("--mask-holes", choices=("black", "white"), default="black",
                   help="colour of the holes in --masks files (default: black)")
    p.add_argument("--out", type=Path, default=Path("runs/inpainting"), help="output folder")
    p.add_argument("--size", type=int, default=256, help="training crop size (default: 256)")
    p.add_argument("--layer-size", type=int, default=7,
                   help="encoder/decoder depth: 7 for 256 px, 8 for 512 px (the paper); smaller for tiny runs")
    p.add_argument("--base-channels", type=int, default=64, help="first layer width (default: 64, the paper)")
    p.add_argument("--batch-size", type=int, default=6, help="batch size (default: 6, the paper)")
    p.add_argument("--steps", type=int, default=1000, help="total steps of this stage (a resumed run continues to it)")
    p.add_argument("--lr", type=float, help="Adam learning rate (default: 2e-4, or 5e-5 with --finetune)")
    p.add_argument("--finetune", action="store_true",
                   help="second stage: encoder BatchNorm frozen, lr 5e-5; start from --resume of the first stage")
    p.add_argument("--resume", type=Path, help="checkpoint to continue from (or to fine-tune, with --finetune)")
    p.add_argument("--vgg-weights", default=None,
                   help="torchvision vgg16-397923af.pth for the perceptual/style losses (default: torch.hub's "
                        "cache; random weights with a warning if absent); 'random' for random weights")
    p.add_argument("--unfused", action="store_true",
                   help="build the network on pconv_cuda.reference layers instead of the fused PartialConv2d "
                        "(same weights and checkpoints; slower)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--grid-every", type=int, default=200)
    p.add_argument("--ckpt-every", type=int, default=200)
    p.add_argument("--grid-samples", type=int, default=4, help="rows of the preview grid")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    return p


def _check_size(size: int, layer_size: int) -> None:
    if size % (2 ** layer_size):
        raise SystemExit(f"--size {size} must be a multiple of 2**layer_size = {2 ** layer_size}")


def _save_checkpoint(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # never leave a half-written checkpoint behind


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Run training; returns a summary (last logged losses, paths) for scripts and tests."""
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    stage = "finetune" if args.finetune else "train"
    lr = args.lr if args.lr is not None else (5e-5 if args.finetune else 2e-4)
    args.out.mkdir(parents=True, exist_ok=True)

    ckpt = torch.load(args.resume, map_location="cpu", weights_only=True) if args.resume else None
    config = {"layer_size": args.layer_size, "in_channels": 3, "base_channels": args.base_channels}
    size = args.size
    if ckpt is not None:
        # The architecture comes from the checkpoint; say so if the command line disagrees.
        if ckpt["config"] != config and not args.quiet:
            print(f"note: using the checkpoint's model config {ckpt['config']}", file=sys.stderr)
        config = ckpt["config"]
    _check_size(size, config["layer_size"])

    torch.manual_seed(args.seed)
    pconv = None
    if args.unfused:
        from pconv_cuda import reference

        pconv = reference.PartialConv2d
    model = PConvUNet(**config, pconv=pconv, freeze_encoder_bn=args.finetune)
    start = 0
    resume_same_stage = ckpt is not None and ckpt.get("stage") == stage
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    # Frozen BN parameters stay out of the optimizer, so its state is tied to the stage.
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    # Different data order per stage, but the same order again when a stage is resumed.
    rng = np.random.default_rng([args.seed, 1 if args.finetune else 0])
    if resume_same_stage:
        optimizer.load_state_dict(ckpt["optimizer"])
        for g in optimizer.param_groups:
            g["lr"] = lr
        start = int(ckpt["step"])
        rng.bit_generator.state = ckpt["rng"]
    elif args.finetune and ckpt is None and not args.quiet:
        print("warning: --finetune without --resume fine-tunes a freshly initialised model", file=sys.stderr)

    # Data: images in memory, random crops; held-out images for the grid.
    if args.data is not None:
        train = folder_images(args.data)
        if args.val_data is not None:
            val = folder_images(args.val_data)
        else:
            names = list(train)
            n_val = min(max(1, len(names) // 20), args.grid_samples) if len(names) > 1 else 0
            val = {k: train.pop(k) for k in names[len(names) - n_val:]} if n_val else dict(train)
    else:
        train = builtin_images(held_out=False)
        val = folder_images(args.val_data) if args.val_data is not None else builtin_images(held_out=True)
    train_list = list(train.values())
    if args.masks is not None:
        mask_source: Callable[[], torch.Tensor] = MaskFolder(args.masks, size, size, holes=args.mask_holes, seed=rng)
    else:
        mask_source = IrregularMaskGenerator(size, size, seed=rng)

    grid_gen = IrregularMaskGenerator(size, size, seed=GRID_SEED)
    val_names = list(val)[: args.grid_samples]
    n_grid = max(1, min(args.grid_samples, len(val_names) * len(GRID_BUCKETS)))
    grid_images = torch.stack([center_square(val[val_names[i % len(val_names)]], size) for i in range(n_grid)])
    grid_masks = torch.stack([grid_gen.sample(*GRID_BUCKETS[i % len(GRID_BUCKETS)]) for i in range(n_grid)])

    loss_fn = InpaintingLoss(vgg_weights=args.vgg_weights)
    log_path = args.out / "log.jsonl"
    ckpt_path = args.out / "checkpoint.pt"

    def write_grid(step: int) -> Path:
        model.eval()
        with torch.no_grad():
            out, _ = model(grid_images, grid_masks)
        model.train()
        path = args.out / f"grid_{stage}_{step:06d}.png"
        save_grid(grid_images, grid_masks, out, path)
        save_grid(grid_images, grid_masks, out, args.out / "grid_latest.png")
        return path

    def checkpoint(step: int) -> None:
        _save_checkpoint(ckpt_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "stage": stage,
            "config": config, "size": size, "rng": rng.bit_generator.state,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        })

    from tqdm import tqdm

    model.train()
    sums: Dict[str, float] = {}
    count = 0
    last: Dict[str, float] = {}
    t0 = time.perf_counter()
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=args.quiet, desc=stage,
               dynamic_ncols=True)
    grid_path: Optional[Path] = None
    for step in bar:
        images = torch.stack([random_crop(train_list[int(rng.integers(len(train_list)))], size, rng)
                              for _ in range(args.batch_size)])
        masks = torch.stack([mask_source() for _ in range(args.batch_size)])
        output, _ = model(images, masks)
        losses = loss_fn(output, images, masks)
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        optimizer.step()

        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        count += 1
        done = step + 1
        bar.set_postfix(total=f"{float(losses['total'].detach()):.3f}", hole=f"{float(losses['hole'].detach()):.3f}")
        if done % args.log_every == 0 or done == args.steps:
            last = {k: v / count for k, v in sums.items()}
            record = {"stage": stage, "step": done, "lr": lr, **last,
                      "sec_per_step": (time.perf_counter() - t0) / count}
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if not args.quiet:
                bar.write(f"{stage} {done:6d}  " + "  ".join(f"{k} {v:.4f}" for k, v in last.items()))
            sums, count, t0 = {}, 0, time.perf_counter()
        if done % args.grid_every == 0 or done == args.steps:
            grid_path = write_grid(done)
        if done % args.ckpt_every == 0 or done == args.steps:
            checkpoint(done)
    bar.close()
    if start >= args.steps:  # nothing to do: still leave a grid and a checkpoint of what was loaded
        grid_path = write_grid(start)
        checkpoint(start)
    return {"stage": stage, "step": max(start, args.steps), "losses": last, "checkpoint": ckpt_path,
            "log": log_path, "grid": grid_path}


if __name__ == "__main__":
    main()
