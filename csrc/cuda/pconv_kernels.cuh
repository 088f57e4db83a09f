// The CUDA kernels of pconv_cuda and their launch configurations. No launch syntax and no ATen here: nvcc compiles
// this header in pconv_cuda.cu, and g++ compiles it in emu/pconv_emu.cpp under the SIMT emulation (simt_emu.h),
// so the kernels tested on the CPU are these very functions.
// All tensors are NCHW-contiguous; indices are int64_t; half types accumulate in float (acc_t).
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>

#include "../common/pconv_math.h"

#if defined(__CUDACC__)
#define PCONV_DYNAMIC_SHARED(T, name) \
  extern __shared__ unsigned char name##_raw[]; \
  T* name = reinterpret_cast<T*>(name##_raw)
#endif

namespace pconv {
namespace cuda {

struct LaunchConfig {
  dim3 grid;
  dim3 block;
  size_t shared_bytes;
  bool barriers;  // the kernel calls __syncthreads() (the emulation runs such blocks as fibers)
};

constexpr int kThreads = 256;
constexpr int64_t kMaxGridX = 65535;  // grid-stride kernels cap their grid here
constexpr int64_t kMaxGridY = 65535;  // the hardware limit of gridDim.y

C10_HOST_DEVICE inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline LaunchConfig elementwise_config(int64_t n) {
  const int64_t blocks = n == 0 ? 0 : (ceil_div(n, kThreads) < kMaxGridX ? ceil_div(n, kThreads) : kMaxGridX);
  return {dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0, false};
}

template <typename T>
__device__ __forceinline__ T quiet_nan() {
  return std::numeric_limits<T>::quiet_NaN();
}

#define PCONV_GRID_STRIDE_LOOP(i, n)                                                              \
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < (n);                      \
       i += int64_t(blockDim.x) * gridDim.x)

// ---------------------------------------------------------------------------------------------------------------
// Mask kernel: S, ratio and U once per output pixel, summing the window over every mask channel. mask == nullptr
// is the all-ones mask (S from the in-bounds tap counts). A mask value outside [0, 1] or NaN in a window makes
// that pixel's ratio and U NaN, so bad masks show in the output instead of passing silently (no host sync).
template <typename mask_t, typename acc_t, typename update_t>
__global__ void mask_kernel(const mask_t* __restrict__ mask, Geometry g, acc_t* __restrict__ ratio,
                            update_t* __restrict__ update) {
  const int64_t HWo = g.Ho * g.Wo, HW = g.H * g.W;
  const acc_t win = static_cast<acc_t>(g.window_size());
  PCONV_GRID_STRIDE_LOOP(i, g.mask_batch * HWo) {
    const int64_t n = i / HWo, p = i % HWo, oh = p / g.Wo, ow = p % g.Wo;
    acc_t s = acc_t(0);
    bool invalid = false;
    if (mask != nullptr) {
      for (int64_t c = 0; c < g.mask_channels; ++c) {
        s += window_sum<acc_t>(mask + (n * g.mask_channels + c) * HW, g.H, g.W, g.win, oh, ow, &invalid);
      }
    } else {
      s = static_cast<acc_t>(all_ones_window_sum(g, oh, ow));
    }
    acc_t r, u;
    ratio_and_update(s, win, &r, &u);
    if (invalid) r = u = quiet_nan<acc_t>();
    ratio[i] = r;
    update[i] = static_cast<update_t>(u);
  }
}

inline LaunchConfig mask_config(const Geometry& g) { return elementwise_config(g.mask_batch * g.Ho * g.Wo); }

// ---------------------------------------------------------------------------------------------------------------
// out = x * M, M broadcast over batch (mask_batch 1) and channels (mask_channels 1). out may alias x (dX *= M).
template <typename scalar_t, typename mask_t, typename acc_t>
__global__ void apply_mask_kernel(const scalar_t* x, const mask_t* __restrict__ mask, scalar_t* out, Geometry g) {
  const int64_t HW = g.H * g.W;
  PCONV_GRID_STRIDE_LOOP(i, g.N * g.C_in * HW) {
    const int64_t n = i / (g.C_in * HW), c = (i / HW) % g.C_in, p = i % HW;
    const int64_t mi = ((g.mask_batch == 1 ? 0 : n) * g.mask_channels + (g.mask_channels == 1 ? 0 : c)) * HW + p;
    out[i] = static_cast<scalar_t>(static_cast<acc_t>(x[i]) * static_cast<acc_t>(mask[mi]));
  }
}

inline LaunchConfig apply_mask_config(const Geometry& g) { return elementwise_config(g.N * g.C_in * g.H * g.W); }

// ---------------------------------------------------------------------------------------------------------------
// Vendor-route epilogue, in place on the conv output: Y = raw * ratio + b * U.
template <typename scalar_t, typename acc_t>
__global__ void epilogue_kernel(scalar_t* y, const acc_t* __restrict__ ratio, const scalar_t* __restrict__ update,
                                const scalar_t* __restrict__ bias, Geometry g) {
  const int64_t HWo = g.Ho * g.Wo;
  PCONV_GRID_STRIDE_LOOP(i, g.N * g.C_out * HWo) {
    const int64_t n = i / (g.C_out * HWo), c = (i / HWo) % g.C_out, p = i % HWo;
    const int64_t mi = (g.mask_batch == 1 ? 0 : n) * HWo + p;
    const acc_t b = bias != nullptr ? static_cast<acc_t>(bias[c]) : acc_t(0);
    y[i] = static_cast<scalar_t>(
        renormalise(static_cast<acc_t>(y[i]), static_cast<acc_t>(ratio[mi]), b, static_cast<acc_t>(update[mi])));
  }
}

inline LaunchConfig epilogue_config(const Geometry& g) { return elementwise_config(g.N * g.C_out * g.Ho * g.Wo); }

// ---------------------------------------------------------------------------------------------------------------
// grad_output pass: G = dY * ratio, and per (channel, chunk) block the partial sum of dY * U, reduced by a fixed
// tree in shared memory. bias_grad_kernel then adds each channel's partials in order: deterministic, no atomics.
constexpr int64_t kGradChunk = 8 * kThreads;  // elements of one channel per block

template <typename scalar_t, typename acc_t>
__global__ void grad_output_kernel(const scalar_t* __restrict__ dy, scalar_t* __restrict__ g_out,
                                   acc_t* __restrict__ partial, const acc_t* __restrict__ ratio,
                                   const scalar_t* __restrict__ update, Geometry g) {
  __shared__ acc_t red[kThreads];
  const int64_t HWo = g.Ho * g.Wo;
  const int64_t c = blockIdx.y, chunk = blockIdx.x;
  const int64_t begin = chunk * kGradChunk;
  const int64_t end = begin + kGradChunk < g.N * HWo ? begin + kGradChunk : g.N * HWo;
  acc_t s = acc_t(0);
  for (int64_t e = begin + threadIdx.x; e < end; e += blockDim.x) {
    const int64_t n = e / HWo, p = e % HWo;
    const int64_t idx = (n * g.C_out + c) * HWo + p;
    const int64_t mi = (g.mask_batch == 1 ? 0 : n) * HWo + p;
    const acc_t v = static_cast<acc_t>(dy[idx]);
    g_out[idx] = static_cast<scalar_t>(v * static_cast<acc_t>(ratio[mi]));
    s += v * static_cast<acc_t>(update[mi]);
  }
  red[threadIdx.x] = s;
  __syncthreads();
  for (unsigned stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) red[threadIdx.x] += red[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0 && partial != nullptr) partial[c * gridDim.x + chunk] = red[0];
}

inline LaunchConfig grad_output_config(const Geometry& g) {
  const int64_t chunks = ceil_div(g.N * g.Ho * g.Wo, kGradChunk);
  return {dim3(static_cast<unsigned>(chunks), static_cast<unsigned>(g.C_out)), dim3(kThreads), 0, true};
}

template <typename scalar_t, typename acc_t>
__global__ void bias_grad_kernel(const acc_t* __restrict__ partial, scalar_t* __restrict__ db, int64_t channels,
                                 int64_t chunks) {
  PCONV_GRID_STRIDE_LOOP(c, channels) {
    acc_t s = acc_t(0);
    for (int64_t k = 0; k < chunks; ++k) s += partial[c * chunks + k];
    db[c] = static_cast<scalar_t>(s);
  }
}

inline LaunchConfig bias_grad_config(const Geometry& g) { return elementwise_config(g.C_out); }

// ---------------------------------------------------------------------------------------------------------------
// The one-pass forward: an implicit-GEMM convolution in one launch. Each block computes a tile of kTileM output
// channels (of one group) x kTileN output pixels. Per K slice of kTileK (channel, tap) pairs it stages the weights
// and the masked input X*M (gathered with zero padding) in shared memory, accumulating S from the mask values it
// loads; the epilogue applies ratio, bias and hole zeroing, and the first channel tile writes ratio and U.
// Needs groups == 1 for a multi-channel mask (S sums over every input channel; a block sees one group's).
constexpr int kTileM = 32;  // output channels per block
constexpr int kTileN = 32;  // output pixels per block (threadIdx.x)
constexpr int kTileK = 8;   // K slice per stage (threadIdx.y)
constexpr int kRowsPerThread = kTileM / kTileK;

template <typename scalar_t, typename mask_t, typename acc_t>
__global__ void one_pass_forward_kernel(const scalar_t* __restrict__ x, const mask_t* __restrict__ mask,
                                        const scalar_t* __restrict__ w, const scalar_t* __restrict__ bias,
                                        Geometry g, scalar_t* __restrict__ y, acc_t* __restrict__ ratio,
                                        scalar_t* __restrict__ update) {
  __shared__ acc_t w_tile[kTileK][kTileM];
  __shared__ acc_t x_tile[kTileK][kTileN];
  __shared__ acc_t s_part[kTileK][kTileN];
  __shared__ int bad_part[kTileK][kTileN];

  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kTileN + tx;
  const int64_t Cg = g.C_in / g.groups, Cog = g.C_out / g.groups;
  const int64_t taps = g.win.kh * g.win.kw, K = Cg * taps;
  const int64_t tiles_per_group = ceil_div(Cog, kTileM);
  const int64_t group = blockIdx.y / tiles_per_group, co0 = (blockIdx.y % tiles_per_group) * kTileM;
  const int64_t HWo = g.Ho * g.Wo, HW = g.H * g.W;
  const int64_t pix = int64_t(blockIdx.x) * kTileN + tx;
  const bool pix_ok = pix < g.N * HWo;
  const int64_t n = pix_ok ? pix / HWo : 0, p = pix_ok ? pix % HWo : 0;
  const int64_t oh = p / g.Wo, ow = p % g.Wo;
  const int64_t nm = g.mask_batch == 1 ? 0 : n;

  acc_t acc[kRowsPerThread];
  for (int r = 0; r < kRowsPerThread; ++r) acc[r] = acc_t(0);
  acc_t s = acc_t(0);
  bool invalid = false;

  for (int64_t k0 = 0; k0 < K; k0 += kTileK) {
    {  // weights: consecutive threads read consecutive k of one output channel
      const int64_t co = co0 + tid / kTileK, k = k0 + tid % kTileK;
      w_tile[tid % kTileK][tid / kTileK] =
          co < Cog && k < K ? static_cast<acc_t>(w[(group * Cog + co) * K + k]) : acc_t(0);
    }
    acc_t v = acc_t(0);
    const int64_t k = k0 + ty;
    if (pix_ok && k < K) {
      const int64_t c = k / taps, i = (k / g.win.kw) % g.win.kh, j = k % g.win.kw;
      const int64_t h = oh * g.win.sh - g.win.ph + i * g.win.dh;
      const int64_t wc = ow * g.win.sw - g.win.pw + j * g.win.dw;
      if (h >= 0 && h < g.H && wc >= 0 && wc < g.W) {
        const acc_t xv = static_cast<acc_t>(x[(n * g.C_in + group * Cg + c) * HW + h * g.W + wc]);
        if (mask != nullptr) {
          const int64_t mc = g.mask_channels == 1 ? 0 : group * Cg + c;
          const acc_t mv = static_cast<acc_t>(mask[(nm * g.mask_channels + mc) * HW + h * g.W + wc]);
          v = xv * mv;
          if (g.mask_channels > 1 || c == 0) {  // a single-channel mask is summed over the taps once
            s += mv;
            invalid |= mask_value_invalid(mv);
          }
        } else {
          v = xv;
        }
      }
    }
    x_tile[ty][tx] = v;
    __syncthreads();
    for (int kk = 0; kk < kTileK; ++kk) {
      const acc_t xv = x_tile[kk][tx];
      for (int r = 0; r < kRowsPerThread; ++r) acc[r] += w_tile[kk][ty + r * kTileK] * xv;
    }
    __syncthreads();
  }
  s_part[ty][tx] = s;
  bad_part[ty][tx] = invalid ? 1 : 0;
  __syncthreads();
  if (!pix_ok) return;

  acc_t s_total = acc_t(0);
  bool any_invalid = false;
  if (mask != nullptr) {
    for (int kk = 0; kk < kTileK; ++kk) {  // fixed order: deterministic
      s_total += s_part[kk][tx];
      any_invalid |= bad_part[kk][tx] != 0;
    }
  } else {
    s_total = static_cast<acc_t>(all_ones_window_sum(g, oh, ow));
  }
  acc_t r_val, u_val;
  ratio_and_update(s_total, static_cast<acc_t>(g.window_size()), &r_val, &u_val);
  if (any_invalid) r_val = u_val = quiet_nan<acc_t>();
  for (int r = 0; r < kRowsPerThread; ++r) {
    const int64_t co = co0 + ty + r * kTileK;
    if (co < Cog) {
      const int64_t oc = group * Cog + co;
      const acc_t b = bias != nullptr ? static_cast<acc_t>(bias[oc]) : acc_t(0);
      y[(n * g.C_out + oc) * HWo + p] = static_cast<scalar_t>(renormalise(acc[r], r_val, b, u_val));
    }
  }
  if (blockIdx.y == 0 && ty == 0 && n < g.mask_batch) {
    ratio[n * HWo + p] = r_val;
    update[n * HWo + p] = static_cast<scalar_t>(u_val);
  }
}

inline LaunchConfig one_pass_config(const Geometry& g) {
  const int64_t pixel_tiles = ceil_div(g.N * g.Ho * g.Wo, kTileN);
  const int64_t channel_tiles = ceil_div(g.C_out / g.groups, kTileM) * g.groups;
  return {dim3(static_cast<unsigned>(pixel_tiles), static_cast<unsigned>(channel_tiles)), dim3(kTileN, kTileK), 0,
          true};
}

}  // namespace cuda
}  // namespace pconv
