// The CUDA backend run by the SIMT emulation on CPU tensors: the kernels of kernels.cuh and the primitives of
// cuda_primitives.h in the op flows of common/op_flow.h, exactly as the CUDA build uses them, registered as
// torch.ops.pconv_cuda_emu.* with the same schemas. The convolution (cuDNN on a GPU) is ATen's CPU one here.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <Python.h>
#include <torch/library.h>

#include <bit>
#include <chrono>
#include <cstdlib>
#include <functional>
#include <type_traits>

#include "../../common/autograd.h"
#include "../../common/schemas.h"
#include "../cudnn_fused.h"
#include "simt_emu.h"  // after every library header: it defines CUDA's keywords
// clang-format off
#include "../kernels.cuh"
#include "../cuda_primitives.h"
// clang-format on

namespace pconv {
namespace emu {
namespace {

using at::Tensor;

// Runs a kernel over its grid: blocks spread over the CPU threads, the threads of a block as fibers.
struct EmuLaunch {
  // The GPU the emulation stands for: sm_90 (every kernel, WMMA included, runs here), or PCONV_EMU_COMPUTE_CAPABILITY
  // (e.g. 75) to test the host's choices for an older GPU (no bfloat16 or TF32 fragments below 80).
  static int compute_capability() {
    const char* env = std::getenv("PCONV_EMU_COMPUTE_CAPABILITY");
    return env != nullptr && *env != '\0' ? std::atoi(env) : 90;
  }
  template <typename... KArgs>
  void operator()(void (*kernel)(KArgs...), const cuda::LaunchConfig& cfg, std::type_identity_t<KArgs>... args) {
    const std::function<void()> body = [&] { kernel(args...); };
    pconv_emu::launch(cfg.grid, cfg.block, cfg.shared_bytes, cfg.barriers, body, [](int64_t blocks, auto&& run) {
      at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) run(b);
      });
    });
  }
  // No cuDNN here: a model of the cudnn_fused graph stands for it, so the flow around the route (the scale map,
  // the factor it multiplies by, the fallback decisions of the support surface) runs in tests. The model computes
  // what the graph specifies: the convolution and the epilogue in float, one rounding to the output's dtype.
  static bool fused_supported(const Geometry& g, const Tensor& input, bool has_bias) {
    return cuda::fused_surface_reason(cuda::fused_call(g, input, has_bias)).empty();
  }
  static bool fused_conv(const Tensor& conv_in, const Tensor& weight, const Tensor& bias, const Tensor& factor,
                         const Tensor& updated_mask, const Geometry& g, Tensor& out) {
    const Tensor raw = at::convolution(conv_in.to(at::kFloat), weight.to(at::kFloat), c10::nullopt,
                                       {g.win.sh, g.win.sw}, {g.win.ph, g.win.pw}, {g.win.dh, g.win.dw}, false,
                                       {0, 0}, 1);
    const Tensor y = bias.defined()
                         ? (raw * factor + bias.to(at::kFloat).view({1, -1, 1, 1})) * updated_mask.to(at::kFloat)
                         : raw * factor;
    out = y.to(conv_in.scalar_type()).contiguous(at::MemoryFormat::ChannelsLast);
    return true;
  }
  template <class Fn>
  double time_ms(Fn&& fn) {
    const auto start = std::chrono::steady_clock::now();
    fn();
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  }
};

// The op flows (op_flow.h, impl_ops) run with the CUDA primitives under the emulation.
struct EmuBackend {
  template <class Fn>
  static auto run(const Tensor&, Fn&& fn) {
    EmuLaunch launch;
    cuda::CudaPrimitives<EmuLaunch> prim{launch};
    return fn(prim);
  }
};

// Kernels that check the emulation itself: each is right or wrong in a way a GPU would show.
template <bool kBarrier>
__global__ void reverse_kernel(const float* in, float* out) {
  __shared__ float tile[1024];
  const int64_t base = int64_t(blockIdx.x) * blockDim.x;
  tile[threadIdx.x] = in[base + threadIdx.x];
  if (kBarrier) __syncthreads();  // without it, threads read slots their peers have not written yet
  out[base + threadIdx.x] = tile[blockDim.x - 1 - threadIdx.x];
}

__global__ void divergent_barrier_kernel(const float* in, float* out) {
  if (threadIdx.x < blockDim.x / 2) __syncthreads();  // undefined behaviour on a GPU: half the block never arrives
  out[threadIdx.x] = in[threadIdx.x];
}

__global__ void atomic_sum_kernel(const float* in, float* out, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(blockDim.x) * gridDim.x) {
    atomicAdd(out, in[i]);
  }
}

__global__ void dynamic_shared_rotate_kernel(const float* in, float* out) {
  PCONV_DYNAMIC_SHARED(float, buf);
  const int64_t base = int64_t(blockIdx.x) * blockDim.x;
  buf[threadIdx.x] = in[base + threadIdx.x];
  __syncthreads();
  out[base + threadIdx.x] = buf[(threadIdx.x + 1) % blockDim.x];
}

// Warp collectives, one per case, over blocks of 64 threads (two warps; 48 for kPartialWarp). out[t] as in
// tests/test_emulation.py.
enum WarpCase {
  kShfl, kShflWidth8, kShflXorSum, kShflXorWidth16, kShflDown, kShflUpWidth8, kBallot, kSyncwarpExchange,
  kExchangeWithoutSyncwarp, kPartialWarp, kLanesReturned, kMismatchedMasks, kDifferentCollectives,
  kCollectiveAndSyncthreads, kLaneNotInMask, kBadWidth, kBlockSum
};

template <int kCase>
__global__ void warp_kernel(const float* in, float* out) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const unsigned lane = threadIdx.x % 32;
  const float v = in[t];
  float r = 0.0f;
  if constexpr (kCase == kShfl) {
    r = __shfl_sync(0xffffffffu, v, int((lane * 5 + 3) % 32));
  } else if constexpr (kCase == kShflWidth8) {
    r = __shfl_sync(0xffffffffu, v, int(lane + 3), 8);  // lane (lane + 3) mod 8 of its group of 8
  } else if constexpr (kCase == kShflXorSum) {
    r = v;
    for (int offset = 16; offset > 0; offset /= 2) r += __shfl_xor_sync(0xffffffffu, r, offset);
  } else if constexpr (kCase == kShflXorWidth16) {
    r = __shfl_xor_sync(0xffffffffu, v, 16, 16);  // a later group: own value; an earlier one: its value
  } else if constexpr (kCase == kShflDown) {
    r = __shfl_down_sync(0xffffffffu, v, 5);
  } else if constexpr (kCase == kShflUpWidth8) {
    r = __shfl_up_sync(0xffffffffu, v, 2, 8);
  } else if constexpr (kCase == kBallot) {  // two disjoint groups: even and odd lanes
    const unsigned mask = (lane & 1) ? 0xaaaaaaaau : 0x55555555u;
    r = std::bit_cast<float>(__ballot_sync(mask, v > 0.0f));
  } else if constexpr (kCase == kSyncwarpExchange || kCase == kExchangeWithoutSyncwarp) {
    __shared__ float tile[64];
    tile[threadIdx.x] = v;
    if (kCase == kSyncwarpExchange) __syncwarp();
    r = tile[threadIdx.x ^ 31];  // the mirror lane of the same warp
  } else if constexpr (kCase == kPartialWarp) {
    r = __shfl_down_sync(0xffffffffu, v, 8);  // block of 48: lanes 8-15 of warp 1 read absent lanes
  } else if constexpr (kCase == kLanesReturned) {
    if (lane >= 16) return;
    r = __shfl_sync(0xffffffffu, v, 0);
  } else if constexpr (kCase == kMismatchedMasks) {
    r = __shfl_sync(lane < 16 ? 0x0000ffffu : 0xffffffffu, v, 0);
  } else if constexpr (kCase == kDifferentCollectives) {
    r = (lane & 1) ? float(__ballot_sync(0xffffffffu, v > 0.0f)) : __shfl_sync(0xffffffffu, v, 0);
  } else if constexpr (kCase == kCollectiveAndSyncthreads) {
    if (lane == 0) {
      __syncthreads();
    } else {
      __syncwarp();
    }
  } else if constexpr (kCase == kLaneNotInMask) {
    r = __shfl_sync(1u << ((lane + 1) % 32), v, 0);
  } else if constexpr (kCase == kBadWidth) {
    r = __shfl_sync(0xffffffffu, v, 0, 12);
  } else if constexpr (kCase == kBlockSum) {  // warp sums, then warp 0 adds them up: collectives and barriers
    __shared__ float partial[32];
    r = v;
    for (unsigned offset = 16; offset > 0; offset /= 2) r += __shfl_down_sync(0xffffffffu, r, offset);
    if (lane == 0) partial[threadIdx.x / 32] = r;
    __syncthreads();
    if (threadIdx.x < 32) {
      r = lane < blockDim.x / 32 ? partial[lane] : 0.0f;
      for (unsigned offset = 16; offset > 0; offset /= 2) r += __shfl_down_sync(0xffffffffu, r, offset);
      if (lane == 0) partial[0] = r;
    }
    __syncthreads();
    r = partial[0];
  }
  out[t] = r;
}

// C = A B (+ C0) for 32x32 matrices with WMMA: one block of four warps, one 16x16 tile of C each. A is stored
// row- or col-major as LA says, B as LB, C0 row-major, C as kStore.
template <class T, int KS, class LA, class LB, nvcuda::wmma::layout_t kStore, bool kLoadC>
__global__ void wmma_gemm_kernel(
    const typename nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, KS, T, LA>::element_type* a,
    const typename nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, KS, T, LA>::element_type* b,
    const float* c0, float* c) {
  using namespace nvcuda;
  const unsigned warp = threadIdx.x / 32, tm = warp / 2 * 16, tn = warp % 2 * 16;
  wmma::fragment<wmma::accumulator, 16, 16, KS, float> acc;
  if (kLoadC) {
    wmma::load_matrix_sync(acc, c0 + tm * 32 + tn, 32, wmma::mem_row_major);
  } else {
    wmma::fill_fragment(acc, 0.0f);
  }
  for (unsigned k = 0; k < 32; k += KS) {
    wmma::fragment<wmma::matrix_a, 16, 16, KS, T, LA> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, KS, T, LB> fb;
    wmma::load_matrix_sync(fa, std::is_same_v<LA, wmma::row_major> ? a + tm * 32 + k : a + k * 32 + tm, 32);
    wmma::load_matrix_sync(fb, std::is_same_v<LB, wmma::row_major> ? b + k * 32 + tn : b + tn * 32 + k, 32);
    wmma::mma_sync(acc, fa, fb, acc);
  }
  wmma::store_matrix_sync(kStore == wmma::mem_row_major ? c + tm * 32 + tn : c + tn * 32 + tm, acc, 32, kStore);
}

// C = A B + C0, but C0 added through acc.x[] as if lane l held elements l * 8 .. l * 8 + 7 of the tile in row-major
// order: not portable, so wrong here.
__global__ void wmma_assumes_row_major_kernel(const c10::Half* a, const c10::Half* b, const float* c0, float* c) {
  using namespace nvcuda;
  const unsigned warp = threadIdx.x / 32, tm = warp / 2 * 16, tn = warp % 2 * 16, lane = threadIdx.x % 32;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.0f);
  for (unsigned k = 0; k < 32; k += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, c10::Half, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, c10::Half, wmma::row_major> fb;
    wmma::load_matrix_sync(fa, a + tm * 32 + k, 32);
    wmma::load_matrix_sync(fb, b + k * 32 + tn, 32);
    wmma::mma_sync(acc, fa, fb, acc);
  }
  for (int i = 0; i < acc.num_elements; ++i) {
    const unsigned e = lane * acc.num_elements + i;
    acc.x[i] += c0[(tm + e / 16) * 32 + tn + e % 16];
  }
  wmma::store_matrix_sync(c + tm * 32 + tn, acc, 32, wmma::mem_row_major);
}

// WMMA misuse, one warp: each case breaks one rule.
enum WmmaCase { kMisaligned, kBadLdm, kMismatchedLdm, kWmmaPartialWarp, kWmmaLaneReturned };

template <int kCase>
__global__ void wmma_check_kernel(const c10::Half* a, float* c) {
  using namespace nvcuda;
  const unsigned lane = threadIdx.x % 32;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, c10::Half, wmma::row_major> fa;
  if (kCase == kWmmaLaneReturned && lane == 31) return;
  const c10::Half* p = kCase == kMisaligned ? a + 8 : a;  // 16 bytes off
  const unsigned ldm = kCase == kBadLdm ? 20 : kCase == kMismatchedLdm && lane == 5 ? 40 : 32;
  wmma::load_matrix_sync(fa, p, ldm);
  c[threadIdx.x] = float(fa.x[0]);
}

Tensor wmma_selftest(c10::string_view name, const Tensor& in) {
  using namespace nvcuda;
  EmuLaunch launch;
  const cuda::LaunchConfig cfg{dim3(1), dim3(128), 0, true};
  TORCH_CHECK(in.numel() == 3 * 1024, name, ": input must hold A, B and C0, 32x32 each");
  const Tensor a = in.slice(0, 0, 1024).view({32, 32}), b = in.slice(0, 1024, 2048).view({32, 32});
  const Tensor c0 = in.slice(0, 2048, 3072).contiguous();
  Tensor c = at::empty({32, 32}, in.options());
  float* cp = c.mutable_data_ptr<float>();
  auto as = [](const Tensor& m, at::ScalarType dtype, bool col_major) {
    return (col_major ? m.t() : m).to(dtype).contiguous();
  };
  if (name == "wmma_gemm_half") {  // A row-major, B col-major, C row-major, C = A B
    const Tensor ah = as(a, at::kHalf, false), bh = as(b, at::kHalf, true);
    launch(wmma_gemm_kernel<c10::Half, 16, wmma::row_major, wmma::col_major, wmma::mem_row_major, false>, cfg,
           ah.const_data_ptr<c10::Half>(), bh.const_data_ptr<c10::Half>(), c0.const_data_ptr<float>(), cp);
    return c.view(-1);
  }
  if (name == "wmma_gemm_bf16") {  // A col-major, B row-major, C col-major, C = A B + C0
    const Tensor ah = as(a, at::kBFloat16, true), bh = as(b, at::kBFloat16, false);
    launch(wmma_gemm_kernel<c10::BFloat16, 16, wmma::col_major, wmma::row_major, wmma::mem_col_major, true>, cfg,
           ah.const_data_ptr<c10::BFloat16>(), bh.const_data_ptr<c10::BFloat16>(), c0.const_data_ptr<float>(), cp);
    return c.t().contiguous().view(-1);
  }
  if (name == "wmma_gemm_tf32") {  // float A, B row-major, C row-major, C = A B + C0; rounding to tf32 in mma_sync
    const Tensor af = a.contiguous(), bf = b.contiguous();
    launch(wmma_gemm_kernel<wmma::precision::tf32, 8, wmma::row_major, wmma::row_major, wmma::mem_row_major, true>,
           cfg, af.const_data_ptr<float>(), bf.const_data_ptr<float>(), c0.const_data_ptr<float>(), cp);
    return c.view(-1);
  }
  const Tensor ah = as(a, at::kHalf, false), bh = as(b, at::kHalf, false);
  if (name == "wmma_assumes_row_major") {  // meant as C = A B + C0
    launch(wmma_assumes_row_major_kernel, cfg, ah.const_data_ptr<c10::Half>(), bh.const_data_ptr<c10::Half>(),
           c0.const_data_ptr<float>(), cp);
    return c.view(-1);
  }
  const c10::Half* ap = ah.const_data_ptr<c10::Half>();
  const cuda::LaunchConfig warp{dim3(1), dim3(32), 0, true};
  if (name == "wmma_misaligned") {
    launch(wmma_check_kernel<kMisaligned>, warp, ap, cp);
  } else if (name == "wmma_bad_ldm") {
    launch(wmma_check_kernel<kBadLdm>, warp, ap, cp);
  } else if (name == "wmma_mismatched_ldm") {
    launch(wmma_check_kernel<kMismatchedLdm>, warp, ap, cp);
  } else if (name == "wmma_partial_warp") {
    launch(wmma_check_kernel<kWmmaPartialWarp>, cuda::LaunchConfig{dim3(1), dim3(48), 0, true}, ap, cp);
  } else if (name == "wmma_lane_returned") {
    launch(wmma_check_kernel<kWmmaLaneReturned>, warp, ap, cp);
  } else if (name == "wmma_barrier_free") {
    launch(wmma_check_kernel<kWmmaPartialWarp>, cuda::LaunchConfig{dim3(1), dim3(32), 0, false}, ap, cp);
  } else {
    TORCH_CHECK(false, "unknown self-test '", name, "'");
  }
  return c.view(-1);
}

// _emu_selftest(name, input): runs one check kernel over `input` (float32, a multiple of 64 elements) in blocks of 64;
// wmma_* over A, B, C0 (32x32 each).
Tensor emu_selftest(c10::string_view name, const Tensor& input) {
  TORCH_CHECK(input.scalar_type() == at::kFloat && input.numel() % 64 == 0, "input must be float32, numel % 64 == 0");
  const Tensor in = input.contiguous();
  if (name.starts_with("wmma_")) return wmma_selftest(name, in);
  const float* ip = in.const_data_ptr<float>();
  const unsigned blocks = static_cast<unsigned>(in.numel() / 64);
  EmuLaunch launch;
  const cuda::LaunchConfig cfg{dim3(blocks), dim3(64), 0, true};
  if (name == "atomic_sum") {
    Tensor out = at::zeros({1}, in.options());
    launch(atomic_sum_kernel, cuda::LaunchConfig{dim3(4), dim3(64), 0, false}, ip, out.mutable_data_ptr<float>(),
           in.numel());
    return out;
  }
  Tensor out = at::empty_like(in);
  float* op = out.mutable_data_ptr<float>();
  if (name == "reverse") {
    launch(reverse_kernel<true>, cfg, ip, op);
  } else if (name == "reverse_without_barrier") {
    launch(reverse_kernel<false>, cfg, ip, op);
  } else if (name == "reverse_declared_barrier_free") {
    launch(reverse_kernel<true>, cuda::LaunchConfig{dim3(blocks), dim3(64), 0, false}, ip, op);
  } else if (name == "divergent_barrier") {
    launch(divergent_barrier_kernel, cuda::LaunchConfig{dim3(1), dim3(64), 0, true}, ip, op);
  } else if (name == "dynamic_shared_rotate") {
    launch(dynamic_shared_rotate_kernel, cuda::LaunchConfig{dim3(blocks), dim3(64), 64 * sizeof(float), true}, ip, op);
  } else if (name == "shfl") {
    launch(warp_kernel<kShfl>, cfg, ip, op);
  } else if (name == "shfl_width8") {
    launch(warp_kernel<kShflWidth8>, cfg, ip, op);
  } else if (name == "shfl_xor_sum") {
    launch(warp_kernel<kShflXorSum>, cfg, ip, op);
  } else if (name == "shfl_xor_width16") {
    launch(warp_kernel<kShflXorWidth16>, cfg, ip, op);
  } else if (name == "shfl_down") {
    launch(warp_kernel<kShflDown>, cfg, ip, op);
  } else if (name == "shfl_up_width8") {
    launch(warp_kernel<kShflUpWidth8>, cfg, ip, op);
  } else if (name == "ballot") {
    launch(warp_kernel<kBallot>, cfg, ip, op);
  } else if (name == "syncwarp_exchange") {
    launch(warp_kernel<kSyncwarpExchange>, cfg, ip, op);
  } else if (name == "exchange_without_syncwarp") {
    launch(warp_kernel<kExchangeWithoutSyncwarp>, cfg, ip, op);
  } else if (name == "partial_warp") {  // one block of 48 threads over the first 48 elements
    out.zero_();
    launch(warp_kernel<kPartialWarp>, cuda::LaunchConfig{dim3(1), dim3(48), 0, true}, ip, op);
  } else if (name == "warp_lanes_returned") {
    launch(warp_kernel<kLanesReturned>, cfg, ip, op);
  } else if (name == "warp_mismatched_masks") {
    launch(warp_kernel<kMismatchedMasks>, cfg, ip, op);
  } else if (name == "warp_different_collectives") {
    launch(warp_kernel<kDifferentCollectives>, cfg, ip, op);
  } else if (name == "warp_collective_and_syncthreads") {
    launch(warp_kernel<kCollectiveAndSyncthreads>, cfg, ip, op);
  } else if (name == "warp_lane_not_in_mask") {
    launch(warp_kernel<kLaneNotInMask>, cfg, ip, op);
  } else if (name == "warp_bad_width") {
    launch(warp_kernel<kBadWidth>, cfg, ip, op);
  } else if (name == "block_sum") {
    launch(warp_kernel<kBlockSum>, cfg, ip, op);
  } else if (name == "warp_declared_barrier_free") {
    launch(warp_kernel<kShfl>, cuda::LaunchConfig{dim3(blocks), dim3(64), 0, false}, ip, op);
  } else {
    TORCH_CHECK(false, "unknown self-test '", name, "'");
  }
  return out;
}

}  // namespace
}  // namespace emu
}  // namespace pconv

namespace {
struct EmuLibrary {
  static constexpr const char* ns = "pconv_cuda_emu";
};
}  // namespace

TORCH_LIBRARY(pconv_cuda_emu, m) {
  pconv::define_ops(m);
  m.def("_emu_selftest(str name, Tensor input) -> Tensor");
}

TORCH_LIBRARY_IMPL(pconv_cuda_emu, Autograd, m) { pconv::impl_autograd<EmuLibrary>(m); }

TORCH_LIBRARY_IMPL(pconv_cuda_emu, CPU, m) {
  pconv::impl_ops<pconv::emu::EmuBackend>(m);
  m.impl("_emu_selftest", &pconv::emu::emu_selftest);
}

extern "C" PyObject* PyInit__emu(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_emu",
                                          "pconv_cuda's CUDA kernels under the SIMT emulation", -1,
                                          nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
