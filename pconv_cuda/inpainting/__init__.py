"""Image inpainting with partial convolutions (Liu et al. 2018): the PConv U-Net, the training loss, the
irregular hole masks and the datasets that feed them; see docs/inpainting.md. The examples (examples/) train, run
and evaluate it.

Optional part of pconv_cuda: it needs the ``inpainting`` extra, ``pip install 'pconv_cuda[inpainting]'``
(pillow, torchvision, scikit-image, tqdm). ``import pconv_cuda`` itself needs none of them.
"""
import importlib.util

#: The modules behind the ``inpainting`` extra and the distributions that provide them. masks.py imports PIL;
#: the loss builds torchvision's VGG16; the examples use scikit-image (built-in photographs, PSNR/SSIM, the
#: biharmonic baseline) and tqdm. Checked here so that a missing one is named up front, not deep in a run.
_EXTRA = "pconv_cuda[inpainting]"
_REQUIREMENTS = (("PIL", "pillow"), ("torchvision", "torchvision"), ("skimage", "scikit-image"), ("tqdm", "tqdm"))


def _missing_requirements():
    missing = []
    for module, dist in _REQUIREMENTS:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package fails, or a module object without __spec__
            found = False
        if not found:
            missing.append((module, dist))
    return missing


def _check_requirements():
    missing = _missing_requirements()
    if missing:
        names = ", ".join(f"{module} (from {dist})" for module, dist in missing)
        raise ImportError(f"pconv_cuda.inpainting needs the optional dependencies of the 'inpainting' extra; "
                          f"missing: {names}. Install them with: pip install '{_EXTRA}'", name=missing[0][0])


_check_requirements()

from pconv_cuda.inpainting.losses import (  # noqa: E402
    IMAGENET_MEAN, IMAGENET_STD, VGG16_FILENAME, InpaintingLoss, LossWeights, VGG16FeatureExtractor, gram_matrix,
    total_variation_in_holes,
)
from pconv_cuda.inpainting.masks import (  # noqa: E402
    DILATION_RANGE, HOLE_RATIO_BUCKETS, IMAGE_SUFFIXES, REFERENCE_SIZE, IrregularMaskGenerator, MaskFolder,
    augment_mask, bucket_index, bucket_name, dilate_holes, hole_ratio, list_images, load_mask, make_bucketed_masks,
    save_bucketed_masks, save_mask,
)
from pconv_cuda.inpainting.model import PConvUNet, crop_to, encoder_plan, pad_to_multiple  # noqa: E402
from pconv_cuda.inpainting.data import (  # noqa: E402
    ImageDataset, InpaintingTrainSet, MaskDataset, TrainSampler, builtin_images, center_square, load_image,
    make_train_loader, random_crop, sample_rng, seed_worker, to_tensor,
)

__all__ = [
    # model
    "PConvUNet", "pad_to_multiple", "crop_to", "encoder_plan",
    # loss
    "InpaintingLoss", "LossWeights", "VGG16FeatureExtractor", "gram_matrix", "total_variation_in_holes",
    "IMAGENET_MEAN", "IMAGENET_STD", "VGG16_FILENAME",
    # masks
    "IrregularMaskGenerator", "MaskFolder", "augment_mask", "dilate_holes", "hole_ratio", "bucket_index",
    "bucket_name", "load_mask", "save_mask", "list_images", "make_bucketed_masks", "save_bucketed_masks",
    "HOLE_RATIO_BUCKETS", "DILATION_RANGE", "REFERENCE_SIZE", "IMAGE_SUFFIXES",
    # data: datasets, the training sampler and loader
    "ImageDataset", "MaskDataset", "InpaintingTrainSet", "TrainSampler", "make_train_loader", "seed_worker",
    "sample_rng", "builtin_images", "load_image", "to_tensor", "center_square", "random_crop",
]
