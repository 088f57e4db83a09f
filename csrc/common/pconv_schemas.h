// The op schemas, written once: the pconv_cuda library and the SIMT-emulation library (pconv_cuda_emu) both
// define their ops with this function, so the emulated ops cannot drift from the real ones.
#pragma once

#include <torch/library.h>

namespace pconv {

inline void define_ops(torch::Library& m) {
  // Returns (output, updated_mask, ratio); updated_mask and ratio are (N_mask, 1, H', W'), ratio in float32
  // (float64 for float64 input). mask=None means an all-ones mask.
  m.def(
      "partial_conv2d(Tensor input, Tensor? mask, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, bool multi_channel) -> (Tensor output, Tensor updated_mask, Tensor ratio)");
  // Private: the gradients of partial_conv2d for input, weight and bias, those asked for by output_mask.
  m.def(
      "_partial_conv2d_backward(Tensor grad_output, Tensor input, Tensor? mask, Tensor weight, Tensor ratio, "
      "Tensor updated_mask, int[2] stride, int[2] padding, int[2] dilation, int groups, bool multi_channel, "
      "bool[3] output_mask) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  // The mask path alone: (ratio, updated_mask), each (N, 1, H', W').
  m.def(
      "mask_update(Tensor mask, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, "
      "bool multi_channel) -> (Tensor ratio, Tensor updated_mask)");
}

}  // namespace pconv
