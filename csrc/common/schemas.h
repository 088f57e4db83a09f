// The op schemas, written once: the pconv_cuda library and the SIMT-emulation library (pconv_cuda_emu) both
// define their ops with this function, so the emulated ops cannot drift from the real ones.
#pragma once

#include <torch/library.h>

#include <string>

#include "routes.h"

namespace pconv {

inline void define_ops(torch::Library& m) {
  // partial_conv2d and partial_conv3d: one schema each for 2 and 3 spatial dimensions (a 1-D convolution is a 2-D
  // one of height 1). Returns (output, updated_mask, ratio, masked_input). updated_mask and ratio are
  // (N_mask, 1, [D',] H', W'), ratio in float32 (float64 for float64 input); masked_input is X*M (the convolution's
  // input, kept for the weight gradient), or an empty tensor for mask=None (the input itself is the convolution's
  // input then).
  // _partial_conv{2,3}d_backward (private): the gradients for input, weight and bias, those asked for by
  // output_mask. masked_input is the forward's masked_input (the input for mask=None); the mask zeroes grad_input
  // in holes.
  // mask_groups (with multi_channel=True): the mask has G maps, map g covering mask_groups[g] consecutive input
  // channels (summing to C_in), with exactly the semantics of that mask expanded to C_in channels.
  // input_masked: the input already is X*M for this mask (exactly 0 in holes; masked_cat forms it): the forward
  // reads the mask only for the ratio map and convolves the input as it is (masked_input is then empty), and
  // grad_input is the convolution's, not zeroed in holes (the input's producer applies M in its backward).
  for (const std::string n : {"2", "3"}) {
    const std::string forward = "partial_conv" + n + "d(Tensor input, Tensor? mask, Tensor weight, Tensor? bias, int[" +
                                n + "] stride, int[" + n + "] padding, int[" + n + "] dilation, int groups, bool "
                                "multi_channel, int[]? mask_groups=None, bool input_masked=False) -> (Tensor output, Tensor updated_mask, "
                                "Tensor ratio, Tensor masked_input)";
    const std::string backward = "_partial_conv" + n + "d_backward(Tensor grad_output, Tensor masked_input, Tensor? "
                                 "mask, Tensor weight, Tensor ratio, Tensor updated_mask, int[" + n + "] stride, "
                                 "int[" + n + "] padding, int[" + n + "] dilation, int groups, bool multi_channel, "
                                 "bool[3] output_mask, int[]? mask_groups=None, bool input_masked=False) -> (Tensor grad_input, "
                                 "Tensor grad_weight, Tensor grad_bias)";
    m.def(forward.c_str());
    m.def(backward.c_str());
  }
  // The mask path alone, 2-D or 3-D by the mask's dim(): (ratio, updated_mask), each (N, 1, [D',] H', W'); with
  // mask_groups, the mask's G maps stand for sum(mask_groups) channels.
  m.def(
      "mask_update(Tensor mask, int[] kernel_size, int[] stride, int[] padding, int[] dilation, "
      "bool multi_channel, int[]? mask_groups=None) -> (Tensor ratio, Tensor updated_mask)");
  // X*M of the channel concatenation of `inputs` (4-D or 5-D, one dtype, batch and spatial size) in one pass: the
  // mask as a multi-channel partial convolution's (1 map for every channel, one per channel, or G maps covering
  // mask_groups[g] channels), holes exactly 0. Differentiable in the inputs (M * grad, 0 in holes).
  m.def("masked_cat(Tensor[] inputs, Tensor mask, int[]? mask_groups=None) -> Tensor");
  // Route control (routes.h), for pconv_cuda.routes: no tensors, so each library keeps its own state.
  m.def("_set_route(str device_type, str route) -> ()", &set_route_override);
  m.def("_get_route(str device_type) -> str", &route_override);
  m.def("_last_route(str device_type) -> str", &last_route);
  m.def("_clear_route_cache() -> ()", &clear_route_cache);
  m.def("_route_cache() -> str[]", &route_cache_entries);
  m.def("_set_route_timer(str spec) -> ()", &set_route_timer);
}

}  // namespace pconv
