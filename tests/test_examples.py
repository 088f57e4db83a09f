"""The examples and the model benchmark, end to end on tiny settings: train, resume, fine-tune, inpaint,
evaluate."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pconv_cuda
from pconv_cuda.inpainting import PConvUNet

from helpers import load_example

ROOT = Path(__file__).resolve().parents[1]
# --threads 1: on a small shared machine, OpenMP oversubscription slows these tiny convolutions ~100x.
TINY = ["--size", "32", "--layer-size", "4", "--base-channels", "8", "--batch-size", "2",
        "--vgg-weights", "random", "--quiet", "--threads", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """A few small synthetic RGB images (smooth gradients and a disc), written as PNG."""
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:56] / 48.0
    for i in range(4):
        a, b, c = rng.uniform(0.2, 1.0, 3)
        img = np.stack([a * xx, b * yy, c * (1 - xx * yy)], -1)
        img[(yy - 0.5) ** 2 + (xx - 0.6) ** 2 < 0.05] = rng.uniform(0, 1, 3)
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(d / f"img{i}.png")
    return d


def _log(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def restore_determinism():
    """--deterministic sets process-wide flags; the tests share the process."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.benchmark = saved[2]


def test_train_resume_finetune_inpaint_evaluate(examples, image_dir, tmp_path, restore_determinism):
    train = examples["train_inpainting"].main
    out = tmp_path / "run"

    def args(run_dir, *more):  # --deterministic: the resume check below is bitwise on a GPU too
        return ["--data", str(image_dir), "--out", str(run_dir), "--log-every", "2", "--grid-every", "2",
                "--ckpt-every", "2", "--deterministic", *TINY, *more]

    # Train 4 steps: checkpoint, a log line every 2 steps with every loss term, grids of the right size.
    summary = train(args(out, "--steps", "4"))
    log = _log(out / "log.jsonl")
    assert [r["step"] for r in log] == [2, 4]
    for r in log:
        assert {"valid", "hole", "perceptual", "style_out", "style_comp", "tv", "total"} <= set(r)
        assert all(np.isfinite(r[k]) for k in ("valid", "hole", "total"))
    assert summary["step"] == 4 and (out / "checkpoint.pt").is_file()
    grid = Image.open(out / "grid_train_000004.png")
    # 5 columns (input, mask, output, composite, ground truth) of 32 px + 2 px padding; 4 rows: the one
    # held-out image (the last of 4) under 4 masks of growing hole ratio.
    assert grid.size == (5 * 34 + 2, 4 * 34 + 2)
    assert (out / "grid_train_000002.png").is_file() and (out / "grid_latest.png").is_file()
    ckpt4 = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt4["step"] == 4 and ckpt4["stage"] == "train"

    # Resuming to 6 steps gives exactly what 6 uninterrupted steps give (model, optimizer and data RNG restored;
    # on a GPU this needs --deterministic: cuDNN's default algorithms may add in another order per call).
    train(args(out, "--steps", "6", "--resume", str(out / "checkpoint.pt")))
    resumed = torch.load(out / "checkpoint.pt", weights_only=True)
    assert resumed["step"] == 6 and [r["step"] for r in _log(out / "log.jsonl")] == [2, 4, 6]
    straight_dir = tmp_path / "straight"
    train(args(straight_dir, "--steps", "6"))
    straight = torch.load(straight_dir / "checkpoint.pt", weights_only=True)
    for k, v in straight["model"].items():
        assert torch.equal(v, resumed["model"][k]), k

    # Fine-tuning: encoder BatchNorm frozen (statistics and affine parameters unchanged), the rest trains.
    ft_dir = tmp_path / "ft"
    train(args(ft_dir, "--steps", "2", "--finetune", "--resume", str(out / "checkpoint.pt")))
    ft = torch.load(ft_dir / "checkpoint.pt", weights_only=True)
    assert ft["stage"] == "finetune" and ft["step"] == 2
    assert _log(ft_dir / "log.jsonl")[-1]["lr"] == 5e-5
    enc_bn = [k for k in ft["model"] if k.startswith("encoder.") and ".bn." in k]
    assert enc_bn and all(torch.equal(ft["model"][k], resumed["model"][k]) for k in enc_bn)
    assert not torch.equal(ft["model"]["decoder.0.conv.weight"], resumed["model"]["decoder.0.conv.weight"])

    # Inpaint an image whose size is not a multiple of 2**layer_size, with a generated mask.
    src = image_dir / "img0.png"
    res = examples["inpaint"].main([str(src), "--checkpoint", str(ft_dir / "checkpoint.pt"),
                                    "--out", str(tmp_path / "filled.png"), "--save-mask", str(tmp_path / "m.png"),
                                    "--hole-ratio", "0.3", "0.4"])
    assert 0.3 < res["hole_ratio"] <= 0.4
    filled = np.asarray(Image.open(tmp_path / "filled.png"))
    original = np.asarray(Image.open(src))
    valid = np.asarray(Image.open(tmp_path / "m.png")) > 127
    assert filled.shape == original.shape
    assert np.array_equal(filled[valid], original[valid])  # known pixels come back untouched
    # The saved mask, given back as a file, reproduces the result.
    examples["inpaint"].main([str(src), "--checkpoint", str(ft_dir / "checkpoint.pt"),
                              "--mask", str(tmp_path / "m.png"), "--out", str(tmp_path / "again.png")])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png")), filled)

    # Evaluate per bucket, with the biharmonic baseline, to JSON.
    metrics_path = tmp_path / "metrics.json"
    result = examples["evaluate"].main(["--checkpoint", str(ft_dir / "checkpoint.pt"), "--images", str(image_dir),
                                        "--per-bucket", "1", "--baseline", "biharmonic", "--json",
                                        str(metrics_path), "--quiet"])
    saved = json.loads(metrics_path.read_text())
    assert saved["results"] == json.loads(json.dumps(result["results"]))
    assert list(saved["results"]) == ["pconv", "biharmonic"]
    for method in saved["results"].values():
        assert list(method) == ["(0.01,0.1]", "(0.1,0.2]", "(0.2,0.3]", "(0.3,0.4]", "(0.4,0.5]", "(0.5,0.6]"]
        for r in method.values():
            assert r["n"] == 4 and 0 < r["l1"] < 100 and r["psnr"] > 0 and -1 <= r["ssim"] <= 1
    # More holes, more error: the smallest bucket beats the largest (composites keep the known pixels).
    b = saved["results"]["biharmonic"]
    assert b["(0.01,0.1]"]["l1"] < b["(0.5,0.6]"]["l1"]


def test_train_on_builtin_photographs(examples, tmp_path):
    pytest.importorskip("skimage")
    summary = examples["train_inpainting"].main(["--out", str(tmp_path), "--steps", "1", *TINY])
    assert summary["step"] == 1 and (tmp_path / "grid_latest.png").is_file()
    # The held-out photographs fill the preview grid (4 rows).
    assert Image.open(tmp_path / "grid_latest.png").size[1] == 4 * 34 + 2


def test_bench_model_runs(tmp_path):
    bench = load_example("benchmarks/bench_model.py")
    out = tmp_path / "bench.json"
    result = bench.main(["--size", "32", "--layer-size", "4", "--base-channels", "8", "--batch", "1", "2",
                         "--repeats", "1", "--warmup", "0", "--device", "cpu", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert [(r["mode"], r["batch"]) for r in saved["rows"]] == [("infer", 1), ("infer", 2), ("train", 1), ("train", 2)]
    for r in saved["rows"]:
        assert r["reference_ms"] > 0 and r["plain_ms"] > 0
        if saved["env"]["fused_available"]:
            assert r["fused_ms"] > 0 and r["speedup"] == pytest.approx(r["reference_ms"] / r["fused_ms"])
            assert r["fused_over_plain"] == pytest.approx(r["fused_ms"] / r["plain_ms"])
        if r["mode"] == "train":  # memory autograd keeps: the parameters and more; the reference keeps C-channel masks
            assert r["plain_kept_mb"] > r["plain_kept_act_mb"] > 0
            if saved["env"]["fused_available"]:
                assert r["plain_kept_act_mb"] < r["fused_kept_act_mb"] < r["reference_kept_act_mb"]
                assert r["fused_kept_over_plain"] == pytest.approx(r["fused_kept_mb"] / r["plain_kept_mb"])
    assert "| case | batch |" in bench.format_table(result["rows"], saved["env"]["fused_available"])
    with pytest.raises(SystemExit, match="--cuda-graphs needs --device cuda"):
        bench.main(["--cuda-graphs", "--device", "cpu"])


def test_bench_model_over_processes(tmp_path):
    # --processes: each row is the median over fresh processes of their own medians and ratios.
    bench = load_example("benchmarks/bench_model.py")
    out = tmp_path / "bench.json"
    bench.main(["--size", "32", "--layer-size", "3", "--base-channels", "4", "--batch", "1", "--repeats", "1",
                "--warmup", "0", "--device", "cpu", "--modes", "infer", "--variants", "plain", "fused",
                "--processes", "3", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["env"]["processes"] == 3
    (row,) = saved["rows"]
    assert len(row["plain_all_ms"]) == 3 and row["plain_ms"] == statistics.median(row["plain_all_ms"])
    if saved["env"]["fused_available"]:
        assert len(row["fused_over_plain_per_process"]) == 3
        assert row["fused_over_plain"] == statistics.median(row["fused_over_plain_per_process"])


def test_plain_conv_baseline_passes_the_mask_along():
    # The plain network: the same U-Net with every layer an nn.Conv2d that never reads the mask; its masks keep
    # the shapes the partial convolution's would have, so the network around the layers does the same work.
    bench = load_example("benchmarks/bench_model.py")
    torch.manual_seed(0)
    plain = PConvUNet(4, pconv=bench.PlainConv2d, base_channels=8)
    fused = PConvUNet(4, pconv=pconv_cuda.PartialConv2d, base_channels=8)
    plain.load_state_dict(fused.state_dict())
    x, m = torch.rand(2, 3, 32, 32), (torch.rand(2, 1, 32, 32) > 0.3).float()
    out, out_mask = plain.eval()(x, m)
    assert out.shape == fused.eval()(x, m)[0].shape == x.shape
    layer = plain.encoder[0].conv
    y, ym = layer(x, m.expand(2, 3, 32, 32))
    torch.testing.assert_close(y, torch.nn.functional.conv2d(x, layer.weight, layer.bias, 2, 3), rtol=0, atol=0)
    assert ym.shape == (2, layer.out_channels, 16, 16)
    torch.testing.assert_close(ym[:, 0], m[:, 0, ::2, ::2])




# Two programs suffice: the examples share their import set-up, and each start costs a torch import.
@pytest.mark.parametrize("script", ["examples/train_inpainting.py", "benchmarks/bench_model.py"])
def test_scripts_run_as_programs(script):
    # The scripts import the installed pconv_cuda (the source tree has no compiled ops in CI).
    proc = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout


@pytest.mark.parametrize("mask", ["groups", "skip"])
def test_bench_skip_link_variants_agree(mask):
    # bench.py's decoder-layer cases: every variant computes the same layer (the skip kind joins the two halves,
    # the fused one by masked_cat and input_masked), so its ratios compare equals; run_case labels the row.
    bench = load_example("benchmarks/bench.py")
    layers = bench.unet_layers(32, 3)
    dec2 = next(l for l in layers if l.name == "dec2")
    groups = bench.decoder_groups(dec2, layers)
    x, m, conv = bench.make_case(dec2, 2, True, "cpu", torch.float64, mask_groups=groups)
    x = x.masked_fill(m.repeat_interleave(torch.tensor(groups), 1) == 0, 1e6)  # holes: multiplied by 0 (the peer too)
    xs = tuple(t.contiguous() for t in x.split(list(groups), 1)) if mask == "skip" else (x,)
    fns = bench.variants(x, m, conv, True, groups)
    want = fns["peer"](*xs)
    assert torch.isfinite(want).all()
    torch.testing.assert_close(fns["fused"](*xs), want, rtol=1e-10, atol=1e-10)
    row = bench.run_case(dec2, 1, False, True, "cpu", torch.float32, 1, bench.Clock("cpu"), mask_groups=groups,
                         skip_link=mask == "skip")
    assert row.mask == mask and row.pass_ == "fwd+bwd" and row.fused_ms > 0
