"""pconv_cuda: fused partial convolution (Liu et al. 2018) for PyTorch.

``PartialConv2d`` and ``PartialConv3d`` (drop-ins for NVIDIA's layers), ``PartialConv1d``,
``functional.partial_conv2d`` / ``partial_conv3d`` / ``partial_conv1d``, ``mask_update``, ``masked_cat`` and
``PartialConv2dFunction`` run the ``torch.ops.pconv_cuda.*`` ops; ``reference`` is the unfused pure-PyTorch oracle.
"""
import torch


def _load_extension():
    try:
        from pconv_cuda import _build_info
    except ImportError:
        raise ImportError("pconv_cuda is not built: install it with `pip install --no-build-isolation .` "
                          "(or build in place with `python setup.py build_ext --inplace`)") from None
    if _build_info.TORCH_VERSION != torch.__version__:
        raise ImportError(f"pconv_cuda was compiled against torch {_build_info.TORCH_VERSION} but torch "
                          f"{torch.__version__} is installed; the C++ ABI differs between releases. Reinstall "
                          f"pconv_cuda with the installed torch: `pip install --no-build-isolation .`")
    try:
        from pconv_cuda import _C  # noqa: F401  (runs the static op registrations)
    except ImportError as e:
        raise ImportError(f"pconv_cuda's compiled ops could not be loaded from {__path__[0]} ({e}). If that is the "
                          f"source tree, run from another directory so that the installed package is imported, "
                          f"or build in place: `python setup.py build_ext --inplace`") from e


_load_extension()

from pconv_cuda import ops  # noqa: E402,F401  (fake kernels, autograd, autocast)
from pconv_cuda import functional, reference, routes  # noqa: E402,F401
from pconv_cuda.functional import (PartialConv2dFunction, mask_update, masked_cat, partial_conv1d,  # noqa: E402,F401
                                   partial_conv2d, partial_conv3d)
from pconv_cuda.modules import PartialConv1d, PartialConv2d, PartialConv3d  # noqa: E402,F401

__version__ = "0.1.0"
__all__ = ["PartialConv1d", "PartialConv2d", "PartialConv3d", "PartialConv2dFunction", "partial_conv1d",
           "partial_conv2d", "partial_conv3d", "mask_update", "masked_cat", "functional", "reference", "routes"]
