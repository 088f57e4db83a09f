// The CUDA backend: the op flows of common/op_flow.h over CudaPrimitives with real launches on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <type_traits>

#include "kernels.cuh"
#include "cuda_primitives.h"
#include "cudnn_fused.h"

namespace pconv {
namespace cuda {
namespace {

struct CudaLaunch {
  cudaStream_t stream;
  // major * 10 + minor of the current device: which tensor-core fragments its kernels may use.
  static int compute_capability() {
    const int device = c10::cuda::current_device();
    int major = 0, minor = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    return major * 10 + minor;
  }
  template <typename... KArgs>
  void operator()(void (*kernel)(KArgs...), const LaunchConfig& cfg, std::type_identity_t<KArgs>... args) {
    if (cfg.grid.x == 0 || cfg.grid.y == 0 || cfg.grid.z == 0) return;  // empty tensors
    kernel<<<cfg.grid, cfg.block, cfg.shared_bytes, stream>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // The cudnn_fused route: its plan for this call (built once per key and cached), and the plan run.
  static bool fused_supported(const Geometry& g, const at::Tensor& input, bool has_bias) {
    return fused_unsupported(fused_call(g, input, has_bias), FusedStage::Plan).empty();
  }
  static bool fused_conv(const at::Tensor& conv_in, const at::Tensor& weight, const at::Tensor& bias,
                         const at::Tensor& factor, const at::Tensor& updated_mask, const Geometry& g, at::Tensor& out) {
    return fused_run(fused_call(g, conv_in, bias.defined()), conv_in, weight, bias, factor, updated_mask, out);
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

// The op flows (op_flow.h, impl_ops) run with these primitives, on the current stream of the tensor's device.
struct CudaBackend {
  template <class Fn>
  static auto run(const at::Tensor& on, Fn&& fn) {
    const c10::cuda::CUDAGuard guard(on.device());
    CudaLaunch launch{c10::cuda::getCurrentCUDAStream().stream()};
    CudaPrimitives<CudaLaunch> prim{launch};
    return fn(prim);
  }
};

}  // namespace
}  // namespace cuda
}  // namespace pconv

TORCH_LIBRARY_IMPL(pconv_cuda, CUDA, m) { pconv::impl_ops<pconv::cuda::CudaBackend>(m); }
