"""Networks built on partial convolutions."""
from pconv_cuda.models.pconv_unet import PConvUNet, crop_to, pad_to_multiple

__all__ = ["PConvUNet", "crop_to", "pad_to_multiple"]
