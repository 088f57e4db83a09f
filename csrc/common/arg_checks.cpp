#include "arg_checks.h"

#include <c10/util/Exception.h>


namespace pconv {
namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_pair(const char* op, const char* name, at::IntArrayRef v, int64_t min_value) {
  TORCH_CHECK(v.size() == 2, op, ": ", name, " must have 2 elements (height, width), got ", v.size());
  TORCH_CHECK(v[0] >= min_value && v[1] >= min_value, op, ": ", name, " must be >= ", min_value, ", got ", v);
}

Window make_window(int64_t kh, int64_t kw, at::IntArrayRef stride, at::IntArrayRef padding,
                   at::IntArrayRef dilation) {
  return Window{kh, kw, stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1]};
}

void fill_output_size(const char* op, Geometry& g) {
  g.Ho = conv_out_size(g.H, g.win.kh, g.win.sh, g.win.ph, g.win.dh);
  g.Wo = conv_out_size(g.W, g.win.kw, g.win.sw, g.win.pw, g.win.dw);
  TORCH_CHECK(g.Ho > 0 && g.Wo > 0, op, ": the input's spatial size (", g.H, ", ", g.W,
              ") is too small for kernel (", g.win.kh, ", ", g.win.kw, ") with padding (", g.win.ph, ", ", g.win.pw,
              ") and dilation (", g.win.dh, ", ", g.win.dw, "): the output would be (", g.Ho, ", ", g.Wo, ")");
}

}  // namespace

at::ScalarType ratio_dtype(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

Geometry check_conv_args(const char* op, const at::Tensor& input, const c10::optional<at::Tensor>& mask,
                         const at::Tensor& weight, const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool multi_channel) {
  TORCH_CHECK(input.dim() == 4, op, ": input must be a 4-D tensor (N, C_in, H, W), got shape ", input.sizes());
  TORCH_CHECK(is_supported_float(input.scalar_type()), op,
              ": input must be float32, float64, float16 or bfloat16, got ", input.scalar_type());
  TORCH_CHECK(weight.dim() == 4, op, ": weight must be a 4-D tensor (C_out, C_in / groups, kh, kw), got shape ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), op, ": weight dtype ", weight.scalar_type(),
              " does not match input dtype ", input.scalar_type());
  TORCH_CHECK(weight.device() == input.device(), op, ": weight is on ", weight.device(), " but input is on ",
              input.device());
  check_pair(op, "stride", stride, 1);
  check_pair(op, "padding", padding, 0);
  check_pair(op, "dilation", dilation, 1);

  Geometry g{};
  g.N = input.size(0);
  g.C_in = input.size(1);
  g.H = input.size(2);
  g.W = input.size(3);
  g.C_out = weight.size(0);
  g.groups = groups;
  g.multi_channel = multi_channel;
  g.win = make_window(weight.size(2), weight.size(3), stride, padding, dilation);

  TORCH_CHECK(groups >= 1, op, ": groups must be >= 1, got ", groups);
  // ATen's convolution returns (N, 0, H', W') for zero input channels, not (N, C_out, H', W'), and fails on an empty
  // image with a backend's message: both are refused here, with the shape.
  TORCH_CHECK(g.C_in >= 1, op, ": input must have at least one channel (C_in >= 1), got shape ", input.sizes());
  TORCH_CHECK(g.H >= 1 && g.W >= 1, op, ": input must have at least one pixel (H, W >= 1), got shape ",
              input.sizes());
  TORCH_CHECK(g.C_in % groups == 0, op, ": groups=", groups, " must divide the input channels C_in=", g.C_in);
  TORCH_CHECK(g.C_out % groups == 0, op, ": groups=", groups, " must divide the output channels C_out=", g.C_out);
  TORCH_CHECK(weight.size(1) * groups == g.C_in, op, ": weight of shape ", weight.sizes(), " expects ",
              weight.size(1) * groups, " input channels (weight.size(1) * groups), but input has C_in=", g.C_in);
  TORCH_CHECK(g.win.kh > 0 && g.win.kw > 0, op, ": kernel size must be positive, got weight shape ", weight.sizes());

  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == g.C_out, op, ": bias must have shape (", g.C_out,
                ",), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == input.scalar_type(), op, ": bias dtype ", bias->scalar_type(),
                " does not match input dtype ", input.scalar_type());
    TORCH_CHECK(bias->device() == input.device(), op, ": bias is on ", bias->device(), " but input is on ",
                input.device());
  }

  if (mask.has_value() && mask->defined()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.dim() == 4, op, ": mask must be a 4-D tensor (N or 1, ", multi_channel ? "C_in" : "1",
                ", H, W), got shape ", m.sizes());
    TORCH_CHECK(m.device() == input.device(), op, ": mask is on ", m.device(), " but input is on ", input.device());
    TORCH_CHECK(m.scalar_type() == input.scalar_type() || m.scalar_type() == at::kBool ||
                    m.scalar_type() == at::kByte,
                op, ": mask dtype must be the input's dtype (", input.scalar_type(), "), bool or uint8, got ",
                m.scalar_type());
    TORCH_CHECK(m.size(0) == g.N || m.size(0) == 1, op, ": mask batch size ", m.size(0),
                " must be 1 or the input's batch size ", g.N);
    const int64_t want_c = multi_channel ? g.C_in : 1;
    TORCH_CHECK(m.size(1) == want_c, op, ": ",
                multi_channel ? "multi_channel=True expects a mask with one channel per input channel (C_in="
                              : "multi_channel=False expects a single-channel mask (",
                want_c, multi_channel ? ")" : " channel)", ", got ", m.size(1), " channels",
                multi_channel ? "" : "; pass multi_channel=True for a per-channel mask");
    TORCH_CHECK(m.size(2) == g.H && m.size(3) == g.W, op, ": mask spatial size (", m.size(2), ", ", m.size(3),
                ") must equal the input's (", g.H, ", ", g.W, ")");
    g.mask_batch = m.size(0);
    g.mask_channels = m.size(1);
  } else {
    g.mask_batch = 1;
    g.mask_channels = 0;
  }
  fill_output_size(op, g);
  return g;
}

namespace {
void check_map(const char* op, const char* name, const at::Tensor& t, const Geometry& g, at::ScalarType dtype,
               const at::Tensor& input) {
  TORCH_CHECK(t.dim() == 4 && t.size(0) == g.mask_batch && t.size(1) == 1 && t.size(2) == g.Ho &&
                  t.size(3) == g.Wo,
              op, ": ", name, " must have shape (", g.mask_batch, ", 1, ", g.Ho, ", ", g.Wo, "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == input.device(), op, ": ", name, " is on ", t.device(), " but input is on ",
              input.device());
}
}  // namespace

void check_backward_args(const char* op, const at::Tensor& grad_output, const at::Tensor& ratio,
                         const at::Tensor& updated_mask, const at::Tensor& input, const Geometry& g) {
  TORCH_CHECK(grad_output.dim() == 4 && grad_output.size(0) == g.N && grad_output.size(1) == g.C_out &&
                  grad_output.size(2) == g.Ho && grad_output.size(3) == g.Wo,
              op, ": grad_output must have shape (", g.N, ", ", g.C_out, ", ", g.Ho, ", ", g.Wo, "), got ",
              grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), op, ": grad_output dtype ",
              grad_output.scalar_type(), " does not match input dtype ", input.scalar_type());
  TORCH_CHECK(grad_output.device() == input.device(), op, ": grad_output is on ", grad_output.device(),
              " but input is on ", input.device());
  check_map(op, "ratio", ratio, g, ratio_dtype(input.scalar_type()), input);
  check_map(op, "updated_mask", updated_mask, g, input.scalar_type(), input);
}

Geometry check_mask_update_args(const at::Tensor& mask, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation, bool multi_channel) {
  const char* op = "pconv_cuda::mask_update";
  TORCH_CHECK(mask.dim() == 4, op, ": mask must be a 4-D tensor (N, C, H, W), got shape ", mask.sizes());
  TORCH_CHECK(is_supported_float(mask.scalar_type()) || mask.scalar_type() == at::kBool ||
                  mask.scalar_type() == at::kByte,
              op, ": mask must be a floating, bool or uint8 tensor, got ", mask.scalar_type());
  TORCH_CHECK(multi_channel || mask.size(1) == 1, op,
              ": multi_channel=False expects a single-channel mask, got ", mask.size(1),
              " channels; pass multi_channel=True for a per-channel mask");
  check_pair(op, "kernel_size", kernel_size, 1);
  check_pair(op, "stride", stride, 1);
  check_pair(op, "padding", padding, 0);
  check_pair(op, "dilation", dilation, 1);
  Geometry g{};
  g.N = mask.size(0);
  g.C_in = mask.size(1);
  g.H = mask.size(2);
  g.W = mask.size(3);
  g.C_out = 1;
  g.groups = 1;
  g.multi_channel = multi_channel;
  g.mask_batch = g.N;
  g.mask_channels = g.C_in;
  g.win = make_window(kernel_size[0], kernel_size[1], stride, padding, dilation);
  fill_output_size(op, g);
  return g;
}

}  // namespace pconv
