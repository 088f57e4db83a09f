// The CUDA backend run by the SIMT emulation on CPU tensors: the kernels of kernels.cuh and the primitives of
// cuda_primitives.h in the op flows of common/op_flow.h, exactly as the CUDA build uses them, registered as
// torch.ops.pconv_cuda_emu.* with the same schemas. The convolution (cuDNN on a GPU) is ATen's CPU one here.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <Python.h>
#include <torch/library.h>

#include <chrono>
#include <functional>
#include <type_traits>

#include "../../common/schemas.h"
#include "simt_emu.h"  // after every library header: it defines CUDA's keywords
// clang-format off
#include "../kernels.cuh"
#include "../cuda_primitives.h"
// clang-format on

namespace pconv {
namespace emu {
namespace {

using at::Tensor;

// Runs a kernel over its grid: blocks spread over the CPU threads, the threads of a block as fibers.
struct EmuLaunch {
  template <typename... KArgs>
  void operator()(void (*kernel)(KArgs...), const cuda::LaunchConfig& cfg, std::type_identity_t<KArgs>... args) {
    const std::function<void()> body = [&] { kernel(args...); };
    pconv_emu::launch(cfg.grid, cfg.block, cfg.shared_bytes, cfg.barriers, body, [](int64_t blocks, auto&& run) {
      at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) run(b);
      });
    });
  }
  template <class Fn>
  double time_ms(Fn&& fn) {
    const auto start = std::chrono::steady_clock::now();
    fn();
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor> partial_conv2d(const Tensor& input, const c10::optional<Tensor>& mask,
                                                          const Tensor& weight, const c10::optional<Tensor>& bias,
                                                          at::IntArrayRef stride, at::IntArrayRef padding,
                                                          at::IntArrayRef dilation, int64_t groups,
                                                          bool multi_channel) {
  EmuLaunch launch;
  cuda::CudaPrimitives<EmuLaunch> prim{launch};
  return pconv::partial_conv2d(prim, input, mask, weight, bias, stride, padding, dilation, groups, multi_channel);
}

std::tuple<Tensor, Tensor, Tensor> partial_conv2d_backward(
    const Tensor& grad_output, const Tensor& masked_input, const c10::optional<Tensor>& mask, const Tensor& weight,
    const Tensor& ratio, const Tensor& updated_mask, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool multi_channel, std::array<bool, 3> output_mask) {
  EmuLaunch launch;
  cuda::CudaPrimitives<EmuLaunch> prim{launch};
  return pconv::partial_conv2d_backward(prim, grad_output, masked_input, mask, weight, ratio, updated_mask, stride,
                                        padding, dilation, groups, multi_channel, output_mask);
}

std::tuple<Tensor, Tensor> mask_update(const Tensor& mask, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                       at::IntArrayRef padding, at::IntArrayRef dilation, bool multi_channel) {
  EmuLaunch launch;
  cuda::CudaPrimitives<EmuLaunch> prim{launch};
  return pconv::mask_update(prim, mask, kernel_size, stride, padding, dilation, multi_channel);
}

// Kernels that check the emulation itself: each is right or wrong in a way a GPU would show.
template <bool kBarrier>
__global__ void reverse_kernel(const float* in, float* out) {
  __shared__ float tile[1024];
  const int64_t base = int64_t(blockIdx.x) * blockDim.x;
  tile[threadIdx.x] = in[base + threadIdx.x];
  if (kBarrier) __syncthreads();  // without it, threads read slots their peers have not written yet
  out[base + threadIdx.x] = tile[blockDim.x - 1 - threadIdx.x];
}

__global__ void divergent_barrier_kernel(const float* in, float* out) {
  if (threadIdx.x < blockDim.x / 2) __syncthreads();  // undefined behaviour on a GPU: half the block never arrives
  out[threadIdx.x] = in[threadIdx.x];
}

__global__ void atomic_sum_kernel(const float* in, float* out, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(blockDim.x) * gridDim.x) {
    atomicAdd(out, in[i]);
  }
}

__global__ void dynamic_shared_rotate_kernel(const float* in, float* out) {
  PCONV_DYNAMIC_SHARED(float, buf);
  const int64_t base = int64_t(blockIdx.x) * blockDim.x;
  buf[threadIdx.x] = in[base + threadIdx.x];
  __syncthreads();
  out[base + threadIdx.x] = buf[(threadIdx.x + 1) % blockDim.x];
}

// _emu_selftest(name, input): runs one check kernel over `input` (float32, a multiple of 64 elements) in blocks of 64.
Tensor emu_selftest(c10::string_view name, const Tensor& input) {
  TORCH_CHECK(input.scalar_type() == at::kFloat && input.numel() % 64 == 0, "input must be float32, numel % 64 == 0");
  const Tensor in = input.contiguous();
  const float* ip = in.const_data_ptr<float>();
  const unsigned blocks = static_cast<unsigned>(in.numel() / 64);
  EmuLaunch launch;
  const cuda::LaunchConfig cfg{dim3(blocks), dim3(64), 0, true};
  if (name == "atomic_sum") {
    Tensor out = at::zeros({1}, in.options());
    launch(atomic_sum_kernel, cuda::LaunchConfig{dim3(4), dim3(64), 0, false}, ip, out.mutable_data_ptr<float>(),
           in.numel());
    return out;
  }
  Tensor out = at::empty_like(in);
  float* op = out.mutable_data_ptr<float>();
  if (name == "reverse") {
    launch(reverse_kernel<true>, cfg, ip, op);
  } else if (name == "reverse_without_barrier") {
    launch(reverse_kernel<false>, cfg, ip, op);
  } else if (name == "reverse_declared_barrier_free") {
    launch(reverse_kernel<true>, cuda::LaunchConfig{dim3(blocks), dim3(64), 0, false}, ip, op);
  } else if (name == "divergent_barrier") {
    launch(divergent_barrier_kernel, cuda::LaunchConfig{dim3(1), dim3(64), 0, true}, ip, op);
  } else if (name == "dynamic_shared_rotate") {
    launch(dynamic_shared_rotate_kernel, cuda::LaunchConfig{dim3(blocks), dim3(64), 64 * sizeof(float), true}, ip, op);
  } else {
    TORCH_CHECK(false, "unknown self-test '", name, "'");
  }
  return out;
}

}  // namespace
}  // namespace emu
}  // namespace pconv

TORCH_LIBRARY(pconv_cuda_emu, m) {
  pconv::define_ops(m);
  m.def("_emu_selftest(str name, Tensor input) -> Tensor");
}

TORCH_LIBRARY_IMPL(pconv_cuda_emu, CPU, m) {
  m.impl("partial_conv2d", &pconv::emu::partial_conv2d);
  m.impl("_partial_conv2d_backward", &pconv::emu::partial_conv2d_backward);
  m.impl("mask_update", &pconv::emu::mask_update);
  m.impl("_emu_selftest", &pconv::emu::emu_selftest);
}

extern "C" PyObject* PyInit__emu(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_emu",
                                          "pconv_cuda's CUDA kernels under the SIMT emulation", -1,
                                          nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
