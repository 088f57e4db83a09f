// Argument checking and geometry shared by every device's entry points (host code only).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

#include "pconv_math.h"

namespace pconv {

// Everything an op needs to know about one call, derived once from checked arguments.
struct Geometry {
  int64_t N, C_in, H, W;  // input
  int64_t C_out;          // weight.size(0)
  int64_t Ho, Wo;         // output spatial size
  int64_t mask_batch;     // 1 or N (1 also for mask=None)
  int64_t mask_channels;  // 1, C_in (multi-channel), or 0 for mask=None
  int64_t groups;
  bool multi_channel;
  Window win;
  // sum(1) over a window: kh*kw, times C_in for a multi-channel mask.
  double window_size() const {
    return static_cast<double>(win.kh * win.kw * (multi_channel ? C_in : 1));
  }
};

// partial_conv2d / _partial_conv2d_backward arguments. `op` names the op in error messages.
Geometry check_conv_args(const char* op, const at::Tensor& input, const c10::optional<at::Tensor>& mask,
                         const at::Tensor& weight, const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool multi_channel);

// mask_update arguments: the mask is (N, C, H, W) and plays the role of the input for the geometry.
Geometry check_mask_update_args(const at::Tensor& mask, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation, bool multi_channel);

// The ratio's dtype: float64 for float64 inputs, float32 otherwise (half types compute the ratio in float).
at::ScalarType ratio_dtype(at::ScalarType input_dtype);

}  // namespace pconv
