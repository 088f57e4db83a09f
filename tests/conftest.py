"""The suite's fixtures over the sample and backend lists of helpers.py."""
from __future__ import annotations

import os

import pytest
import torch

from helpers import BACKENDS, FUSED_BACKENDS, SAMPLES, Backend, Sample, use_backend


def pytest_collection_modifyitems(config, items):
    """PCONV_TEST_BACKENDS (comma-separated backend names, e.g. "cuda-aten_conv,cuda-gemm") keeps only the tests
    of those backends, and those that take none: a short GPU lease spends no time on what CI runs anyway."""
    wanted = os.environ.get("PCONV_TEST_BACKENDS")
    if not wanted:
        return
    names = {n.strip() for n in wanted.split(",") if n.strip()}
    known = [b.name for b in BACKENDS + FUSED_BACKENDS]
    unknown = names - set(known)
    if unknown:
        raise pytest.UsageError(f"PCONV_TEST_BACKENDS: unknown backend(s) {sorted(unknown)}; "
                                f"expected names from {known}")

    def other_backend(item) -> bool:
        params = getattr(item, "callspec", None)
        return params is not None and any(isinstance(v, Backend) and v.name not in names
                                          for v in params.params.values())

    deselected = [item for item in items if other_backend(item)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not other_backend(item)]


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
