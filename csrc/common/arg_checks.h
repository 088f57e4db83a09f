// Argument checking and geometry shared by every device's entry points (host code only).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

#include <vector>

#include "maths.h"

namespace pconv {

// partial_conv{2,3}d / _partial_conv{2,3}d_backward arguments for `dims` (2 or 3) spatial dimensions. `op` names
// the op in error messages.
Geometry check_conv_args(const char* op, int64_t dims, const at::Tensor& input,
                         const c10::optional<at::Tensor>& mask, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation, int64_t groups, bool multi_channel);

// mask_update arguments: the mask is (N, C, H, W) or (N, C, D, H, W) and plays the role of the input for the
// geometry.
Geometry check_mask_update_args(const at::Tensor& mask, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation, bool multi_channel);

// _partial_conv{2,3}d_backward's tensors besides those check_conv_args covers.
void check_backward_args(const char* op, const at::Tensor& grad_output, const at::Tensor& ratio,
                         const at::Tensor& updated_mask, const at::Tensor& input, const Geometry& g);

// (D', H', W') or (H', W'); (D, H, W) or (H, W); and (batch, channels, output spatial sizes...).
std::vector<int64_t> input_spatial_sizes(const Geometry& g);
std::vector<int64_t> output_spatial_sizes(const Geometry& g);
std::vector<int64_t> output_map_sizes(const Geometry& g, int64_t batch, int64_t channels);
// (batch, 1, input spatial sizes...): the channel-summed mask plane.
std::vector<int64_t> input_map_sizes(const Geometry& g, int64_t batch);

// The ratio's dtype: float64 for float64 inputs, float32 otherwise (half types compute the ratio in float).
at::ScalarType ratio_dtype(at::ScalarType input_dtype);

}  // namespace pconv
