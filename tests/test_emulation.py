"""The SIMT emulation is faithful enough that a wrong kernel fails (csrc/cuda/emu/simt_emu.h)."""
from __future__ import annotations

import pytest
import torch

import pconv_cuda
from helpers import emu_unavailable
from pconv_cuda import ops

if emu_unavailable():  # a build without PCONV_BUILD_EMU=1 (scripts/gpu_check.sh's default)
    pytest.skip(emu_unavailable(), allow_module_level=True)
import pconv_cuda.emu  # noqa: E402,F401

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


# Warps: 32 lanes by linear thread index, collectives as rendezvous of the lanes named in their masks.
def lanes_of(x: torch.Tensor) -> torch.Tensor:
    return x.view(-1, 32)


def warp_gather(x: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    return lanes_of(x)[:, src].reshape(-1)


LANE = torch.arange(32)


@pytest.mark.parametrize("name, src", [
    ("shfl", (LANE * 5 + 3) % 32),
    ("shfl_width8", (LANE & ~7) | ((LANE + 3) & 7)),  # srcLane modulo width, within the lane's group of 8
    ("shfl_xor_width16", torch.where(LANE < 16, LANE, LANE - 16)),  # later group: own value; earlier: its value
    ("shfl_down", torch.where(LANE + 5 <= 31, LANE + 5, LANE)),
    ("shfl_up_width8", torch.where(LANE % 8 >= 2, LANE - 2, LANE)),
    ("syncwarp_exchange", LANE ^ 31),
])
def test_shuffles_move_the_right_lanes(name, src):
    x = torch.randn(64 * 3)
    torch.testing.assert_close(selftest(name, x), warp_gather(x, src), rtol=0, atol=0)


def test_shfl_xor_butterfly_sums_the_warp():
    x = torch.randint(-100, 100, (64 * 2,)).float()  # integers: exact in any order
    expected = lanes_of(x).sum(1, keepdim=True).expand(-1, 32).reshape(-1)
    torch.testing.assert_close(selftest("shfl_xor_sum", x), expected, rtol=0, atol=0)


def test_block_sum_with_warp_shuffles_and_barriers():
    x = torch.randint(-100, 100, (64 * 3,)).float()
    expected = x.view(-1, 64).sum(1, keepdim=True).expand(-1, 64).reshape(-1)
    torch.testing.assert_close(selftest("block_sum", x), expected, rtol=0, atol=0)


def test_ballot_over_two_disjoint_masks():
    x = torch.randn(64 * 2)
    bits = (lanes_of(x) > 0).long() << LANE
    even = (bits * (LANE % 2 == 0)).sum(1, keepdim=True)
    odd = (bits * (LANE % 2 == 1)).sum(1, keepdim=True)
    expected = torch.where(LANE % 2 == 0, even, odd).reshape(-1)
    got = selftest("ballot", x).view(torch.int32).long() & 0xFFFFFFFF
    assert torch.equal(got, expected)


def test_missing_syncwarp_gives_wrong_result():
    x = torch.randn(64 * 2)
    assert not torch.equal(selftest("exchange_without_syncwarp", x), warp_gather(x, LANE ^ 31))


def test_partial_last_warp():
    # A block of 48: warp 1 has lanes 0-15. Its lanes 8-15 shuffle down from absent lanes: undefined, NaN here.
    x = torch.randn(64)
    out = selftest("partial_warp", x)
    t = torch.arange(48)
    lane = t % 32
    expected = torch.where(lane + 8 <= 31, x[(t + 8).clamp(max=63)], x[t])
    absent = (t >= 32) & (lane >= 8)
    torch.testing.assert_close(out[:48][~absent], expected[~absent], rtol=0, atol=0)
    assert out[:48][absent].isnan().all()
    assert (out[48:] == 0).all()


@pytest.mark.parametrize("name, message", [
    ("warp_lanes_returned", r"lane 0 is at __shfl_sync\(mask 0xffffffff\) while lane 16, named in the mask, "
                            r"had returned"),
    ("warp_mismatched_masks", r"lane 16 is at __shfl_sync\(mask 0xffffffff\) while lane 0, named in the mask, is "
                              r"there with mask 0x0000ffff: the masks must be equal"),
    ("warp_different_collectives", r"lane 0 is at __shfl_sync\(mask 0xffffffff\) while lane 1, named in the mask, "
                                   r"is at __ballot_sync\(mask 0xffffffff\): the lanes of a mask must reach the "
                                   r"same collective"),
    ("warp_collective_and_syncthreads", r"lane 1 is at __syncwarp\(mask 0xffffffff\) while lane 0, named in the "
                                        r"mask, is at __syncthreads\(\)"),
    ("warp_lane_not_in_mask", r"lane 0 calls __shfl_sync with mask 0x00000002, which does not include the calling "
                              r"lane"),
    ("warp_bad_width", r"__shfl_sync with width 12: width must be a power of 2 no larger than 32"),
    ("warp_declared_barrier_free", r"__shfl_sync in a kernel launched as barrier-free"),
])
def test_warp_collective_misuse_is_reported(name, message):
    with pytest.raises(RuntimeError, match=message):
        selftest(name, torch.randn(64))


# WMMA: C = A B (+ C0), 32x32x32, four warps of 16x16 tiles. Products of fp16, bf16 or tf32 inputs are exact in
# float (at most 11-bit significands) and the 32 products (+ C0) are summed in float: |error| <= 33 * 2^-24 *
# sum of |terms| against the float64 product of the rounded inputs.
def tf32(x: torch.Tensor) -> torch.Tensor:
    return ((x.view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)  # round to nearest, ties away


def wmma_case(name: str):
    a, b, c0 = torch.randn(3, 32, 32).unbind(0)
    out = selftest(name, torch.cat([a.reshape(-1), b.reshape(-1), c0.reshape(-1)])).view(32, 32)
    return a, b, c0, out


def assert_within_float_accumulation(out, a, b, c0):
    a, b, c0 = a.double(), b.double(), c0.double()
    expected = a @ b + c0
    bound = 33 * 2.0**-24 * (a.abs() @ b.abs() + c0.abs())
    assert ((out.double() - expected).abs() <= bound).all()


@pytest.mark.parametrize("name, dtype, with_c0", [
    ("wmma_gemm_half", torch.float16, False),  # A row-major, B col-major, fill_fragment(0), stored row-major
    ("wmma_gemm_bf16", torch.bfloat16, True),  # A col-major, B row-major, C0 loaded, stored col-major
])
def test_wmma_gemm_half_types(name, dtype, with_c0):
    a, b, c0, out = wmma_case(name)
    assert_within_float_accumulation(out, a.to(dtype), b.to(dtype), c0 if with_c0 else torch.zeros_like(c0))


def test_wmma_gemm_tf32_rounds_its_inputs():
    a, b, c0, out = wmma_case("wmma_gemm_tf32")
    assert_within_float_accumulation(out, tf32(a), tf32(b), c0)
    assert not torch.allclose(out, a @ b + c0, rtol=1e-5, atol=1e-5)  # unrounded inputs: further off


def test_wmma_fragment_layout_is_not_row_major():
    # Indexing acc.x[] as if lanes held the tile in row-major order adds C0 to the wrong elements.
    a, b, c0, out = wmma_case("wmma_assumes_row_major")
    expected = a.half().float() @ b.half().float() + c0
    assert (out - expected).abs().max() > 0.1


@pytest.mark.parametrize("name, message", [
    ("wmma_misaligned", r"wmma::load_matrix_sync with a pointer that is not 256-bit \(32-byte\) aligned"),
    ("wmma_bad_ldm", r"wmma::load_matrix_sync with ldm 20, which is not a multiple of 8 for 2-byte elements"),
    ("wmma_mismatched_ldm", r"lane 0 is at wmma::load_matrix_sync\(mask 0xffffffff\) while lane 5, named in the "
                            r"mask, passes different arguments"),
    ("wmma_partial_warp", r"wmma::load_matrix_sync needs all 32 lanes of a warp; this warp has 16"),
    ("wmma_lane_returned", r"lane 0 is at wmma::load_matrix_sync\(mask 0xffffffff\) while lane 31, named in the "
                           r"mask, had returned"),
    ("wmma_barrier_free", r"wmma::load_matrix_sync in a kernel launched as barrier-free"),
])
def test_wmma_misuse_is_reported(name, message):
    with pytest.raises(RuntimeError, match=message):
        selftest(name, torch.randn(3 * 1024))
