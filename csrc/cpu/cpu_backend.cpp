// The CPU backend: the primitives of common/op_flow.h as loops over at::parallel_for (parallel_loop), ATen's
// convolution (oneDNN) on the aten_conv route, and an im2col + GEMM per image on the gemm route (small output maps,
// see CpuPrimitives::auto_candidates).
#include <ATen/ATen.h>
#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <atomic>
#include <chrono>
#include <string>
#include <vector>

#include "../common/maths.h"
#include "../common/op_flow.h"

namespace pconv {
namespace {

using at::Tensor;

// Work items below which a loop stays on one thread.
constexpr int64_t kGrainElements = 32768;

int64_t grain_for(int64_t elements_per_item) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, elements_per_item));
}

// at::parallel_for whose ranges run compiled for AVX2 (with FMA and F16C) on CPUs that have it. The extension is
// built for baseline x86-64, where GCC vectorises these loops 4 floats wide (SSE2), while ATen dispatches its own
// loops per CPU to AVX2/AVX-512. `flatten` inlines the whole range function, its loops included, into a wrapper
// compiled for AVX2, so the same source runs 8 wide (the X*M pass of a 192-channel 128x128 map: 0.48 -> 0.27 ms in a
// stand-alone loop here, 2 threads; the epilogue ~2x). setup.py builds with -ffp-contract=off, so no multiply-add is
// fused, and GCC reassociates no sum: both forms round alike (tests/test_cpu_vector.py compares them bitwise).
#if defined(__x86_64__) && defined(__GNUC__)
template <class F>
__attribute__((target("avx2,fma,f16c"), flatten)) void run_avx2(const F& f, int64_t begin, int64_t end) {
  f(begin, end);
}

// ATen's choice for its own loops (ATEN_CPU_CAPABILITY=default forces the baseline form here too; the tests
// compare both forms that way), and the CPU's.
inline bool cpu_has_avx2() {
  static const bool has = (at::get_cpu_capability() == "AVX2" || at::get_cpu_capability() == "AVX512") &&
                          __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return has;
}
#endif

template <class F>
void parallel_loop(int64_t begin, int64_t end, int64_t grain, const F& f) {
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (cpu_has_avx2()) return run_avx2(f, b, e);
#endif
    f(b, e);
  });
}

// The layout the flow gave a tensor (op_flow.h, layout_of): the loops have an NCHW and an NHWC form.
bool is_channels_last(const Tensor& t) { return is_nhwc(t); }

// f(i, n, p) for the global pixels i in [begin, end), i = n * HW + p: one division per range, not per pixel (a 64-bit
// division per pixel cost ~1 ms per U-Net enc1 call in the NHWC loops, as much as the convolution itself).
template <class F>
inline void for_each_pixel(int64_t begin, int64_t end, int64_t HW, const F& f) {
  int64_t n = begin / HW, p = begin % HW;
  for (int64_t i = begin; i < end; ++i) {
    f(i, n, p);
    if (++p == HW) {
      p = 0;
      ++n;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Mask pass: one read of M, and of X when `x` is given. For the first mask_batch images, plane[n] = the sum over
// the mask's maps of weight(g) * M[n, g] (MaskGroups: once, or once per channel the map covers), with every value
// checked to lie in [0, 1]; and xm = X * M (M broadcast over batch, and channel c reading its group's map) is
// written in the same sweep, so the masked input costs no extra pass over M; into channels [offset, offset + C)
// of xm, which may have more channels (masked_cat's output).
// Tensors are contiguous in `fmt` (NCHW or NHWC). Returns false if some mask value was outside [0, 1] or NaN.
template <typename scalar_t, typename mask_t, typename acc_t>
bool mask_pass_kernel(const Tensor& mask, acc_t* plane, const Tensor* x_t, Tensor* xm_t, const MaskGroups& groups,
                      int64_t offset) {
  const int64_t Nm = mask.size(0), Cm = mask.size(1), HW = plane_pixels(mask);
  const int64_t N = x_t ? x_t->size(0) : Nm;
  const int64_t C = x_t ? x_t->size(1) : Cm;
  const int64_t Cxm = xm_t ? xm_t->size(1) : C;  // xm's channels, of which this pass writes C from `offset`
  // (xm's layout decides: a one-channel input reads alike in both, the wider output does not)
  const bool nhwc = is_channels_last(xm_t ? *xm_t : mask);
  const mask_t* m = mask.const_data_ptr<mask_t>();
  const scalar_t* x = x_t ? x_t->const_data_ptr<scalar_t>() : nullptr;
  scalar_t* xm = xm_t ? xm_t->mutable_data_ptr<scalar_t>() : nullptr;
  // Map g covers the channels [first[g], first[g + 1]) and counts weight[g] times in the plane.
  std::vector<int64_t> first(Cm + 1, 0);
  std::vector<acc_t> weight(Cm);
  for (int64_t gi = 0; gi < Cm; ++gi) {
    const int64_t size = x_t ? groups.sizes[gi] : 1;
    first[gi + 1] = first[gi] + size;
    weight[gi] = static_cast<acc_t>(groups.weighted ? groups.sizes[gi] : 1);
  }
  std::atomic<bool> invalid{false};
  // NCHW reads C rows per run of pixels: runs of >= 4096 pixels keep each row segment long enough to stream.
  const int64_t grain = nhwc ? grain_for(C) : std::max<int64_t>(4096, grain_for(C));
  parallel_loop(0, N * HW, grain, [&](int64_t begin, int64_t end) {
    // An unsigned OR, not a bool: `bool |= a && b` is control flow to GCC and keeps the loops scalar (3.5x slower
    // on a 67-channel mask).
    unsigned bad = 0;
    if (nhwc) {
      for_each_pixel(begin, end, HW, [&](int64_t i, int64_t n, int64_t p) {
        const mask_t* mi = m + ((Nm == 1 ? 0 : n) * HW + p) * Cm;
        if (x) {
          const scalar_t* xi = x + i * C;
          scalar_t* oi = xm + i * Cxm + offset;
          if (Cm == C || Cm == 1) {  // one map per channel, or one for all: the channel loop vectorises
            for (int64_t c = 0; c < C; ++c) {
              oi[c] = static_cast<scalar_t>(masked(static_cast<acc_t>(xi[c]), static_cast<acc_t>(mi[Cm == 1 ? 0 : c])));
            }
          } else {
            for (int64_t gi = 0; gi < Cm; ++gi) {
              const acc_t mv = static_cast<acc_t>(mi[gi]);
              for (int64_t c = first[gi]; c < first[gi + 1]; ++c) {
                oi[c] = static_cast<scalar_t>(masked(static_cast<acc_t>(xi[c]), mv));
              }
            }
          }
        }
        if (plane && n < Nm) {
          acc_t s = acc_t(0);
          for (int64_t c = 0; c < Cm; ++c) {  // mi is hot in cache from the multiply above
            const acc_t v = static_cast<acc_t>(mi[c]);
            bad |= unsigned(mask_value_invalid(v));
            s += weight[c] * v;
          }
          plane[n * HW + p] = s;
        }
      });
    } else {
      // Per image, a run of pixels [p0, p1), map by map and channel-outer, so every row is read contiguously.
      for (int64_t i = begin; i < end;) {
        const int64_t n = i / HW, p0 = i % HW, p1 = std::min(HW, p0 + (end - i));
        const int64_t nm = Nm == 1 ? 0 : n;
        acc_t* pl = plane && n < Nm ? plane + n * HW : nullptr;
        if (pl) std::fill(pl + p0, pl + p1, acc_t(0));
        for (int64_t gi = 0; gi < Cm; ++gi) {
          const mask_t* mr = m + (nm * Cm + gi) * HW;
          for (int64_t c = first[gi]; x && c < first[gi + 1]; ++c) {
            const scalar_t* xr = x + (n * C + c) * HW;
            scalar_t* orow = xm + (n * Cxm + offset + c) * HW;
            for (int64_t p = p0; p < p1; ++p) {
              orow[p] = static_cast<scalar_t>(masked(static_cast<acc_t>(xr[p]), static_cast<acc_t>(mr[p])));
            }
          }
          if (pl) {  // a second loop keeps both vectorisable; the row is in L1 by now
            const acc_t w = weight[gi];
            for (int64_t p = p0; p < p1; ++p) {
              const acc_t v = static_cast<acc_t>(mr[p]);
              bad |= unsigned(mask_value_invalid(v));
              pl[p] += w * v;
            }
          }
        }
        i += p1 - p0;
      }
    }
    if (bad != 0) invalid.store(true, std::memory_order_relaxed);
  });
  return !invalid.load();
}

// S per output pixel from the channel-summed plane, then ratio and U, in two vectorisable passes: the row sums
// R[n, d, h, ow] (the window's columns of output column ow, on input row (d, h)), formed tap by tap over the output
// columns each tap keeps inside the row; then S = the sum of R over the window's in-bounds (depth, row) pairs, a
// contiguous add per pair. kw + kd*kh adds per output pixel instead of kd*kh*kw, and none of them tests bounds.
// The association is window_sum's (maths.h): the sums are bitwise those of the CUDA kernel.
template <typename acc_t, typename update_t>
void ratio_kernel(const acc_t* plane, const Geometry& g, acc_t* ratio, update_t* updated_mask) {
  const acc_t win = static_cast<acc_t>(g.window_size());
  const Window& w = g.win;
  std::vector<int64_t> col_begin(w.kw), col_end(w.kw);  // output columns [begin, end) whose tap j is inside
  for (int64_t j = 0; j < w.kw; ++j) {
    const int64_t offset = j * w.dw - w.pw;  // input column of output column ow: ow * sw + offset
    col_begin[j] = std::min(g.Wo, offset >= 0 ? 0 : (-offset + w.sw - 1) / w.sw);
    col_end[j] = g.W - 1 - offset < 0 ? 0 : std::min(g.Wo, (g.W - 1 - offset) / w.sw + 1);
  }
  const int64_t input_rows = g.mask_batch * g.D * g.H;
  std::vector<acc_t> row_sums(input_rows * g.Wo);
  parallel_loop(0, input_rows, grain_for(g.Wo * w.kw), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const acc_t* line = plane + r * g.W;
      acc_t* sums = row_sums.data() + r * g.Wo;
      std::fill(sums, sums + g.Wo, acc_t(0));
      for (int64_t j = 0; j < w.kw; ++j) {
        const int64_t offset = j * w.dw - w.pw;
        for (int64_t ow = col_begin[j]; ow < col_end[j]; ++ow) sums[ow] += line[ow * w.sw + offset];
      }
    }
  });
  const int64_t output_rows = g.mask_batch * g.Do * g.Ho;  // (n, od, oh)
  parallel_loop(0, output_rows, grain_for(g.Wo * w.kd * w.kh), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> s(g.Wo);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t image = row / g.Ho, oh = row % g.Ho;  // image = n * Do + od
      const int64_t n = image / g.Do, od = image % g.Do;
      std::fill(s.begin(), s.end(), acc_t(0));
      for (int64_t k = 0; k < w.kd; ++k) {
        const int64_t d = od * w.sd - w.pd + k * w.dd;
        if (d < 0 || d >= g.D) continue;
        for (int64_t i = 0; i < w.kh; ++i) {
          const int64_t h = oh * w.sh - w.ph + i * w.dh;
          if (h < 0 || h >= g.H) continue;
          const acc_t* sums = row_sums.data() + ((n * g.D + d) * g.H + h) * g.Wo;
          for (int64_t ow = 0; ow < g.Wo; ++ow) s[ow] += sums[ow];
        }
      }
      for (int64_t ow = 0; ow < g.Wo; ++ow) {
        acc_t r, u;
        ratio_and_update(s[ow], win, &r, &u);
        ratio[row * g.Wo + ow] = r;
        updated_mask[row * g.Wo + ow] = static_cast<update_t>(u);
      }
    }
  });
}

// mask=None: S is the number of in-bounds taps (times C_in for multi-channel); no mask exists to read. The count
// factors into a count per dimension (all_ones_window_sum), each computed once.
template <typename acc_t, typename update_t>
void ratio_all_ones_kernel(const Geometry& g, acc_t* ratio, update_t* updated_mask) {
  const acc_t win = static_cast<acc_t>(g.window_size());
  const Window& w = g.win;
  std::vector<int64_t> depths(g.Do), rows(g.Ho), cols(g.Wo);
  for (int64_t od = 0; od < g.Do; ++od) depths[od] = taps_in_bounds(od, w.kd, w.sd, w.pd, w.dd, g.D);
  for (int64_t oh = 0; oh < g.Ho; ++oh) rows[oh] = taps_in_bounds(oh, w.kh, w.sh, w.ph, w.dh, g.H);
  for (int64_t ow = 0; ow < g.Wo; ++ow) cols[ow] = taps_in_bounds(ow, w.kw, w.sw, w.pw, w.dw, g.W);
  const int64_t channels = g.multi_channel ? g.C_in : 1;
  for (int64_t od = 0; od < g.Do; ++od) {
    for (int64_t oh = 0; oh < g.Ho; ++oh) {
      const int64_t row = od * g.Ho + oh;
      for (int64_t ow = 0; ow < g.Wo; ++ow) {
        acc_t r, u;
        ratio_and_update(static_cast<acc_t>(depths[od] * rows[oh] * cols[ow] * channels), win, &r, &u);
        ratio[row * g.Wo + ow] = r;
        updated_mask[row * g.Wo + ow] = static_cast<update_t>(u);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Epilogue, in place on the conv output: Y = raw * ratio + b * U. `out` is contiguous in NCHW or NHWC.
template <typename scalar_t, typename acc_t>
void epilogue_kernel(Tensor& out, const acc_t* ratio, const scalar_t* updated_mask, const scalar_t* bias,
                     const Geometry& g) {
  using opmath_t = acc_t;  // float for half types
  scalar_t* y = out.mutable_data_ptr<scalar_t>();
  const int64_t HW = g.out_pixels(), C = g.C_out;
  const int64_t mask_stride = g.mask_batch == 1 ? 0 : HW;
  if (is_channels_last(out)) {
    parallel_loop(0, g.N * HW, grain_for(C), [&](int64_t begin, int64_t end) {
      for_each_pixel(begin, end, HW, [&](int64_t i, int64_t n, int64_t p) {
        const opmath_t r = static_cast<opmath_t>(ratio[n * mask_stride + p]);
        const opmath_t u = static_cast<opmath_t>(updated_mask[n * mask_stride + p]);
        scalar_t* yi = y + i * C;
        for (int64_t c = 0; c < C; ++c) {
          const opmath_t b = bias ? static_cast<opmath_t>(bias[c]) : opmath_t(0);
          yi[c] = static_cast<scalar_t>(renormalise(static_cast<opmath_t>(yi[c]), r, b, u));
        }
      });
    });
  } else {
    parallel_loop(0, g.N * C, grain_for(HW), [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t n = plane / C, c = plane % C;
        const acc_t* r = ratio + n * mask_stride;
        const scalar_t* u = updated_mask + n * mask_stride;
        const opmath_t b = bias ? static_cast<opmath_t>(bias[c]) : opmath_t(0);
        scalar_t* yp = y + plane * HW;
        for (int64_t p = 0; p < HW; ++p) {
          yp[p] = static_cast<scalar_t>(
              renormalise(static_cast<opmath_t>(yp[p]), static_cast<opmath_t>(r[p]), b, static_cast<opmath_t>(u[p])));
        }
      }
    });
  }
}

// grad_output pass: G = dY * ratio and db[c] = sum dY * U, one read of dY. db is deterministic: its partial sums
// are taken over a fixed partition of the pixels and added in a fixed order, whatever the thread count.
template <typename scalar_t, typename acc_t>
void grad_output_kernel(const Tensor& dy, Tensor& gy, scalar_t* db, const acc_t* ratio, const scalar_t* updated_mask,
                        const Geometry& g) {
  using opmath_t = acc_t;  // float for half types
  const scalar_t* d = dy.const_data_ptr<scalar_t>();
  scalar_t* o = gy.mutable_data_ptr<scalar_t>();
  const int64_t HW = g.out_pixels(), C = g.C_out;
  const int64_t mask_stride = g.mask_batch == 1 ? 0 : HW;
  if (is_channels_last(dy)) {
    constexpr int64_t kChunk = 1024;  // pixels per partial sum
    const int64_t pixels = g.N * HW;
    const int64_t chunks = (pixels + kChunk - 1) / kChunk;
    std::vector<opmath_t> partial(db ? chunks * C : 0, opmath_t(0));
    parallel_loop(0, chunks, grain_for(kChunk * C), [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        opmath_t* acc = db ? partial.data() + k * C : nullptr;
        for_each_pixel(k * kChunk, std::min(pixels, (k + 1) * kChunk), HW, [&](int64_t i, int64_t n, int64_t p) {
          const opmath_t r = static_cast<opmath_t>(ratio[n * mask_stride + p]);
          const opmath_t u = static_cast<opmath_t>(updated_mask[n * mask_stride + p]);
          for (int64_t c = 0; c < C; ++c) {
            const opmath_t v = static_cast<opmath_t>(d[i * C + c]);
            o[i * C + c] = static_cast<scalar_t>(v * r);
            if (acc) acc[c] += v * u;
          }
        });
      }
    });
    if (db) {
      for (int64_t c = 0; c < C; ++c) {
        opmath_t s = opmath_t(0);
        for (int64_t k = 0; k < chunks; ++k) s += partial[k * C + c];
        db[c] = static_cast<scalar_t>(s);
      }
    }
  } else {
    // One channel per work item: db[c] is owned by one thread.
    parallel_loop(0, C, grain_for(g.N * HW), [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        opmath_t total = opmath_t(0);
        for (int64_t n = 0; n < g.N; ++n) {
          const acc_t* r = ratio + n * mask_stride;
          const scalar_t* u = updated_mask + n * mask_stride;
          const scalar_t* dp = d + (n * C + c) * HW;
          scalar_t* op = o + (n * C + c) * HW;
          // kLanes interleaved partial sums (added in a fixed order below) break the add chain, so the loop
          // vectorises without reassociating anything at run time: still deterministic.
          constexpr int64_t kLanes = 16;
          opmath_t lanes[kLanes] = {};
          int64_t p = 0;
          for (; p + kLanes <= HW; p += kLanes) {
            for (int64_t l = 0; l < kLanes; ++l) {
              const opmath_t v = static_cast<opmath_t>(dp[p + l]);
              op[p + l] = static_cast<scalar_t>(v * static_cast<opmath_t>(r[p + l]));
              lanes[l] += v * static_cast<opmath_t>(u[p + l]);
            }
          }
          for (; p < HW; ++p) {
            const opmath_t v = static_cast<opmath_t>(dp[p]);
            op[p] = static_cast<scalar_t>(v * static_cast<opmath_t>(r[p]));
            lanes[0] += v * static_cast<opmath_t>(u[p]);
          }
          for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
        }
        if (db) db[c] = static_cast<scalar_t>(total);
      }
    });
  }
}

// ---------------------------------------------------------------------------------------------------------------
// gemm route: im2col of the convolution's input (X*M, already masked) and a GEMM per image and group. NCHW only.
template <typename scalar_t>
void im2col_kernel(const scalar_t* x, int64_t c0, int64_t Cg, const Geometry& g, scalar_t* cols) {
  const Window& w = g.win;
  const int64_t HWo = g.Ho * g.Wo, HW = g.H * g.W;
  parallel_loop(0, Cg * w.kh * w.kw, grain_for(HWo), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t c = r / (w.kh * w.kw), i = (r / w.kw) % w.kh, j = r % w.kw;
      const scalar_t* xc = x + (c0 + c) * HW;
      scalar_t* row = cols + r * HWo;
      for (int64_t oh = 0; oh < g.Ho; ++oh) {
        const int64_t h = oh * w.sh - w.ph + i * w.dh;
        scalar_t* dst = row + oh * g.Wo;
        if (h < 0 || h >= g.H) {
          std::fill(dst, dst + g.Wo, scalar_t(0));
          continue;
        }
        for (int64_t ow = 0; ow < g.Wo; ++ow) {
          const int64_t col = ow * w.sw - w.pw + j * w.dw;
          dst[ow] = col >= 0 && col < g.W ? xc[h * g.W + col] : scalar_t(0);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------
struct CpuPrimitives {
  static constexpr const char* device_type = "cpu";

  static constexpr bool reports_bad_mask = true;

  bool mask_pass(const Tensor& mask, const Tensor& x, Tensor& xm, Tensor& plane, const MaskGroups& groups,
                 int64_t offset = 0) {
    const at::ScalarType x_dtype = mask_pass_dtype(x, mask, plane);
    bool valid = true;
    dispatch_input_and_mask(x_dtype, mask.scalar_type(), [&]<typename x_t, typename mask_t>() {
      using acc_t = acc_type_t<x_t>;
      valid = mask_pass_kernel<x_t, mask_t, acc_t>(mask, plane.defined() ? plane.mutable_data_ptr<acc_t>() : nullptr,
                                                   x.defined() ? &x : nullptr, x.defined() ? &xm : nullptr, groups,
                                                   offset);
    });
    return valid;
  }

  void ratio_update(const Tensor& plane, const Geometry& g, Tensor& ratio, Tensor& updated_mask, Tensor& scale) {
    TORCH_INTERNAL_ASSERT(!scale.defined(), "scale is only asked for by the cudnn_fused route, which the CPU lacks");
    AT_DISPATCH_FLOATING_TYPES(ratio.scalar_type(), "pconv_ratio", [&] {
      using acc_t = scalar_t;
      acc_t* ratio_p = ratio.mutable_data_ptr<acc_t>();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, updated_mask.scalar_type(), "pconv_ratio_update", [&] {
        if (plane.defined()) {
          ratio_kernel<acc_t>(plane.const_data_ptr<acc_t>(), g, ratio_p, updated_mask.mutable_data_ptr<scalar_t>());
        } else {
          ratio_all_ones_kernel<acc_t>(g, ratio_p, updated_mask.mutable_data_ptr<scalar_t>());
        }
      });
    });
  }

  void epilogue(Tensor& out, const Tensor& ratio, const Tensor& updated_mask, const Tensor& bias, const Geometry& g) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "pconv_epilogue", [&] {
      using acc_t = acc_type_t<scalar_t>;
      epilogue_kernel<scalar_t, acc_t>(out, ratio.const_data_ptr<acc_t>(), updated_mask.const_data_ptr<scalar_t>(),
                                       bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr, g);
    });
  }

  void grad_output(const Tensor& dy, Tensor& gy, Tensor& db, const Tensor& ratio, const Tensor& updated_mask,
                   const Geometry& g) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "pconv_grad_output", [&] {
      using acc_t = acc_type_t<scalar_t>;
      grad_output_kernel<scalar_t, acc_t>(dy, gy, db.defined() ? db.mutable_data_ptr<scalar_t>() : nullptr,
                                          ratio.const_data_ptr<acc_t>(), updated_mask.const_data_ptr<scalar_t>(), g);
    });
  }

  bool gemm_supported(const Geometry& g, const Tensor& conv_in) {
    return g.spatial_dims == 2 && layout_of(conv_in) == at::MemoryFormat::Contiguous;
  }

  // On small output maps oneDNN's per-call cost dominates and a GEMM over im2col wins (0.6x-0.9x of aten_conv at
  // 4..64 output pixels); on large maps im2col's traffic loses (up to 9x). Measurements: docs/benchmarks.md.
  // oneDNN always: once X*M is formed for the backward anyway, im2col + GEMM lost on every U-Net layer measured
  // (1.3x-1.5x slower on the 4..64-pixel maps where it used to win by skipping X*M; docs/benchmarks.md).
  template <class Supported>
  std::vector<Route> auto_candidates(const Geometry& g, const Tensor& input, Supported&&) {
    return {Route::AtenConv};
  }

  // cudnn_fused is a CUDA route (routes.cpp refuses to force it on the CPU).
  bool fused_supported(const Geometry&, const Tensor&, bool) { return false; }
  bool fused_conv(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Geometry&, Tensor&) {
    return false;
  }

  // The backward always runs ATen's convolution backward on the CPU.
  bool gemm_backward(const Tensor&, const Tensor&, const Tensor&, const MaskGroups&, const Tensor&, const Geometry&,
                     Tensor*, Tensor*) {
    return false;
  }

  Tensor gemm_conv(const Tensor& conv_in, const Tensor& weight, const Tensor& bias, const Tensor& ratio,
                   const Tensor& updated_mask, const Geometry& g) {
    const int64_t Cg = g.C_in / g.groups, Cog = g.C_out / g.groups, HWo = g.Ho * g.Wo;
    const int64_t K = Cg * g.win.kh * g.win.kw;
    Tensor out = at::empty({g.N, g.C_out, g.Ho, g.Wo}, conv_in.options());
    Tensor cols = at::empty({K, HWo}, conv_in.options());
    const Tensor w2 = weight.contiguous().view({g.C_out, K});
    for (int64_t n = 0; n < g.N; ++n) {
      Tensor out_n = out[n].view({g.C_out, HWo});
      for (int64_t gi = 0; gi < g.groups; ++gi) {
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, conv_in.scalar_type(), "pconv_im2col", [&] {
          im2col_kernel<scalar_t>(conv_in.const_data_ptr<scalar_t>() + n * g.C_in * g.H * g.W, gi * Cg, Cg, g,
                                  cols.mutable_data_ptr<scalar_t>());
        });
        Tensor dst = out_n.narrow(0, gi * Cog, Cog);
        at::mm_out(dst, w2.narrow(0, gi * Cog, Cog), cols);
      }
    }
    epilogue(out, ratio, updated_mask, bias, g);
    return out;
  }

  template <class Fn>
  double time_ms(Fn&& fn) {
    const auto start = std::chrono::steady_clock::now();
    fn();
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  }
};

// The op flows (op_flow.h, impl_ops) run with these primitives.
struct CpuBackend {
  template <class Fn>
  static auto run(const Tensor&, Fn&& fn) {
    CpuPrimitives prim;
    return fn(prim);
  }
};

}  // namespace
}  // namespace pconv

TORCH_LIBRARY_IMPL(pconv_cuda, CPU, m) { pconv::impl_ops<pconv::CpuBackend>(m); }
