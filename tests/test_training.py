"""Training at scale, checked on the CPU: the data pipeline (datasets, the per-rank sample stream, DataLoader
workers), mixed precision, and multi-process training with torchrun (DistributedDataParallel over gloo,
SyncBatchNorm, rank-0 checkpoints resumed by a different number of processes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pconv_cuda.inpainting import (
    ImageDataset, InpaintingTrainSet, MaskDataset, PConvUNet, TrainSampler, make_bucketed_masks, make_train_loader,
    save_bucketed_masks,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_inpainting.py"
# One thread per process: on a small shared machine OpenMP oversubscription slows these tiny steps ~100x.
TINY = ["--size", "32", "--layer-size", "4", "--base-channels", "8", "--vgg-weights", "random", "--quiet",
        "--threads", "1", "--device", "cpu", "--log-every", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """Six small RGB images of different sizes, two in a sub-folder and one a JPEG (recursive, mixed formats)."""
    d = tmp_path_factory.mktemp("images")
    (d / "sub").mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        h, w = 40 + 4 * i, 56 - 2 * i
        yy, xx = np.mgrid[0:h, 0:w] / h
        a, b, c = rng.uniform(0.2, 1.0, 3)
        img = np.stack([a * xx, b * yy, c * (1 - xx * yy)], -1)
        img[(yy - 0.5) ** 2 + (xx - 0.6) ** 2 < 0.05] = rng.uniform(0, 1, 3)
        arr = (np.clip(img, 0, 1) * 255).astype(np.uint8)
        name = (d / "sub" if i >= 4 else d) / f"img{i}.{'jpg' if i == 5 else 'png'}"
        Image.fromarray(arr).save(name)
    return d


@pytest.fixture(scope="module")
def mask_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("masks")
    save_bucketed_masks(make_bucketed_masks(1, 48, 48, seed=1), d)
    return d


def _log(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------------
# Data


def test_image_and_mask_datasets(image_dir, mask_dir):
    images = ImageDataset(image_dir)
    assert len(images) == 6 and images.names[-2:] == ["sub/img4.png", "sub/img5.jpg"]
    assert images[5].shape == (3, 60, 46) and images[5].dtype == torch.float32
    train, val = images.split(2)
    assert train.names == images.names[:4] and val.names == images.names[4:]
    masks = MaskDataset(mask_dir, 32, 32)
    assert len(masks) == 6 and masks[0].shape == (1, 32, 32)
    pairs = InpaintingTrainSet(images, 32, masks=masks, seed=3)
    image, mask = pairs[(2, 17)]
    assert image.shape == (3, 32, 32) and mask.shape == (1, 32, 32)
    assert set(mask.unique().tolist()) <= {0.0, 1.0} and 0 < float(mask.mean()) < 1
    again = pairs[(2, 17)]  # a sample is a function of (seed, stream, position): no hidden state
    assert torch.equal(again[0], image) and torch.equal(again[1], mask)
    other = pairs[(2, 18)]
    assert not torch.equal(other[1], mask)


def test_sampler_global_batch_does_not_depend_on_world_size():
    data = list(range(7))  # 7 images, global batch 4: batches straddle epochs
    one = iter(TrainSampler(data, 4, num_replicas=1, rank=0, seed=3))
    ranks = [iter(TrainSampler(data, 2, num_replicas=2, rank=r, seed=3)) for r in (0, 1)]
    stream = []
    for _ in range(6):
        whole = [next(one) for _ in range(4)]
        parts = [[next(it) for _ in range(2)] for it in ranks]
        # DistributedSampler's interleaving: rank r holds global positions r, r + 2, ... of the global batch.
        assert parts[0] == whole[0::2] and parts[1] == whole[1::2]
        stream += whole
    assert [p for _, p in stream] == list(range(24))
    for e in range(3):  # every epoch shows every image once
        assert sorted(i for i, _ in stream[7 * e : 7 * e + 7]) == list(range(7))
    # Resuming at any global sample (here after 3 steps of batch 4) continues the same stream, on any world size.
    resumed = iter(TrainSampler(data, 1, num_replicas=2, rank=1, seed=3, start=12))
    assert [next(resumed) for _ in range(3)] == [stream[13], stream[15], stream[17]]
    # Another seed or stream (the fine-tuning stage) orders the images differently.
    for kw in ({"seed": 4}, {"seed": 3, "stream": 1}):
        s = iter(TrainSampler(data, 4, num_replicas=1, rank=0, **kw))
        assert [next(s)[0] for _ in range(14)] != [i for i, _ in stream[:14]]


class _Probe(InpaintingTrainSet):
    """Adds a draw from NumPy's global generator, to check how the workers are seeded."""

    def __getitem__(self, item):
        image, mask = super().__getitem__(item)
        return image, mask, torch.tensor(np.random.randint(2 ** 31))


def _batches(image_dir, *, workers, seed=5, rank=0, world=1, n=3):
    data = _Probe(ImageDataset(image_dir), 32, seed=seed)
    loader = make_train_loader(data, 2, num_replicas=world, rank=rank, workers=workers)
    it = iter(loader)
    out = [next(it) for _ in range(n)]
    del it
    return out


def test_loader_with_two_workers_is_reproducible(image_dir):
    a = _batches(image_dir, workers=2)
    b = _batches(image_dir, workers=2)
    for x, y in zip(a, b):
        assert all(torch.equal(u, v) for u, v in zip(x, y))  # images, masks, and the workers' global NumPy draws
    # The samples do not depend on the number of workers, nor on which worker makes them.
    c = _batches(image_dir, workers=0)
    for x, y in zip(a, c):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
    d = _batches(image_dir, workers=2, seed=6)
    assert not torch.equal(d[0][1], a[0][1])
    # Two ranks of one run: different crops, masks, and worker seeds.
    r0 = _batches(image_dir, workers=2, world=2, rank=0, n=2)
    r1 = _batches(image_dir, workers=2, world=2, rank=1, n=2)
    for x, y in zip(r0, r1):
        assert not torch.equal(x[1], y[1]) and not torch.equal(x[2], y[2])


# ---------------------------------------------------------------------------------------------------------------
# Precision


def test_amp_bf16_on_cpu(examples, image_dir, tmp_path):
    out = tmp_path / "bf16"
    summary = examples["train_inpainting"].main(
        ["--data", str(image_dir), "--out", str(out), "--steps", "2", "--batch-size", "2", "--amp", "bf16",
         "--channels-last", *TINY])
    assert summary["device"] == "cpu"
    for r in _log(out / "log.jsonl"):
        assert all(np.isfinite(r[k]) for k in ("valid", "hole", "perceptual", "style_out", "tv", "total"))
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for k, v in ckpt["model"].items() if "num_batches" not in k)
    assert all(torch.isfinite(v.float()).all() for v in ckpt["model"].values())

    # Evaluation: bf16 close to float32; batching changes nothing (BatchNorm in eval mode).
    ev = examples["evaluate"].main
    common = ["--checkpoint", str(out / "checkpoint.pt"), "--images", str(image_dir), "--per-bucket", "1",
              "--quiet", "--device", "cpu", "--threads", "1"]
    f32 = ev([*common, "--batch-size", "5"])["results"]["pconv"]
    f32_b1 = ev([*common, "--batch-size", "1"])["results"]["pconv"]
    bf16 = ev([*common, "--batch-size", "5", "--amp", "bf16", "--channels-last"])["results"]["pconv"]
    for b in f32:
        assert f32[b]["n"] == 6
        assert f32_b1[b]["l1"] == pytest.approx(f32[b]["l1"], rel=1e-4, abs=1e-5)
        # bf16 keeps ~3 significant digits of the network output; the composite keeps the known pixels exactly.
        assert bf16[b]["l1"] == pytest.approx(f32[b]["l1"], rel=0.05, abs=0.05)

    # Inference on two images of different sizes in one call, bf16: known pixels come back untouched.
    srcs = [image_dir / "img0.png", image_dir / "sub" / "img5.jpg"]
    res = examples["inpaint"].main([*map(str, srcs), "--checkpoint", str(out / "checkpoint.pt"), "--out",
                                    str(tmp_path / "filled"), "--save-mask", str(tmp_path / "masks"), "--amp",
                                    "bf16", "--batch-size", "2", "--device", "cpu"])
    assert len(res["results"]) == 2
    for src in srcs:
        filled = np.asarray(Image.open(tmp_path / "filled" / f"{src.stem}.png"))
        original = np.asarray(Image.open(src).convert("RGB"))
        valid = np.asarray(Image.open(tmp_path / "masks" / f"{src.stem}.png")) > 127
        assert filled.shape == original.shape and np.array_equal(filled[valid], original[valid])


# ---------------------------------------------------------------------------------------------------------------
# Several processes: torchrun, DistributedDataParallel over gloo


def _torchrun(tmp_path: Path, name: str, *args: str, nproc: int = 2) -> Path:
    """Run the training script under torchrun (standalone: a free port, so parallel runs do not collide)."""
    launcher = Path(sys.executable).with_name("torchrun")
    cmd = [str(launcher)] if launcher.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    run_dir, dump = tmp_path / name, tmp_path / f"{name}_dump"
    cmd += ["--standalone", f"--nproc_per_node={nproc}", str(SCRIPT), "--out", str(run_dir), "--debug-dump",
            str(dump), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return run_dir


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory, image_dir):
    """Two 2-process runs of 3 steps, global batch 4 (2 per process), without and with --sync-bn."""
    tmp = tmp_path_factory.mktemp("ddp")
    common = ["--data", str(image_dir), "--steps", "3", "--batch-size", "4", "--grid-every", "3", *TINY]
    return {"plain": _torchrun(tmp, "plain", *common), "sync": _torchrun(tmp, "sync", *common, "--sync-bn")}


def _dump(run_dir: Path, name: str):
    return torch.load(run_dir.parent / f"{run_dir.name}_dump" / name, weights_only=True)


@pytest.mark.parametrize("kind", ["plain", "sync"])
def test_torchrun_ranks_hold_identical_parameters(ddp_runs, kind):
    run = ddp_runs[kind]
    finals = [_dump(run, f"final_rank{r}.pt") for r in (0, 1)]
    names = [n for n, _ in PConvUNet(4, base_channels=8).named_parameters()]
    for n in names:
        assert torch.equal(finals[0][n], finals[1][n]), n  # DDP: averaged gradients, identical updates
    running = [k for k in finals[0] if "running_" in k]
    if kind == "sync":  # global-batch statistics: the running statistics agree too
        assert all(torch.equal(finals[0][k], finals[1][k]) for k in running)
    else:  # each process' shard: rank 0's are broadcast at every forward, then each rank updates its own
        assert any(not torch.equal(finals[0][k], finals[1][k]) for k in running)
    # Rank 0 alone wrote the outputs; the log averages over both processes.
    log = _log(run / "log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3] and all(r["world_size"] == 2 for r in log)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "grid_latest.png", "grid_train_000003.png",
                                                     "log.jsonl"]
    first = _dump(run, "first_step.pt")
    local = [_dump(run, f"batch_rank{r}.pt")["losses"]["total"] for r in (0, 1)]
    assert first["losses"]["total"] == pytest.approx(sum(local) / 2, rel=1e-12)
    assert log[0]["total"] == pytest.approx(first["losses"]["total"], rel=1e-6)


def test_sync_bn_first_step_matches_one_process_on_the_whole_batch(examples, ddp_runs, image_dir, tmp_path):
    """With --sync-bn, 2 processes x 2 samples give the loss and the gradients of 1 process x 4 samples.

    The data: both runs draw global batch 0 (positions 0..3); rank r holds positions r and r + 2, checked
    bitwise below. The model and the random VGG come from the same seed. Tolerance: float32 throughout; what
    differs is only the order of reductions: BatchNorm sums over 2 halves then all-reduced (gloo) instead of
    one pass, each loss term a mean of two half-batch means, and DDP's gradient all-reduce (sum of the two
    ranks' gradients, then / 2) against one backward. Each such reordering moves a result by a few float32
    ulps (1.2e-7 relative); through ~8 layers of backward this measured <= 2e-6 of the largest gradient entry
    per tensor. 1e-4 of it leaves a 50x margin, and is still ~1000x below the effect of per-shard
    statistics: the same comparison against the run without --sync-bn must fail by more than 1e-2."""
    single = tmp_path / "single"
    dump = tmp_path / "single_dump"
    examples["train_inpainting"].main(["--data", str(image_dir), "--out", str(single), "--steps", "1",
                                       "--batch-size", "4", "--debug-dump", str(dump), *TINY])
    ref = torch.load(dump / "first_step.pt", weights_only=True)
    ref_batch = torch.load(dump / "batch_rank0.pt", weights_only=True)
    ranks = [_dump(ddp_runs["sync"], f"batch_rank{r}.pt") for r in (0, 1)]
    for key in ("images", "masks"):  # the same four samples, rank r holding global positions r and r + 2
        assert torch.equal(torch.stack([ranks[0][key], ranks[1][key]], 1).flatten(0, 1), ref_batch[key])

    def worst(run) -> float:
        got = _dump(run, "first_step.pt")
        for k, v in ref["losses"].items():
            assert got["losses"][k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
        assert set(got["grads"]) == set(ref["grads"]) and len(ref["grads"]) == 22
        return max(float((got["grads"][n] - g).abs().max() / g.abs().max()) for n, g in ref["grads"].items())

    assert worst(ddp_runs["sync"]) <= 1e-4
    # Without --sync-bn each process normalises by its own 2 samples' statistics: visibly different gradients.
    plain = _dump(ddp_runs["plain"], "first_step.pt")
    assert max(float((plain["grads"][n] - g).abs().max() / g.abs().max()) for n, g in ref["grads"].items()) > 1e-2


def test_two_process_checkpoint_resumed_by_one_process(examples, ddp_runs, image_dir, tmp_path):
    src = ddp_runs["sync"] / "checkpoint.pt"
    ckpt = torch.load(src, weights_only=True)
    assert ckpt["step"] == 3 and ckpt["world_size"] == 2 and ckpt["samples"] == 12 and ckpt["global_batch"] == 4
    out = tmp_path / "resumed"
    dump = tmp_path / "resumed_dump"
    examples["train_inpainting"].main(["--data", str(image_dir), "--out", str(out), "--steps", "5", "--batch-size",
                                       "4", "--resume", str(src), "--debug-dump", str(dump), *TINY])
    resumed = torch.load(out / "checkpoint.pt", weights_only=True)
    assert resumed["step"] == 5 and resumed["world_size"] == 1 and resumed["samples"] == 20
    assert [r["step"] for r in _log(out / "log.jsonl")] == [4, 5]
    # The optimizer state continued (Adam's step count), and the parameters moved on from the 2-process run's.
    state = next(iter(resumed["optimizer"]["state"].values()))
    assert float(state["step"]) == 5
    assert not torch.equal(resumed["model"]["decoder.0.conv.weight"], ckpt["model"]["decoder.0.conv.weight"])
    # The data stream continued too: the first resumed batch is global positions 12..15, which the data set
    # alone reproduces (a single process with batch 4 would have drawn the same samples at step 3).
    batch = torch.load(dump / "batch_rank0.pt", weights_only=True)
    data = InpaintingTrainSet(ImageDataset(image_dir).split(1)[0], 32, seed=0)
    it = iter(TrainSampler(data, 4, num_replicas=1, rank=0, seed=0, start=12))
    expected = [data[next(it)] for _ in range(4)]
    assert torch.equal(batch["images"], torch.stack([e[0] for e in expected]))
    assert torch.equal(batch["masks"], torch.stack([e[1] for e in expected]))
