"""Irregular hole masks: generation, loading, augmentation and the paper's hole-ratio buckets.

Convention everywhere: a mask is a float32 tensor (1, H, W) with 1 = valid pixel and 0 = hole.

Liu et al. 2018 made their masks from occlusion/disocclusion maps of video frames, then augmented them with
random dilation (5 to 47 pixels on their 512x512 masks), rotation and cropping, and tested on six hole-ratio
buckets (0.01, 0.1], (0.1, 0.2], ..., (0.5, 0.6]. That mask set is not shipped here (it can be loaded with
:class:`MaskFolder`); :class:`IrregularMaskGenerator` draws masks in the same spirit from random strokes, lines,
circles and ellipses and applies the same augmentation. Both are deterministic given a seed.

Sizes are expressed at the paper's 512-pixel scale and scaled to the target size, so a 256x256 mask looks like a
512x512 one downsampled.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor

#: The paper's evaluation buckets of hole-to-image area ratio, each (lo, hi].
HOLE_RATIO_BUCKETS: Tuple[Tuple[float, float], ...] = (
    (0.01, 0.1), (0.1, 0.2), (0.2, 0.3), (0.3, 0.4), (0.4, 0.5), (0.5, 0.6),
)
#: Dilation range of the paper's augmentation, in pixels at 512x512.
DILATION_RANGE = (5, 47)
REFERENCE_SIZE = 512
_ROTATE_MARGIN = 1.25
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")

Seed = Union[int, np.random.Generator, None]


def _rng(seed: Seed) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def hole_ratio(mask: Union[Tensor, np.ndarray]) -> float:
    """Fraction of hole pixels (value < 0.5) of a (..., H, W) mask, over all its elements."""
    # A count over the size, not a float32 mean: bucket edges such as 0.1 must compare exactly.
    if isinstance(mask, Tensor):
        return int((mask < 0.5).sum()) / mask.numel()
    arr = np.asarray(mask)
    return int((arr < 0.5).sum()) / arr.size


def bucket_index(ratio: float, buckets: Sequence[Tuple[float, float]] = HOLE_RATIO_BUCKETS) -> Optional[int]:
    """Index of the bucket (lo, hi] that holds ``ratio``, or ``None`` if none does."""
    for i, (lo, hi) in enumerate(buckets):
        if lo < ratio <= hi:
            return i
    return None


def bucket_name(bucket: Tuple[float, float]) -> str:
    """``(0.1, 0.2)`` -> ``"(0.1,0.2]"``."""
    return f"({bucket[0]:g},{bucket[1]:g}]"


def dilate_holes(holes: Tensor, size: int) -> Tensor:
    """Dilate a binary hole map (H, W) (1 = hole) by a near-disc (regular octagon) of diameter ``size`` pixels.

    A square max-pool of half-width a followed by b cross-shaped 3x3 steps (a diamond of radius b) gives an
    octagon; a/b = sqrt(2) - 1 makes it regular, with inradius a + b. That costs O(size) cheap passes where a
    disc-shaped kernel would cost O(size**2) per pixel.
    """
    r = (int(size) - 1) // 2
    if r <= 0:
        return holes
    a = round(r * (math.sqrt(2) - 1))
    b = r - a
    x = holes[None, None].float()
    if a > 0:
        k = 2 * a + 1
        x = F.max_pool2d(x, (k, 1), stride=1, padding=(a, 0))
        x = F.max_pool2d(x, (1, k), stride=1, padding=(0, a))
    for _ in range(b):
        x = torch.maximum(
            F.max_pool2d(x, (1, 3), stride=1, padding=(0, 1)), F.max_pool2d(x, (3, 1), stride=1, padding=(1, 0))
        )
    return x[0, 0]


@dataclass
class _Augment:
    """One draw of the augmentation parameters (dilation, then scale + rotation + crop + flips)."""

    dilation: int  # structuring element diameter in canvas pixels
    angle: float  # radians
    scale: float  # canvas pixels -> output pixels
    center: Tuple[float, float]  # crop centre (x, y) in the scaled canvas
    flip_h: bool
    flip_v: bool


def _sample_augment(
    rng: np.random.Generator,
    canvas_hw: Tuple[int, int],
    out_hw: Tuple[int, int],
    canvas_scale: float,
    dilation: Optional[Tuple[int, int]],
    rotate: bool,
) -> _Augment:
    ch, cw = canvas_hw
    h, w = out_hw
    d = 0
    if dilation is not None:
        d = int(round(rng.integers(dilation[0], dilation[1] + 1) * canvas_scale))
    if rotate:
        # Any rotation of the crop stays inside the canvas' inscribed disc if its corners do. Scale the canvas so
        # that this disc is _ROTATE_MARGIN times the crop's diagonal: shapes keep their size relative to the
        # output whatever the canvas size, and the crop can move by an eighth of its diagonal.
        need = math.hypot(h, w)
        scale = need * _ROTATE_MARGIN / min(ch, cw)
        radius = max(min(ch, cw) * scale / 2 - need / 2, 0.0)
        rho, phi = radius * math.sqrt(rng.uniform()), rng.uniform(0, 2 * math.pi)
        center = (cw * scale / 2 + rho * math.cos(phi), ch * scale / 2 + rho * math.sin(phi))
        angle = float(rng.uniform(0, 2 * math.pi))
    else:
        scale = max(h / ch, w / cw)
        sw, sh = cw * scale, ch * scale
        center = (rng.uniform(w / 2, max(sw - w / 2, w / 2)), rng.uniform(h / 2, max(sh - h / 2, h / 2)))
        angle = 0.0
    return _Augment(d, angle, scale, center, bool(rng.integers(2)), bool(rng.integers(2)))


def _source_pixels(aug: _Augment, canvas_hw: Tuple[int, int], out_hw: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """For every output pixel, the canvas pixel it samples (nearest): flat indices, and whether it is inside.

    Inverse mapping of scale -> rotate about the scaled canvas' centre -> crop -> flip, so one gather replaces
    resizing, rotating and cropping the whole canvas (the generator re-evaluates its mask after every shape).
    """
    ch, cw = canvas_hw
    h, w = out_hw
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    if aug.flip_h:
        xs = w - xs
    if aug.flip_v:
        ys = h - ys
    cx, cy = cw * aug.scale / 2, ch * aug.scale / 2
    dx = aug.center[0] - w / 2 + xs - cx
    dy = aug.center[1] - h / 2 + ys - cy
    c, s = math.cos(aug.angle), math.sin(aug.angle)
    col = np.floor((c * dx - s * dy + cx) / aug.scale).astype(np.int64)
    row = np.floor((s * dx + c * dy + cy) / aug.scale).astype(np.int64)
    inside = (col >= 0) & (col < cw) & (row >= 0) & (row < ch)
    return np.where(inside, row * cw + col, 0), inside


def _gather_mask(holes: np.ndarray, src: Tuple[np.ndarray, np.ndarray]) -> Tensor:
    """Dilated hole canvas -> (1, h, w) float mask, 1 = valid. Outside the canvas is unknown: call it valid."""
    idx, inside = src
    valid = ~holes.reshape(-1)[idx] | ~inside
    return torch.from_numpy(valid.astype(np.float32))[None]


def augment_mask(
    mask: Union[Tensor, np.ndarray],
    height: int,
    width: int,
    seed: Seed = None,
    *,
    dilation: Optional[Tuple[int, int]] = DILATION_RANGE,
    rotate: bool = True,
) -> Tensor:
    """The paper's mask augmentation: random dilation of the holes by ``dilation`` pixels (given at 512x512
    scale, scaled to the mask's size), then a random rotation, crop and flips at a scale where the crop's diagonal
    is 4/5 of the mask's shorter side (without ``rotate``: the largest crop of the mask's aspect, scaled to fit).

    ``mask`` is (H, W) or (1, H, W), 1 = valid. Returns (1, height, width) float32, binary. ``dilation=None``
    and ``rotate=False`` leave only the crop and flips.
    """
    arr = mask.detach().cpu().numpy() if isinstance(mask, Tensor) else np.asarray(mask)
    arr = arr.reshape(arr.shape[-2:])
    holes = arr < 0.5
    rng = _rng(seed)
    aug = _sample_augment(rng, holes.shape, (height, width), max(holes.shape) / REFERENCE_SIZE, dilation, rotate)
    if aug.dilation > 1:
        holes = dilate_holes(torch.from_numpy(holes), aug.dilation).numpy() > 0
    return _gather_mask(holes, _source_pixels(aug, holes.shape, (height, width)))


class IrregularMaskGenerator:
    """Random irregular masks from strokes, lines, circles and ellipses, augmented like the paper's mask set.

    Args:
        height, width: size of the masks.
        seed: an int or ``numpy.random.Generator``; the sequence of masks is a function of it.
        hole_range: the (lo, hi] hole ratio that :meth:`__call__` draws a target from, uniformly;
            the paper's masks cover (0.01, 0.6].
        dilation: dilation range in pixels at 512x512 scale, ``None`` for none.
        rotate: rotate the canvas by a random angle before cropping.

    ``gen()`` returns the next mask (1, H, W); ``gen.sample(lo, hi)`` one whose hole ratio is in (lo, hi].
    """

    #: relative frequency of each shape kind
    KINDS = (("stroke", 0.5), ("line", 0.2), ("circle", 0.15), ("ellipse", 0.15))

    def __init__(
        self,
        height: int,
        width: int,
        seed: Seed = None,
        *,
        hole_range: Tuple[float, float] = (0.01, 0.6),
        dilation: Optional[Tuple[int, int]] = DILATION_RANGE,
        rotate: bool = True,
    ) -> None:
        if height < 1 or width < 1:
            raise ValueError(f"height and width must be >= 1, got {height}x{width}")
        if not 0 <= hole_range[0] < hole_range[1] <= 1:
            raise ValueError(f"hole_range must satisfy 0 <= lo < hi <= 1, got {hole_range}")
        self.height, self.width = height, width
        self.hole_range = hole_range
        self.dilation = dilation
        self.rotate = rotate
        self.rng = _rng(seed)
        # A canvas whose inscribed disc is _ROTATE_MARGIN crop diagonals wide: the augment scale is then 1.
        self.canvas = int(math.ceil(math.hypot(height, width) * _ROTATE_MARGIN)) if rotate else max(height, width)
        self.unit = max(height, width) / REFERENCE_SIZE  # output pixels per pixel at 512x512 scale

    def __iter__(self) -> "IrregularMaskGenerator":
        return self

    def __next__(self) -> Tensor:
        return self()

    def __call__(self) -> Tensor:
        """Next mask, with a hole ratio drawn uniformly from ``hole_range``."""
        lo, hi = self.hole_range
        target = float(self.rng.uniform(lo, hi))
        # A band around the target instead of an exact value: shapes add holes in chunks.
        band = max(0.02, (hi - lo) / 20)
        return self.sample(max(lo, target - band), min(hi, target + band))

    def sample(self, lo: float, hi: float, max_tries: int = 200) -> Tensor:
        """A mask whose hole ratio lies in (lo, hi]: shapes are added one by one under one augmentation draw
        until the ratio exceeds ``lo``; an overshoot past ``hi`` starts over with new shapes."""
        if not 0 <= lo < hi <= 1:
            raise ValueError(f"need 0 <= lo < hi <= 1, got ({lo}, {hi})")
        hw = (self.height, self.width)
        cs = (self.canvas, self.canvas)
        for _ in range(max_tries):
            aug = _sample_augment(self.rng, cs, hw, 1.0, None, self.rotate)
            if self.dilation is not None:
                aug.dilation = int(round(self.rng.integers(self.dilation[0], self.dilation[1] + 1) * self.unit))
            src = _source_pixels(aug, cs, hw)
            holes = np.zeros(cs, dtype=bool)  # the dilated holes so far
            r = max(aug.dilation // 2, 0) + 1
            for _ in range(400):
                # Dilation distributes over union, so each shape is dilated alone, within its bounding box.
                img = Image.new("L", (self.canvas, self.canvas), 0)
                self._draw_shape(ImageDraw.Draw(img))
                box = img.getbbox()
                if box is None:
                    continue
                x0, y0 = max(box[0] - r, 0), max(box[1] - r, 0)
                x1, y1 = min(box[2] + r, self.canvas), min(box[3] + r, self.canvas)
                shape = torch.from_numpy(np.asarray(img.crop((x0, y0, x1, y1))) > 0)
                if aug.dilation > 1:
                    shape = dilate_holes(shape, aug.dilation) > 0
                holes[y0:y1, x0:x1] |= shape.numpy()
                mask = _gather_mask(holes, src)
                ratio = hole_ratio(mask)
                if ratio > lo:
                    if ratio <= hi:
                        return mask
                    break
        raise RuntimeError(
            f"could not draw a {self.height}x{self.width} mask with hole ratio in ({lo}, {hi}] in {max_tries} "
            "tries; widen the interval or lower the dilation"
        )

    def _draw_shape(self, draw: ImageDraw.ImageDraw) -> None:
        """Draw one hole shape (value 255) with sizes given at 512x512 scale."""
        rng, u = self.rng, self.unit
        kinds, probs = zip(*self.KINDS)
        kind = kinds[int(rng.choice(len(kinds), p=np.asarray(probs) / sum(probs)))]
        # Anchor shapes around the canvas centre, where every crop lies, so that most of them land in the mask.
        half = math.hypot(self.height, self.width) / 2
        x0 = self.canvas / 2 + rng.uniform(-half, half)
        y0 = self.canvas / 2 + rng.uniform(-half, half)
        if kind == "stroke":
            # A random walk with smooth turns and round ends: the look of a brush stroke.
            n = int(rng.integers(3, 10))
            width = int(max(1, round(rng.uniform(6, 28) * u)))
            step = rng.uniform(20, 70) * u
            angle = rng.uniform(0, 2 * math.pi)
            pts = [(x0, y0)]
            for _ in range(n):
                angle += rng.normal(0, 0.8)
                x0, y0 = x0 + step * math.cos(angle), y0 + step * math.sin(angle)
                pts.append((x0, y0))
            draw.line(pts, fill=255, width=width, joint="curve")
            for x, y in (pts[0], pts[-1]):
                draw.ellipse((x - width / 2, y - width / 2, x + width / 2, y + width / 2), fill=255)
        elif kind == "line":
            length = rng.uniform(40, 250) * u
            angle = rng.uniform(0, math.pi)
            width = int(max(1, round(rng.uniform(3, 16) * u)))
            draw.line((x0, y0, x0 + length * math.cos(angle), y0 + length * math.sin(angle)), fill=255, width=width)
        elif kind == "circle":
            r = rng.uniform(5, 45) * u
            draw.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=255)
        else:
            a, b = rng.uniform(8, 70) * u, rng.uniform(4, 30) * u
            theta = rng.uniform(0, math.pi)
            t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
            xs = x0 + a * np.cos(t) * math.cos(theta) - b * np.sin(t) * math.sin(theta)
            ys = y0 + a * np.cos(t) * math.sin(theta) + b * np.sin(t) * math.cos(theta)
            draw.polygon(list(zip(xs.tolist(), ys.tolist())), fill=255)


def load_mask(path: Union[str, os.PathLike], *, holes: str = "black", threshold: int = 128) -> Tensor:
    """Read a mask image as a binary (1, H, W) float32 tensor, 1 = valid.

    ``holes`` says how the file marks holes: ``"black"`` (dark pixels are holes, the convention of this library's
    files) or ``"white"``. Mask sets differ; check yours. Pixels are split at ``threshold`` (0..255) after
    conversion to grayscale, which removes the grey edges that resizing and JPEG leave.
    """
    if holes not in ("black", "white"):
        raise ValueError(f"holes must be 'black' or 'white', got {holes!r}")
    arr = np.asarray(Image.open(path).convert("L"))
    valid = arr >= threshold if holes == "black" else arr < threshold
    return torch.from_numpy(valid.astype(np.float32))[None]


def save_mask(mask: Tensor, path: Union[str, os.PathLike]) -> None:
    """Write a (1, H, W) or (H, W) mask as an 8-bit PNG: white = valid, black = hole."""
    arr = (mask.detach().cpu().reshape(mask.shape[-2:]).numpy() >= 0.5).astype(np.uint8) * 255
    Image.fromarray(arr, mode="L").save(path)


def list_images(root: Union[str, os.PathLike]) -> List[Path]:
    """Image files under ``root`` (recursively), sorted, so that indices are stable."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"not a directory: {str(root)!r}")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


class MaskFolder:
    """Masks from a folder of images (e.g. NVIDIA's irregular mask set), resized or augmented to one size.

    Args:
        root: folder searched recursively for image files.
        height, width: size of the masks returned.
        holes: ``"black"`` or ``"white"``, see :func:`load_mask`.
        seed: for :meth:`sample`.
        dilation, rotate: augmentation of :meth:`sample`, as in :func:`augment_mask`.

    ``folder[i]`` is the i-th file resized (nearest) to (height, width) without augmentation, for evaluation;
    ``folder.sample()`` is a random file with the paper's augmentation, for training.
    """

    def __init__(
        self,
        root: Union[str, os.PathLike],
        height: int,
        width: int,
        *,
        holes: str = "black",
        seed: Seed = None,
        dilation: Optional[Tuple[int, int]] = DILATION_RANGE,
        rotate: bool = True,
    ) -> None:
        self.paths = list_images(root)
        if not self.paths:
            raise FileNotFoundError(f"no mask images ({', '.join(IMAGE_SUFFIXES)}) under {str(root)!r}")
        self.height, self.width, self.holes = height, width, holes
        self.dilation, self.rotate = dilation, rotate
        self.rng = _rng(seed)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tensor:
        m = load_mask(self.paths[index], holes=self.holes)
        if m.shape[-2:] != (self.height, self.width):
            m = F.interpolate(m[None], size=(self.height, self.width), mode="nearest")[0]
        return m

    def sample(self) -> Tensor:
        """A random file, augmented (dilation, rotation, crop, flips)."""
        m = load_mask(self.paths[int(self.rng.integers(len(self.paths)))], holes=self.holes)
        return augment_mask(m, self.height, self.width, self.rng, dilation=self.dilation, rotate=self.rotate)

    __call__ = sample


def make_bucketed_masks(
    per_bucket: int,
    height: int,
    width: int,
    seed: Seed = 0,
    *,
    buckets: Sequence[Tuple[float, float]] = HOLE_RATIO_BUCKETS,
    source: Optional[Iterable[Tensor]] = None,
    **generator_kwargs,
) -> Dict[Tuple[float, float], List[Tensor]]:
    """A test set of ``per_bucket`` masks for each hole-ratio bucket, reproducible from ``seed``.

    Without ``source`` the masks come from :class:`IrregularMaskGenerator` aimed at each bucket. With ``source``
    (e.g. a :class:`MaskFolder`), its masks are sorted into buckets by hole ratio, in order, until every bucket
    is full or the source is exhausted (buckets may then hold fewer masks).
    """
    if per_bucket < 1:
        raise ValueError(f"per_bucket must be >= 1, got {per_bucket}")
    out: Dict[Tuple[float, float], List[Tensor]] = {tuple(b): [] for b in buckets}
    if source is None:
        gen = IrregularMaskGenerator(height, width, seed, **generator_kwargs)
        for b in out:
            out[b] = [gen.sample(*b) for _ in range(per_bucket)]
        return out
    for m in source:
        i = bucket_index(hole_ratio(m), buckets)
        if i is not None and len(out[tuple(buckets[i])]) < per_bucket:
            out[tuple(buckets[i])].append(m)
            if all(len(v) >= per_bucket for v in out.values()):
                break
    return out


def save_bucketed_masks(masks: Dict[Tuple[float, float], List[Tensor]], root: Union[str, os.PathLike]) -> List[Path]:
    """Write a :func:`make_bucketed_masks` set as ``root/<lo>-<hi>/NNNN.png``; returns the paths."""
    paths = []
    for (lo, hi), ms in masks.items():
        d = Path(root) / f"{lo:g}-{hi:g}"
        d.mkdir(parents=True, exist_ok=True)
        for i, m in enumerate(ms):
            p = d / f"{i:04d}.png"
            save_mask(m, p)
            paths.append(p)
    return paths
