// The op schemas of pconv_cuda (one place), and the Python module that loading them needs.
// Kernels register per device: csrc/cpu/ (CPU) and csrc/cuda/ (CUDA).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(pconv_cuda, m) {
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

#ifndef PCONV_WITH_CUDA
#define PCONV_WITH_CUDA 0
#endif

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "pconv_cuda's compiled ops", -1,
                                              nullptr, nullptr, nullptr, nullptr, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr) PyModule_AddIntConstant(module, "WITH_CUDA", PCONV_WITH_CUDA);
  return module;
}
