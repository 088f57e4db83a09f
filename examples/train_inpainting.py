#!/usr/bin/env python
"""Train the PConv U-Net (Liu et al. 2018) on a folder of images, or on the photographs that ship with
scikit-image / scikit-learn; on the CPU, one GPU, or several GPUs and machines with torchrun.

Two stages, as in the paper: Adam at 2e-4 with BatchNorm everywhere, then ``--finetune`` at 5e-5 with the
encoder's BatchNorm frozen, resuming from the first stage's checkpoint::

    python examples/train_inpainting.py --out runs/demo --steps 2000
    python examples/train_inpainting.py --out runs/demo --steps 500 --finetune --resume runs/demo/checkpoint.pt
    torchrun --nproc_per_node=4 examples/train_inpainting.py --out runs/ddp --batch-size 24 --amp bf16 --sync-bn

Device and precision: ``--device`` (default CUDA when available), ``--amp bf16|fp16`` (torch.autocast; fp16
adds a GradScaler), ``--channels-last``, ``--compile``. Data: random crops, flips and masks are made in
``--workers`` DataLoader processes; every sample is seeded by its position in the global sample stream, so a run
is reproducible whatever the number of workers. Under torchrun each process trains one shard of every global
batch with DistributedDataParallel (NCCL on GPUs, gloo on the CPU); ``--batch-size`` is the global batch (the
paper's 6), split evenly over the processes; ``--sync-bn`` computes BatchNorm statistics over the global batch.
Rank 0 alone writes the log, the grids and the checkpoints; ``--resume`` works across a change of world size
(same global batch: the same sample stream continues).

Writes to ``--out``: ``checkpoint.pt`` (model, optimizer, step, samples seen: ``--resume`` continues exactly),
``log.jsonl`` (every loss term, averaged over ``--log-every`` steps and over the processes) and
``grid_<stage>_<step>.png`` / ``grid_latest.png`` (rows of: input with holes in white, mask, raw output,
composite, ground truth) on held-out images with fixed masks. The paper trains at 512x512 (``--size 512
--layer-size 8``); 256x256 with ``--layer-size 7`` is the common choice; CPU demos use smaller sizes with
``--layer-size`` at most log2(size) (see docs/inpainting.md).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

from _common import add_device_args, autocast, center_square, resolve_device, save_grid
from _distributed import DistEnv, convert_sync_batchnorm, mean_over_ranks, setup, teardown
from pconv_cuda.inpainting import (
    ImageDataset, InpaintingLoss, InpaintingTrainSet, IrregularMaskGenerator, MaskDataset, PConvUNet,
    make_train_loader,
)

GRID_BUCKETS = ((0.1, 0.2), (0.2, 0.3), (0.3, 0.4), (0.4, 0.5))
GRID_SEED = 20180420  # fixed masks for the preview grid, whatever --seed is


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="folder of training images, searched recursively (default: built-in "
                                             "photographs)")
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
    p.add_argument("--batch-size", type=int, default=6,
                   help="global batch size, split evenly over the torchrun processes (default: 6, the paper)")
    p.add_argument("--steps", type=int, default=1000, help="total steps of this stage (a resumed run continues to it)")
    p.add_argument("--lr", type=float, help="Adam learning rate (default: 2e-4, or 5e-5 with --finetune)")
    p.add_argument("--finetune", action="store_true",
                   help="second stage: encoder BatchNorm frozen, lr 5e-5; start from --resume of the first stage")
    p.add_argument("--resume", type=Path, help="checkpoint to continue from (or to fine-tune, with --finetune); "
                                               "any device, any world size")
    p.add_argument("--vgg-weights", default=None,
                   help="torchvision vgg16-397923af.pth for the perceptual/style losses (default: torch.hub's "
                        "cache; random weights with a warning if absent); 'random' for random weights")
    p.add_argument("--unfused", action="store_true",
                   help="build the network on pconv_cuda.reference layers instead of the fused PartialConv2d "
                        "(same weights and checkpoints; slower)")
    add_device_args(p)
    p.add_argument("--compile", action="store_true", help="torch.compile the model (after the DDP wrapper)")
    p.add_argument("--workers", type=int,
                   help="DataLoader worker processes per rank that decode, crop and mask (default: 4 on CUDA, "
                        "0 on the CPU); persistent, pinned memory on CUDA")
    p.add_argument("--sync-bn", action="store_true",
                   help="with several processes: BatchNorm statistics over the global batch (nn.SyncBatchNorm on "
                        "GPUs, a gloo version on the CPU) instead of each process' shard. Fine-tuning freezes the "
                        "encoder's BN (running statistics, nothing to sync); the decoder's BN is synchronised")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deterministic", action="store_true",
                   help="bitwise-reproducible runs on a GPU (a resumed run then equals an uninterrupted one): "
                        "torch.use_deterministic_algorithms, cuDNN's deterministic algorithms, no cudnn.benchmark "
                        "(slower). CPU runs are reproducible without it")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--grid-every", type=int, default=200)
    p.add_argument("--ckpt-every", type=int, default=200)
    p.add_argument("--grid-samples", type=int, default=4, help="rows of the preview grid")
    p.add_argument("--threads", type=int, help="torch threads per process (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    p.add_argument("--debug-dump", type=Path, metavar="DIR",
                   help="testing: write the first step's averaged losses and gradients (rank 0, before the "
                        "optimizer step; scaled by the GradScaler with --amp fp16), every rank's first batch and "
                        "every rank's final parameters and buffers to DIR")
    return p


def _check_size(size: int, layer_size: int) -> None:
    if size % (2 ** layer_size):
        raise SystemExit(f"--size {size} must be a multiple of 2**layer_size = {2 ** layer_size}")


def _save_checkpoint(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # never leave a half-written checkpoint behind


def _datasets(args, size: int):
    """Training images (a dataset decoded in the workers) and the preview images (tensors, (N, 3, size, size))."""
    if args.data is not None:
        train = ImageDataset(args.data)
        if args.val_data is not None:
            val = ImageDataset(args.val_data)
        elif len(train) > 1:
            n_val = min(max(1, len(train) // 20), args.grid_samples)
            train, val = train.split(n_val)
        else:
            val = train
    else:
        train = ImageDataset.builtin(held_out=False)
        val = ImageDataset(args.val_data) if args.val_data is not None else ImageDataset.builtin(held_out=True)
    grid_gen = IrregularMaskGenerator(size, size, seed=GRID_SEED)
    n_names = min(args.grid_samples, len(val))
    n_grid = max(1, min(args.grid_samples, n_names * len(GRID_BUCKETS)))
    grid_images = torch.stack([center_square(val[i % n_names], size) for i in range(n_grid)])
    grid_masks = torch.stack([grid_gen.sample(*GRID_BUCKETS[i % len(GRID_BUCKETS)]) for i in range(n_grid)])
    return train, grid_images, grid_masks


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Run training; returns a summary (last logged losses, paths) for scripts and tests."""
    args = build_parser().parse_args(argv)
    if args.deterministic:
        # cuBLAS reads this when its first handle is made, so before anything runs on the GPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    env, device = setup(resolve_device(args.device))
    # No teardown on an error: its barrier would wait for ranks that are blocked in a collective; the process
    # exits instead, and torchrun stops the others.
    summary = _train(args, env, device)
    teardown(env)
    return summary


def _train(args, env: DistEnv, device: torch.device) -> Dict[str, object]:
    if args.threads:
        torch.set_num_threads(args.threads)
    say = env.is_main and not args.quiet
    stage = "finetune" if args.finetune else "train"
    lr = args.lr if args.lr is not None else (5e-5 if args.finetune else 2e-4)
    if args.batch_size % env.world_size:
        raise SystemExit(f"--batch-size {args.batch_size} (the global batch) must be a multiple of the number of "
                         f"processes, {env.world_size}")
    local_batch = args.batch_size // env.world_size
    if env.is_main:
        args.out.mkdir(parents=True, exist_ok=True)
    if args.debug_dump is not None:
        args.debug_dump.mkdir(parents=True, exist_ok=True)

    ckpt = torch.load(args.resume, map_location="cpu", weights_only=True) if args.resume else None
    config = {"layer_size": args.layer_size, "in_channels": 3, "base_channels": args.base_channels}
    size = args.size
    if ckpt is not None:
        # The architecture comes from the checkpoint; say so if the command line disagrees.
        if ckpt["config"] != config and say:
            print(f"note: using the checkpoint's model config {ckpt['config']}", file=sys.stderr)
        config = ckpt["config"]
    _check_size(size, config["layer_size"])

    # The model and the loss first, from the seed alone: every rank (and a single process) builds the same
    # initial weights and, with random VGG weights, the same VGG.
    torch.manual_seed(args.seed)
    pconv = None
    if args.unfused:
        from pconv_cuda import reference

        pconv = reference.PartialConv2d
    model = PConvUNet(**config, pconv=pconv, freeze_encoder_bn=args.finetune)
    loss_fn = InpaintingLoss(vgg_weights=args.vgg_weights)
    start = 0
    resume_same_stage = ckpt is not None and ckpt.get("stage") == stage
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    if args.sync_bn and env.world_size > 1:
        model = convert_sync_batchnorm(model, device)
    elif args.sync_bn and say:
        print("note: --sync-bn has no effect in a single process", file=sys.stderr)
    model.to(device)
    loss_fn.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
        loss_fn.to(memory_format=torch.channels_last)
    # Frozen BN parameters stay out of the optimizer, so its state is tied to the stage.
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    samples = 0  # global samples consumed so far: the position in the data stream
    if resume_same_stage:
        optimizer.load_state_dict(ckpt["optimizer"])  # moves the state to the parameters' device
        for g in optimizer.param_groups:
            g["lr"] = lr
        start = int(ckpt["step"])
        samples = int(ckpt.get("samples", start * args.batch_size))
        if "scaler" in ckpt and args.amp == "fp16":
            scaler.load_state_dict(ckpt["scaler"])
        if say and ckpt.get("world_size", 1) != env.world_size:
            print(f"note: resuming a {ckpt.get('world_size', 1)}-process run on {env.world_size} process(es); "
                  f"global batch {ckpt.get('global_batch', args.batch_size)} -> {args.batch_size}", file=sys.stderr)
    elif args.finetune and ckpt is None and say:
        print("warning: --finetune without --resume fine-tunes a freshly initialised model", file=sys.stderr)

    train_model: torch.nn.Module = model
    if env.world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        train_model = torch.compile(train_model)

    # Data: crops and masks made in the loader's workers, seeded by their position in the global stream.
    train_images, grid_images, grid_masks = _datasets(args, size)
    masks = (MaskDataset(args.masks, size, size, holes=args.mask_holes) if args.masks is not None else None)
    trainset = InpaintingTrainSet(train_images, size, masks=masks, seed=args.seed, stream=1 if args.finetune else 0)
    workers = args.workers if args.workers is not None else (4 if device.type == "cuda" else 0)
    loader = make_train_loader(trainset, local_batch, num_replicas=env.world_size, rank=env.rank, start=samples,
                               workers=workers, pin_memory=device.type == "cuda")
    grid_images, grid_masks = grid_images.to(device), grid_masks.to(device)

    log_path = args.out / "log.jsonl"
    ckpt_path = args.out / "checkpoint.pt"
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

    def write_grid(step: int) -> Path:
        model.eval()
        with torch.no_grad(), autocast(device, args.amp):
            out, _ = model(grid_images.contiguous(memory_format=memory_format),
                           grid_masks.contiguous(memory_format=memory_format))
        model.train()
        path = args.out / f"grid_{stage}_{step:06d}.png"
        save_grid(grid_images, grid_masks, out, path)
        save_grid(grid_images, grid_masks, out, args.out / "grid_latest.png")
        return path

    def checkpoint(step: int, seen: int) -> None:
        _save_checkpoint(ckpt_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "stage": stage,
            "config": config, "size": size, "samples": seen, "global_batch": args.batch_size,
            "world_size": env.world_size, "scaler": scaler.state_dict(),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        })

    from tqdm import tqdm

    train_model.train()
    sums: Dict[str, float] = {}
    count = 0
    last: Dict[str, float] = {}
    t0 = time.perf_counter()
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=not say, desc=stage,
               dynamic_ncols=True)
    grid_path: Optional[Path] = None
    batches = iter(loader)
    for step in bar:
        images, masks_b = next(batches)
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        masks_b = masks_b.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        with autocast(device, args.amp):
            output, _ = train_model(images, masks_b)
            losses = loss_fn(output, images, masks_b)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(losses["total"]).backward()
        if args.debug_dump is not None and step == start:
            _dump_first_step(args.debug_dump, env, model, losses, images, masks_b)
        scaler.step(optimizer)
        scaler.update()
        samples += args.batch_size

        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        count += 1
        done = step + 1
        if say:
            bar.set_postfix(total=f"{float(losses['total'].detach()):.3f}",
                            hole=f"{float(losses['hole'].detach()):.3f}")
        if done % args.log_every == 0 or done == args.steps:
            last = mean_over_ranks({k: v / count for k, v in sums.items()}, env)
            if env.is_main:
                record = {"stage": stage, "step": done, "lr": lr, **last,
                          "sec_per_step": (time.perf_counter() - t0) / count, "world_size": env.world_size}
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                if say:
                    bar.write(f"{stage} {done:6d}  " + "  ".join(f"{k} {v:.4f}" for k, v in last.items()))
            sums, count, t0 = {}, 0, time.perf_counter()
        if env.is_main and (done % args.grid_every == 0 or done == args.steps):
            grid_path = write_grid(done)
        if env.is_main and (done % args.ckpt_every == 0 or done == args.steps):
            checkpoint(done, samples)
    bar.close()
    del batches  # stops the loader's workers
    if start >= args.steps and env.is_main:  # nothing to do: still leave a grid and a checkpoint of what was loaded
        grid_path = write_grid(start)
        checkpoint(start, samples)
    if args.debug_dump is not None:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()},
                   args.debug_dump / f"final_rank{env.rank}.pt")
    return {"stage": stage, "step": max(start, args.steps), "losses": last, "checkpoint": ckpt_path,
            "log": log_path, "grid": grid_path, "rank": env.rank, "world_size": env.world_size,
            "device": str(device)}


def _dump_first_step(path: Path, env: DistEnv, model: torch.nn.Module, losses, images, masks) -> None:
    """Testing aid: each rank's batch and local losses; on rank 0 the losses averaged over the ranks and the
    gradients (DistributedDataParallel has averaged them over the ranks by now)."""
    local = {k: float(v.detach()) for k, v in losses.items()}
    torch.save({"images": images.detach().cpu(), "masks": masks.detach().cpu(), "losses": local},
               path / f"batch_rank{env.rank}.pt")
    mean = mean_over_ranks(local, env)
    if env.is_main:
        grads = {n: p.grad.detach().float().cpu().clone() for n, p in model.named_parameters() if p.grad is not None}
        torch.save({"losses": mean, "grads": grads, "world_size": env.world_size}, path / "first_step.pt")


if __name__ == "__main__":
    main()
