// Argument checking and geometry shared by every device's entry points (host code only).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>
#include <c10/util/OptionalArrayRef.h>

#include <vector>

#include "maths.h"

namespace pconv {

// The mask's maps as groups of input channels: one general form of the three masks (docs/architecture.md, "The
// maths"). Single-channel: one map covering every channel, counted once in S. Multi-channel: one map per channel.
// Grouped (mask_groups): map g covers sizes[g] consecutive channels and counts sizes[g] times in S, exactly as the
// expanded multi-channel mask would.
struct MaskGroups {
  std::vector<int64_t> sizes;  // input channels of each map (G entries summing to C_in); empty for mask=None
  bool weighted = false;       // map g counts sizes[g] times in S (multi-channel semantics), else once
  bool expanded = false;       // the mask argument repeats one map over C_in channels (stride 0): read channel 0
  int64_t count() const { return static_cast<int64_t>(sizes.size()); }
  // The mask the passes read: the one map of an expanded view (a view, no copy), else the mask itself.
  at::Tensor maps(const at::Tensor& mask) const { return expanded ? mask.narrow(1, 0, 1) : mask; }
};

// partial_conv{2,3}d / _partial_conv{2,3}d_backward arguments for `dims` (2 or 3) spatial dimensions. `op` names
// the op in error messages. *mask_groups_out (when given) receives the mask's groups.
Geometry check_conv_args(const char* op, int64_t dims, const at::Tensor& input,
                         const c10::optional<at::Tensor>& mask, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation, int64_t groups, bool multi_channel,
                         at::OptionalIntArrayRef mask_groups = c10::nullopt, MaskGroups* mask_groups_out = nullptr);

// mask_update arguments: the mask is (N, G, H, W) or (N, G, D, H, W) and plays the role of the input for the
// geometry (C_in = G, or the sum of mask_groups).
Geometry check_mask_update_args(const at::Tensor& mask, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation, bool multi_channel,
                                at::OptionalIntArrayRef mask_groups = c10::nullopt,
                                MaskGroups* mask_groups_out = nullptr);

// masked_cat arguments: inputs (N, C_i, [D,] H, W) of one dtype and device, and the mask over their C = sum C_i
// channels as a multi-channel partial convolution takes it (one map for all, one per channel, or G maps with
// mask_groups). Returns the mask's groups over the C channels.
MaskGroups check_masked_cat_args(const char* op, at::TensorList inputs, const at::Tensor& mask,
                                 at::OptionalIntArrayRef mask_groups);

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
