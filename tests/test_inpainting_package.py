"""pconv_cuda.inpainting is optional: `import pconv_cuda` needs none of its dependencies, and importing the
subpackage without one of them names the missing module and the extra that provides it."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

import pconv_cuda.inpainting

# The modules behind the `inpainting` extra (pillow, torchvision, scikit-image, tqdm).
EXTRA_MODULES = ("PIL", "torchvision", "skimage", "tqdm")


def _python(code: str, cwd) -> subprocess.CompletedProcess:
    # From a scratch directory, so that the installed package is imported, not the source tree.
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


def _blocking(modules) -> str:
    # sys.modules[name] = None makes `import name` raise ImportError, as if the package were not installed.
    return "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in modules)


def test_import_pconv_cuda_needs_none_of_the_inpainting_dependencies(tmp_path):
    code = _blocking(EXTRA_MODULES) + (
        "import torch\n"
        "import pconv_cuda\n"
        "x, m = torch.rand(1, 2, 8, 8), (torch.rand(1, 1, 8, 8) > 0.3).float()\n"
        "y = pconv_cuda.PartialConv2d(2, 3, 3, padding=1)(x, m)\n"
        "assert y.shape == (1, 3, 8, 8)\n"
        "assert 'pconv_cuda.inpainting' not in sys.modules\n"
        "print('ok')\n"
    )
    proc = _python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


@pytest.mark.parametrize("missing", EXTRA_MODULES)
def test_inpainting_without_a_dependency_names_it_and_the_extra(tmp_path, missing):
    code = _blocking([missing]) + (
        "import pconv_cuda\n"
        "try:\n"
        "    import pconv_cuda.inpainting\n"
        "except ImportError as e:\n"
        "    print(e)\n"
        "    print('name:', e.name)\n"
        "else:\n"
        "    print('imported')\n"
    )
    proc = _python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "pip install 'pconv_cuda[inpainting]'" in proc.stdout
    assert f"missing: {missing} " in proc.stdout
    assert f"name: {missing}" in proc.stdout
    for other in set(EXTRA_MODULES) - {missing}:
        assert f" {other} (" not in proc.stdout  # only the missing one is named


def test_public_names():
    for name in pconv_cuda.inpainting.__all__:
        assert getattr(pconv_cuda.inpainting, name) is not None, name
    from pconv_cuda.inpainting import losses, masks, model

    assert pconv_cuda.inpainting.PConvUNet is model.PConvUNet
    assert pconv_cuda.inpainting.InpaintingLoss is losses.InpaintingLoss
    assert pconv_cuda.inpainting.IrregularMaskGenerator is masks.IrregularMaskGenerator
    # Every public name of the three modules is exported.
    for module in (losses, masks, model):
        public = {n for n, v in vars(module).items() if not n.startswith("_") and getattr(v, "__module__", None)
                  == module.__name__}
        assert public <= set(pconv_cuda.inpainting.__all__), module.__name__


@pytest.mark.parametrize("old", ["pconv_cuda.models", "pconv_cuda.losses", "pconv_cuda.masks"])
def test_the_old_module_paths_are_gone(old):
    assert importlib.util.find_spec(old) is None
