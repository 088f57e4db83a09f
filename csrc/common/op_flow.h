// Each op written once, for every backend: check -> allocate -> mask pass -> ratio map -> route -> convolution ->
// epilogue (forward); grad_output pass -> ATen's convolution backward -> hole zeroing (backward).
// A backend supplies the primitives (the struct `Prim` below, as CpuPrimitives in cpu/cpu_backend.cpp and
// CudaPrimitives<Launch> in cuda/cuda_primitives.h, which the SIMT emulation also instantiates):
//
//   static constexpr const char* device_type;            "cpu" or "cuda": route variable and override
//   bool mask_pass(mask, x, xm, plane, groups, offset)    xm = X*M (holes exact; channel c uses the mask's map
//                                                         groups.map_of(c)) when x is defined, written to channels
//                                                         [offset, offset + C) of xm (which may have more: the
//                                                         masked_cat output; may alias x); plane[n] = sum over
//                                                         the maps of weight(g) * mask[n, g] (acc dtype, NaN where
//                                                         a value is outside [0, 1]) when plane is defined; false
//                                                         if a bad value was seen and the backend can report it
//   static constexpr bool reports_bad_mask                whether mask_pass can return false (CPU: raises; CUDA:
//                                                         NaN in the plane instead, as no host sync is made)
//   void ratio_update(plane, g, ratio, updated_mask, scale)   S by window sums of the plane (or closed form when
//                                                         plane is undefined: mask=None), then ratio and U; also
//                                                         scale = win / S where scale is defined (cudnn_fused)
//   void epilogue(out, ratio, updated_mask, bias, g)      out = out * ratio + b * U, in place
//   void grad_output(dy, gy, db, ratio, updated_mask, g)  gy = dY * ratio; db = sum dY * U when db is defined
//   bool gemm_supported(g, conv_in)                       whether the gemm route can run this call
//   Tensor gemm_conv(conv_in, weight, bias, ratio, updated_mask, g)   the gemm route's finished output
//   bool gemm_backward(gy, conv_in, mask, groups, weight, g, dx*, dw*)   the forced gemm route's backward: dX (holes
//                                                         zeroed) and dW from G and X*M; false where it has none
//   bool fused_supported(g, input, has_bias)              whether the cudnn_fused route can run this call (CUDA:
//                                                         its cuDNN plan is built, or found cached)
//   bool fused_conv(conv_in, weight, bias, factor, updated_mask, g, out&)   the cudnn_fused route's finished output
//                                                         (factor: scale with a bias, ratio without); false if
//                                                         cuDNN could not run it
//   std::vector<Route> auto_candidates(g, input, supported)   one route, or several to time (autotuning);
//                                                         supported(route) says whether a route can run the call
//   double time_ms(fn)                                    runs fn and times it
//
// Tensors given to the primitives are contiguous in the call's layout: NCHW, or NHWC (channels_last), which the
// input's layout selects and the output keeps. A 3-D call's (N, C, D, H, W) tensors are NCHW with D*H pixel rows
// (channels_last_3d: NHWC): only ratio_update reads the depth, from the Geometry; gemm_supported is false for it.
//
// impl_ops<Backend>(m) registers every op for a backend; Backend::run(device_tensor, fn) builds its primitives for
// that tensor's device and returns fn(prim).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <algorithm>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "arg_checks.h"
#include "maths.h"
#include "routes.h"

namespace pconv {

using at::Tensor;

// Names a pass in torch.profiler traces (free when no profiler runs): each op's time splits into its passes and
// the vendor convolution.
#define PCONV_PASS(name) RECORD_FUNCTION(name, c10::ArrayRef<const c10::IValue>{})

inline bool has(const c10::optional<Tensor>& t) { return t.has_value() && t->defined(); }

// NHWC when the tensor is channels_last (channels_last_3d for 5-D), NCHW otherwise (other strides are copied).
inline at::MemoryFormat layout_of(const Tensor& t) {
  const at::MemoryFormat f = t.suggest_memory_format();
  if (t.dim() == 4 && f == at::MemoryFormat::ChannelsLast) return f;
  if (t.dim() == 5 && f == at::MemoryFormat::ChannelsLast3d) return f;
  return at::MemoryFormat::Contiguous;
}

inline bool is_nhwc(const Tensor& t) { return layout_of(t) != at::MemoryFormat::Contiguous; }

// Pixels per (image, channel) plane of an (N, C, spatial...) tensor.
inline int64_t plane_pixels(const Tensor& t) {
  int64_t p = 1;
  for (int64_t d = 2; d < t.dim(); ++d) p *= t.size(d);
  return p;
}

// Runs fn.template operator()<x_t, mask_t>() for the reachable pairs: the mask in the input's dtype, bool or uint8.
template <class Fn>
void dispatch_input_and_mask(at::ScalarType x, at::ScalarType m, Fn&& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x, "pconv", [&] {
    using x_t = scalar_t;
    if (m == x) {
      fn.template operator()<x_t, x_t>();
    } else if (m == at::kBool) {
      fn.template operator()<x_t, bool>();
    } else if (m == at::kByte) {
      fn.template operator()<x_t, uint8_t>();
    } else {
      TORCH_CHECK(false, "pconv_cuda: a ", m, " mask with a ", x, " input is not supported");
    }
  });
}

// The dtype the mask pass works in when there is no input (mask_update): a floating mask's own, else float32.
inline at::ScalarType mask_only_dtype(at::ScalarType mask) { return at::isFloatingType(mask) ? mask : at::kFloat; }

// The dtype a mask pass runs in: the swept input's; without one (the plane alone: input_masked, an empty batch) the
// mask-only dtype, widened to float64 where the plane is (a bool/uint8 mask beside a float64 input).
inline at::ScalarType mask_pass_dtype(const Tensor& x, const Tensor& mask, const Tensor& plane) {
  if (x.defined()) return x.scalar_type();
  return plane.defined() && plane.scalar_type() == at::kDouble ? at::kDouble : mask_only_dtype(mask.scalar_type());
}

[[noreturn]] inline void fail_invalid_mask(const char* op, const Tensor& mask) {
  const Tensor m = mask.to(at::kDouble);
  const Tensor bad = m.masked_select((m < 0).logical_or(m > 1).logical_or(m.isnan()));
  TORCH_CHECK(false, op, ": mask values must lie in [0, 1] (1 = valid pixel, 0 = hole), but the mask contains ",
              bad.numel(), " value(s) outside that range or NaN, e.g. ", bad[0].item<double>());
}

// Everything the route's speed can depend on.
inline std::string tuning_key(const Geometry& g, const Tensor& conv_in, const Tensor& weight) {
  std::ostringstream k;
  k << conv_in.device() << ' ' << conv_in.scalar_type() << (is_nhwc(conv_in) ? " nhwc" : " nchw")
    << " N" << g.N << " C" << g.C_in << " D" << g.D << " H" << g.H << " W" << g.W << " O" << g.C_out << " k" << g.win.kh << 'x'
    << g.win.kw << " s" << g.win.sh << 'x' << g.win.sw << " p" << g.win.ph << 'x' << g.win.pw << " d" << g.win.dh
    << 'x' << g.win.dw << " kd" << g.win.kd << " sd" << g.win.sd << " pd" << g.win.pd << " dd" << g.win.dd << " g" << g.groups << " mb" << g.mask_batch << (weight.is_contiguous() ? "" : " w-strided")
    << " tf32=" << at::globalContext().allowTF32CuDNN() << " det=" << at::globalContext().deterministicAlgorithms()
    << at::globalContext().deterministicCuDNN();
  return k.str();
}

// The routes that may run this call, decided before the passes (the cudnn_fused route needs the ratio pass to also
// write win / S): the forced route where it can run the call, else aten_conv; or the backend's candidates.
template <class Prim>
std::vector<Route> route_candidates(Prim& prim, const Geometry& g, const Tensor& input, bool has_bias) {
  auto supported = [&](Route r) {
    switch (r) {
      case Route::Gemm:
        return prim.gemm_supported(g, input);
      case Route::CudnnFused:
        return prim.fused_supported(g, input, has_bias);
      default:
        return true;
    }
  };
  if (const auto forced = forced_route(Prim::device_type)) {
    return {supported(*forced) ? *forced : Route::AtenConv};
  }
  return prim.auto_candidates(g, input, supported);
}

template <class Prim, class Run>
Route choose_route(Prim& prim, const Geometry& g, const Tensor& conv_in, const Tensor& weight,
                   const std::vector<Route>& candidates, Run&& run) {
  if (candidates.size() == 1) return candidates.front();
  return tuned_route(tuning_key(g, conv_in, weight), candidates, [&](Route r) {
    run(r);  // warm-up: first-call costs (cuDNN's own algorithm search) are not the route's
    return prim.time_ms([&] { run(r); });
  });
}

inline bool contains(const std::vector<Route>& routes, Route r) {
  return std::find(routes.begin(), routes.end(), r) != routes.end();
}

// The convolution of `dims` (2 or 3) spatial dimensions: partial_conv2d and partial_conv3d.
template <class Prim>
std::tuple<Tensor, Tensor, Tensor, Tensor> partial_conv(Prim& prim, int64_t dims, const Tensor& input,
                                                        const c10::optional<Tensor>& mask, const Tensor& weight,
                                                        const c10::optional<Tensor>& bias, at::IntArrayRef stride,
                                                        at::IntArrayRef padding, at::IntArrayRef dilation,
                                                        int64_t groups, bool multi_channel,
                                                        at::OptionalIntArrayRef mask_groups, bool input_masked) {
  const char* op = dims == 3 ? "pconv_cuda::partial_conv3d" : "pconv_cuda::partial_conv2d";
  MaskGroups mg;
  const Geometry g = check_conv_args(op, dims, input, mask, weight, bias, stride, padding, dilation, groups,
                                     multi_channel, mask_groups, &mg);
  TORCH_CHECK(!input_masked || has(mask), op, ": input_masked=True says the input is X*M for a mask, but mask is None");
  const at::MemoryFormat fmt = layout_of(input);
  const Tensor x = input.contiguous(fmt);
  const std::vector<int64_t> map_sizes = output_map_sizes(g, g.mask_batch, 1);
  Tensor ratio = at::empty(map_sizes, input.options().dtype(ratio_dtype(input.scalar_type())));
  Tensor updated_mask = at::empty(map_sizes, input.options());
  const std::vector<Route> candidates = route_candidates(prim, g, x, has(bias));
  // scale = win / S: the cudnn_fused graph's factor when there is a bias (without one it multiplies by ratio).
  Tensor scale = has(bias) && contains(candidates, Route::CudnnFused) ? at::empty_like(ratio) : Tensor();
  // X*M is formed here unless the input already holds it (input_masked: then only the plane is).
  const bool form_xm = has(mask) && !input_masked;
  Tensor xm, plane;
  if (has(mask)) {
    if (form_xm) xm = at::empty(x.sizes(), x.options(), fmt);
    plane = at::empty(input_map_sizes(g, g.mask_batch), ratio.options());
    // An empty batch still has a mask (batch 1) whose maps are returned: then only the plane is formed.
    const Tensor& swept = g.N > 0 && form_xm ? x : Tensor();
    PCONV_PASS("pconv::mask_pass");
    if (!prim.mask_pass(mg.maps(*mask).contiguous(fmt), swept, xm, plane, mg)) fail_invalid_mask(op, *mask);
  }
  {
    PCONV_PASS("pconv::ratio_update");
    prim.ratio_update(plane, g, ratio, updated_mask, scale);
  }

  const Tensor& conv_in = form_xm ? xm : x;
  const Tensor b = has(bias) ? bias->contiguous() : Tensor();
  const std::vector<int64_t> no_output_padding(dims, 0);
  // Runs `route`; a cudnn_fused call that cuDNN fails to run (the plan was built) falls back to aten_conv, and
  // `route` then says so.
  auto run = [&](Route& route) {
    if (route == Route::Gemm) {
      PCONV_PASS("pconv::gemm_conv");
      return prim.gemm_conv(conv_in, weight, b, ratio, updated_mask, g);
    }
    if (route == Route::CudnnFused) {
      PCONV_PASS("pconv::cudnn_fused");
      Tensor out;
      if (prim.fused_conv(conv_in, weight, b, b.defined() ? scale : ratio, updated_mask, g, out)) return out;
      route = Route::AtenConv;
    }
    Tensor out = at::convolution(conv_in, weight, c10::nullopt, stride, padding, dilation, /*transposed=*/false,
                                 no_output_padding, groups)
                     .contiguous(fmt);
    PCONV_PASS("pconv::epilogue");
    prim.epilogue(out, ratio, updated_mask, b, g);
    return out;
  };
  Route route = choose_route(prim, g, conv_in, weight, candidates, [&](Route r) { return run(r); });
  Tensor out = run(route);
  record_route(Prim::device_type, route);
  return {out, updated_mask, ratio, form_xm ? xm : at::empty({0}, input.options())};
}

template <class Prim>
std::tuple<Tensor, Tensor, Tensor> partial_conv_backward(
    Prim& prim, int64_t dims, const Tensor& grad_output, const Tensor& masked_input,
    const c10::optional<Tensor>& mask, const Tensor& weight, const Tensor& ratio, const Tensor& updated_mask,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool multi_channel,
    std::array<bool, 3> output_mask, at::OptionalIntArrayRef mask_groups, bool input_masked) {
  const char* op = dims == 3 ? "pconv_cuda::_partial_conv3d_backward" : "pconv_cuda::_partial_conv2d_backward";
  MaskGroups mg;
  const Geometry g = check_conv_args(op, dims, masked_input, mask, weight, c10::nullopt, stride, padding, dilation,
                                     groups, multi_channel, mask_groups, &mg);
  check_backward_args(op, grad_output, ratio, updated_mask, masked_input, g);
  const auto [need_input, need_weight, need_bias] = output_mask;
  const at::MemoryFormat fmt = layout_of(masked_input);
  const Tensor dy = grad_output.contiguous(fmt);
  Tensor gy = at::empty(dy.sizes(), dy.options(), fmt);
  Tensor db = need_bias ? at::empty({g.C_out}, masked_input.options()) : Tensor();
  {
    PCONV_PASS("pconv::grad_output");
    prim.grad_output(dy, gy, db, ratio.contiguous(), updated_mask.contiguous(), g);
  }

  Tensor dx, dw;
  if (need_input || need_weight) {
    const Tensor conv_in = masked_input.contiguous(fmt);
    // The gemm route, when forced, has its own backward where the backend has one (CUDA: tensor cores). Holes
    // are zeroed with the mask unless the input was X*M already (its producer applies M).
    const Tensor maps = has(mask) && !input_masked ? mg.maps(*mask).contiguous(fmt) : Tensor();
    const bool gemm = forced_route(Prim::device_type) == Route::Gemm &&
                      prim.gemm_backward(gy, conv_in, maps, mg, weight, g, need_input ? &dx : nullptr,
                                         need_weight ? &dw : nullptr);
    if (!gemm) {
      // grad_input does not read the convolution's input values; grad_weight reads X*M, kept by the forward.
      auto grads = at::convolution_backward(gy, conv_in, weight, c10::nullopt, stride, padding, dilation,
                                            /*transposed=*/false, std::vector<int64_t>(dims, 0), groups,
                                            {need_input, need_weight, false});
      if (need_input) {
        dx = std::get<0>(grads).contiguous(fmt);
        if (maps.defined()) {  // dX = M * conv_transpose(G, W), zero in holes, in place
          Tensor no_plane;
          PCONV_PASS("pconv::mask_pass");
          prim.mask_pass(maps, dx, dx, no_plane, mg);
        }
      }
      if (need_weight) dw = std::get<1>(grads);
    }
    if (need_weight) dw = dw.contiguous(weight.suggest_memory_format());
  }
  return {dx, dw, db};
}

template <class Prim>
std::tuple<Tensor, Tensor> mask_update(Prim& prim, const Tensor& mask, at::IntArrayRef kernel_size,
                                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                       bool multi_channel, at::OptionalIntArrayRef mask_groups) {
  const char* op = "pconv_cuda::mask_update";
  MaskGroups mg;
  const Geometry g =
      check_mask_update_args(mask, kernel_size, stride, padding, dilation, multi_channel, mask_groups, &mg);
  const at::ScalarType update_dtype = mask_only_dtype(mask.scalar_type());
  const std::vector<int64_t> map_sizes = output_map_sizes(g, g.N, 1);
  Tensor ratio = at::empty(map_sizes, mask.options().dtype(ratio_dtype(update_dtype)));
  Tensor updated_mask = at::empty(map_sizes, mask.options().dtype(update_dtype));
  Tensor plane = at::empty(input_map_sizes(g, g.N), ratio.options());
  Tensor no_input, no_output, no_scale;
  const Tensor maps = mg.maps(mask);
  if (!prim.mask_pass(maps.contiguous(layout_of(maps)), no_input, no_output, plane, mg)) fail_invalid_mask(op, mask);
  prim.ratio_update(plane, g, ratio, updated_mask, no_scale);
  return {ratio, updated_mask};
}

// X*M of the inputs' channel concatenation, written by one mask pass per input into its channels of the output:
// the concatenation itself is never formed.
template <class Prim>
Tensor masked_cat(Prim& prim, at::TensorList inputs, const Tensor& mask, at::OptionalIntArrayRef mask_groups) {
  const char* op = "pconv_cuda::masked_cat";
  const MaskGroups mg = check_masked_cat_args(op, inputs, mask, mask_groups);
  const at::MemoryFormat fmt = layout_of(inputs[0]);
  std::vector<int64_t> sizes = inputs[0].sizes().vec();
  sizes[1] = 0;
  for (const Tensor& t : inputs) sizes[1] += t.size(1);
  Tensor out = at::empty(sizes, inputs[0].options(), fmt);
  const Tensor maps = mg.maps(mask).contiguous(fmt);
  if (Prim::reports_bad_mask && out.numel() > 0) {  // the values checked once, over the maps alone
    Tensor no_input, no_output;
    Tensor plane =
        at::empty({maps.size(0), 1, plane_pixels(maps)}, out.options().dtype(ratio_dtype(mask_only_dtype(mask.scalar_type()))));
    if (!prim.mask_pass(maps, no_input, no_output, plane, mg)) fail_invalid_mask(op, mask);
  }
  PCONV_PASS("pconv::mask_pass");
  // Input i covers channels [first, first + C_i): the maps of the groups it overlaps, clipped to it.
  int64_t first = 0;
  size_t group = 0;
  int64_t group_first = 0;  // the first channel of map `group`
  for (const Tensor& t : inputs) {
    const int64_t c = t.size(1);
    if (c == 0 || out.numel() == 0) {
      first += c;
      continue;
    }
    while (group_first + mg.sizes[group] <= first) group_first += mg.sizes[group++];
    MaskGroups part;
    part.weighted = mg.weighted;
    size_t last = group;
    for (int64_t gf = group_first; gf < first + c; gf += mg.sizes[last++]) {
      part.sizes.push_back(std::min(gf + mg.sizes[last], first + c) - std::max(gf, first));
    }
    const Tensor part_maps =
        maps.narrow(1, static_cast<int64_t>(group), static_cast<int64_t>(last - group)).contiguous(fmt);
    Tensor no_plane;
    prim.mask_pass(part_maps, t.contiguous(fmt), out, no_plane, part, first);
    first += c;
  }
  return out;
}

// The dispatcher's entry points for a backend: each builds the backend's primitives and runs the op's flow.
template <class Backend>
struct OpEntries {
  template <int64_t Dims>
  static std::tuple<Tensor, Tensor, Tensor, Tensor> conv(const Tensor& input, const c10::optional<Tensor>& mask,
                                                         const Tensor& weight, const c10::optional<Tensor>& bias,
                                                         at::IntArrayRef stride, at::IntArrayRef padding,
                                                         at::IntArrayRef dilation, int64_t groups,
                                                         bool multi_channel, at::OptionalIntArrayRef mask_groups,
                                                         bool input_masked) {
    return Backend::run(input, [&](auto& prim) {
      return partial_conv(prim, Dims, input, mask, weight, bias, stride, padding, dilation, groups, multi_channel,
                          mask_groups, input_masked);
    });
  }

  template <int64_t Dims>
  static std::tuple<Tensor, Tensor, Tensor> conv_backward(
      const Tensor& grad_output, const Tensor& masked_input, const c10::optional<Tensor>& mask,
      const Tensor& weight, const Tensor& ratio, const Tensor& updated_mask, at::IntArrayRef stride,
      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool multi_channel,
      std::array<bool, 3> output_mask, at::OptionalIntArrayRef mask_groups, bool input_masked) {
    return Backend::run(masked_input, [&](auto& prim) {
      return partial_conv_backward(prim, Dims, grad_output, masked_input, mask, weight, ratio, updated_mask, stride,
                                   padding, dilation, groups, multi_channel, output_mask, mask_groups,
                                   input_masked);
    });
  }

  static Tensor cat(at::TensorList inputs, const Tensor& mask, at::OptionalIntArrayRef mask_groups) {
    TORCH_CHECK(!inputs.empty(), "pconv_cuda::masked_cat: inputs must hold at least one tensor");
    return Backend::run(inputs[0], [&](auto& prim) { return masked_cat(prim, inputs, mask, mask_groups); });
  }

  static std::tuple<Tensor, Tensor> update(const Tensor& mask, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                           at::IntArrayRef padding, at::IntArrayRef dilation, bool multi_channel,
                                           at::OptionalIntArrayRef mask_groups) {
    return Backend::run(mask, [&](auto& prim) {
      return mask_update(prim, mask, kernel_size, stride, padding, dilation, multi_channel, mask_groups);
    });
  }
};

template <class Backend>
void impl_ops(torch::Library& m) {
  using E = OpEntries<Backend>;
  m.impl("partial_conv2d", &E::template conv<2>);
  m.impl("partial_conv3d", &E::template conv<3>);
  m.impl("_partial_conv2d_backward", &E::template conv_backward<2>);
  m.impl("_partial_conv3d_backward", &E::template conv_backward<3>);
  m.impl("mask_update", &E::update);
  m.impl("masked_cat", &E::cat);
}

}  // namespace pconv
