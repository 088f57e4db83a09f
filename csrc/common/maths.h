// The partial-convolution maths shared by the CPU and CUDA kernels (docs/architecture.md, "The maths").
// Host-and-device code only: no ATen, no launch syntax, so g++ and nvcc read the same definitions.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>
#include <limits>
#include <type_traits>

namespace pconv {

// The accumulation type: double for double, float for float and the half types.
template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Convolution window: kernel, stride, padding, dilation per spatial dimension. A 2-D call (and a 1-D call, which
// is a 2-D call of height 1) has depth 1: kernel 1, stride 1, no padding, so every depth loop runs once.
struct Window {
  int64_t kh, kw;
  int64_t sh, sw;
  int64_t ph, pw;
  int64_t dh, dw;
  int64_t kd = 1, sd = 1, pd = 0, dd = 1;  // depth
};

// Everything an op needs to know about one call, derived once from checked arguments. Spatial sizes are
// (D, H, W), D = 1 for 2-D; every per-pixel pass sees an image as D*H*W pixels and only window sums see the depth.
struct Geometry {
  int64_t N, C_in, H, W;  // input
  int64_t C_out;          // weight.size(0)
  int64_t Ho, Wo;         // output spatial size
  int64_t mask_batch;     // 1 or N (1 also for mask=None)
  int64_t mask_channels;  // G, the mask's maps: 1, C_in (multi-channel), a group count between, or 0 for mask=None
  int64_t groups;
  bool multi_channel;
  Window win;
  int64_t D = 1, Do = 1;  // input and output depth
  int64_t spatial_dims = 2;  // 2 or 3: the tensors' dim() - 2
  C10_HOST_DEVICE int64_t pixels() const { return D * H * W; }
  C10_HOST_DEVICE int64_t out_pixels() const { return Do * Ho * Wo; }
  // sum(1) over a window: kd*kh*kw, times C_in for a multi-channel (or grouped) mask.
  C10_HOST_DEVICE double window_size() const {
    return static_cast<double>(win.kd * win.kh * win.kw * (multi_channel ? C_in : 1));
  }
};

// Which of a mask's G maps each of the C input channels uses, and how often a map counts in S, in the form a
// kernel takes by value (docs/architecture.md, "The maths"). G = 1: one map for every channel; G = C: one map per
// channel (multi-channel); 1 < G < C: map g covers the channels [end[g-1], end[g]) (at most kMaxMaskGroups maps:
// the CUDA primitives expand a mask with more to one map per channel first). `weighted`: map g counts once per
// channel it covers (the expanded multi-channel mask's S); otherwise once (the single-channel mask, G = 1).
constexpr int kMaxMaskGroups = 16;
struct ChannelGroups {
  int64_t channels = 1;  // C: the input's channels
  int64_t count = 1;     // G: the mask's maps
  bool weighted = false;
  int32_t end[kMaxMaskGroups] = {};  // groups only (1 < G < C)
  C10_HOST_DEVICE bool grouped() const { return count > 1 && count < channels; }
  // The map of channel c: a scan of at most kMaxMaskGroups ends (the same for a warp's channel row).
  C10_HOST_DEVICE int64_t map_of(int64_t c) const {
    if (count == 1) return 0;
    if (count == channels) return c;
    int64_t g = 0;
    while (g + 1 < count && c >= end[g]) ++g;
    return g;
  }
  // How many times map g counts in S.
  C10_HOST_DEVICE int64_t weight(int64_t g) const {
    if (!weighted || count == channels) return 1;
    if (count == 1) return channels;
    return end[g] - (g == 0 ? 0 : end[g - 1]);
  }
};

C10_HOST_DEVICE inline int64_t conv_out_size(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d) {
  return (in + 2 * p - d * (k - 1) - 1) / s + 1;
}

// X * M with holes as exact holes: where M == 0 the input's value is never multiplied, so NaN or inf in a hole
// gives 0, not NaN. A NaN in a valid pixel still propagates (it is data).
// The product is formed unconditionally and then selected, so compilers emit a blend (CPU) or a select (GPU)
// instead of a branch that random masks would mispredict.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t masked(acc_t x, acc_t m) {
  const acc_t product = x * m;
  return m == acc_t(0) ? acc_t(0) : product;
}

// A mask value is usable when it lies in [0, 1]; the negated form also rejects NaN.
template <typename acc_t>
C10_HOST_DEVICE inline bool mask_value_invalid(acc_t v) {
  return !(v >= acc_t(0) && v <= acc_t(1));
}

// The value a mask element contributes to the channel-summed plane: itself, or NaN when it is not in [0, 1], so
// that a bad mask value shows as NaN in ratio, U and the output of every window that reads it (the CUDA kernels
// cannot raise an error without a host sync; the CPU raises one before the NaN is used).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t plane_value(acc_t v) {
  return mask_value_invalid(v) ? std::numeric_limits<acc_t>::quiet_NaN() : v;
}

// The renormalisation factor before the update mask: win / S where S > 0, else 0; NaN S (a bad mask value) stays
// NaN. ratio = scale * U, so Y = raw * ratio + b * U = U * (raw * scale + b): the cudnn_fused route's form.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t window_scale(acc_t s, acc_t win) {
  return s > acc_t(0) ? win / s : (s == s ? acc_t(0) : s);
}

// U = clamp(S, 0, 1) and ratio = win / S * U where S > 0, else 0; NaN S (a bad mask value) gives NaN for both.
// No epsilon: win / S is finite for every S > 0 in the accumulation type (float for half types), which is what
// keeps fp16 free of inf.
template <typename acc_t>
C10_HOST_DEVICE inline void ratio_and_update(acc_t s, acc_t win, acc_t* ratio, acc_t* updated_mask) {
  const acc_t u = s > acc_t(0) ? (s < acc_t(1) ? s : acc_t(1)) : (s == s ? acc_t(0) : s);
  *updated_mask = u;
  *ratio = window_scale(s, win) * u;
}

// Sum of one zero-padded (D, H, W) plane over the window of output pixel (od, oh, ow): for each in-bounds (depth,
// row) of the window, the sum of its in-bounds columns, added in (depth, row) order. Every backend adds in this
// association (the CPU forms the row sums once per input row and shares them between windows), so their sums
// agree bitwise.
template <typename acc_t, typename plane_t>
C10_HOST_DEVICE inline acc_t window_sum(const plane_t* plane, int64_t D, int64_t H, int64_t W, const Window& w,
                                        int64_t od, int64_t oh, int64_t ow) {
  acc_t s = acc_t(0);
  const int64_t d0 = od * w.sd - w.pd;
  const int64_t h0 = oh * w.sh - w.ph;
  const int64_t w0 = ow * w.sw - w.pw;
  for (int64_t k = 0; k < w.kd; ++k) {
    const int64_t d = d0 + k * w.dd;
    if (d < 0 || d >= D) continue;
    for (int64_t i = 0; i < w.kh; ++i) {
      const int64_t h = h0 + i * w.dh;
      if (h < 0 || h >= H) continue;
      acc_t row = acc_t(0);
      for (int64_t j = 0; j < w.kw; ++j) {
        const int64_t x = w0 + j * w.dw;
        if (x < 0 || x >= W) continue;
        row += static_cast<acc_t>(plane[(d * H + h) * W + x]);
      }
      s += row;
    }
  }
  return s;
}

// Taps of a window that fall inside [0, size) along one dimension: the window sum of an all-ones mask is the
// product of the dimensions' counts (times C_in for a multi-channel mask), so mask=None needs no mask pass.
C10_HOST_DEVICE inline int64_t taps_in_bounds(int64_t o, int64_t k, int64_t s, int64_t p, int64_t d, int64_t size) {
  const int64_t start = o * s - p;
  int64_t n = 0;
  for (int64_t i = 0; i < k; ++i) {
    const int64_t x = start + i * d;
    n += (x >= 0 && x < size) ? 1 : 0;
  }
  return n;
}

// S of an all-ones mask (mask=None) at output pixel (od, oh, ow).
C10_HOST_DEVICE inline int64_t all_ones_window_sum(const Geometry& g, int64_t od, int64_t oh, int64_t ow) {
  return taps_in_bounds(od, g.win.kd, g.win.sd, g.win.pd, g.win.dd, g.D) *
         taps_in_bounds(oh, g.win.kh, g.win.sh, g.win.ph, g.win.dh, g.H) *
         taps_in_bounds(ow, g.win.kw, g.win.sw, g.win.pw, g.win.dw, g.W) * (g.multi_channel ? g.C_in : 1);
}

// The epilogue: Y = raw * ratio + b * U (bias removed in holes, renormalised elsewhere).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t renormalise(acc_t raw, acc_t ratio, acc_t bias, acc_t updated_mask) {
  return raw * ratio + bias * updated_mask;
}

// Unsigned 32-bit division by a divisor fixed at launch, in a multiply-high, an add and a shift (Granlund and
// Montgomery's round-up method): the per-element kernels split flat indices with it instead of a runtime
// division. Valid for numerators and divisors below 2^31.
struct FastDivmod {
  uint32_t divisor = 1, multiplier = 0, shift = 0;
  FastDivmod() = default;
  explicit FastDivmod(uint32_t d) : divisor(d) {
    while ((uint64_t(1) << shift) < d) ++shift;
    multiplier = static_cast<uint32_t>(((uint64_t(1) << 32) * ((uint64_t(1) << shift) - d)) / d + 1);
  }
  C10_HOST_DEVICE uint32_t div(uint32_t n) const {
#if defined(__CUDA_ARCH__)
    const uint32_t t = __umulhi(n, multiplier);
#else
    const uint32_t t = static_cast<uint32_t>((uint64_t(n) * multiplier) >> 32);
#endif
    return (t + n) >> shift;
  }
  C10_HOST_DEVICE uint32_t mod(uint32_t n, uint32_t q) const { return n - q * divisor; }
};

}  // namespace pconv
