"""Mask generation, augmentation, loading and hole-ratio buckets."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pconv_cuda.inpainting.masks import (
    HOLE_RATIO_BUCKETS, IrregularMaskGenerator, MaskFolder, augment_mask, bucket_index, bucket_name, dilate_holes,
    hole_ratio, load_mask, make_bucketed_masks, save_bucketed_masks, save_mask,
)


def _is_binary(m: torch.Tensor) -> bool:
    return bool(((m == 0) | (m == 1)).all())


def test_buckets_are_the_papers():
    assert HOLE_RATIO_BUCKETS == ((0.01, 0.1), (0.1, 0.2), (0.2, 0.3), (0.3, 0.4), (0.4, 0.5), (0.5, 0.6))
    assert bucket_index(0.01) is None  # (lo, hi]: lo excluded
    assert bucket_index(0.05) == 0 and bucket_index(0.1) == 0 and bucket_index(0.1001) == 1
    assert bucket_index(0.6) == 5 and bucket_index(0.61) is None
    assert bucket_name((0.01, 0.1)) == "(0.01,0.1]"
    assert hole_ratio(torch.tensor([[1.0, 0.0], [1.0, 1.0]])) == 0.25


def test_generator_is_seeded_and_reproducible():
    first = IrregularMaskGenerator(48, 64, seed=7)()
    gen1, gen2, gen3 = (IrregularMaskGenerator(48, 64, seed=s) for s in (7, 7, 8))
    seq1 = [gen1() for _ in range(4)]
    seq2 = [gen2() for _ in range(4)]
    seq3 = [gen3() for _ in range(4)]
    assert all(torch.equal(x, y) for x, y in zip(seq1, seq2))
    assert torch.equal(first, seq1[0])
    assert not all(torch.equal(x, y) for x, y in zip(seq1, seq3))
    assert len({tuple(m.flatten().tolist()) for m in seq1}) == 4  # successive masks differ


def test_generated_masks_are_binary_in_range_and_varied():
    gen = IrregularMaskGenerator(64, 64, seed=0)
    masks = [gen() for _ in range(40)]
    ratios = [hole_ratio(m) for m in masks]
    assert all(m.shape == (1, 64, 64) and m.dtype == torch.float32 and _is_binary(m) for m in masks)
    assert all(0.01 < r <= 0.6 for r in ratios)
    # Targets are uniform over (0.01, 0.6]: both small and large masks show up.
    assert min(ratios) < 0.15 and max(ratios) > 0.45


@pytest.mark.parametrize("bucket", HOLE_RATIO_BUCKETS, ids=bucket_name)
def test_sample_lands_in_the_bucket(bucket):
    gen = IrregularMaskGenerator(96, 128, seed=1)
    for _ in range(3):
        m = gen.sample(*bucket)
        assert m.shape == (1, 96, 128)
        assert bucket[0] < hole_ratio(m) <= bucket[1]


def test_make_bucketed_masks_is_reproducible():
    a = make_bucketed_masks(2, 64, 64, seed=3)
    b = make_bucketed_masks(2, 64, 64, seed=3)
    assert list(a) == list(HOLE_RATIO_BUCKETS)
    for bucket in HOLE_RATIO_BUCKETS:
        assert len(a[bucket]) == 2
        assert all(torch.equal(x, y) for x, y in zip(a[bucket], b[bucket]))
        assert all(bucket_index(hole_ratio(m)) == HOLE_RATIO_BUCKETS.index(bucket) for m in a[bucket])


def test_make_bucketed_masks_from_a_source_sorts_by_ratio():
    def square(ratio):
        m = torch.ones(1, 10, 10)
        m.view(-1)[: round(ratio * 100)] = 0
        return m

    source = [square(r) for r in (0.05, 0.55, 0.15, 0.07, 0.0, 0.7, 0.25)]
    out = make_bucketed_masks(1, 10, 10, source=source)
    assert [len(v) for v in out.values()] == [1, 1, 1, 0, 0, 1]
    assert hole_ratio(out[(0.01, 0.1)][0]) == 0.05  # the first one met, not the later 0.07


def test_dilation_is_a_near_disc():
    r = 10
    holes = torch.zeros(41, 41)
    holes[20, 20] = 1
    d = dilate_holes(holes, 2 * r + 1)
    assert _is_binary(d) and torch.equal(d, d.flip(0)) and torch.equal(d, d.flip(1)) and torch.equal(d, d.T)
    ys, xs = torch.nonzero(d, as_tuple=True)
    assert int(xs.min()) == 20 - r and int(xs.max()) == 20 + r  # diameter 2r + 1 along the axes
    # A regular octagon between the inscribed and the circumscribed disc: exact away from the rim.
    dist = torch.hypot(*torch.meshgrid(torch.arange(41.0) - 20, torch.arange(41.0) - 20, indexing="ij"))
    assert bool((d[dist <= r] == 1).all())
    assert bool((d[dist > r / math.cos(math.pi / 8) + 0.5] == 0).all())
    assert torch.equal(dilate_holes(holes, 1), holes)
    assert bool((dilate_holes(holes, 31) >= d).all())  # larger elements contain smaller ones


def test_augment_dilates_and_keeps_the_crop_inside():
    # Dilation only (a same-size mask, no rotation, a centred symmetric hole: crops and flips change nothing).
    m = np.ones((64, 64), np.float32)
    m[30:34, 30:34] = 0
    plain = augment_mask(m, 64, 64, seed=0, dilation=None, rotate=False)
    assert torch.equal(plain[0], torch.from_numpy(m))
    fat = augment_mask(m, 64, 64, seed=0, dilation=(47, 47), rotate=False)  # 47 px at 512 = 6 px at 64
    assert _is_binary(fat) and hole_ratio(fat) > hole_ratio(plain)
    assert bool((fat[0][m == 0] == 0).all())
    assert bool((fat[0, :24] == 1).all()) and bool((fat[0, 40:] == 1).all())  # grown by r = 2 + a bit, no more
    # Rotated crops stay inside the canvas: an all-hole mask stays all hole for any angle and offset.
    for seed in range(10):
        assert hole_ratio(augment_mask(np.zeros((100, 80)), 64, 48, seed=seed, dilation=None)) == 1.0
    # Reproducible from the seed.
    assert torch.equal(augment_mask(m, 32, 32, seed=5), augment_mask(m, 32, 32, seed=5))


def test_load_save_and_folder(tmp_path):
    gen = IrregularMaskGenerator(40, 40, seed=0)
    masks = [gen.sample(0.2, 0.4) for _ in range(3)]
    for i, m in enumerate(masks):
        save_mask(m, tmp_path / f"m{i}.png")
    assert torch.equal(load_mask(tmp_path / "m0.png"), masks[0])
    assert torch.equal(load_mask(tmp_path / "m0.png", holes="white"), 1 - masks[0])
    with pytest.raises(ValueError, match="holes"):
        load_mask(tmp_path / "m0.png", holes="grey")

    folder = MaskFolder(tmp_path, 20, 20, seed=0)
    assert len(folder) == 3
    small = folder[1]
    assert small.shape == (1, 20, 20) and _is_binary(small)
    assert torch.equal(small, masks[1][:, ::2, ::2])  # nearest resize by 2
    aug = [folder.sample() for _ in range(3)]
    again = MaskFolder(tmp_path, 20, 20, seed=0)
    assert all(torch.equal(a, again()) for a in aug)
    assert all(a.shape == (1, 20, 20) and _is_binary(a) for a in aug)
    with pytest.raises(FileNotFoundError):
        MaskFolder(tmp_path / "nothing", 8, 8)


def test_save_bucketed_masks_round_trip(tmp_path):
    masks = make_bucketed_masks(1, 32, 32, seed=0)
    paths = save_bucketed_masks(masks, tmp_path)
    assert len(paths) == 6 and paths[0].parent.name == "0.01-0.1"
    loaded = MaskFolder(tmp_path, 32, 32)
    again = make_bucketed_masks(1, 32, 32, source=(loaded[i] for i in range(len(loaded))))
    for bucket in HOLE_RATIO_BUCKETS:
        assert torch.equal(again[bucket][0], masks[bucket][0])


def test_augment_flips_horizontally_and_vertically():
    # A same-size mask without dilation or rotation is cropped whole: the augmentation is then only its flips,
    # drawn per call. Every result is one of the four flips of the mask, and across seeds all four occur.
    m = torch.ones(24, 32)
    m[2:6, 3:12] = 0  # an L in the top-left corner: no flip of it equals another
    m[6:14, 3:6] = 0
    variants = {"none": m, "horizontal": m.flip(1), "vertical": m.flip(0), "both": m.flip(0).flip(1)}
    assert len({tuple(v.flatten().tolist()) for v in variants.values()}) == 4
    seen = set()
    for seed in range(24):
        out = augment_mask(m, 24, 32, seed=seed, dilation=None, rotate=False)
        assert out.shape == (1, 24, 32) and _is_binary(out)
        match = [name for name, v in variants.items() if torch.equal(out[0], v)]
        assert len(match) == 1, f"seed {seed}: not a flip of the mask"
        seen.add(match[0])
    assert seen == set(variants)
