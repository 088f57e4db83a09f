// The CUDA backend's primitives for the op flows of common/op_flow.h: which kernel of kernels.cuh runs, with which
// launch configuration and vector width. A template over a `Launch` policy: cuda_backend.cu instantiates it with
// real launches on the current stream, emu/emu_backend.cpp with the SIMT emulation on CPU tensors. Include
// kernels.cuh (and, for the emulation, simt_emu.h) before this header.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../common/op_flow.h"

namespace pconv {
namespace cuda {

using at::Tensor;

constexpr int64_t kMaxIndex32 = (int64_t(1) << 31) - 1;  // FastDivmod's numerator limit

inline bool aligned(const void* p, size_t bytes) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <typename T>
const T* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

inline void check_index_range(const char* what, int64_t n) {
  TORCH_CHECK(n <= kMaxIndex32, "pconv_cuda (CUDA): ", what, " (", n, ") exceeds 2^31 - 1, which the CUDA kernels "
              "do not support; split the batch");
}

// The kernels' form of a mask's groups over `channels` input channels (maths.h). A grouped mask of more maps than
// ChannelGroups holds is first expanded to one map per channel (expand_groups).
inline bool fits_kernels(const MaskGroups& mg, int64_t channels) {
  return mg.count() <= 1 || mg.count() == channels || mg.count() <= kMaxMaskGroups;
}

inline ChannelGroups channel_groups(const MaskGroups& mg, int64_t channels) {
  ChannelGroups cg;
  cg.channels = channels;
  cg.count = std::max<int64_t>(1, mg.count());
  cg.weighted = mg.weighted;
  if (cg.grouped()) {
    int64_t end = 0;
    for (int64_t g = 0; g < cg.count; ++g) cg.end[g] = static_cast<int32_t>(end += mg.sizes[g]);
  }
  return cg;
}

// A grouped mask as one map per channel (a copy; only past kMaxMaskGroups maps): the same X*M and S.
inline Tensor expand_groups(const Tensor& mask, const MaskGroups& mg, MaskGroups* per_channel) {
  std::vector<int64_t> index;
  for (int64_t g = 0; g < mg.count(); ++g) index.insert(index.end(), mg.sizes[g], g);
  per_channel->sizes.assign(index.size(), 1);
  per_channel->weighted = true;
  const Tensor idx = at::tensor(index, mask.options().dtype(at::kLong));
  return mask.index_select(1, idx).contiguous(layout_of(mask));
}

template <class Launch>
struct CudaPrimitives {
  static constexpr const char* device_type = "cuda";
  Launch& launch;

  static constexpr bool reports_bad_mask = false;

  bool mask_pass(const Tensor& mask_maps, const Tensor& x, Tensor& xm, Tensor& plane, const MaskGroups& groups,
                 int64_t offset = 0) {
    if (plane_pixels(mask_maps) == 0) return true;  // no pixels: nothing to write, the plane is empty too
    int64_t channels = 0;
    for (const int64_t c : groups.sizes) channels += c;
    MaskGroups expanded;
    const bool expand = !fits_kernels(groups, channels);
    const Tensor mask = expand ? expand_groups(mask_maps, groups, &expanded) : mask_maps;
    const ChannelGroups cg = channel_groups(expand ? expanded : groups, channels);
    // An input with no elements (no channels) has no X*M to form; the plane is still the mask's.
    const bool sweep = x.defined() && x.numel() > 0;
    const bool nhwc = is_nhwc(sweep ? xm : mask);  // (a one-channel x reads alike in both layouts, xm not)
    const MaskPassShape s{sweep ? x.size(0) : mask.size(0), sweep ? x.size(1) : mask.size(1),
                          plane_pixels(mask), mask.size(0), mask.size(1), cg, sweep ? xm.size(1) : 0};
    check_index_range("pixels per image", s.HW);
    const at::ScalarType x_dtype = mask_pass_dtype(x, mask, plane);
    dispatch_input_and_mask(x_dtype, mask.scalar_type(), [&]<typename x_t, typename mask_t>() {
      using acc_t = acc_type_t<x_t>;
      constexpr int W = 16 / sizeof(x_t);
      const x_t* xp = sweep ? x.const_data_ptr<x_t>() : nullptr;
      x_t* xmp = sweep ? xm.mutable_data_ptr<x_t>() + offset * (nhwc ? 1 : s.HW) : nullptr;
      acc_t* pp = plane.defined() ? plane.mutable_data_ptr<acc_t>() : nullptr;
      const mask_t* mp = mask.const_data_ptr<mask_t>();
      if (!nhwc) {
        const bool vec = s.HW % W == 0 && aligned(xp, 16) && aligned(xmp, 16) && aligned(mp, W * sizeof(mask_t)) &&
                         aligned(pp, W * sizeof(acc_t));
        int64_t per_group = 0;
        if (vec) {
          const LaunchConfig cfg = mask_pass_nchw_config<W>(s, xp != nullptr, pp != nullptr, &per_group);
          launch(mask_pass_nchw_kernel<x_t, mask_t, W>, cfg, xp, mp, xmp, pp, s, per_group);
        } else {
          const LaunchConfig cfg = mask_pass_nchw_config<1>(s, xp != nullptr, pp != nullptr, &per_group);
          launch(mask_pass_nchw_kernel<x_t, mask_t, 1>, cfg, xp, mp, xmp, pp, s, per_group);
        }
        return;
      }
      check_index_range("pixels in the batch", s.N * s.HW);
      if (xp != nullptr) {
        const MaskPixel mask_pixel{s.Nm == 1 && s.N > 1, FastDivmod(static_cast<uint32_t>(s.HW))};
        const bool vec = s.C % W == 0 && s.Cxm % W == 0 && aligned(xp, 16) && aligned(xmp, 16) &&
                         (s.Cm == 1 || aligned(mp, W * sizeof(mask_t)));  // one mask value per pixel: scalar
        if (vec) {
          launch(mask_pass_nhwc_kernel<x_t, mask_t, W>, nhwc_config(s.N * s.HW, s.C / W), xp, mp, xmp, s, mask_pixel);
        } else {
          launch(mask_pass_nhwc_kernel<x_t, mask_t, 1>, nhwc_config(s.N * s.HW, s.C), xp, mp, xmp, s, mask_pixel);
        }
      }
      if (pp != nullptr) {
        launch(plane_nhwc_kernel<mask_t, acc_t>, plane_nhwc_config(s.Nm * s.HW, s.Cm), mp, pp, s.Nm * s.HW, s.Cm,
               cg);
      }
    });
    return true;  // bad values cannot be reported without a host sync: they show as NaN (maths.h, plane_value)
  }

  void ratio_update(const Tensor& plane, const Geometry& g, Tensor& ratio, Tensor& updated_mask, Tensor& scale) {
    check_index_range("output pixels per image", g.out_pixels());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, updated_mask.scalar_type(), "pconv_ratio", [&] {
      using acc_t = acc_type_t<scalar_t>;
      launch(ratio_kernel<acc_t, scalar_t>, ratio_config(g), ptr_or_null<acc_t>(plane), g,
             FastDivmod(static_cast<uint32_t>(g.Wo)), FastDivmod(static_cast<uint32_t>(g.Ho)),
             ratio.mutable_data_ptr<acc_t>(), updated_mask.mutable_data_ptr<scalar_t>(),
             scale.defined() ? scale.mutable_data_ptr<acc_t>() : nullptr);
    });
  }

  static MapShape map_shape(const Tensor& y, const Tensor& ratio) {
    check_index_range("output planes", y.size(0) * y.size(1));
    return MapShape{y.size(0), y.size(1), plane_pixels(y), ratio.size(0),
                    FastDivmod(static_cast<uint32_t>(std::max<int64_t>(1, y.size(1))))};
  }

  static MaskPixel map_pixel(const MapShape& s) {
    check_index_range("output pixels in the batch", s.N * s.HW);
    return MaskPixel{s.Nm == 1 && s.N > 1, FastDivmod(static_cast<uint32_t>(std::max<int64_t>(1, s.HW)))};
  }

  void epilogue(Tensor& out, const Tensor& ratio, const Tensor& updated_mask, const Tensor& bias, const Geometry& g) {
    const MapShape s = map_shape(out, ratio);
    const bool nhwc = is_nhwc(out);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "pconv_epilogue", [&] {
      using acc_t = acc_type_t<scalar_t>;
      constexpr int W = 16 / sizeof(scalar_t);
      scalar_t* y = out.mutable_data_ptr<scalar_t>();
      const acc_t* r = ratio.const_data_ptr<acc_t>();
      const scalar_t* u = updated_mask.const_data_ptr<scalar_t>();
      const scalar_t* b = ptr_or_null<scalar_t>(bias);
      if (!nhwc) {
        const bool vec = s.HW % W == 0 && aligned(y, 16) && aligned(r, W * sizeof(acc_t)) && aligned(u, 16);
        if (vec) {
          launch(epilogue_nchw_kernel<scalar_t, W>, nchw_config<W>(s.N * s.C, s.HW), y, r, u, b, s);
        } else {
          launch(epilogue_nchw_kernel<scalar_t, 1>, nchw_config<1>(s.N * s.C, s.HW), y, r, u, b, s);
        }
        return;
      }
      const MaskPixel pixel = map_pixel(s);
      if (s.C % W == 0 && aligned(y, 16)) {  // the bias is read element by element
        launch(epilogue_nhwc_kernel<scalar_t, W>, nhwc_config(s.N * s.HW, s.C / W), y, r, u, b, s, pixel);
      } else {
        launch(epilogue_nhwc_kernel<scalar_t, 1>, nhwc_config(s.N * s.HW, s.C), y, r, u, b, s, pixel);
      }
    });
  }

  void grad_output(const Tensor& dy, Tensor& gy, Tensor& db, const Tensor& ratio, const Tensor& updated_mask,
                   const Geometry& g) {
    const MapShape s = map_shape(dy, ratio);
    const bool nhwc = is_nhwc(dy);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "pconv_grad_output", [&] {
      using acc_t = acc_type_t<scalar_t>;
      constexpr int W = 16 / sizeof(scalar_t);
      const scalar_t* d = dy.const_data_ptr<scalar_t>();
      scalar_t* o = gy.mutable_data_ptr<scalar_t>();
      const acc_t* r = ratio.const_data_ptr<acc_t>();
      const scalar_t* u = updated_mask.const_data_ptr<scalar_t>();
      Tensor partial;
      int64_t per_channel = 0;
      if (!nhwc) {
        const int64_t chunks = ceil_div(s.HW, kGradChunk);
        per_channel = s.N * chunks;
        if (db.defined()) partial = at::empty({s.C, per_channel}, ratio.options());
        acc_t* pp = db.defined() ? partial.mutable_data_ptr<acc_t>() : nullptr;
        const bool vec = s.HW % W == 0 && aligned(d, 16) && aligned(o, 16) && aligned(r, W * sizeof(acc_t)) &&
                         aligned(u, 16);
        for (int64_t n0 = 0; n0 < s.N; n0 += kMaxGridY) {  // images in gridDim.z
          const int64_t images = std::min<int64_t>(kMaxGridY, s.N - n0);
          if (vec) {
            launch(grad_output_nchw_kernel<scalar_t, W>, grad_output_nchw_config(s, images), d, o, pp, r, u, s, n0);
          } else {
            launch(grad_output_nchw_kernel<scalar_t, 1>, grad_output_nchw_config(s, images), d, o, pp, r, u, s, n0);
          }
        }
      } else {
        const LaunchConfig cfg = grad_output_nhwc_config(s);
        per_channel = cfg.grid.x;
        if (db.defined()) partial = at::empty({s.C, per_channel}, ratio.options());
        launch(grad_output_nhwc_kernel<scalar_t>, cfg, d, o,
               db.defined() ? partial.mutable_data_ptr<acc_t>() : static_cast<acc_t*>(nullptr), r, u, s,
               map_pixel(s));
      }
      if (!db.defined()) return;
      if (per_channel == 0) {
        db.zero_();  // empty batch or map: no block ran
      } else {
        launch(bias_grad_kernel<scalar_t>, bias_grad_config(s.C), partial.const_data_ptr<acc_t>(),
               db.mutable_data_ptr<scalar_t>(), s.C, per_channel);
      }
    });
  }

  static GemmShape gemm_shape(const Geometry& g, int64_t tile_m) {
    const int64_t taps = g.win.kh * g.win.kw;
    return GemmShape{g,
                     FastDivmod(static_cast<uint32_t>(taps)),
                     FastDivmod(static_cast<uint32_t>(g.win.kw)),
                     FastDivmod(static_cast<uint32_t>(std::max<int64_t>(1, g.Ho * g.Wo))),
                     FastDivmod(static_cast<uint32_t>(g.Wo)),
                     ceil_div(g.C_out / g.groups, tile_m)};
  }

  // Whether the gemm route runs on tensor cores (mma_conv_kernel) for this dtype: half from sm_70, bfloat16 from
  // sm_80, float as TF32 from sm_80 and only while cuDNN may use TF32 for convolutions
  // (torch.backends.cudnn.allow_tf32): otherwise float (strict FP32) and double run the FMA kernel.
  bool tensor_cores(at::ScalarType dtype) const {
    const int cc = launch.compute_capability();
    switch (dtype) {
      case at::kHalf:
        return cc >= 70;
      case at::kBFloat16:
        return cc >= 80;
      case at::kFloat:
        return cc >= 80 && at::globalContext().allowTF32CuDNN();
      default:
        return false;
    }
  }

  bool gemm_supported(const Geometry& g, const Tensor& conv_in) {
    return g.spatial_dims == 2 && layout_of(conv_in) == at::MemoryFormat::Contiguous &&
           ceil_div(g.C_out / g.groups, kTileM) * g.groups <= kMaxGridY && g.N * g.Ho * g.Wo <= kMaxIndex32 &&
           (g.C_in / g.groups) * g.win.kh * g.win.kw <= kMaxIndex32;
  }

  // cuDNN (with our passes) unless the user asked for benchmark mode (torch.backends.cudnn.benchmark), where the
  // gemm kernel and the cudnn_fused graph compete and the fastest route is cached per shape. Both sides compute in
  // the same precision: with TF32 allowed, float runs the gemm route as TF32 on tensor cores, so only a device
  // without TF32 (strict FP32 FMA kernel against TF32 cuDNN: the results would differ, not just the speed) keeps
  // the gemm route out. cudnn_fused has cuDNN's own numerics (its plan deselects TF32 engines when TF32 is off).
  template <class Supported>
  std::vector<Route> auto_candidates(const Geometry& g, const Tensor& input, Supported&& supported) {
    if (!at::globalContext().benchmarkCuDNN()) return {Route::AtenConv};
    std::vector<Route> candidates{Route::AtenConv};
    const bool tf32 = input.scalar_type() == at::kFloat && at::globalContext().allowTF32CuDNN();
    if (!(tf32 && !tensor_cores(at::kFloat)) && supported(Route::Gemm)) candidates.push_back(Route::Gemm);
    if (supported(Route::CudnnFused)) candidates.push_back(Route::CudnnFused);
    return candidates;
  }

  // The cudnn_fused route (cudnn_fused.h), through the Launch policy: real cuDNN on a GPU; the emulation has none.
  bool fused_supported(const Geometry& g, const Tensor& input, bool has_bias) {
    return launch.fused_supported(g, input, has_bias);
  }

  bool fused_conv(const Tensor& conv_in, const Tensor& weight, const Tensor& bias, const Tensor& factor,
                  const Tensor& updated_mask, const Geometry& g, Tensor& out) {
    return launch.fused_conv(conv_in, weight, bias, factor, updated_mask, g, out);
  }

  Tensor gemm_conv(const Tensor& conv_in, const Tensor& weight, const Tensor& bias, const Tensor& ratio,
                   const Tensor& updated_mask, const Geometry& g) {
    Tensor out = at::empty({g.N, g.C_out, g.Ho, g.Wo}, conv_in.options());
    const Tensor w = weight.contiguous();
    const bool mma = tensor_cores(conv_in.scalar_type());
    const GemmShape s = gemm_shape(g, mma ? kMmaTileM : kTileM);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, conv_in.scalar_type(), "pconv_gemm", [&] {
      using acc_t = acc_type_t<scalar_t>;
      const scalar_t* xp = conv_in.const_data_ptr<scalar_t>();
      const scalar_t* wp = w.const_data_ptr<scalar_t>();
      const scalar_t* bp = ptr_or_null<scalar_t>(bias);
      const acc_t* rp = ratio.const_data_ptr<acc_t>();
      const scalar_t* up = updated_mask.const_data_ptr<scalar_t>();
      scalar_t* yp = out.mutable_data_ptr<scalar_t>();
      if constexpr (std::is_same_v<scalar_t, double>) {
        launch(gemm_conv_kernel<scalar_t>, gemm_conv_config(s), xp, wp, bp, rp, up, s, yp);
      } else {
        if (mma) {
          launch(mma_conv_kernel<scalar_t>, mma_conv_config(s), xp, wp, bp, rp, up, s, yp);
        } else {
          launch(gemm_conv_kernel<scalar_t>, gemm_conv_config(s), xp, wp, bp, rp, up, s, yp);
        }
      }
    });
    return out;
  }

  // The gemm route's backward on tensor cores: dX (M applied) and dW from G = dY * ratio and X*M (kernels.cuh,
  // mma_dgrad_kernel / mma_wgrad_kernel). False, leaving dx and dw alone, where it cannot run: a dtype or GPU
  // without tensor-core fragments (tensor_cores), channels_last, 3-D, or sizes past the kernels' index range.
  bool gemm_backward(const Tensor& gy, const Tensor& conv_in, const Tensor& mask_maps, const MaskGroups& groups,
                     const Tensor& weight, const Geometry& g, Tensor* dx, Tensor* dw) {
    const int64_t Cg = g.C_in / g.groups, Cog = g.C_out / g.groups, taps = g.win.kh * g.win.kw;
    const bool nchw = layout_of(gy) == at::MemoryFormat::Contiguous && layout_of(conv_in) == at::MemoryFormat::Contiguous;
    if (g.spatial_dims != 2 || !nchw || !tensor_cores(gy.scalar_type())) return false;
    if (g.N * g.H * g.W > kMaxIndex32 || g.N * g.Ho * g.Wo > kMaxIndex32 || Cg * taps > kMaxIndex32 ||
        Cog * taps > kMaxIndex32 || g.H + g.win.ph > kMaxIndex32 || g.W + g.win.pw > kMaxIndex32) {
      return false;
    }
    const int64_t tiles_c = ceil_div(Cg, kMmaTileM), tiles_o = ceil_div(Cog, kMmaTileM);
    if (tiles_c * g.groups > kMaxGridY || tiles_o * g.groups > kMaxGridY) return false;
    const Tensor w = weight.contiguous();
    MmaGradShape s{gemm_shape(g, kMmaTileM), FastDivmod(static_cast<uint32_t>(std::max<int64_t>(1, g.H * g.W))),
                   FastDivmod(static_cast<uint32_t>(g.W)), FastDivmod(static_cast<uint32_t>(g.win.sh)),
                   FastDivmod(static_cast<uint32_t>(g.win.sw)), 0};
    if (dx != nullptr) {
      MaskGroups expanded;
      const bool expand = mask_maps.defined() && !fits_kernels(groups, g.C_in);
      const Tensor mask = expand ? expand_groups(mask_maps, groups, &expanded) : mask_maps;
      const ChannelGroups cg = channel_groups(expand ? expanded : groups, g.C_in);
      *dx = at::empty(conv_in.sizes(), conv_in.options());
      s.gemm.tiles_per_group = tiles_c;
      const at::ScalarType mask_dtype = mask.defined() ? mask.scalar_type() : gy.scalar_type();
      dispatch_input_and_mask(gy.scalar_type(), mask_dtype, [&]<typename x_t, typename mask_t>() {
        if constexpr (!std::is_same_v<x_t, double>) {
          launch(mma_dgrad_kernel<x_t, mask_t>, mma_dgrad_config(s), gy.const_data_ptr<x_t>(), w.const_data_ptr<x_t>(),
                 ptr_or_null<mask_t>(mask), mask.defined() ? mask.size(0) : int64_t(1), cg, s,
                 dx->mutable_data_ptr<x_t>());
        }
      });
    }
    if (dw != nullptr) {
      // Split K (the N*H'*W' pixels) until ~2 blocks per SM of a large GPU run, each split at least 512 pixels.
      const int64_t P = g.N * g.Ho * g.Wo, tiles = ceil_div(Cg * taps, kMmaTileN) * tiles_o * g.groups;
      const int64_t splits = std::clamp<int64_t>(std::min(ceil_div(P, 512), ceil_div(264, tiles)), 1, kMaxGridY);
      s.k_chunk = ceil_div(ceil_div(std::max<int64_t>(P, 1), splits), kMmaTileK) * kMmaTileK;
      s.gemm.tiles_per_group = tiles_o;
      const int64_t used = ceil_div(std::max<int64_t>(P, 1), s.k_chunk), count = g.C_out * Cg * taps;
      Tensor partial = at::empty({used, count}, gy.options().dtype(at::kFloat));
      *dw = at::empty(w.sizes(), w.options());
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gy.scalar_type(), "pconv_mma_wgrad", [&] {
        if constexpr (!std::is_same_v<scalar_t, double>) {
          launch(mma_wgrad_kernel<scalar_t>, mma_wgrad_config(s, used), gy.const_data_ptr<scalar_t>(),
                 conv_in.const_data_ptr<scalar_t>(), s, partial.mutable_data_ptr<float>());
          launch(mma_wgrad_reduce_kernel<scalar_t>, mma_wgrad_reduce_config(count), partial.const_data_ptr<float>(),
                 used, count, dw->mutable_data_ptr<scalar_t>());
        }
      });
    }
    return true;
  }

  template <class Fn>
  double time_ms(Fn&& fn) {
    return launch.time_ms(fn);
  }
};

}  // namespace cuda
}  // namespace pconv
