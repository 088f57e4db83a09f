// Autograd of partial_conv2d / partial_conv3d, in C++: registered at the Autograd key of a library (pconv_cuda and
// the emulation's pconv_cuda_emu: impl_autograd), so eager training records one C++ node per call. A Python
// autograd kernel cost ~20 us a call more (measured: forward+backward of an 8-channel 8x8 layer, 76 -> ~55 us on
// the CPU) and, on CUDA, its backward needs the GIL on the autograd engine's device thread.
//
// Backward (M, ratio and U are constants; the mask never gets a gradient):
//   grad_output only            -> the library's _partial_conv{2,3}d_backward op (the fused passes);
//   under create_graph          -> the same maths in differentiable ATen ops, so it can be differentiated again;
//   gradient on masked_input    -> (double backward through the weight gradient, which reads X*M) adds
//                                  d(X*M)/dX = M to grad_input, exactly 0 in holes.
// pconv_cuda/functional.py's PartialConv2dFunction (torch.func, forward-mode AD, torch.compile) keeps the same
// backward in Python: torch.func needs a Python Function's setup_context.
// masked_cat's autograd (MaskedCatFunction, below): its backward is masked_cat of the gradient, split by input.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

namespace pconv {

using ConvSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const std::optional<at::Tensor>&,
    at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t, bool, at::OptionalIntArrayRef, bool);
using ConvBackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t, bool, std::array<bool, 3>,
    at::OptionalIntArrayRef, bool);
using MaskedCatSig = at::Tensor(at::TensorList, const at::Tensor&, at::OptionalIntArrayRef);

// grad in holes exactly 0 (a select, so NaN/inf in grad never leaks), grad * M elsewhere. A grouped mask
// (mask_groups: G maps, 1 < G < C) is first repeated to one map per channel (create_graph and double backward only).
inline at::Tensor hole_select(const at::Tensor& t, const at::Tensor& mask, at::OptionalIntArrayRef mask_groups) {
  at::Tensor m = mask.to(t.scalar_type());
  if (mask_groups.has_value() && m.size(1) > 1 && m.size(1) != t.size(1)) {
    // Views concatenated (no index tensor: this runs under fake tensors too, in torch.compile's backward).
    std::vector<at::Tensor> parts;
    std::vector<int64_t> shape = m.sizes().vec();
    for (int64_t g = 0; g < m.size(1); ++g) {
      shape[1] = (*mask_groups)[g];
      parts.push_back(m.narrow(1, g, 1).expand(shape));
    }
    m = at::cat(parts, 1);
  }
  return at::where(m == 0, at::zeros({}, t.options()), t * m);
}

inline c10::IValue optional_ints(at::OptionalIntArrayRef v) {
  return v.has_value() ? c10::IValue(v->vec()) : c10::IValue();
}

inline std::optional<std::vector<int64_t>> optional_ints(const c10::IValue& v) {
  return v.isNone() ? std::nullopt : std::optional<std::vector<int64_t>>(v.toIntVector());
}

template <class Sig>
c10::TypedOperatorHandle<Sig> find_op(const std::string& name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), "").template typed<Sig>();
}

// The Function of one library (Lib::ns) and dimensionality.
template <class Lib, int64_t Dims>
struct PartialConvFunction : public torch::autograd::Function<PartialConvFunction<Lib, Dims>> {
  static const c10::TypedOperatorHandle<ConvSig>& forward_op() {
    static const auto op = find_op<ConvSig>(std::string(Lib::ns) + "::partial_conv" + std::to_string(Dims) + "d");
    return op;
  }
  static const c10::TypedOperatorHandle<ConvBackwardSig>& backward_op() {
    static const auto op =
        find_op<ConvBackwardSig>(std::string(Lib::ns) + "::_partial_conv" + std::to_string(Dims) + "d_backward");
    return op;
  }

  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& input,
                                                const std::optional<at::Tensor>& mask, const at::Tensor& weight,
                                                const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                                bool multi_channel, at::OptionalIntArrayRef mask_groups,
                                                bool input_masked) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [output, updated_mask, ratio, masked_input] = forward_op().call(
        input, mask, weight, bias, stride, padding, dilation, groups, multi_channel, mask_groups, input_masked);
    const bool has_mask = mask.has_value() && mask->defined();
    const bool has_bias = bias.has_value() && bias->defined();
    // The weight gradient needs the convolution's input: X*M as the forward formed it (the input itself for
    // mask=None or input_masked), so the backward never rebuilds it (one input-sized tensor kept per layer).
    ctx->save_for_backward({has_mask && !input_masked ? masked_input : input, has_mask ? *mask : at::Tensor(),
                            weight, ratio, updated_mask});
    ctx->saved_data["input_masked"] = input_masked;
    ctx->saved_data["has_bias"] = has_bias;
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["multi_channel"] = multi_channel;
    ctx->saved_data["mask_groups"] = optional_ints(mask_groups);
    ctx->mark_non_differentiable({updated_mask, ratio});
    ctx->set_materialize_grads(false);
    return {output, updated_mask, ratio, masked_input};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &conv_input = saved[0], &mask = saved[1], &weight = saved[2], &ratio = saved[3],
                     &updated_mask = saved[4];
    // Autograd's edges are the tensor arguments present: input, [mask], weight, [bias].
    const size_t weight_edge = mask.defined() ? 2 : 1;
    const bool need_input = ctx->needs_input_grad(0);
    const bool need_weight = ctx->needs_input_grad(weight_edge);
    const bool need_bias = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(weight_edge + 1);
    torch::autograd::variable_list result(11);  // one per forward argument: input, mask, weight, bias, ...
    if (!need_input && !need_weight && !need_bias) return result;
    const std::vector<int64_t> stride = ctx->saved_data["stride"].toIntVector();
    const std::vector<int64_t> padding = ctx->saved_data["padding"].toIntVector();
    const std::vector<int64_t> dilation = ctx->saved_data["dilation"].toIntVector();
    const int64_t groups = ctx->saved_data["groups"].toInt();
    const bool multi_channel = ctx->saved_data["multi_channel"].toBool();
    const std::optional<std::vector<int64_t>> mask_groups = optional_ints(ctx->saved_data["mask_groups"]);
    const at::OptionalIntArrayRef mask_groups_ref =
        mask_groups ? at::OptionalIntArrayRef(*mask_groups) : at::OptionalIntArrayRef();
    const bool input_masked = ctx->saved_data["input_masked"].toBool();
    const at::Tensor& grad_output = grads[0];
    const at::Tensor& grad_masked_input = grads[3];
    // With input_masked the holes are the input producer's to zero: the backward sees no mask for them.
    const at::Tensor& hole_mask = input_masked ? at::Tensor() : mask;

    at::Tensor grad_input, grad_weight, grad_bias;
    if (grad_output.defined()) {
      if (at::GradMode::is_enabled()) {  // create_graph: differentiable ops, same maths
        std::tie(grad_input, grad_weight, grad_bias) =
            differentiable_grads(grad_output, conv_input, hole_mask, weight, ratio, updated_mask, stride, padding,
                                 dilation, groups, {need_input, need_weight, need_bias}, mask_groups_ref);
      } else {
        const std::optional<at::Tensor> m = mask.defined() ? std::optional<at::Tensor>(mask) : std::nullopt;
        std::tie(grad_input, grad_weight, grad_bias) =
            backward_op().call(grad_output, conv_input, m, weight, ratio, updated_mask, stride, padding, dilation,
                               groups, multi_channel, {need_input, need_weight, need_bias}, mask_groups_ref,
                               input_masked);
      }
    }
    if (grad_masked_input.defined() && hole_mask.defined() && need_input) {
      const at::Tensor extra = hole_select(grad_masked_input, mask, mask_groups_ref);
      grad_input = grad_input.defined() ? grad_input + extra : extra;
    }
    result[0] = grad_input;  // each defined only where asked for
    result[2] = grad_weight;
    result[3] = grad_bias;
    return result;
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> differentiable_grads(
      const at::Tensor& grad_output, const at::Tensor& conv_input, const at::Tensor& mask, const at::Tensor& weight,
      const at::Tensor& ratio, const at::Tensor& updated_mask, at::IntArrayRef stride, at::IntArrayRef padding,
      at::IntArrayRef dilation, int64_t groups, std::array<bool, 3> need, at::OptionalIntArrayRef mask_groups) {
    const at::ScalarType acc = ratio.scalar_type();  // float32 (float64 for float64): as the kernels accumulate
    const at::Tensor g = (grad_output.to(acc) * ratio).to(grad_output.scalar_type());
    at::Tensor grad_input, grad_weight, grad_bias;
    if (need[2]) {
      std::vector<int64_t> dims{0};
      for (int64_t d = 2; d < grad_output.dim(); ++d) dims.push_back(d);
      grad_bias = (grad_output.to(acc) * updated_mask.to(acc)).sum(dims).to(grad_output.scalar_type());
    }
    if (need[0] || need[1]) {
      auto grads = at::convolution_backward(g, conv_input, weight, std::nullopt, stride, padding, dilation,
                                            /*transposed=*/false, std::vector<int64_t>(Dims, 0), groups,
                                            {need[0], need[1], false});
      grad_input = std::get<0>(grads);
      grad_weight = std::get<1>(grads);
      if (grad_input.defined() && mask.defined()) grad_input = hole_select(grad_input, mask, mask_groups);
    }
    return {grad_input, grad_weight, grad_bias};
  }

  // The library's Autograd kernel.
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kernel(
      const at::Tensor& input, const std::optional<at::Tensor>& mask, const at::Tensor& weight,
      const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
      at::IntArrayRef dilation, int64_t groups, bool multi_channel, at::OptionalIntArrayRef mask_groups,
      bool input_masked) {
    const auto dual = [](const at::Tensor& t) { return t.defined() && t._fw_grad(/*level=*/0).defined(); };
    TORCH_CHECK(!dual(input) && !dual(weight) && !(bias && dual(*bias)), Lib::ns, "::partial_conv", Dims,
                "d: forward-mode AD (jvp) is not implemented; reverse mode and torch.func's vjp/grad/vmap are");
    const bool record = at::GradMode::is_enabled() &&
                        (input.requires_grad() || weight.requires_grad() || (bias && bias->requires_grad()));
    if (!record) {  // nothing to record: the op itself, without the Function's bookkeeping (~1.5 us a call)
      at::AutoDispatchBelowADInplaceOrView below;
      return forward_op().call(input, mask, weight, bias, stride, padding, dilation, groups, multi_channel,
                               mask_groups, input_masked);
    }
    auto out = PartialConvFunction::apply(input, mask, weight, bias, stride, padding, dilation, groups,
                                          multi_channel, mask_groups, input_masked);
    return {out[0], out[1], out[2], out[3]};
  }
};

// masked_cat: linear in its inputs, so its backward is masked_cat of the gradient (then split by input), called
// through the dispatcher so that create_graph records it again.
template <class Lib>
struct MaskedCatFunction : public torch::autograd::Function<MaskedCatFunction<Lib>> {
  static const c10::TypedOperatorHandle<MaskedCatSig>& op() {
    static const auto handle = find_op<MaskedCatSig>(std::string(Lib::ns) + "::masked_cat");
    return handle;
  }

  static at::Tensor forward(torch::autograd::AutogradContext* ctx, at::TensorList inputs, const at::Tensor& mask,
                            at::OptionalIntArrayRef mask_groups) {
    at::Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      out = op().call(inputs, mask, mask_groups);
    }
    std::vector<int64_t> channels;
    for (const at::Tensor& t : inputs) channels.push_back(t.size(1));
    ctx->save_for_backward({mask});
    ctx->saved_data["channels"] = channels;
    ctx->saved_data["mask_groups"] = optional_ints(mask_groups);
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const std::vector<int64_t> channels = ctx->saved_data["channels"].toIntVector();
    torch::autograd::variable_list result(channels.size() + 2);  // the inputs, mask, mask_groups
    if (!grads[0].defined()) return result;
    const std::optional<std::vector<int64_t>> mask_groups = optional_ints(ctx->saved_data["mask_groups"]);
    const at::Tensor grad = op().call(at::TensorList(grads[0]), ctx->get_saved_variables()[0],
                                      mask_groups ? at::OptionalIntArrayRef(*mask_groups) : at::OptionalIntArrayRef());
    const std::vector<at::Tensor> parts = grad.split_with_sizes(channels, 1);
    for (size_t i = 0; i < parts.size(); ++i) {
      if (ctx->needs_input_grad(i)) result[i] = parts[i];
    }
    return result;
  }

  static at::Tensor kernel(at::TensorList inputs, const at::Tensor& mask, at::OptionalIntArrayRef mask_groups) {
    bool record = false;
    for (const at::Tensor& t : inputs) {
      TORCH_CHECK(!t._fw_grad(/*level=*/0).defined(), Lib::ns, "::masked_cat: forward-mode AD (jvp) is not "
                  "implemented for the op; pconv_cuda.masked_cat handles it (and torch.func) in torch operations");
      record = record || t.requires_grad();
    }
    if (!record || !at::GradMode::is_enabled()) {
      at::AutoDispatchBelowADInplaceOrView below;
      return op().call(inputs, mask, mask_groups);
    }
    return MaskedCatFunction::apply(inputs, mask, mask_groups);
  }
};

// Registers the Autograd kernels of library Lib (Lib::ns names it).
template <class Lib>
void impl_autograd(torch::Library& m) {
  m.impl("partial_conv2d", &PartialConvFunction<Lib, 2>::kernel);
  m.impl("partial_conv3d", &PartialConvFunction<Lib, 3>::kernel);
  m.impl("masked_cat", &MaskedCatFunction<Lib>::kernel);
}

}  // namespace pconv
