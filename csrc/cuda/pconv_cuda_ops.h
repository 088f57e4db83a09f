// The CUDA backend's op implementations: which kernels run, in what order, with which launch configuration.
// Written once as templates over a `Launch` policy: pconv_cuda.cu instantiates them with real CUDA launches
// (<<<>>> on the current stream), emu/pconv_emu.cpp with the SIMT emulation on CPU tensors. Include
// pconv_kernels.cuh (and, for the emulation, simt_emu.h) before this header.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch_v2.h>

#include <string>
#include <tuple>
#include <type_traits>

#include "../common/pconv_args.h"

namespace pconv {
namespace cuda {

using at::Tensor;

enum class Route { Vendor, OnePass };

// PCONV_CUDA_ROUTE=auto|vendor|one_pass (default auto). The auto rule is reasoned, not measured (no GPU was
// available to this project): the one-pass kernel uses plain FMA, so it takes the convolutions where the vendor
// route's extra passes and launches weigh most against a small GEMM: fp32/fp64, C_out <= 64 and
// C_in/groups*kh*kw <= 1024; cuDNN keeps everything else (and half types, for its tensor cores). A multi-channel
// mask with groups > 1 always takes the vendor route (the one-pass kernel sums S within one group).
inline Route choose_route(const Geometry& g, at::ScalarType dtype) {
  const std::string choice = route_choice("PCONV_CUDA_ROUTE");
  // gridDim.y holds the channel tiles (one-pass) and the channels (grad kernel): at most 65535.
  const bool supported = (g.groups == 1 || !g.multi_channel || g.mask_channels == 0) &&
                         ceil_div(g.C_out / g.groups, kTileM) * g.groups <= kMaxGridY;
  if (choice == "vendor" || !supported) return Route::Vendor;
  if (choice == "one_pass") return Route::OnePass;
  const int64_t K = (g.C_in / g.groups) * g.win.kh * g.win.kw;
  const bool full_precision = dtype == at::kFloat || dtype == at::kDouble;
  return full_precision && g.C_out <= 64 && K <= 1024 ? Route::OnePass : Route::Vendor;
}

inline bool has(const c10::optional<Tensor>& t) { return t.has_value() && t->defined(); }

// Runs fn.template operator()<scalar_t, mask_t>() for the input dtype and the mask dtype (the input's when none).
template <class Fn>
void dispatch_input_and_mask(at::ScalarType input, const c10::optional<Tensor>& mask, Fn&& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input, "pconv_cuda", [&] {
    using x_t = scalar_t;
    if (!has(mask)) {
      fn.template operator()<x_t, x_t>();
      return;
    }
    AT_DISPATCH_V2(mask->scalar_type(), "pconv_cuda_mask", AT_WRAP([&] { fn.template operator()<x_t, scalar_t>(); }),
                   AT_EXPAND(AT_FLOATING_TYPES), at::kHalf, at::kBFloat16, at::kBool, at::kByte);
  });
}

template <typename T>
const T* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

template <class Launch>
std::tuple<Tensor, Tensor, Tensor> partial_conv2d(Launch& launch, const Tensor& input,
                                                  const c10::optional<Tensor>& mask, const Tensor& weight,
                                                  const c10::optional<Tensor>& bias, at::IntArrayRef stride,
                                                  at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                                  bool multi_channel) {
  const Geometry g = check_conv_args("pconv_cuda::partial_conv2d", input, mask, weight, bias, stride, padding,
                                     dilation, groups, multi_channel);
  const at::MemoryFormat fmt = input.suggest_memory_format();
  const Tensor x = input.contiguous();
  const Tensor m = has(mask) ? mask->contiguous() : Tensor();
  const Tensor w = weight.contiguous();
  const Tensor b = has(bias) ? bias->contiguous() : Tensor();
  Tensor ratio = at::empty({g.mask_batch, 1, g.Ho, g.Wo}, input.options().dtype(ratio_dtype(input.scalar_type())));
  Tensor update = at::empty({g.mask_batch, 1, g.Ho, g.Wo}, input.options());
  Tensor out;
  const Route route = choose_route(g, input.scalar_type());
  dispatch_input_and_mask(input.scalar_type(), mask, [&]<typename scalar_t, typename mask_t>() {
    using acc_t = acc_type_t<scalar_t>;
    const mask_t* mp = ptr_or_null<mask_t>(m);
    if (route == Route::OnePass) {
      out = at::empty({g.N, g.C_out, g.Ho, g.Wo}, input.options());
      launch(one_pass_forward_kernel<scalar_t, mask_t, acc_t>, one_pass_config(g), x.const_data_ptr<scalar_t>(), mp,
             w.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(b), g, out.mutable_data_ptr<scalar_t>(),
             ratio.mutable_data_ptr<acc_t>(), update.mutable_data_ptr<scalar_t>());
      return;
    }
    launch(mask_kernel<mask_t, acc_t, scalar_t>, mask_config(g), mp, g, ratio.mutable_data_ptr<acc_t>(),
           update.mutable_data_ptr<scalar_t>());
    Tensor xm = x;
    if (mp != nullptr) {
      xm = at::empty_like(x);
      launch(apply_mask_kernel<scalar_t, mask_t, acc_t>, apply_mask_config(g), x.const_data_ptr<scalar_t>(), mp,
             xm.mutable_data_ptr<scalar_t>(), g);
    }
    out = at::convolution(xm, w, c10::nullopt, stride, padding, dilation, false, {0, 0}, groups).contiguous();
    launch(epilogue_kernel<scalar_t, acc_t>, epilogue_config(g), out.mutable_data_ptr<scalar_t>(),
           ratio.const_data_ptr<acc_t>(), update.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(b), g);
  });
  return {out.contiguous(fmt), update, ratio};
}

template <class Launch>
std::tuple<Tensor, Tensor, Tensor> partial_conv2d_backward(
    Launch& launch, const Tensor& grad_output, const Tensor& input, const c10::optional<Tensor>& mask,
    const Tensor& weight, const Tensor& ratio, const Tensor& update, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool multi_channel, std::array<bool, 3> output_mask) {
  const char* op = "pconv_cuda::_partial_conv2d_backward";
  const Geometry g =
      check_conv_args(op, input, mask, weight, c10::nullopt, stride, padding, dilation, groups, multi_channel);
  check_backward_args(op, grad_output, ratio, update, input, g);
  TORCH_CHECK(g.C_out <= kMaxGridY, op, ": the CUDA backward supports at most ", kMaxGridY,
              " output channels, got ", g.C_out);
  const auto [need_input, need_weight, need_bias] = output_mask;
  const at::MemoryFormat fmt = input.suggest_memory_format();
  const Tensor dy = grad_output.contiguous();
  const Tensor x = input.contiguous();
  const Tensor m = has(mask) ? mask->contiguous() : Tensor();
  const Tensor r = ratio.contiguous();
  const Tensor u = update.contiguous();
  Tensor gy = at::empty_like(dy, dy.options(), at::MemoryFormat::Contiguous);
  Tensor db = need_bias ? at::empty({g.C_out}, input.options()) : Tensor();
  Tensor dx, dw;
  dispatch_input_and_mask(input.scalar_type(), mask, [&]<typename scalar_t, typename mask_t>() {
    using acc_t = acc_type_t<scalar_t>;
    const mask_t* mp = ptr_or_null<mask_t>(m);
    const LaunchConfig cfg = grad_output_config(g);
    Tensor partial;
    if (need_bias) partial = at::empty({g.C_out, static_cast<int64_t>(cfg.grid.x)}, r.options());
    launch(grad_output_kernel<scalar_t, acc_t>, cfg, dy.const_data_ptr<scalar_t>(), gy.mutable_data_ptr<scalar_t>(),
           need_bias ? partial.mutable_data_ptr<acc_t>() : static_cast<acc_t*>(nullptr), r.const_data_ptr<acc_t>(),
           u.const_data_ptr<scalar_t>(), g);
    if (need_bias) {
      if (cfg.grid.x == 0) {
        db.zero_();  // empty batch: no block ran
      } else {
        launch(bias_grad_kernel<scalar_t, acc_t>, bias_grad_config(g), partial.const_data_ptr<acc_t>(),
               db.mutable_data_ptr<scalar_t>(), g.C_out, static_cast<int64_t>(cfg.grid.x));
      }
    }
    if (!need_input && !need_weight) return;
    // grad_input of a convolution does not read the input's values, so X*M is only formed for the weight.
    Tensor conv_input = x;
    if (need_weight && mp != nullptr) {
      conv_input = at::empty_like(x);
      launch(apply_mask_kernel<scalar_t, mask_t, acc_t>, apply_mask_config(g), x.const_data_ptr<scalar_t>(), mp,
             conv_input.mutable_data_ptr<scalar_t>(), g);
    }
    auto grads = at::convolution_backward(gy, conv_input, weight, c10::nullopt, stride, padding, dilation,
                                          false, {0, 0}, groups, {need_input, need_weight, false});
    if (need_input) {
      dx = std::get<0>(grads).contiguous();
      if (mp != nullptr) {  // the final * M, in place
        launch(apply_mask_kernel<scalar_t, mask_t, acc_t>, apply_mask_config(g), dx.const_data_ptr<scalar_t>(), mp,
               dx.mutable_data_ptr<scalar_t>(), g);
      }
      dx = dx.contiguous(fmt);
    }
    if (need_weight) dw = std::get<1>(grads).contiguous(weight.suggest_memory_format());
  });
  return {dx, dw, db};
}

template <class Launch>
std::tuple<Tensor, Tensor> mask_update(Launch& launch, const Tensor& mask, at::IntArrayRef kernel_size,
                                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                       bool multi_channel) {
  const Geometry g = check_mask_update_args(mask, kernel_size, stride, padding, dilation, multi_channel);
  const at::ScalarType update_dtype = at::isFloatingType(mask.scalar_type()) ? mask.scalar_type() : at::kFloat;
  Tensor ratio = at::empty({g.N, 1, g.Ho, g.Wo}, mask.options().dtype(ratio_dtype(update_dtype)));
  Tensor update = at::empty({g.N, 1, g.Ho, g.Wo}, mask.options().dtype(update_dtype));
  const Tensor m = mask.contiguous();
  dispatch_input_and_mask(update_dtype, m, [&]<typename update_t, typename mask_t>() {
    using acc_t = acc_type_t<update_t>;
    launch(mask_kernel<mask_t, acc_t, update_t>, mask_config(g), m.const_data_ptr<mask_t>(), g,
           ratio.mutable_data_ptr<acc_t>(), update.mutable_data_ptr<update_t>());
  });
  return {ratio, update};
}

}  // namespace cuda
}  // namespace pconv
