"""Datasets and sampling for training and evaluating the PConv U-Net, built for ``torch.utils.data.DataLoader``
workers and ``torch.distributed`` ranks.

- :class:`ImageDataset`: images as (3, H, W) float32 in [0, 1], from a folder (recursive, the formats of
  :data:`~pconv_cuda.inpainting.masks.IMAGE_SUFFIXES`; files are decoded in ``__getitem__``, i.e. in the loader's
  workers) or from tensors in memory (:meth:`ImageDataset.builtin`: the photographs bundled with scikit-image,
  and scikit-learn when installed).
- :class:`MaskDataset`: a folder of mask images, (1, H, W) float32 with 1 = valid; ``dataset[i]`` resized for
  evaluation, :meth:`MaskDataset.augmented` with the paper's augmentation for training.
- :class:`InpaintingTrainSet`: training pairs (random crop of an image, augmented or generated mask).
- :class:`TrainSampler`: the index stream of those pairs, for one rank of ``world_size``.

**Reproducibility.** Every training sample is a pure function of ``(seed, stream, position)``, where
``position`` counts samples from the start of training over all ranks: the sampler hands ``(image_index,
position)`` to the dataset, which seeds the sample's crop, flip and mask from it. Hence a batch does not depend
on the number of loader workers or on which worker makes it, two ranks never draw the same crop/mask stream
(their positions differ), and the global batch of step ``s`` is positions ``[s*B, (s+1)*B)`` whatever the world
size: N ranks with ``B/N`` samples each see exactly the samples one process with batch ``B`` sees, so a run can
resume on a different number of GPUs and continue the same stream. :func:`seed_worker` additionally seeds
Python's, NumPy's and torch's global generators in each worker from the loader's per-rank generator, for any
transform that uses them.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler

from pconv_cuda.inpainting.masks import (
    IMAGE_SUFFIXES, IrregularMaskGenerator, MaskFolder, augment_mask, list_images, load_mask,
)

PathLike = Union[str, "os.PathLike[str]"]

#: Natural photographs bundled with scikit-image (no download): the training split and the held-out split.
SKIMAGE_TRAIN = (
    "astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "camera", "coins", "moon",
    "brick", "grass", "gravel", "clock",
)
SKIMAGE_HELD_OUT = ("chelsea", "coffee")
#: scikit-learn's two sample photographs, added when scikit-learn is installed.
SKLEARN_TRAIN = ("china.jpg",)
SKLEARN_HELD_OUT = ("flower.jpg",)


def to_tensor(arr: np.ndarray) -> Tensor:
    """HxW or HxWxC uint8/float array -> (3, H, W) float32 in [0, 1] (grey is repeated, alpha dropped)."""
    a = np.asarray(arr)
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    elif a.dtype == bool:
        a = a.astype(np.float32)
    else:
        a = a.astype(np.float32)
        if a.max() > 1.0:  # some scikit-image arrays are uint16-like floats
            a = a / a.max()
    if a.ndim == 2:
        a = a[:, :, None]
    a = a[:, :, :3]
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


def load_image(path: PathLike) -> Tensor:
    """Read an image file as (3, H, W) float32 in [0, 1]."""
    with Image.open(path) as img:
        return to_tensor(np.asarray(img.convert("RGB")))


def builtin_images(held_out: bool = False) -> Dict[str, Tensor]:
    """The photographs that ship with scikit-image (and scikit-learn, if installed): the training split, or the
    held-out split (chelsea, coffee, flower) used for previews and evaluation."""
    try:
        from skimage import data
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the built-in photographs need scikit-image (pip install scikit-image); or give an image folder"
        ) from e
    out: Dict[str, Tensor] = {}
    for name in SKIMAGE_HELD_OUT if held_out else SKIMAGE_TRAIN:
        out[name] = to_tensor(getattr(data, name)())
    try:
        from sklearn.datasets import load_sample_image
    except ImportError:
        pass
    else:
        for name in SKLEARN_HELD_OUT if held_out else SKLEARN_TRAIN:
            out[name.split(".")[0]] = to_tensor(load_sample_image(name))
    return out


def center_square(img: Tensor, size: int) -> Tensor:
    """The largest centred square of (C, H, W), resized to size x size."""
    _, h, w = img.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    crop = img[:, top : top + s, left : left + s]
    out = F.interpolate(crop[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out[0].clamp(0, 1)


def random_crop(img: Tensor, size: int, rng: np.random.Generator) -> Tensor:
    """A random square crop of a random side between ``size`` and the image's shorter side, resized to ``size``,
    flipped left-right half of the time. The random side multiplies a few photographs into many scales."""
    _, h, w = img.shape
    if min(h, w) < size:
        f = size / min(h, w)
        img = F.interpolate(img[None], scale_factor=f, mode="bilinear", align_corners=False)[0]
        _, h, w = img.shape
    side = int(rng.integers(size, min(h, w) + 1))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = img[:, top : top + side, left : left + side]
    if side != size:
        crop = F.interpolate(crop[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    if rng.integers(2):
        crop = crop.flip(-1)
    return crop.clamp(0, 1)


class ImageDataset(Dataset):
    """Full-size images, (3, H, W) float32 in [0, 1].

    ``ImageDataset(root)`` lists the image files under ``root`` recursively (sorted, so indices are stable) and
    decodes one per ``__getitem__``; ``ImageDataset(paths=[...])`` takes a list of files;
    ``ImageDataset(images={name: tensor})`` holds tensors in memory; :meth:`builtin` the bundled photographs.
    ``names[i]`` is the i-th image's name (its path relative to ``root``, or the dict key).
    """

    def __init__(
        self,
        root: Optional[PathLike] = None,
        *,
        paths: Optional[Sequence[PathLike]] = None,
        images: Optional[Dict[str, Tensor]] = None,
    ) -> None:
        if sum(x is not None for x in (root, paths, images)) != 1:
            raise ValueError("give exactly one of root, paths and images")
        self.root = Path(root) if root is not None else None
        self._images: Optional[List[Tensor]] = None
        self.paths: List[Path] = []
        if images is not None:
            self.names = list(images)
            self._images = [images[k] for k in self.names]
        else:
            self.paths = list_images(root) if root is not None else [Path(p) for p in paths]
            if not self.paths:
                raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {str(root)!r}")
            self.names = [str(p.relative_to(self.root)) if self.root is not None else str(p) for p in self.paths]

    @classmethod
    def builtin(cls, held_out: bool = False) -> "ImageDataset":
        """The photographs bundled with scikit-image (and scikit-learn): see :func:`builtin_images`."""
        return cls(images=builtin_images(held_out))

    def split(self, n_last: int) -> Tuple["ImageDataset", "ImageDataset"]:
        """(all but the last ``n_last`` images, the last ``n_last``): a held-out split of one folder."""
        if not 0 < n_last < len(self):
            raise ValueError(f"n_last must be in (0, {len(self)}), got {n_last}")
        if self._images is not None:
            keys = self.names
            return (ImageDataset(images={k: self._images[i] for i, k in enumerate(keys[:-n_last])}),
                    ImageDataset(images={k: self._images[len(keys) - n_last + i]
                                         for i, k in enumerate(keys[-n_last:])}))
        a, b = ImageDataset(paths=self.paths[:-n_last]), ImageDataset(paths=self.paths[-n_last:])
        a.root = b.root = self.root
        a.names, b.names = self.names[:-n_last], self.names[-n_last:]
        return a, b

    def __len__(self) -> int:
        return len(self._images) if self._images is not None else len(self.paths)

    def __getitem__(self, index: int) -> Tensor:
        if self._images is not None:
            return self._images[index]
        return load_image(self.paths[index])


class MaskDataset(MaskFolder, Dataset):
    """A folder of mask images (e.g. NVIDIA's irregular mask set), searched recursively: a :class:`MaskFolder`
    that takes its random stream from the caller, as DataLoader workers need.

    ``dataset[i]`` is the i-th file resized (nearest) to (height, width), for evaluation;
    ``dataset.augmented(i, rng)`` the i-th file with the paper's augmentation (dilation, rotation, crop, flips),
    for training. ``holes`` says how the files mark holes (see :func:`~pconv_cuda.inpainting.load_mask`).
    """

    def augmented(self, index: int, rng: np.random.Generator) -> Tensor:
        m = load_mask(self.paths[index], holes=self.holes)
        return augment_mask(m, self.height, self.width, rng, dilation=self.dilation, rotate=self.rotate)


def sample_rng(seed: int, stream: int, position: int) -> np.random.Generator:
    """The generator of training sample ``position`` of ``stream`` (0: training, 1: fine-tuning)."""
    return np.random.default_rng([int(seed), int(stream), 0x5EED, int(position)])


class InpaintingTrainSet(Dataset):
    """Training pairs ``(image, mask)``: a random square crop of ``images[i]`` (random side between ``size`` and
    the shorter side, resized to ``size``, random left-right flip) and a mask, (3, size, size) and
    (1, size, size). Masks are augmented files of ``masks`` (a :class:`MaskDataset`, chosen at random) or, with
    ``masks=None``, drawn by :class:`~pconv_cuda.inpainting.IrregularMaskGenerator` (hole ratio uniform in
    (0.01, 0.6], the paper's range).

    Indexed by ``(i, position)`` pairs from :class:`TrainSampler`: the crop and the mask are seeded by
    ``(seed, stream, position)`` alone (see the module docstring). A plain integer ``i`` means ``(i, i)``.
    """

    def __init__(
        self,
        images: Dataset,
        size: int,
        *,
        masks: Optional[MaskDataset] = None,
        seed: int = 0,
        stream: int = 0,
    ) -> None:
        self.images, self.size, self.masks = images, int(size), masks
        self.seed, self.stream = int(seed), int(stream)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: Union[int, Tuple[int, int]]) -> Tuple[Tensor, Tensor]:
        index, position = (item, item) if isinstance(item, (int, np.integer)) else item
        rng = sample_rng(self.seed, self.stream, position)
        image = random_crop(self.images[int(index)], self.size, rng)
        if self.masks is not None:
            mask = self.masks.augmented(int(rng.integers(len(self.masks))), rng)
        else:
            mask = IrregularMaskGenerator(self.size, self.size, seed=rng)()
        return image, mask


class TrainSampler(DistributedSampler):
    """The training index stream of one rank: an endless sequence of ``(image_index, position)`` pairs.

    Global position ``p`` (counted over all ranks from the start of training) is image ``perm_e[p % n]`` of
    epoch ``e = p // n``, ``perm_e`` a permutation of the ``n`` images seeded by ``(seed, stream, e)``: every
    epoch shows each image once over all ranks. Step ``s`` uses the global batch of positions ``[s*B, (s+1)*B)``,
    ``B = batch_size * num_replicas``; rank ``r`` takes positions ``s*B + r + num_replicas*j``, ``j <
    batch_size`` (the interleaving of ``DistributedSampler``), so the ranks' batches partition the global batch
    and their union does not depend on the world size. ``start`` (a number of global samples, e.g.
    ``step * B`` from a checkpoint) resumes the stream anywhere.

    ``num_replicas`` and ``rank`` default to the process group's, as for ``DistributedSampler`` (whose
    bookkeeping this reuses; ``set_epoch`` has no effect: epochs follow from positions). Use it with
    ``DataLoader(..., batch_size=batch_size)``; the stream never ends, stop after as many steps as needed.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        num_replicas: Optional[int] = None,
        rank: Optional[int] = None,
        seed: int = 0,
        stream: int = 0,
        start: int = 0,
        shuffle: bool = True,
    ) -> None:
        if num_replicas is None and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            num_replicas, rank = 1, 0
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(dataset) < 1:
            raise ValueError("the dataset is empty")
        self.batch_size, self.stream, self.start = int(batch_size), int(stream), int(start)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.num_replicas

    def permutation(self, epoch: int) -> np.ndarray:
        n = len(self.dataset)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, self.stream, 0xE90C, int(epoch)]).permutation(n)

    def positions(self) -> Iterator[int]:
        """This rank's global positions, in order."""
        b, big = self.batch_size, self.global_batch
        step = 0
        while True:
            base = self.start + step * big + self.rank
            for j in range(b):
                yield base + self.num_replicas * j
            step += 1

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        n = len(self.dataset)
        epoch, perm = -1, None
        for p in self.positions():
            if p // n != epoch:
                epoch = p // n
                perm = self.permutation(epoch)
            yield int(perm[p % n]), p

    def __len__(self) -> int:
        # The stream is endless; DataLoader only needs a length for len(loader), which training does not use.
        return 2 ** 62


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn`` for ``DataLoader``: seeds Python's ``random`` and NumPy's global generator from the
    worker's torch seed, which DataLoader derives from its ``generator`` and the worker id (give a generator
    seeded per rank, as :func:`make_train_loader` does). The training samples themselves do not use these."""
    s = torch.initial_seed() % 2 ** 32
    random.seed(s)
    np.random.seed(s)


def make_train_loader(
    dataset: InpaintingTrainSet,
    batch_size: int,
    *,
    num_replicas: int = 1,
    rank: int = 0,
    start: int = 0,
    workers: int = 0,
    pin_memory: bool = False,
    prefetch_factor: Optional[int] = None,
) -> torch.utils.data.DataLoader:
    """A DataLoader over ``dataset`` for one rank: :class:`TrainSampler` (``batch_size`` per rank, from global
    sample ``start``), ``workers`` worker processes (persistent, seeded by :func:`seed_worker` from a generator
    seeded by the dataset's seed and the rank), pinned memory on request. Endless: take ``next()`` per step."""
    sampler = TrainSampler(dataset, batch_size, num_replicas=num_replicas, rank=rank, seed=dataset.seed,
                           stream=dataset.stream, start=start)
    g = torch.Generator()
    g.manual_seed(int(np.random.default_rng([dataset.seed, dataset.stream, 0x1007, rank]).integers(2 ** 62)))
    kwargs = {}
    if workers > 0:
        kwargs.update(persistent_workers=True, worker_init_fn=seed_worker)
        if prefetch_factor is not None:
            kwargs["prefetch_factor"] = prefetch_factor
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin_memory,
        generator=g, drop_last=True, **kwargs,
    )
