"""InpaintingLoss: every term against values worked out by hand on tiny tensors, the VGG16 extractor, weights."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from pconv_cuda.inpainting.losses import (
    IMAGENET_MEAN, IMAGENET_STD, VGG16_FILENAME, InpaintingLoss, LossWeights, VGG16FeatureExtractor, gram_matrix,
    total_variation_in_holes,
)


class Identity(nn.Module):
    """Feature extractor whose single "layer" is the image itself, so the feature terms can be done by hand."""

    def forward(self, x):
        return [x]


def _loss(**kw) -> InpaintingLoss:
    return InpaintingLoss(feature_extractor=Identity(), **kw)


def test_valid_and_hole_l1_are_size_averaged():
    # 1 x 1 x 2 x 2, one hole at (0, 0). |out - gt| = [[4, 1], [2, 3]].
    target = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    output = torch.tensor([[[[4.0, -1.0], [2.0, -3.0]]]], dtype=torch.float64)
    mask = torch.tensor([[[[0.0, 1.0], [1.0, 1.0]]]], dtype=torch.float64)
    d = _loss()(output, target, mask)
    assert d["valid"].item() == pytest.approx((1 + 2 + 3) / 4)  # over all 4 elements, not the 3 valid ones
    assert d["hole"].item() == pytest.approx(4 / 4)


def test_l1_with_single_channel_mask_on_rgb():
    # The mask broadcasts over channels and the mean runs over N*C*H*W = 2*3*1*2 = 12 elements.
    target = torch.zeros(2, 3, 1, 2, dtype=torch.float64)
    output = torch.ones(2, 3, 1, 2, dtype=torch.float64)
    mask = torch.tensor([[[[1.0, 0.0]]], [[[1.0, 1.0]]]], dtype=torch.float64)  # 1 hole pixel x 3 channels
    d = _loss()(output, target, mask)
    assert d["valid"].item() == pytest.approx(9 / 12)
    assert d["hole"].item() == pytest.approx(3 / 12)


def test_perceptual_and_style_single_channel():
    # Features = image, C = 1, H = 1, W = 2: out = [1, 3], gt = [0, 1], hole at the second pixel.
    output = torch.tensor([[[[1.0, 3.0]]]], dtype=torch.float64)
    target = torch.tensor([[[[0.0, 1.0]]]], dtype=torch.float64)
    mask = torch.tensor([[[[1.0, 0.0]]]], dtype=torch.float64)
    d = _loss()(output, target, mask)
    # comp = [0, 3]; perceptual = mean(|1-0|, |3-1|) + mean(|0-0|, |3-1|) = 1.5 + 1
    assert d["perceptual"].item() == pytest.approx(2.5)
    # Gram / (C*H*W): out (1 + 9) / 2 = 5, gt (0 + 1) / 2 = 0.5, comp (0 + 9) / 2 = 4.5
    assert d["style_out"].item() == pytest.approx(4.5)
    assert d["style_comp"].item() == pytest.approx(4.0)


def test_style_gram_normalisation_over_channels():
    # C = 2, H = W = 1: out features (2, 1), gt (1, 1). Gram / (C*H*W = 2):
    # out [[4, 2], [2, 1]] / 2, gt [[1, 1], [1, 1]] / 2, |diff| = [[3, 1], [1, 0]] / 2, mean over C*C = 0.625.
    output = torch.tensor([2.0, 1.0], dtype=torch.float64).view(1, 2, 1, 1)
    target = torch.tensor([1.0, 1.0], dtype=torch.float64).view(1, 2, 1, 1)
    mask = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    d = _loss()(output, target, mask)
    assert d["style_out"].item() == pytest.approx(0.625)
    assert d["style_comp"].item() == 0.0  # no hole: the composite is the ground truth
    assert gram_matrix(output).shape == (1, 2, 2)


def test_tv_over_the_dilated_hole_region():
    # 3x3 with the hole in the centre: the 1-pixel dilation covers all 9 pixels, so all 6 horizontal and 6
    # vertical pairs count; divided by N*C*H*W = 9.
    comp = torch.tensor([[[[0.0, 1.0, 3.0], [0.0, 2.0, 2.0], [5.0, 5.0, 5.0]]]], dtype=torch.float64)
    mask = torch.ones_like(comp)
    mask[..., 1, 1] = 0
    horizontal = (1 + 2) + (2 + 0) + (0 + 0)
    vertical = (0 + 1 + 1) + (5 + 3 + 3)
    assert total_variation_in_holes(comp, mask).item() == pytest.approx((horizontal + vertical) / 9)

    # 4x4 with the hole in the corner: P = the top-left 2x2, so 2 horizontal and 2 vertical pairs.
    comp = torch.arange(16, dtype=torch.float64).view(1, 1, 4, 4) ** 2
    mask = torch.ones_like(comp)
    mask[..., 0, 0] = 0
    c = comp[0, 0]
    pairs = [(c[0, 1] - c[0, 0]), (c[1, 1] - c[1, 0]), (c[1, 0] - c[0, 0]), (c[1, 1] - c[0, 1])]
    assert pairs == [1, 9, 16, 24]
    assert total_variation_in_holes(comp, mask).item() == pytest.approx(50 / 16)


def test_tv_is_taken_on_the_composite():
    # Outside the holes the composite is the ground truth, whatever the output there.
    target = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    mask = torch.ones_like(target)
    mask[..., 0, 0] = 0
    output = torch.full_like(target, 7.0)
    output[..., 0, 0] = 2.0
    # comp: 2 at (0, 0), 0 elsewhere; pairs in P touching (0, 0): right and down, |2 - 0| each.
    assert _loss()(output, target, mask)["tv"].item() == pytest.approx(4 / 16)


def test_total_is_the_weighted_sum_and_weights_are_configurable():
    torch.manual_seed(0)
    output, target = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    mask = (torch.rand(2, 1, 8, 8) > 0.3).float()
    d = _loss()(output, target, mask)
    paper = {"valid": 1, "hole": 6, "perceptual": 0.05, "style_out": 120, "style_comp": 120, "tv": 0.1}
    assert d["total"].item() == pytest.approx(sum(w * d[k].item() for k, w in paper.items()), rel=1e-6)
    d2 = _loss(weights={"hole": 1.0, "tv": 0.0})(output, target, mask)
    expected = d["total"] - 5 * d["hole"] - 0.1 * d["tv"]
    assert d2["total"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert _loss(weights=LossWeights(valid=2.0)).weights.valid == 2.0
    with pytest.raises(ValueError, match="unknown loss terms"):
        _loss(weights={"style": 1.0})


def test_vgg_extractor_layers_and_normalisation():
    torch.manual_seed(0)
    vgg = VGG16FeatureExtractor("random")
    assert not vgg.pretrained
    # Each slice ends at a max-pool: pool1, pool2, pool3 of VGG16.
    assert [type(s[-1]).__name__ for s in vgg.slices] == ["MaxPool2d"] * 3
    assert [sum(isinstance(m, nn.Conv2d) for m in s) for s in vgg.slices] == [2, 2, 3]
    x = torch.rand(2, 3, 32, 32)
    feats = vgg(x)
    assert [tuple(f.shape) for f in feats] == [(2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4)]
    # [0, 1] images are normalised with the ImageNet statistics before the first conv.
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(feats[0], vgg.slices[0]((x - mean) / std))
    assert all(not p.requires_grad for p in vgg.parameters())
    vgg.train()
    assert not vgg.training
    with pytest.raises(ValueError, match="RGB"):
        vgg(torch.rand(1, 1, 32, 32))


def test_vgg_weights_from_file_and_from_the_hub_cache(tmp_path, monkeypatch):
    torch.manual_seed(0)
    src = VGG16FeatureExtractor("random")
    # torchvision's file layout: keys "features.<index>.<param>", plus classifier keys, which are ignored.
    # (Slicing an nn.Sequential keeps the original indices as keys.)
    state = {f"features.{k}": v for s in src.slices for k, v in s.state_dict().items()}
    assert "features.14.weight" in state and "features.28.weight" not in state  # conv3_3 is the last
    state["classifier.0.weight"] = torch.zeros(1)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(state, cache / VGG16_FILENAME)

    x = torch.rand(1, 3, 16, 16)
    loaded = VGG16FeatureExtractor(cache / VGG16_FILENAME)
    assert loaded.pretrained
    for a, b in zip(loaded(x), src(x)):
        assert torch.equal(a, b)

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # found in the cache: no warning
        cached = VGG16FeatureExtractor(None)
    assert cached.pretrained and torch.equal(cached(x)[2], src(x)[2])

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        fallback = VGG16FeatureExtractor(None)
    assert not fallback.pretrained

    with pytest.raises(FileNotFoundError, match="vgg_weights"):
        VGG16FeatureExtractor(tmp_path / "missing.pth")
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not a VGG16 state dict"):
        VGG16FeatureExtractor(tmp_path / "bad.pth")


def test_loss_with_vgg_gradients_and_finiteness():
    torch.manual_seed(0)
    loss_fn = InpaintingLoss(vgg_weights="random")
    target = torch.rand(2, 3, 32, 32)
    mask = (torch.rand(2, 1, 32, 32) > 0.4).float()
    output = torch.rand(2, 3, 32, 32, requires_grad=True)
    d = loss_fn(output, target, mask)
    assert set(d) == {"valid", "hole", "perceptual", "style_out", "style_comp", "tv", "total"}
    assert all(torch.isfinite(v) and v.item() > 0 for v in d.values())
    d["total"].backward()
    assert output.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss_fn.parameters())
    # A perfect output costs nothing but the smoothness term (the ground truth itself is not flat).
    perfect = loss_fn(target, target, mask)
    assert all(perfect[k].item() == pytest.approx(0, abs=1e-6) for k in InpaintingLoss.terms if k != "tv")
    assert perfect["tv"].item() > 0


def test_loss_under_autocast_bfloat16():
    # VGG runs in bfloat16 under autocast; the terms come back in float32 (Gram matrices are formed in float32)
    # and stay within bfloat16's rounding of the float32 loss.
    torch.manual_seed(0)
    loss_fn = InpaintingLoss(vgg_weights="random")
    target, output = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    mask = (torch.rand(2, 1, 32, 32) > 0.4).float()
    ref = loss_fn(output, target, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = loss_fn(output, target, mask)
    for k in InpaintingLoss.terms + ("total",):
        assert low[k].dtype == torch.float32
        assert low[k].item() == pytest.approx(ref[k].item(), rel=0.05), k


class ThreeLevels(nn.Module):
    """Three feature levels of different sizes and widths, each a simple function of the image:
    the image (C 3, H x W), its 2x2 average pool (C 3, H/2 x W/2), and the squared first channel (C 1, H x W)."""

    def forward(self, x):
        return [x, torch.nn.functional.avg_pool2d(x, 2), x[:, :1] ** 2]


def _gram_per_image(f):
    n, c, h, w = f.shape
    return torch.einsum("nchw,ndhw->ncd", f, f) / (c * h * w)


def _tv_by_loops(comp, mask):
    """The paper's L_tv for one image (C, H, W), pair by pair: both pixels in the 1-pixel dilation of the holes."""
    c, h, w = comp.shape
    hole = mask.expand(c, h, w) < 0.5
    region = torch.zeros_like(hole)
    for i in range(h):
        for j in range(w):
            region[:, i, j] = hole[:, max(i - 1, 0):i + 2, max(j - 1, 0):j + 2].flatten(1).any(1)
    total = 0.0
    for i in range(h):
        for j in range(w):
            for di, dj in ((0, 1), (1, 0)):
                if i + di < h and j + dj < w:
                    both = region[:, i, j] & region[:, i + di, j + dj]
                    total += float(((comp[:, i, j] - comp[:, i + di, j + dj]).abs() * both).sum())
    return total


def test_every_feature_level_enters_the_loss_at_batch_two():
    # N = 2 with different masks: perceptual and both style terms are the sums over all three levels of their
    # per-level values, Gram matrices taken per image, every level contributing.
    g = torch.Generator().manual_seed(0)
    output = torch.rand(2, 3, 6, 8, generator=g, dtype=torch.float64)
    target = torch.rand(2, 3, 6, 8, generator=g, dtype=torch.float64)
    mask = torch.ones(2, 1, 6, 8, dtype=torch.float64)
    mask[0, :, 1:3, 2:5] = 0
    mask[1, :, 3:6, 0:2] = 0
    d = InpaintingLoss(feature_extractor=ThreeLevels())(output, target, mask)
    comp = mask * target + (1 - mask) * output
    levels = list(zip(ThreeLevels()(output), ThreeLevels()(comp), ThreeLevels()(target)))
    perceptual = [(o - t).abs().mean() + (c - t).abs().mean() for o, c, t in levels]
    style_out = [(_gram_per_image(o) - _gram_per_image(t)).abs().mean() for o, c, t in levels]
    style_comp = [(_gram_per_image(c) - _gram_per_image(t)).abs().mean() for o, c, t in levels]
    for name, per_level in (("perceptual", perceptual), ("style_out", style_out), ("style_comp", style_comp)):
        assert all(v.item() > 1e-6 for v in per_level), name  # every level counts
        assert d[name].item() == pytest.approx(sum(v.item() for v in per_level), rel=1e-12, abs=0), name


def test_gram_matrices_are_per_image():
    # A batch of two: each image's Gram matrix is its own, normalised by C*H*W (not by N*C*H*W, not pooled).
    f = torch.tensor([[[[1.0, 2.0]], [[0.0, 1.0]]], [[[3.0, 0.0]], [[1.0, 1.0]]]], dtype=torch.float64)  # 2x2x1x2
    want = torch.tensor([[[5.0, 2.0], [2.0, 1.0]], [[9.0, 3.0], [3.0, 2.0]]], dtype=torch.float64) / 4
    got = gram_matrix(f)
    assert got.shape == (2, 2, 2)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for i in range(2):
        torch.testing.assert_close(gram_matrix(f[i:i + 1])[0], want[i], rtol=0, atol=0)
    # Through the loss: style_out with the identity extractor is the mean |G(out) - G(gt)| over both images.
    target = torch.zeros_like(f)
    d = _loss()(f, target, torch.ones(2, 1, 1, 2, dtype=torch.float64))
    assert d["style_out"].item() == pytest.approx(want.abs().mean().item(), rel=1e-12)


def test_tv_covers_every_image():
    g = torch.Generator().manual_seed(1)
    comp = torch.rand(3, 2, 5, 6, generator=g, dtype=torch.float64)
    mask = torch.ones(3, 1, 5, 6, dtype=torch.float64)
    mask[1, :, 2, 3] = 0  # holes in the second and third image only
    mask[2, :, 0:2, 0] = 0
    per_image = [_tv_by_loops(comp[i], mask[i]) for i in range(3)]
    assert per_image[0] == 0 and per_image[1] > 0 and per_image[2] > 0
    got = total_variation_in_holes(comp, mask).item()
    assert got == pytest.approx(sum(per_image) / comp.numel(), rel=1e-12)
    # Only the last image has holes: its pairs alone, still divided by the whole batch's size.
    mask_last = torch.ones_like(mask)
    mask_last[2] = mask[2]
    assert total_variation_in_holes(comp, mask_last).item() == pytest.approx(per_image[2] / comp.numel(), rel=1e-12)
    # Through the loss (tv is taken on the composite, which here is the ground truth outside the holes).
    d = _loss()(comp, comp, mask)
    assert d["tv"].item() == pytest.approx(sum(per_image) / comp.numel(), rel=1e-12)
