// The pconv_cuda op library (schemas in common/schemas.h), its autograd (common/autograd.h) and the Python module
// that loading it needs. Kernels register per device: cpu/cpu_backend.cpp and cuda/cuda_backend.cu.
#include <Python.h>
#include <torch/library.h>

#include "common/autograd.h"
#include "common/schemas.h"

namespace {
struct MainLibrary {
  static constexpr const char* ns = "pconv_cuda";
};
}  // namespace

TORCH_LIBRARY(pconv_cuda, m) { pconv::define_ops(m); }
TORCH_LIBRARY_IMPL(pconv_cuda, Autograd, m) { pconv::impl_autograd<MainLibrary>(m); }

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
