#include "arg_checks.h"

#include <c10/util/Exception.h>

#include <ostream>


namespace pconv {
namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Sizes as the messages print them: (2, 6, 9, 8).
struct Parenthesised {
  at::IntArrayRef v;
};
std::ostream& operator<<(std::ostream& os, const Parenthesised& p) {
  os << '(';
  for (size_t i = 0; i < p.v.size(); ++i) os << (i ? ", " : "") << p.v[i];
  return os << ')';
}

const char* spatial_names(int64_t dims) { return dims == 3 ? "(depth, height, width)" : "(height, width)"; }
const char* spatial_letters(int64_t dims) { return dims == 3 ? "D, H, W" : "H, W"; }
const char* kernel_letters(int64_t dims) { return dims == 3 ? "kd, kh, kw" : "kh, kw"; }

void check_spatial(const char* op, const char* name, at::IntArrayRef v, int64_t dims, int64_t min_value) {
  TORCH_CHECK(static_cast<int64_t>(v.size()) == dims, op, ": ", name, " must have ", dims, " elements ",
              spatial_names(dims), ", got ", v.size());
  for (const int64_t x : v) TORCH_CHECK(x >= min_value, op, ": ", name, " must be >= ", min_value, ", got ", v);
}

// Spatial sizes and window from (D,) H, W sizes, kernel sizes, stride, padding, dilation of `dims` elements each.
void fill_spatial(Geometry& g, int64_t dims, at::IntArrayRef sizes, at::IntArrayRef kernel, at::IntArrayRef stride,
                  at::IntArrayRef padding, at::IntArrayRef dilation) {
  const int64_t o = dims - 2;  // index of height
  g.spatial_dims = dims;
  g.H = sizes[o];
  g.W = sizes[o + 1];
  g.win = Window{kernel[o], kernel[o + 1], stride[o], stride[o + 1], padding[o], padding[o + 1], dilation[o],
                 dilation[o + 1]};
  if (dims == 3) {
    g.D = sizes[0];
    g.win.kd = kernel[0];
    g.win.sd = stride[0];
    g.win.pd = padding[0];
    g.win.dd = dilation[0];
  }
}

void fill_output_size(const char* op, Geometry& g, at::IntArrayRef sizes, at::IntArrayRef kernel,
                      at::IntArrayRef padding, at::IntArrayRef dilation) {
  g.Do = conv_out_size(g.D, g.win.kd, g.win.sd, g.win.pd, g.win.dd);
  g.Ho = conv_out_size(g.H, g.win.kh, g.win.sh, g.win.ph, g.win.dh);
  g.Wo = conv_out_size(g.W, g.win.kw, g.win.sw, g.win.pw, g.win.dw);
  const std::vector<int64_t> out = output_spatial_sizes(g);
  TORCH_CHECK(g.Do > 0 && g.Ho > 0 && g.Wo > 0, op, ": the input's spatial size ", Parenthesised{sizes},
              " is too small for kernel ", Parenthesised{kernel}, " with padding ", Parenthesised{padding},
              " and dilation ", Parenthesised{dilation}, ": the output would be ", Parenthesised{out});
}

// The mask's groups, checked against C_in: mask_groups (positive, summing to C_in, one per map of the mask, only with
// multi_channel=True), or the single- or multi-channel mask it stands for. A multi-channel mask that is one map
// expanded over its channels (stride 0) is one group: its map is read once, not C_in times, and not copied.
MaskGroups check_mask_groups(const char* op, const at::Tensor* mask, int64_t C_in, bool multi_channel,
                             at::OptionalIntArrayRef mask_groups, const char* channels_name = "the input channels C_in") {
  MaskGroups mg;
  mg.weighted = multi_channel;
  if (mask_groups.has_value()) {
    const at::IntArrayRef sizes = *mask_groups;
    TORCH_CHECK(multi_channel, op, ": mask_groups=", sizes, " describes a multi-channel mask by channel groups; "
                "pass multi_channel=True with it");
    TORCH_CHECK(!sizes.empty(), op, ": mask_groups must name at least one group, got []");
    int64_t total = 0;
    for (const int64_t c : sizes) {
      TORCH_CHECK(c >= 1, op, ": mask_groups must be positive channel counts (each map covers >= 1 input "
                  "channel), got ", sizes);
      total += c;
    }
    TORCH_CHECK(total == C_in, op, ": mask_groups=", sizes, " must sum to ", channels_name, "=", C_in, ", got ",
                total);
    if (mask != nullptr) {
      TORCH_CHECK(mask->size(1) == static_cast<int64_t>(sizes.size()), op, ": mask_groups=", sizes, " names ",
                  sizes.size(), " group(s), so the mask must have one map per group (", sizes.size(),
                  " channels), got ", mask->size(1), " channels");
    }
    mg.sizes = sizes.vec();
    return mg;
  }
  if (mask == nullptr) return mg;
  const int64_t want_c = multi_channel ? C_in : 1;
  TORCH_CHECK(mask->size(1) == want_c, op, ": ",
              multi_channel ? "multi_channel=True expects a mask with one channel per input channel (C_in="
                            : "multi_channel=False expects a single-channel mask (",
              want_c, multi_channel ? ")" : " channel)", ", got ", mask->size(1), " channels",
              multi_channel ? "; or pass mask_groups for a mask of channel groups"
                            : "; pass multi_channel=True for a per-channel mask");
  if (!multi_channel) {
    mg.sizes = {C_in};
  } else if (C_in > 1 && mask->stride(1) == 0) {
    mg.sizes = {C_in};
    mg.expanded = true;
  } else {
    mg.sizes.assign(C_in, 1);
  }
  return mg;
}

}  // namespace

std::vector<int64_t> input_spatial_sizes(const Geometry& g) {
  return g.spatial_dims == 3 ? std::vector<int64_t>{g.D, g.H, g.W} : std::vector<int64_t>{g.H, g.W};
}

std::vector<int64_t> output_spatial_sizes(const Geometry& g) {
  return g.spatial_dims == 3 ? std::vector<int64_t>{g.Do, g.Ho, g.Wo} : std::vector<int64_t>{g.Ho, g.Wo};
}

std::vector<int64_t> output_map_sizes(const Geometry& g, int64_t batch, int64_t channels) {
  std::vector<int64_t> sizes{batch, channels};
  for (const int64_t s : output_spatial_sizes(g)) sizes.push_back(s);
  return sizes;
}

std::vector<int64_t> input_map_sizes(const Geometry& g, int64_t batch) {
  std::vector<int64_t> sizes{batch, 1};
  for (const int64_t s : input_spatial_sizes(g)) sizes.push_back(s);
  return sizes;
}

at::ScalarType ratio_dtype(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

Geometry check_conv_args(const char* op, int64_t dims, const at::Tensor& input,
                         const c10::optional<at::Tensor>& mask, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation, int64_t groups, bool multi_channel,
                         at::OptionalIntArrayRef mask_groups, MaskGroups* mask_groups_out) {
  TORCH_CHECK(input.dim() == dims + 2, op, ": input must be a ", dims + 2, "-D tensor (N, C_in, ",
              spatial_letters(dims), "), got shape ", input.sizes());
  TORCH_CHECK(is_supported_float(input.scalar_type()), op,
              ": input must be float32, float64, float16 or bfloat16, got ", input.scalar_type());
  TORCH_CHECK(weight.dim() == dims + 2, op, ": weight must be a ", dims + 2, "-D tensor (C_out, C_in / groups, ",
              kernel_letters(dims), "), got shape ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), op, ": weight dtype ", weight.scalar_type(),
              " does not match input dtype ", input.scalar_type());
  TORCH_CHECK(weight.device() == input.device(), op, ": weight is on ", weight.device(), " but input is on ",
              input.device());
  check_spatial(op, "stride", stride, dims, 1);
  check_spatial(op, "padding", padding, dims, 0);
  check_spatial(op, "dilation", dilation, dims, 1);
  const at::IntArrayRef sizes = input.sizes().slice(2), kernel = weight.sizes().slice(2);

  Geometry g{};
  g.N = input.size(0);
  g.C_in = input.size(1);
  g.C_out = weight.size(0);
  g.groups = groups;
  g.multi_channel = multi_channel;
  fill_spatial(g, dims, sizes, kernel, stride, padding, dilation);

  TORCH_CHECK(groups >= 1, op, ": groups must be >= 1, got ", groups);
  // ATen's convolution returns (N, 0, ...) for zero input channels, not (N, C_out, ...), and fails on an empty
  // image with a backend's message: both are refused here, with the shape.
  TORCH_CHECK(g.C_in >= 1, op, ": input must have at least one channel (C_in >= 1), got shape ", input.sizes());
  TORCH_CHECK(g.pixels() >= 1, op, ": input must have at least one pixel (", spatial_letters(dims),
              " >= 1), got shape ", input.sizes());
  TORCH_CHECK(g.C_in % groups == 0, op, ": groups=", groups, " must divide the input channels C_in=", g.C_in);
  TORCH_CHECK(g.C_out % groups == 0, op, ": groups=", groups, " must divide the output channels C_out=", g.C_out);
  TORCH_CHECK(weight.size(1) * groups == g.C_in, op, ": weight of shape ", weight.sizes(), " expects ",
              weight.size(1) * groups, " input channels (weight.size(1) * groups), but input has C_in=", g.C_in);
  for (const int64_t k : kernel) {
    TORCH_CHECK(k > 0, op, ": kernel size must be positive, got weight shape ", weight.sizes());
  }

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
    TORCH_CHECK(m.dim() == dims + 2, op, ": mask must be a ", dims + 2, "-D tensor (N or 1, ",
                mask_groups.has_value() ? "G" : multi_channel ? "C_in" : "1", ", ", spatial_letters(dims),
                "), got shape ", m.sizes());
    TORCH_CHECK(m.device() == input.device(), op, ": mask is on ", m.device(), " but input is on ", input.device());
    TORCH_CHECK(m.scalar_type() == input.scalar_type() || m.scalar_type() == at::kBool ||
                    m.scalar_type() == at::kByte,
                op, ": mask dtype must be the input's dtype (", input.scalar_type(), "), bool or uint8, got ",
                m.scalar_type());
    TORCH_CHECK(m.size(0) == g.N || m.size(0) == 1, op, ": mask batch size ", m.size(0),
                " must be 1 or the input's batch size ", g.N);
    const MaskGroups mg = check_mask_groups(op, &m, g.C_in, multi_channel, mask_groups);
    TORCH_CHECK(m.sizes().slice(2) == sizes, op, ": mask spatial size ", Parenthesised{m.sizes().slice(2)},
                " must equal the input's ", Parenthesised{sizes});
    g.mask_batch = m.size(0);
    g.mask_channels = mg.count();
    if (mask_groups_out != nullptr) *mask_groups_out = mg;
  } else {
    check_mask_groups(op, nullptr, g.C_in, multi_channel, mask_groups);
    g.mask_batch = 1;
    g.mask_channels = 0;
    if (mask_groups_out != nullptr) *mask_groups_out = MaskGroups{};
  }
  fill_output_size(op, g, sizes, kernel, padding, dilation);
  return g;
}

MaskGroups check_masked_cat_args(const char* op, at::TensorList inputs, const at::Tensor& mask,
                                 at::OptionalIntArrayRef mask_groups) {
  TORCH_CHECK(!inputs.empty(), op, ": inputs must hold at least one tensor");
  const at::Tensor& x0 = inputs[0];
  TORCH_CHECK(x0.dim() == 4 || x0.dim() == 5, op, ": inputs[0] must be a 4-D (N, C, H, W) or 5-D (N, C, D, H, W) "
              "tensor, got shape ", x0.sizes());
  TORCH_CHECK(is_supported_float(x0.scalar_type()), op,
              ": inputs must be float32, float64, float16 or bfloat16, got ", x0.scalar_type());
  int64_t channels = 0;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const at::Tensor& t = inputs[i];
    TORCH_CHECK(t.dim() == x0.dim() && t.size(0) == x0.size(0) && t.sizes().slice(2) == x0.sizes().slice(2), op,
                ": inputs[", i, "] of shape ", t.sizes(), " must match inputs[0] (shape ", x0.sizes(),
                ") in every dimension but the channels");
    TORCH_CHECK(t.scalar_type() == x0.scalar_type(), op, ": inputs[", i, "] dtype ", t.scalar_type(),
                " does not match inputs[0]'s ", x0.scalar_type());
    TORCH_CHECK(t.device() == x0.device(), op, ": inputs[", i, "] is on ", t.device(), " but inputs[0] is on ",
                x0.device());
    channels += t.size(1);
  }
  TORCH_CHECK(mask.dim() == x0.dim(), op, ": mask must be a ", x0.dim(), "-D tensor (N or 1, ",
              mask_groups.has_value() ? "G" : "1 or C", ", ", spatial_letters(x0.dim() - 2), "), got shape ",
              mask.sizes());
  TORCH_CHECK(mask.device() == x0.device(), op, ": mask is on ", mask.device(), " but inputs[0] is on ",
              x0.device());
  TORCH_CHECK(mask.scalar_type() == x0.scalar_type() || mask.scalar_type() == at::kBool ||
                  mask.scalar_type() == at::kByte,
              op, ": mask dtype must be the inputs' dtype (", x0.scalar_type(), "), bool or uint8, got ",
              mask.scalar_type());
  TORCH_CHECK(mask.size(0) == x0.size(0) || mask.size(0) == 1, op, ": mask batch size ", mask.size(0),
              " must be 1 or the inputs' batch size ", x0.size(0));
  TORCH_CHECK(mask.sizes().slice(2) == x0.sizes().slice(2), op, ": mask spatial size ",
              Parenthesised{mask.sizes().slice(2)}, " must equal the inputs' ", Parenthesised{x0.sizes().slice(2)});
  if (!mask_groups.has_value()) {  // one map for every channel, or one per channel
    TORCH_CHECK(mask.size(1) == 1 || mask.size(1) == channels, op, ": mask must have 1 map (for every channel) or ",
                "one per channel of the inputs (C=", channels, "), got ", mask.size(1),
                "; or pass mask_groups for a mask of channel groups");
    if (mask.size(1) == 1) {
      MaskGroups mg;
      mg.sizes = {channels};
      return mg;
    }
  }
  return check_mask_groups(op, &mask, channels, /*multi_channel=*/true, mask_groups, "the inputs' channels C");
}

namespace {
void check_map(const char* op, const char* name, const at::Tensor& t, const Geometry& g, at::ScalarType dtype,
               const at::Tensor& input) {
  const std::vector<int64_t> want = output_map_sizes(g, g.mask_batch, 1);
  TORCH_CHECK(t.sizes() == at::IntArrayRef(want), op, ": ", name, " must have shape ", Parenthesised{want},
              ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == input.device(), op, ": ", name, " is on ", t.device(), " but input is on ",
              input.device());
}
}  // namespace

void check_backward_args(const char* op, const at::Tensor& grad_output, const at::Tensor& ratio,
                         const at::Tensor& updated_mask, const at::Tensor& input, const Geometry& g) {
  const std::vector<int64_t> want = output_map_sizes(g, g.N, g.C_out);
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(want), op, ": grad_output must have shape ",
              Parenthesised{want}, ", got ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), op, ": grad_output dtype ",
              grad_output.scalar_type(), " does not match input dtype ", input.scalar_type());
  TORCH_CHECK(grad_output.device() == input.device(), op, ": grad_output is on ", grad_output.device(),
              " but input is on ", input.device());
  check_map(op, "ratio", ratio, g, ratio_dtype(input.scalar_type()), input);
  check_map(op, "updated_mask", updated_mask, g, input.scalar_type(), input);
}

Geometry check_mask_update_args(const at::Tensor& mask, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation, bool multi_channel,
                                at::OptionalIntArrayRef mask_groups, MaskGroups* mask_groups_out) {
  const char* op = "pconv_cuda::mask_update";
  TORCH_CHECK(mask.dim() == 4 || mask.dim() == 5, op,
              ": mask must be a 4-D (N, C, H, W) or 5-D (N, C, D, H, W) tensor, got shape ", mask.sizes());
  const int64_t dims = mask.dim() - 2;
  TORCH_CHECK(is_supported_float(mask.scalar_type()) || mask.scalar_type() == at::kBool ||
                  mask.scalar_type() == at::kByte,
              op, ": mask must be a floating, bool or uint8 tensor, got ", mask.scalar_type());
  TORCH_CHECK(multi_channel || mask_groups.has_value() || mask.size(1) == 1, op,
              ": multi_channel=False expects a single-channel mask, got ", mask.size(1),
              " channels; pass multi_channel=True for a per-channel mask");
  // The channels the mask stands for: its own, or those its groups cover.
  int64_t channels = mask.size(1);
  if (mask_groups.has_value()) {
    channels = 0;
    for (const int64_t c : *mask_groups) channels += c;
  }
  const MaskGroups mg = check_mask_groups(op, &mask, channels, multi_channel, mask_groups);
  if (mask_groups_out != nullptr) *mask_groups_out = mg;
  check_spatial(op, "kernel_size", kernel_size, dims, 1);
  check_spatial(op, "stride", stride, dims, 1);
  check_spatial(op, "padding", padding, dims, 0);
  check_spatial(op, "dilation", dilation, dims, 1);
  const at::IntArrayRef sizes = mask.sizes().slice(2);
  Geometry g{};
  g.N = mask.size(0);
  g.C_in = channels;
  g.C_out = 1;
  g.groups = 1;
  g.multi_channel = multi_channel;
  g.mask_batch = g.N;
  g.mask_channels = mg.count();
  fill_spatial(g, dims, sizes, kernel_size, stride, padding, dilation);
  fill_output_size(op, g, sizes, kernel_size, padding, dilation);
  return g;
}

}  // namespace pconv
