// The CUDA backend: the op flows of common/op_flow.h over CudaPrimitives with real launches on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <type_traits>

#include "kernels.cuh"
#include "cuda_primitives.h"

namespace pconv {
namespace cuda {
namespace {

struct CudaLaunch {
  cudaStream_t stream;
  template <typename... KArgs>
  void operator()(void (*kernel)(KArgs...), const LaunchConfig& cfg, std::type_identity_t<KArgs>... args) {
    if (cfg.grid.x == 0 || cfg.grid.y == 0 || cfg.grid.z == 0) return;  // empty tensors
    kernel<<<cfg.grid, cfg.block, cfg.shared_bytes, stream>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // Device time of fn's work on this stream, by CUDA events (the autotuner's timer).
  template <class Fn>
  double time_ms(Fn&& fn) {
    cudaEvent_t start, stop;
    C10_CUDA_CHECK(cudaEventCreate(&start));
    C10_CUDA_CHECK(cudaEventCreate(&stop));
    C10_CUDA_CHECK(cudaEventRecord(start, stream));
    fn();
    C10_CUDA_CHECK(cudaEventRecord(stop, stream));
    C10_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    C10_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    C10_CUDA_CHECK(cudaEventDestroy(start));
    C10_CUDA_CHECK(cudaEventDestroy(stop));
    return ms;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> partial_conv2d_cuda(
    const at::Tensor& input, const c10::optional<at::Tensor>& mask, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, bool multi_channel) {
  const c10::cuda::CUDAGuard guard(input.device());
  CudaLaunch launch{c10::cuda::getCurrentCUDAStream().stream()};
  CudaPrimitives<CudaLaunch> prim{launch};
  return partial_conv2d(prim, input, mask, weight, bias, stride, padding, dilation, groups, multi_channel);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> partial_conv2d_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& masked_input, const c10::optional<at::Tensor>& mask,
    const at::Tensor& weight, const at::Tensor& ratio, const at::Tensor& updated_mask, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool multi_channel,
    std::array<bool, 3> output_mask) {
  const c10::cuda::CUDAGuard guard(masked_input.device());
  CudaLaunch launch{c10::cuda::getCurrentCUDAStream().stream()};
  CudaPrimitives<CudaLaunch> prim{launch};
  return partial_conv2d_backward(prim, grad_output, masked_input, mask, weight, ratio, updated_mask, stride, padding,
                                 dilation, groups, multi_channel, output_mask);
}

std::tuple<at::Tensor, at::Tensor> mask_update_cuda(const at::Tensor& mask, at::IntArrayRef kernel_size,
                                                    at::IntArrayRef stride, at::IntArrayRef padding,
                                                    at::IntArrayRef dilation, bool multi_channel) {
  const c10::cuda::CUDAGuard guard(mask.device());
  CudaLaunch launch{c10::cuda::getCurrentCUDAStream().stream()};
  CudaPrimitives<CudaLaunch> prim{launch};
  return mask_update(prim, mask, kernel_size, stride, padding, dilation, multi_channel);
}

}  // namespace
}  // namespace cuda
}  // namespace pconv

TORCH_LIBRARY_IMPL(pconv_cuda, CUDA, m) {
  m.impl("partial_conv2d", &pconv::cuda::partial_conv2d_cuda);
  m.impl("_partial_conv2d_backward", &pconv::cuda::partial_conv2d_backward_cuda);
  m.impl("mask_update", &pconv::cuda::mask_update_cuda);
}
