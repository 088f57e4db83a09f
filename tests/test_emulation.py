"""The SIMT emulation is faithful enough that a wrong kernel fails (csrc/cuda/emu/simt_emu.h)."""
from __future__ import annotations

import pytest
import torch

import pconv_cuda
import pconv_cuda.emu  # noqa: F401
from pconv_cuda import ops

selftest = torch.ops.pconv_cuda_emu._emu_selftest


def expected_reverse(x: torch.Tensor) -> torch.Tensor:
    return x.view(-1, 64).flip(1).reshape(-1)


def test_barrier_makes_shared_memory_visible():
    x = torch.randn(64 * 5)
    torch.testing.assert_close(selftest("reverse", x), expected_reverse(x), rtol=0, atol=0)


def test_missing_barrier_gives_wrong_result():
    # Threads of a block interleave only at barriers, so a reader runs before the peers it depends on have written.
    x = torch.randn(64 * 3)
    assert not torch.equal(selftest("reverse_without_barrier", x), expected_reverse(x))


def test_barrier_in_kernel_declared_barrier_free_is_reported():
    with pytest.raises(RuntimeError, match=r"__syncthreads\(\) in a kernel launched as barrier-free"):
        selftest("reverse_declared_barrier_free", torch.randn(64))


def test_barrier_reached_by_part_of_a_block_is_reported():
    with pytest.raises(RuntimeError, match=r"__syncthreads\(\) reached by 32 of 64 threads"):
        selftest("divergent_barrier", torch.randn(64))


def test_atomic_add_across_blocks():
    x = torch.arange(64 * 40, dtype=torch.float32)  # integers: the sum is exact in any order
    assert selftest("atomic_sum", x).item() == x.sum().item()


def test_dynamic_shared_memory():
    x = torch.randn(64 * 2)
    torch.testing.assert_close(selftest("dynamic_shared_rotate", x), x.view(-1, 64).roll(-1, 1).reshape(-1))


def test_emulated_library_has_the_same_schemas():
    for op in ops.OPS:
        real = getattr(torch.ops.pconv_cuda, op).default._schema
        emu = getattr(torch.ops.pconv_cuda_emu, op).default._schema
        assert str(real).replace("pconv_cuda::", "") == str(emu).replace("pconv_cuda_emu::", "")


def test_cuda_build_registers_every_op():
    # Whenever the build had CUDA, every op has a real CUDA kernel (not the missing-kernel fallback).
    if not pconv_cuda._C.WITH_CUDA:
        pytest.skip("CPU-only build")
    assert ops.MISSING_CUDA_KERNELS == ()
    for op in ops.OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pconv_cuda::{op}", "CUDA")
