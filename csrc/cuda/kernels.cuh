// The CUDA kernels of pconv_cuda and their launch configurations. No launch syntax and no ATen here: nvcc compiles
// this header in cuda_backend.cu, and g++ compiles it in emu/emu_backend.cpp under the SIMT emulation
// (simt_emu.h), so the kernels tested on the CPU are these very functions.
//
// Per-element kernels come in an NCHW and an NHWC form. Neither divides per element: NCHW kernels put the image or
// the (image, channel) plane in the grid's y (and z) dimensions and the pixel in x; NHWC kernels put the pixel in
// (blockIdx.x, threadIdx.y) and the channel in threadIdx.x. The only index splits left are per plane or per pixel,
// by FastDivmod (maths.h).
// VEC > 1 moves VEC consecutive elements per load and store (16 bytes of the input's dtype), chosen at launch
// when the run length and every pointer allow it. Half types compute in float (acc_t).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#endif

#include "../common/maths.h"

namespace pconv {
namespace cuda {

struct LaunchConfig {
  dim3 grid;
  dim3 block;
  size_t shared_bytes;
  bool barriers;  // the kernel calls __syncthreads() or a warp collective (the emulation runs such blocks as fibers)
};

constexpr int kThreads = 256;
constexpr int64_t kMaxGridY = 65535;  // the hardware limit of gridDim.y and gridDim.z

C10_HOST_DEVICE inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline unsigned grid_y(int64_t n) { return static_cast<unsigned>(n < kMaxGridY ? (n < 1 ? 1 : n) : kMaxGridY); }

// VEC elements moved by one load or store.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <int VEC, typename T>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

template <int VEC, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, VEC>& v) {
  *reinterpret_cast<Pack<T, VEC>*>(p) = v;
}

// ---------------------------------------------------------------------------------------------------------------
// Mask pass. NCHW: per image n and VEC pixels p: xm[n, c, p] = X*M for every channel, channel c reading the mask's
// map groups.map_of(c) (holes exact), and, for the first Nm images, plane[n, p] = sum over the maps of
// groups.weight(g) * M[g] (NaN for a value outside [0, 1]). With x == nullptr only the plane is formed
// (mask_update). xm may alias x (the backward's in-place dX *= M), or have more channels than x (s.Cxm: xm then
// points at the first of x's channels in it).
// The channels are spread over threadIdx.y and, unless the plane sums one map per channel, over blockIdx.z (channel
// slices), so a small image with many channels (the U-Net's inner layers: 1024 channels of 4x4) is not one thread
// per pixel looping over every channel. A mask of one map per channel (multi-channel; or the maps themselves
// without an input) keeps its channels in one block (blockIdx.z == 0 only) and sums the plane over threadIdx.y in
// shared memory, in a fixed order: deterministic, no atomics. A grouped mask's plane is summed over its few maps by
// the block's first thread row.
struct MaskPassShape {
  int64_t N;   // images swept: the input's batch (Nm without an input)
  int64_t C;   // the input's channels (the mask's without an input)
  int64_t HW;  // pixels per image
  int64_t Nm;  // the mask's batch: 1 (broadcast) or N
  int64_t Cm;  // the mask's maps: 1 (broadcast), C, or a group count between
  ChannelGroups groups;
  int64_t Cxm;  // xm's channels (>= C: masked_cat writes an input's C channels into a wider output from xm)
};

constexpr int kMaskPassUnroll = 4;  // channels whose loads a thread issues before their stores

template <typename scalar_t, typename mask_t, int VEC>
__global__ void mask_pass_nchw_kernel(const scalar_t* x, const mask_t* __restrict__ mask, scalar_t* xm,
                                      acc_type_t<scalar_t>* __restrict__ plane, MaskPassShape s,
                                      int64_t per_group) {
  using acc_t = acc_type_t<scalar_t>;
  __shared__ acc_t red[kThreads * VEC];
  const int64_t p = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  const bool active = p < s.HW;  // no early return: the block may meet barriers below
  const int64_t channels = x != nullptr ? s.C : s.Cm;
  const int64_t c_begin = blockIdx.z * per_group;
  const int64_t c_end = c_begin + per_group < channels ? c_begin + per_group : channels;
  // Uniform over the block: the channel loop walks the maps one by one (adding each to the plane), and whether
  // that sum needs the shared-memory reduction.
  const bool by_map = x == nullptr || s.Cm == s.C;
  const bool reduce = by_map && s.Cm > 1 && blockDim.y > 1;
  for (int64_t n = blockIdx.y; n < s.N; n += gridDim.y) {
    const int64_t nm = s.Nm == 1 ? 0 : n;
    const bool want_plane = plane != nullptr && n < s.Nm && blockIdx.z == 0;  // uniform over the block
    acc_t sum[VEC];
    for (int v = 0; v < VEC; ++v) sum[v] = acc_t(0);
    if (active) {
      Pack<mask_t, VEC> m1;
      if (s.Cm == 1) m1 = load_pack<VEC>(mask + nm * s.HW + p);
      const int64_t step = blockDim.y;
      for (int64_t c0 = c_begin + threadIdx.y; c0 < c_end; c0 += step * kMaskPassUnroll) {
        // The loads of kMaskPassUnroll channels first, all in flight together, then their stores: a loop that
        // stored each channel before loading the next waited one memory latency per channel (xm may alias x,
        // so the compiler cannot reorder them itself), ~0.6 us per channel row on the decoder's 768-1024
        // channels of 16x16 and 32x32.
        Pack<mask_t, VEC> mu[kMaskPassUnroll];
        Pack<scalar_t, VEC> xu[kMaskPassUnroll];
#pragma unroll
        for (int u = 0; u < kMaskPassUnroll; ++u) {
          const int64_t c = c0 + u * step;
          if (c >= c_end) break;
          const int64_t map = x != nullptr ? s.groups.map_of(c) : c;
          mu[u] = s.Cm > 1 ? load_pack<VEC>(mask + (nm * s.Cm + map) * s.HW + p) : m1;
          if (x != nullptr) xu[u] = load_pack<VEC>(x + (n * s.C + c) * s.HW + p);
        }
#pragma unroll
        for (int u = 0; u < kMaskPassUnroll; ++u) {
          const int64_t c = c0 + u * step;
          if (c >= c_end) break;
          if (x != nullptr) {
            Pack<scalar_t, VEC> out;
            for (int v = 0; v < VEC; ++v) {
              out.v[v] =
                  static_cast<scalar_t>(masked(static_cast<acc_t>(xu[u].v[v]), static_cast<acc_t>(mu[u].v[v])));
            }
            store_pack<VEC>(xm + (n * s.Cxm + c) * s.HW + p, out);
          }
          if (want_plane && (by_map || (s.Cm == 1 && c == 0))) {
            const acc_t w = static_cast<acc_t>(s.groups.weight(x != nullptr ? s.groups.map_of(c) : c));
            for (int v = 0; v < VEC; ++v) sum[v] += w * plane_value(static_cast<acc_t>(mu[u].v[v]));
          }
        }
      }
      if (want_plane && !by_map && s.Cm > 1 && threadIdx.y == 0) {  // grouped: the maps, read once more (cached)
        for (int64_t map = 0; map < s.Cm; ++map) {
          const Pack<mask_t, VEC> mg = load_pack<VEC>(mask + (nm * s.Cm + map) * s.HW + p);
          const acc_t w = static_cast<acc_t>(s.groups.weight(map));
          for (int v = 0; v < VEC; ++v) sum[v] += w * plane_value(static_cast<acc_t>(mg.v[v]));
        }
      }
    }
    if (!want_plane) continue;
    if (reduce) {
      for (int v = 0; v < VEC; ++v) red[(threadIdx.y * blockDim.x + threadIdx.x) * VEC + v] = sum[v];
      __syncthreads();
      if (threadIdx.y == 0) {
        for (unsigned row = 1; row < blockDim.y; ++row) {
          for (int v = 0; v < VEC; ++v) sum[v] += red[(row * blockDim.x + threadIdx.x) * VEC + v];
        }
      }
      __syncthreads();  // red is reused by the next image
    }
    if (threadIdx.y == 0 && active) {  // a single map's value sits with channel 0, a grouped plane with row 0
      Pack<acc_t, VEC> out;
      for (int v = 0; v < VEC; ++v) out.v[v] = sum[v];
      store_pack<VEC>(plane + n * s.HW + p, out);
    }
  }
}

// Threads: up to 64 pixel vectors in x (16 for a plane summed over one map per channel; 128 or 256 with 2 or 1
// channels), the rest of the 256 on channels in y; unless the plane is summed map by map, channel slices in z until
// about kMaskPassBlocks blocks are in flight (that sum reduces within one block).
// *per_group: the channels of one slice (the kernel's last argument).
constexpr int64_t kMaskPassBlocks = 1024;

template <int VEC>
inline LaunchConfig mask_pass_nchw_config(const MaskPassShape& s, bool with_input, bool with_plane,
                                          int64_t* per_group) {
  const int64_t vectors = ceil_div(s.HW, VEC), channels = with_input ? s.C : s.Cm;
  // The plane summed map by map across the block's channel rows (one map per channel, or the maps alone).
  const bool map_sum = with_plane && s.Cm > 1 && (!with_input || s.Cm == s.C);
  // At least 4 channel rows when there are 4 channels; 16 for such a plane, whose channels stay in one block (a
  // 16x16 image of 1024 channels: 64 channels a thread instead of 256).
  const unsigned ch_rows = map_sum ? 16 : 4;
  unsigned px = 1, ch = 1, ch_min = 1;
  while (ch_min < ch_rows && ch_min < channels) ch_min *= 2;
  while (px < kThreads / ch_min && px < vectors) px *= 2;
  while (px * ch < kThreads && ch < channels) ch *= 2;
  const int64_t pixel_blocks = ceil_div(vectors, px);
  const int64_t images = grid_y(s.N);
  int64_t groups = 1;
  if (!map_sum && channels > ch && pixel_blocks > 0) {
    const int64_t max_groups = ceil_div(channels, ch);
    groups = ceil_div(kMaskPassBlocks, pixel_blocks * images);
    groups = groups < max_groups ? groups : max_groups;
    groups = groups < kMaxGridY ? groups : kMaxGridY;
    groups = groups > 1 ? groups : 1;
  }
  const bool barriers = map_sum && ch > 1;
  *per_group = ceil_div(channels, groups);
  return {dim3(static_cast<unsigned>(pixel_blocks), static_cast<unsigned>(images), static_cast<unsigned>(groups)),
          dim3(px, ch), 0, barriers};
}

template <int VEC>
inline LaunchConfig nchw_config(int64_t planes, int64_t run) {
  return {dim3(static_cast<unsigned>(ceil_div(ceil_div(run, VEC), kThreads)), grid_y(planes)), dim3(kThreads), 0,
          false};
}

// NHWC layouts: threadIdx.x walks the channel vectors of one pixel, (blockIdx.x, threadIdx.y) the pixels.
inline dim3 nhwc_block(int64_t channel_vectors) {
  unsigned bx = 1;
  while (bx < 32 && bx < channel_vectors) bx *= 2;
  return dim3(bx, kThreads / bx);
}

inline LaunchConfig nhwc_config(int64_t pixels, int64_t channel_vectors) {
  const dim3 block = nhwc_block(channel_vectors);
  return {dim3(static_cast<unsigned>(ceil_div(pixels, block.y))), block, 0, false};
}

// The mask's pixel for global pixel q = n * HW + p: q itself, or p when one mask serves the whole batch.
struct MaskPixel {
  bool broadcast;
  FastDivmod hw;
  C10_HOST_DEVICE int64_t operator()(int64_t q) const {
    if (!broadcast) return q;
    const uint32_t q32 = static_cast<uint32_t>(q);
    return hw.mod(q32, hw.div(q32));
  }
};

// NHWC mask pass, X*M only (the plane comes from plane_nhwc_kernel): pixel q of N*HW, VEC channels per thread.
template <typename scalar_t, typename mask_t, int VEC>
__global__ void mask_pass_nhwc_kernel(const scalar_t* x, const mask_t* __restrict__ mask, scalar_t* xm,
                                      MaskPassShape s, MaskPixel mask_pixel) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t q = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  if (q >= s.N * s.HW) return;
  const int64_t mq = mask_pixel(q);
  for (int64_t c = int64_t(threadIdx.x) * VEC; c < s.C; c += int64_t(blockDim.x) * VEC) {
    Pack<mask_t, VEC> m;
    if (s.Cm == 1) {
      for (int v = 0; v < VEC; ++v) m.v[v] = mask[mq];
    } else if (s.Cm == s.C) {
      m = load_pack<VEC>(mask + mq * s.Cm + c);
    } else {  // grouped: each channel's map
      for (int v = 0; v < VEC; ++v) m.v[v] = mask[mq * s.Cm + s.groups.map_of(c + v)];
    }
    const Pack<scalar_t, VEC> xv = load_pack<VEC>(x + q * s.C + c);
    Pack<scalar_t, VEC> out;
    for (int v = 0; v < VEC; ++v) {
      out.v[v] = static_cast<scalar_t>(masked(static_cast<acc_t>(xv.v[v]), static_cast<acc_t>(m.v[v])));
    }
    store_pack<VEC>(xm + q * s.Cxm + c, out);
  }
}

// NHWC plane: threadIdx.x walks the Cm contiguous map values of one mask pixel (each counted groups.weight(g)
// times), threadIdx.y the pixels; the lanes' partial sums are added in a fixed order through shared memory
// (deterministic).
template <typename mask_t, typename acc_t>
__global__ void plane_nhwc_kernel(const mask_t* __restrict__ mask, acc_t* __restrict__ plane, int64_t pixels,
                                  int64_t Cm, ChannelGroups groups) {
  __shared__ acc_t red[kThreads];
  const int64_t q = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool active = q < pixels;  // no early return: the block may meet the barrier below
  acc_t sum = acc_t(0);
  if (active) {
    for (int64_t c = threadIdx.x; c < Cm; c += blockDim.x) {
      sum += static_cast<acc_t>(groups.weight(c)) * plane_value(static_cast<acc_t>(mask[q * Cm + c]));
    }
  }
  if (blockDim.x > 1) {  // uniform over the block
    red[threadIdx.y * blockDim.x + threadIdx.x] = sum;
    __syncthreads();
    if (threadIdx.x == 0) {
      for (unsigned lane = 1; lane < blockDim.x; ++lane) sum += red[threadIdx.y * blockDim.x + lane];
    }
  }
  if (threadIdx.x == 0 && active) plane[q] = sum;
}

inline LaunchConfig plane_nhwc_config(int64_t pixels, int64_t Cm) {
  LaunchConfig cfg = nhwc_config(pixels, Cm);
  cfg.barriers = cfg.block.x > 1;
  return cfg;
}

// ---------------------------------------------------------------------------------------------------------------
// Ratio map: S at each output pixel by a window sum over the plane (kd*kh*kw cached reads; plane == nullptr is
// the all-ones mask, S from the in-bounds tap counts), then ratio and U. Images in blockIdx.y; an image's output
// pixels (od, oh, ow) split with two divisors fixed at launch. scale (win / S, for the cudnn_fused route's
// epilogue) is written where it is not null.
template <typename acc_t, typename update_t>
__global__ void ratio_kernel(const acc_t* __restrict__ plane, Geometry g, FastDivmod wo, FastDivmod ho,
                             acc_t* __restrict__ ratio, update_t* __restrict__ updated_mask,
                             acc_t* __restrict__ scale) {
  const int64_t pixels = g.out_pixels();
  const int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= pixels) return;
  const uint32_t row = wo.div(static_cast<uint32_t>(p)), ow = wo.mod(static_cast<uint32_t>(p), row);
  const uint32_t od = ho.div(row), oh = ho.mod(row, od);
  const acc_t win = static_cast<acc_t>(g.window_size());
  for (int64_t n = blockIdx.y; n < g.mask_batch; n += gridDim.y) {
    const acc_t s = plane != nullptr ? window_sum<acc_t>(plane + n * g.pixels(), g.D, g.H, g.W, g.win, od, oh, ow)
                                     : static_cast<acc_t>(all_ones_window_sum(g, od, oh, ow));
    acc_t r, u;
    ratio_and_update(s, win, &r, &u);
    ratio[n * pixels + p] = r;
    updated_mask[n * pixels + p] = static_cast<update_t>(u);
    if (scale != nullptr) scale[n * pixels + p] = window_scale(s, win);
  }
}

inline LaunchConfig ratio_config(const Geometry& g) {
  return {dim3(static_cast<unsigned>(ceil_div(g.out_pixels(), kThreads)), grid_y(g.mask_batch)), dim3(kThreads), 0,
          false};
}

// ---------------------------------------------------------------------------------------------------------------
// Epilogue, in place on the convolution's output: Y = raw * ratio + b * U.
struct MapShape {
  int64_t N, C, HW;  // output batch, channels, pixels per image
  int64_t Nm;        // batch of the ratio and U maps: 1 or N
  FastDivmod channels;  // splits a plane index into (image, channel)
};

template <typename scalar_t, int VEC>
__global__ void epilogue_nchw_kernel(scalar_t* __restrict__ y, const acc_type_t<scalar_t>* __restrict__ ratio,
                                     const scalar_t* __restrict__ updated_mask, const scalar_t* __restrict__ bias,
                                     MapShape s) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t p = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (p >= s.HW) return;
  for (int64_t plane = blockIdx.y; plane < s.N * s.C; plane += gridDim.y) {
    const uint32_t n = s.channels.div(static_cast<uint32_t>(plane));
    const uint32_t c = s.channels.mod(static_cast<uint32_t>(plane), n);
    const int64_t mi = (s.Nm == 1 ? 0 : int64_t(n)) * s.HW + p;
    const acc_t b = bias != nullptr ? static_cast<acc_t>(bias[c]) : acc_t(0);
    const Pack<scalar_t, VEC> yv = load_pack<VEC>(y + plane * s.HW + p);
    const Pack<acc_t, VEC> r = load_pack<VEC>(ratio + mi);
    const Pack<scalar_t, VEC> u = load_pack<VEC>(updated_mask + mi);
    Pack<scalar_t, VEC> out;
    for (int v = 0; v < VEC; ++v) {
      out.v[v] = static_cast<scalar_t>(
          renormalise(static_cast<acc_t>(yv.v[v]), r.v[v], b, static_cast<acc_t>(u.v[v])));
    }
    store_pack<VEC>(y + plane * s.HW + p, out);
  }
}

template <typename scalar_t, int VEC>
__global__ void epilogue_nhwc_kernel(scalar_t* __restrict__ y, const acc_type_t<scalar_t>* __restrict__ ratio,
                                     const scalar_t* __restrict__ updated_mask, const scalar_t* __restrict__ bias,
                                     MapShape s, MaskPixel map_pixel) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t q = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  if (q >= s.N * s.HW) return;
  const int64_t mq = map_pixel(q);
  const acc_t r = ratio[mq], u = static_cast<acc_t>(updated_mask[mq]);
  for (int64_t c = int64_t(threadIdx.x) * VEC; c < s.C; c += int64_t(blockDim.x) * VEC) {
    const Pack<scalar_t, VEC> yv = load_pack<VEC>(y + q * s.C + c);
    Pack<scalar_t, VEC> out;
    for (int v = 0; v < VEC; ++v) {
      const acc_t b = bias != nullptr ? static_cast<acc_t>(bias[c + v]) : acc_t(0);
      out.v[v] = static_cast<scalar_t>(renormalise(static_cast<acc_t>(yv.v[v]), r, b, u));
    }
    store_pack<VEC>(y + q * s.C + c, out);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// grad_output pass: G = dY * ratio, and per block the partial sum of dY * U for the bias gradient, reduced by a
// fixed tree in shared memory; bias_grad_kernel adds each channel's partials in order. Deterministic, no atomics.
// NCHW: grid (pixel chunk, channel, image); partial[(c * N + n) * chunks + chunk].
constexpr int64_t kGradChunk = 8 * kThreads;  // pixels of one (image, channel) plane per block

template <typename scalar_t, int VEC>
__global__ void grad_output_nchw_kernel(const scalar_t* __restrict__ dy, scalar_t* __restrict__ gy,
                                        acc_type_t<scalar_t>* __restrict__ partial,
                                        const acc_type_t<scalar_t>* __restrict__ ratio,
                                        const scalar_t* __restrict__ updated_mask, MapShape s, int64_t n0) {
  using acc_t = acc_type_t<scalar_t>;
  __shared__ acc_t red[kThreads];
  const int64_t n = n0 + blockIdx.z, chunk = blockIdx.x, chunks = gridDim.x;
  const int64_t begin = chunk * kGradChunk;
  const int64_t end = begin + kGradChunk < s.HW ? begin + kGradChunk : s.HW;
  const int64_t mbase = (s.Nm == 1 ? 0 : n) * s.HW;
  for (int64_t c = blockIdx.y; c < s.C; c += gridDim.y) {  // uniform over the block: the barriers stay legal
    acc_t sum = acc_t(0);
    const int64_t base = (n * s.C + c) * s.HW;
    for (int64_t p = begin + int64_t(threadIdx.x) * VEC; p < end; p += int64_t(blockDim.x) * VEC) {
      const Pack<scalar_t, VEC> d = load_pack<VEC>(dy + base + p);
      const Pack<acc_t, VEC> r = load_pack<VEC>(ratio + mbase + p);
      const Pack<scalar_t, VEC> u = load_pack<VEC>(updated_mask + mbase + p);
      Pack<scalar_t, VEC> out;
      for (int v = 0; v < VEC; ++v) {
        const acc_t dv = static_cast<acc_t>(d.v[v]);
        out.v[v] = static_cast<scalar_t>(dv * r.v[v]);
        sum += dv * static_cast<acc_t>(u.v[v]);
      }
      store_pack<VEC>(gy + base + p, out);
    }
    red[threadIdx.x] = sum;
    __syncthreads();
    for (unsigned stride = blockDim.x / 2; stride > 0; stride >>= 1) {
      if (threadIdx.x < stride) red[threadIdx.x] += red[threadIdx.x + stride];
      __syncthreads();
    }
    if (threadIdx.x == 0 && partial != nullptr) partial[(c * s.N + n) * chunks + chunk] = red[0];
    __syncthreads();  // red is reused by the next channel
  }
}

inline LaunchConfig grad_output_nchw_config(const MapShape& s, int64_t images) {
  return {dim3(static_cast<unsigned>(ceil_div(s.HW, kGradChunk)), grid_y(s.C), static_cast<unsigned>(images)),
          dim3(kThreads), 0, true};
}

// NHWC: block (32 channels, 8 pixel rows), grid (pixel chunk, channel tile); partial[c * chunks + chunk].
constexpr int kGradChannels = 32;
constexpr int kGradRows = kThreads / kGradChannels;
constexpr int64_t kGradPixels = 64 * kGradRows;  // pixels per block

template <typename scalar_t>
__global__ void grad_output_nhwc_kernel(const scalar_t* __restrict__ dy, scalar_t* __restrict__ gy,
                                        acc_type_t<scalar_t>* __restrict__ partial,
                                        const acc_type_t<scalar_t>* __restrict__ ratio,
                                        const scalar_t* __restrict__ updated_mask, MapShape s, MaskPixel map_pixel) {
  using acc_t = acc_type_t<scalar_t>;
  __shared__ acc_t red[kGradRows][kGradChannels];
  const int64_t pixels = s.N * s.HW, chunk = blockIdx.x, chunks = gridDim.x;
  const int64_t end = (chunk + 1) * kGradPixels < pixels ? (chunk + 1) * kGradPixels : pixels;
  for (int64_t c0 = int64_t(blockIdx.y) * kGradChannels; c0 < s.C; c0 += int64_t(gridDim.y) * kGradChannels) {
    const int64_t c = c0 + threadIdx.x;
    acc_t sum = acc_t(0);
    if (c < s.C) {
      for (int64_t q = chunk * kGradPixels + threadIdx.y; q < end; q += kGradRows) {
        const int64_t mq = map_pixel(q);
        const acc_t dv = static_cast<acc_t>(dy[q * s.C + c]);
        gy[q * s.C + c] = static_cast<scalar_t>(dv * ratio[mq]);
        sum += dv * static_cast<acc_t>(updated_mask[mq]);
      }
    }
    red[threadIdx.y][threadIdx.x] = sum;
    __syncthreads();
    if (threadIdx.y == 0 && c < s.C && partial != nullptr) {
      acc_t total = acc_t(0);
      for (int row = 0; row < kGradRows; ++row) total += red[row][threadIdx.x];  // fixed order
      partial[c * chunks + chunk] = total;
    }
    __syncthreads();
  }
}

inline LaunchConfig grad_output_nhwc_config(const MapShape& s) {
  return {dim3(static_cast<unsigned>(ceil_div(s.N * s.HW, kGradPixels)), grid_y(ceil_div(s.C, kGradChannels))),
          dim3(kGradChannels, kGradRows), 0, true};
}

template <typename scalar_t>
__global__ void bias_grad_kernel(const acc_type_t<scalar_t>* __restrict__ partial, scalar_t* __restrict__ db,
                                 int64_t channels, int64_t per_channel) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  acc_t sum = acc_t(0);
  for (int64_t k = 0; k < per_channel; ++k) sum += partial[c * per_channel + k];
  db[c] = static_cast<scalar_t>(sum);
}

inline LaunchConfig bias_grad_config(int64_t channels) {
  return {dim3(static_cast<unsigned>(ceil_div(channels, kThreads))), dim3(kThreads), 0, false};
}

// ---------------------------------------------------------------------------------------------------------------
// gemm route: an implicit-GEMM convolution of the masked input with the epilogue fused, in one launch. Each
// block computes kTileM output channels (of one group) x kTileN output pixels; per K slice of kTileK (channel,
// tap) pairs it stages weights and input (gathered with zero padding) in shared memory. NCHW, plain FMA.
constexpr int kTileM = 32;  // output channels per block
constexpr int kTileN = 32;  // output pixels per block (threadIdx.x)
constexpr int kTileK = 8;   // K slice per stage (threadIdx.y)
constexpr int kRowsPerThread = kTileM / kTileK;

struct GemmShape {
  Geometry g;
  FastDivmod taps;    // k -> (channel, tap)
  FastDivmod kw;      // tap -> (i, j)
  FastDivmod hwo;     // pixel -> (image, output pixel)
  FastDivmod wo;      // output pixel -> (oh, ow)
  int64_t tiles_per_group;
};

template <typename scalar_t>
__global__ void gemm_conv_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                                 const scalar_t* __restrict__ bias, const acc_type_t<scalar_t>* __restrict__ ratio,
                                 const scalar_t* __restrict__ updated_mask, GemmShape s, scalar_t* __restrict__ y) {
  using acc_t = acc_type_t<scalar_t>;
  __shared__ acc_t w_tile[kTileK][kTileM];
  __shared__ acc_t x_tile[kTileK][kTileN];
  const Geometry& g = s.g;
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kTileN + tx;
  const int64_t Cg = g.C_in / g.groups, Cog = g.C_out / g.groups;
  const int64_t K = Cg * g.win.kh * g.win.kw;
  const int64_t group = blockIdx.y / s.tiles_per_group, co0 = (blockIdx.y % s.tiles_per_group) * kTileM;
  const int64_t HWo = g.Ho * g.Wo, HW = g.H * g.W;
  const int64_t pix = int64_t(blockIdx.x) * kTileN + tx;
  const bool pix_ok = pix < g.N * HWo;
  const uint32_t n = pix_ok ? s.hwo.div(static_cast<uint32_t>(pix)) : 0;
  const uint32_t p = pix_ok ? s.hwo.mod(static_cast<uint32_t>(pix), n) : 0;
  const uint32_t oh = s.wo.div(p), ow = s.wo.mod(p, oh);
  const scalar_t* xg = x + (int64_t(n) * g.C_in + group * Cg) * HW;

  acc_t acc[kRowsPerThread];
  for (int r = 0; r < kRowsPerThread; ++r) acc[r] = acc_t(0);
  for (int64_t k0 = 0; k0 < K; k0 += kTileK) {
    {  // weights: consecutive threads read consecutive k of one output channel
      const int64_t co = co0 + tid / kTileK, k = k0 + tid % kTileK;
      w_tile[tid % kTileK][tid / kTileK] =
          co < Cog && k < K ? static_cast<acc_t>(w[(group * Cog + co) * K + k]) : acc_t(0);
    }
    acc_t v = acc_t(0);
    const int64_t k = k0 + ty;
    if (pix_ok && k < K) {
      const uint32_t c = s.taps.div(static_cast<uint32_t>(k)), tap = s.taps.mod(static_cast<uint32_t>(k), c);
      const uint32_t i = s.kw.div(tap), j = s.kw.mod(tap, i);
      const int64_t h = int64_t(oh) * g.win.sh - g.win.ph + int64_t(i) * g.win.dh;
      const int64_t wc = int64_t(ow) * g.win.sw - g.win.pw + int64_t(j) * g.win.dw;
      if (h >= 0 && h < g.H && wc >= 0 && wc < g.W) v = static_cast<acc_t>(xg[int64_t(c) * HW + h * g.W + wc]);
    }
    x_tile[ty][tx] = v;
    __syncthreads();
    for (int kk = 0; kk < kTileK; ++kk) {
      const acc_t xv = x_tile[kk][tx];
      for (int r = 0; r < kRowsPerThread; ++r) acc[r] += w_tile[kk][ty + r * kTileK] * xv;
    }
    __syncthreads();
  }
  if (!pix_ok) return;
  const int64_t mi = (g.mask_batch == 1 ? 0 : int64_t(n)) * HWo + p;
  const acc_t r_val = ratio[mi], u_val = static_cast<acc_t>(updated_mask[mi]);
  for (int r = 0; r < kRowsPerThread; ++r) {
    const int64_t co = co0 + ty + r * kTileK;
    if (co < Cog) {
      const int64_t oc = group * Cog + co;
      const acc_t b = bias != nullptr ? static_cast<acc_t>(bias[oc]) : acc_t(0);
      y[(int64_t(n) * g.C_out + oc) * HWo + p] = static_cast<scalar_t>(renormalise(acc[r], r_val, b, u_val));
    }
  }
}

inline LaunchConfig gemm_conv_config(const GemmShape& s) {
  const int64_t pixel_tiles = ceil_div(s.g.N * s.g.Ho * s.g.Wo, kTileN);
  return {dim3(static_cast<unsigned>(pixel_tiles), static_cast<unsigned>(s.tiles_per_group * s.g.groups)),
          dim3(kTileN, kTileK), 0, true};
}

// ---------------------------------------------------------------------------------------------------------------
// gemm route on tensor cores: the same implicit GEMM (output channels x output pixels, K = C_in/groups*kh*kw) and
// fused epilogue, with nvcuda::wmma: half and bfloat16 operands as m16n16k16, float operands as TF32 m16n16k8
// (only where TF32 is allowed: CudaPrimitives::tensor_cores), float accumulators. A block of 4 warps computes 64
// output channels x 64 output pixels, each warp 32 x 32 (2 x 2 fragments); per stage of 32 K it stages the
// weights (row-major, K contiguous) and the gathered input (K x pixels, zero padding) in shared memory, then
// accumulates from there. The accumulators go through shared memory to the epilogue, so each thread writes one
// pixel's outputs (coalesced along pixels) whatever the fragments' element layout.
constexpr int kMmaTileM = 64;
constexpr int kMmaTileN = 64;
constexpr int kMmaTileK = 32;
constexpr int kMmaThreads = 128;  // 4 warps, 2 x 2 over the tile

// The WMMA operand type of an input dtype: its fragment type, its K per mma_sync, the type load_matrix_sync reads,
// and the padding of the shared tiles' rows (16 bytes: keeps ldm a multiple of 16 bytes and fragment rows 32-byte
// aligned, and staggers banks). bfloat16 and TF32 fragments exist from sm_80 (and in nvcc's host pass); compiled
// for an older arch their kernels use half fragments only so that they compile: they trap before any use
// (mma_unsupported_arch), and the host never launches them there (CudaPrimitives::tensor_cores).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define PCONV_MMA_HALF_ONLY 1
#endif
template <typename scalar_t>
struct MmaOperand;
template <>
struct MmaOperand<c10::Half> {
#if defined(__CUDACC__)
  using fragment_t = __half;
#else
  using fragment_t = c10::Half;
#endif
  using storage_t = c10::Half;  // same bits as __half
  using memory_t = fragment_t;  // what load_matrix_sync reads
  static constexpr int K = 16, pad = 8;
};
template <>
struct MmaOperand<c10::BFloat16> {
#if defined(PCONV_MMA_HALF_ONLY)
  using fragment_t = __half;
#elif defined(__CUDACC__)
  using fragment_t = __nv_bfloat16;
#else
  using fragment_t = c10::BFloat16;
#endif
  using storage_t = c10::BFloat16;  // same bits as __nv_bfloat16
  using memory_t = fragment_t;
  static constexpr int K = 16, pad = 8;
};
template <>
struct MmaOperand<float> {
#if defined(PCONV_MMA_HALF_ONLY)
  using fragment_t = __half;
  using memory_t = __half;
  static constexpr int K = 16;
#else
  using fragment_t = nvcuda::wmma::precision::tf32;
  using memory_t = float;
  static constexpr int K = 8;
#endif
  using storage_t = float;
  static constexpr int pad = 4;
};

// The TF32 operand rounding the guide asks for (cvt.rna.tf32.f32), applied to fragment elements.
template <typename scalar_t, class Frag>
__device__ __forceinline__ void to_mma_operand(Frag& f) {
#if !defined(PCONV_MMA_HALF_ONLY)
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (int t = 0; t < f.num_elements; ++t) f.x[t] = nvcuda::wmma::__float_to_tf32(f.x[t]);
  }
#endif
}

// True, after a trap on a GPU, where this arch has no fragments for scalar_t (see MmaOperand).
template <typename scalar_t>
__device__ __forceinline__ bool mma_unsupported_arch() {
#if defined(PCONV_MMA_HALF_ONLY)
  if (!std::is_same_v<scalar_t, c10::Half>) {
    __trap();
    return true;
  }
#endif
  return false;
}

// C[64][64] = sum over k in [k_begin, k_end) of A[m][k] * B[k][n] on tensor cores, by the 128 threads of a block:
// load_a(m, info) returns A[m][k] and load_b(info) this thread's B[k][col] (zero outside the problem; T, the
// operand's storage type), info = prepare(k): what the loaders need of k (its channel, tap and their offsets), formed
// once per k and stage by 32 threads into a shared table rather than by every element's loader (divisions by the tap
// count and kernel width: ~40 instructions an element). Thread t gathers B for column t % 64 only, and store(m, col,
// value) receives every C element of that column from the same thread. 4 warps x (2 x 2 fragments), K staged 32 at
// a time in padded shared memory; C goes through shared memory, so no code depends on the fragments' element
// layout.
template <typename scalar_t, class Prepare, class LoadA, class LoadB, class Store>
__device__ __forceinline__ void mma_tile(int64_t k_begin, int64_t k_end, const Prepare& prepare, const LoadA& load_a,
                                         const LoadB& load_b, const Store& store) {
  namespace wmma = nvcuda::wmma;
  using Op = MmaOperand<scalar_t>;
  using T = typename Op::storage_t;
  using E = typename Op::memory_t;
  using KInfo = decltype(prepare(int64_t(0)));
  constexpr int KS = Op::K;
  constexpr int LDA = kMmaTileK + Op::pad;  // A: [M][K]
  constexpr int LDB = kMmaTileN + Op::pad;  // B: [K][N]
  constexpr int LDC = kMmaTileN + 4;        // C: float [M][N]
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, KS, typename Op::fragment_t, wmma::row_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, KS, typename Op::fragment_t, wmma::row_major>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, KS, float>;
  struct alignas(32) Tiles {  // each array a multiple of 32 bytes: every fragment pointer 32-byte aligned
    T a[kMmaTileM * LDA];
    T b[kMmaTileK * LDB];
    float c[kMmaTileM * LDC];
    KInfo k[2][kMmaTileK];  // prepare(k) of the stage being fetched, double-buffered
  };
  __shared__ Tiles tiles;
  const int tid = threadIdx.x, warp = tid / 32, wm = warp / 2, wn = warp % 2;
  const int col = tid % kMmaTileN, row0 = tid / kMmaTileN;
  constexpr int kRowStep = kMmaThreads / kMmaTileN;
  // Software pipeline through registers: the next stage's operands are fetched (every load of a thread issued
  // back to back, all in flight together) before this stage's MMAs, and reach shared memory after them. A loop
  // that stored each loaded element to shared memory before issuing the next load waited one memory latency per
  // element: 32 per stage, ~8.5 us per 32-K stage measured on an H200, whatever the tile's work.
  constexpr int kAPerThread = kMmaTileM * kMmaTileK / kMmaThreads, kBPerThread = kMmaTileK / kRowStep;
  T ra[kAPerThread], rb[kBPerThread];
  // The table of stage k0 goes to buffer (k0 - k_begin) / 32 % 2: written before the barrier that precedes its
  // fetch; the buffer's previous stage was fetched before the barrier that precedes this write.
  auto prepare_stage = [&](int64_t k0) {
    if (tid < kMmaTileK && k0 + tid < k_end) tiles.k[((k0 - k_begin) / kMmaTileK) & 1][tid] = prepare(k0 + tid);
  };
  auto fetch = [&](int64_t k0) {
    const KInfo* info = tiles.k[((k0 - k_begin) / kMmaTileK) & 1];
#pragma unroll
    for (int t = 0; t < kAPerThread; ++t) {  // consecutive threads: consecutive k
      const int e = tid + t * kMmaThreads, m = e / kMmaTileK, kk = e % kMmaTileK;
      ra[t] = k0 + kk < k_end ? load_a(m, info[kk]) : T(0);
    }
#pragma unroll
    for (int t = 0; t < kBPerThread; ++t) {
      const int kk = row0 + t * kRowStep;
      rb[t] = k0 + kk < k_end ? load_b(info[kk]) : T(0);
    }
  };

  FragC acc[2][2];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  prepare_stage(k_begin);
  __syncthreads();
  if (k_begin < k_end) fetch(k_begin);
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kMmaTileK) {
#pragma unroll
    for (int t = 0; t < kAPerThread; ++t) {
      const int e = tid + t * kMmaThreads;
      tiles.a[(e / kMmaTileK) * LDA + e % kMmaTileK] = ra[t];
    }
#pragma unroll
    for (int t = 0; t < kBPerThread; ++t) tiles.b[(row0 + t * kRowStep) * LDB + col] = rb[t];
    prepare_stage(k0 + kMmaTileK);
    __syncthreads();
    if (k0 + kMmaTileK < k_end) fetch(k0 + kMmaTileK);  // in flight during the MMAs below
    for (int kk = 0; kk < kMmaTileK; kk += KS) {
      FragA a[2];
      FragB b[2];
      for (int i = 0; i < 2; ++i) {
        wmma::load_matrix_sync(a[i], reinterpret_cast<const E*>(tiles.a + (wm * 32 + i * 16) * LDA + kk), LDA);
        wmma::load_matrix_sync(b[i], reinterpret_cast<const E*>(tiles.b + kk * LDB + wn * 32 + i * 16), LDB);
        to_mma_operand<scalar_t>(a[i]);
        to_mma_operand<scalar_t>(b[i]);
      }
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(tiles.c + (wm * 32 + i * 16) * LDC + wn * 32 + j * 16, acc[i][j], LDC,
                              wmma::mem_row_major);
  __syncthreads();
  for (int m = row0; m < kMmaTileM; m += kRowStep) store(m, col, tiles.c[m * LDC + col]);
}

// What the loaders need of one k (mma_tile's prepare): an offset for the A operand's load, one for B's, and a row and
// column displacement. Each kernel says what they are for it.
struct MmaK {
  int64_t a, b;
  int32_t di, dj;
};

// Forward: C = W (output channels x K) times the gathered X*M (K x output pixels), then the epilogue.
template <typename scalar_t>
__global__ void __launch_bounds__(kMmaThreads)
    mma_conv_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                    const scalar_t* __restrict__ bias, const acc_type_t<scalar_t>* __restrict__ ratio,
                    const scalar_t* __restrict__ updated_mask, GemmShape s, scalar_t* __restrict__ y) {
  if (mma_unsupported_arch<scalar_t>()) return;
  using acc_t = acc_type_t<scalar_t>;
  using T = typename MmaOperand<scalar_t>::storage_t;
  const Geometry& g = s.g;
  const int64_t Cg = g.C_in / g.groups, Cog = g.C_out / g.groups;
  const int64_t K = Cg * g.win.kh * g.win.kw;
  const int64_t group = blockIdx.y / s.tiles_per_group, co0 = (blockIdx.y % s.tiles_per_group) * kMmaTileM;
  const int64_t HWo = g.Ho * g.Wo, HW = g.H * g.W;
  const int64_t pix = int64_t(blockIdx.x) * kMmaTileN + threadIdx.x % kMmaTileN;  // this thread's column
  const bool pix_ok = pix < g.N * HWo;
  const uint32_t n = pix_ok ? s.hwo.div(static_cast<uint32_t>(pix)) : 0;
  const uint32_t p = pix_ok ? s.hwo.mod(static_cast<uint32_t>(pix), n) : 0;
  const uint32_t oh = s.wo.div(p), ow = s.wo.mod(p, oh);
  const int64_t h0 = int64_t(oh) * g.win.sh - g.win.ph, w0 = int64_t(ow) * g.win.sw - g.win.pw;
  const scalar_t* xg = x + (int64_t(n) * g.C_in + group * Cg) * HW;
  const scalar_t* wg = w + group * Cog * K;
  const int64_t mi = (g.mask_batch == 1 ? 0 : int64_t(n)) * HWo + p;
  const acc_t r_val = pix_ok ? ratio[mi] : acc_t(0);
  const acc_t u_val = pix_ok ? static_cast<acc_t>(updated_mask[mi]) : acc_t(0);
  const int64_t at0 = h0 * g.W + w0;  // this pixel's window origin in the image (may lie in the padding)
  mma_tile<scalar_t>(
      0, K,
      [&](int64_t k) {  // k = (channel c, tap (i, j)); b: the tap's offset from the window origin in X, di/dj: its
        // dilated row and column
        const uint32_t c = s.taps.div(static_cast<uint32_t>(k)), tap = s.taps.mod(static_cast<uint32_t>(k), c);
        const uint32_t i = s.kw.div(tap), j = s.kw.mod(tap, i);
        const int32_t di = static_cast<int32_t>(i * g.win.dh), dj = static_cast<int32_t>(j * g.win.dw);
        return MmaK{k, int64_t(c) * HW + int64_t(di) * g.W + dj, di, dj};
      },
      [&](int m, const MmaK& t) { return co0 + m < Cog ? static_cast<T>(wg[(co0 + m) * K + t.a]) : T(0); },
      [&](const MmaK& t) {
        const int64_t h = h0 + t.di, wc = w0 + t.dj;
        return pix_ok && h >= 0 && h < g.H && wc >= 0 && wc < g.W ? static_cast<T>(xg[at0 + t.b]) : T(0);
      },
      [&](int m, int, float v) {
        const int64_t co = co0 + m;
        if (!pix_ok || co >= Cog) return;
        const int64_t oc = group * Cog + co;
        const acc_t b = bias != nullptr ? static_cast<acc_t>(bias[oc]) : acc_t(0);
        y[(int64_t(n) * g.C_out + oc) * HWo + p] =
            static_cast<scalar_t>(renormalise(static_cast<acc_t>(v), r_val, b, u_val));
      });
}

inline LaunchConfig mma_conv_config(const GemmShape& s) {
  const int64_t pixel_tiles = ceil_div(s.g.N * s.g.Ho * s.g.Wo, kMmaTileN);
  return {dim3(static_cast<unsigned>(pixel_tiles), static_cast<unsigned>(s.tiles_per_group * s.g.groups)),
          dim3(kMmaThreads), 0, true};
}

// The backward's GEMMs on tensor cores (the gemm route's backward, CudaPrimitives::gemm_backward). G = dY * ratio
// comes from the grad_output pass.
//   dgrad: dX = M * (W^T (input channels x K = C_out/groups*kh*kw) times G gathered at the input pixels (K x input
//          pixels)); an input pixel reads G at (oh, ow) = ((h + ph - i*dh) / sh, (w + pw - j*dw) / sw) where those
//          divide exactly. M is applied to the float accumulator (exact zero in holes).
//   wgrad: dW = G (output channels x K = N*H'*W') times the gathered X*M (K x C_in/groups*kh*kw), K split over
//          gridDim.z into float partial sums that mma_wgrad_reduce_kernel adds in a fixed order: deterministic, no
//          atomics.
struct MmaGradShape {
  GemmShape gemm;    // g, taps, kw, hwo, wo; tiles_per_group over the GEMM's M (input or output channels)
  FastDivmod hw;     // input pixel -> (image, pixel)
  FastDivmod w;      // input pixel -> (h, w)
  FastDivmod sh, sw; // strides: which output pixel an input pixel's tap came from
  int64_t k_chunk;   // wgrad: pixels per split
};

template <typename scalar_t, typename mask_t>
__global__ void __launch_bounds__(kMmaThreads)
    mma_dgrad_kernel(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ w,
                     const mask_t* __restrict__ mask, int64_t mask_batch, ChannelGroups groups, MmaGradShape s,
                     scalar_t* __restrict__ dx) {
  if (mma_unsupported_arch<scalar_t>()) return;
  using acc_t = acc_type_t<scalar_t>;
  using T = typename MmaOperand<scalar_t>::storage_t;
  const GemmShape& gs = s.gemm;
  const Geometry& g = gs.g;
  const int64_t Cg = g.C_in / g.groups, Cog = g.C_out / g.groups, taps = g.win.kh * g.win.kw;
  const int64_t K = Cog * taps;
  const int64_t group = blockIdx.y / gs.tiles_per_group, c0 = (blockIdx.y % gs.tiles_per_group) * kMmaTileM;
  const int64_t HW = g.H * g.W, HWo = g.Ho * g.Wo;
  const int64_t q = int64_t(blockIdx.x) * kMmaTileN + threadIdx.x % kMmaTileN;  // this thread's input pixel
  const bool q_ok = q < g.N * HW;
  const uint32_t n = q_ok ? s.hw.div(static_cast<uint32_t>(q)) : 0;
  const uint32_t hw = q_ok ? s.hw.mod(static_cast<uint32_t>(q), n) : 0;
  const uint32_t h = s.w.div(hw), wc = s.w.mod(hw, h);
  const scalar_t* wg = w + group * Cog * Cg * taps;
  const scalar_t* gg = gy + (int64_t(n) * g.C_out + group * Cog) * HWo;
  mma_tile<scalar_t>(
      0, K,
      [&](int64_t k) {  // k = (output channel co, tap (i, j)); a: W[co][.][i][j] less the input channel's part, b: G's
        // plane co, di/dj: the padding less the dilated tap (an input pixel reads G at (h + di, w + dj) / stride)
        const uint32_t co = gs.taps.div(static_cast<uint32_t>(k)), tap = gs.taps.mod(static_cast<uint32_t>(k), co);
        const uint32_t i = gs.kw.div(tap), j = gs.kw.mod(tap, i);
        return MmaK{int64_t(co) * Cg * taps + tap, int64_t(co) * HWo,
                    static_cast<int32_t>(g.win.ph - int64_t(i) * g.win.dh),
                    static_cast<int32_t>(g.win.pw - int64_t(j) * g.win.dw)};
      },
      [&](int m, const MmaK& t) { return c0 + m < Cg ? static_cast<T>(wg[t.a + (c0 + m) * taps]) : T(0); },
      [&](const MmaK& t) {
        const int64_t hn = int64_t(h) + t.di, wn = int64_t(wc) + t.dj;
        if (!q_ok || hn < 0 || wn < 0) return T(0);
        const uint32_t oh = s.sh.div(static_cast<uint32_t>(hn)), ow = s.sw.div(static_cast<uint32_t>(wn));
        if (s.sh.mod(static_cast<uint32_t>(hn), oh) != 0 || s.sw.mod(static_cast<uint32_t>(wn), ow) != 0) return T(0);
        if (oh >= g.Ho || ow >= g.Wo) return T(0);
        return static_cast<T>(gg[t.b + int64_t(oh) * g.Wo + ow]);
      },
      [&](int m, int, float v) {
        const int64_t c = c0 + m;
        if (!q_ok || c >= Cg) return;
        const int64_t ci = group * Cg + c;
        acc_t r = static_cast<acc_t>(v);
        if (mask != nullptr) {
          const int64_t mc = groups.map_of(ci), mn = mask_batch == 1 ? 0 : int64_t(n);
          r = masked(r, static_cast<acc_t>(mask[(mn * groups.count + mc) * HW + hw]));
        }
        dx[(int64_t(n) * g.C_in + ci) * HW + hw] = static_cast<scalar_t>(r);
      });
}

inline LaunchConfig mma_dgrad_config(const MmaGradShape& s) {
  const Geometry& g = s.gemm.g;
  return {dim3(static_cast<unsigned>(ceil_div(g.N * g.H * g.W, kMmaTileN)),
               static_cast<unsigned>(s.gemm.tiles_per_group * g.groups)),
          dim3(kMmaThreads), 0, true};
}

template <typename scalar_t>
__global__ void __launch_bounds__(kMmaThreads)
    mma_wgrad_kernel(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ xm, MmaGradShape s,
                     float* __restrict__ partial) {
  if (mma_unsupported_arch<scalar_t>()) return;
  using T = typename MmaOperand<scalar_t>::storage_t;
  const GemmShape& gs = s.gemm;
  const Geometry& g = gs.g;
  const int64_t Cg = g.C_in / g.groups, Cog = g.C_out / g.groups, taps = g.win.kh * g.win.kw;
  const int64_t CgT = Cg * taps, P = g.N * g.Ho * g.Wo;
  const int64_t group = blockIdx.y / gs.tiles_per_group, co0 = (blockIdx.y % gs.tiles_per_group) * kMmaTileM;
  const int64_t HW = g.H * g.W, HWo = g.Ho * g.Wo;
  const int64_t kcol = int64_t(blockIdx.x) * kMmaTileN + threadIdx.x % kMmaTileN;  // this thread's (c, i, j)
  const bool col_ok = kcol < CgT;
  const uint32_t c = col_ok ? gs.taps.div(static_cast<uint32_t>(kcol)) : 0;
  const uint32_t tap = col_ok ? gs.taps.mod(static_cast<uint32_t>(kcol), c) : 0;
  const uint32_t i = gs.kw.div(tap), j = gs.kw.mod(tap, i);
  const int64_t k_begin = int64_t(blockIdx.z) * s.k_chunk;
  const int64_t k_end = k_begin + s.k_chunk < P ? k_begin + s.k_chunk : P;
  const scalar_t* gg = gy + group * Cog * HWo;
  const scalar_t* xg = xm + (group * Cg + c) * HW;
  mma_tile<scalar_t>(
      k_begin, k_end,
      [&](int64_t k) {  // k = output pixel (n, oh, ow); a: G's pixel in image n, b: X*M's image n, di/dj: the window
        // origin (oh * sh - ph, ow * sw - pw)
        const uint32_t n = gs.hwo.div(static_cast<uint32_t>(k)), p = gs.hwo.mod(static_cast<uint32_t>(k), n);
        const uint32_t oh = gs.wo.div(p), ow = gs.wo.mod(p, oh);
        return MmaK{int64_t(n) * g.C_out * HWo + p, int64_t(n) * g.C_in * HW,
                    static_cast<int32_t>(int64_t(oh) * g.win.sh - g.win.ph),
                    static_cast<int32_t>(int64_t(ow) * g.win.sw - g.win.pw)};
      },
      [&](int m, const MmaK& t) { return co0 + m < Cog ? static_cast<T>(gg[t.a + (co0 + m) * HWo]) : T(0); },
      [&](const MmaK& t) {
        const int64_t h = t.di + int64_t(i) * g.win.dh, wc = t.dj + int64_t(j) * g.win.dw;
        return col_ok && h >= 0 && h < g.H && wc >= 0 && wc < g.W ? static_cast<T>(xg[t.b + h * g.W + wc]) : T(0);
      },
      [&](int m, int, float v) {
        const int64_t co = co0 + m;
        if (!col_ok || co >= Cog) return;
        partial[(int64_t(blockIdx.z) * g.C_out + group * Cog + co) * CgT + kcol] = v;
      });
}

inline LaunchConfig mma_wgrad_config(const MmaGradShape& s, int64_t splits) {
  const Geometry& g = s.gemm.g;
  const int64_t CgT = g.C_in / g.groups * g.win.kh * g.win.kw;
  return {dim3(static_cast<unsigned>(ceil_div(CgT, kMmaTileN)), static_cast<unsigned>(s.gemm.tiles_per_group * g.groups),
               static_cast<unsigned>(splits)),
          dim3(kMmaThreads), 0, true};
}

// dW = the sum of the splits' partial products, in split order.
template <typename scalar_t>
__global__ void mma_wgrad_reduce_kernel(const float* __restrict__ partial, int64_t splits, int64_t count,
                                        scalar_t* __restrict__ dw) {
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= count) return;
  float sum = 0.0f;
  for (int64_t z = 0; z < splits; ++z) sum += partial[z * count + e];
  dw[e] = static_cast<scalar_t>(sum);
}

inline LaunchConfig mma_wgrad_reduce_config(int64_t count) {
  return {dim3(static_cast<unsigned>(ceil_div(count, kThreads))), dim3(kThreads), 0, false};
}

}  // namespace cuda
}  // namespace pconv
