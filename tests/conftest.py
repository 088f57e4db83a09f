"""The suite's fixtures over the sample and backend lists of helpers.py."""
from __future__ import annotations

import pytest
import torch

from helpers import BACKENDS, SAMPLES, Backend, Sample, use_backend


@pytest.fixture(params=BACKENDS, ids=str)
def backend(request, monkeypatch) -> Backend:
    return use_backend(request.param, monkeypatch)


@pytest.fixture(params=[b for b in BACKENDS if b.main_library], ids=str)
def main_backend(request, monkeypatch) -> Backend:
    """Backends of the public API (the module, the functional API, the autograd.Function)."""
    return use_backend(request.param, monkeypatch)


@pytest.fixture(params=SAMPLES, ids=str)
def sample(request) -> Sample:
    return request.param


@pytest.fixture(autouse=True)
def no_tf32():
    """fp32 comparisons are strict: TF32 off for cuDNN and cuBLAS during each test (as PyTorch's own tests do),
    so a CUDA fp32 result is held to fp32 tolerances. No effect on the CPU."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def deterministic():
    """Bitwise comparisons of gradients need cuDNN's deterministic algorithms (some weight-gradient algorithms
    accumulate with atomics). No effect on the CPU."""
    saved = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    yield
    torch.backends.cudnn.deterministic = saved


@pytest.fixture
def one_thread():
    """One torch thread (the examples' --threads changes it for the whole process), restored after: on a small
    shared machine OpenMP oversubscription slows tiny convolutions ~100x."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def examples():
    """The example scripts, loaded as modules."""
    from helpers import load_example

    return {name: load_example(f"examples/{name}.py") for name in ("train_inpainting", "inpaint", "evaluate")}
