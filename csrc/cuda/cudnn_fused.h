// The cudnn_fused route (docs/architecture.md, "Routes"): the convolution and the renormalisation in one cuDNN
// kernel, through cuDNN's graph API (cudnn-frontend). The graph, for X*M in NHWC:
//
//   with bias:     Y = U * (conv(X*M, W) * scale + b)      conv_fprop -> MUL scale -> ADD b -> MUL U
//   without bias:  Y = conv(X*M, W) * ratio                conv_fprop -> MUL ratio
//
// scale = win / S (maths.h, window_scale) and ratio = scale * U, so both are today's Y = raw * ratio + b * U with
// the products formed in float inside the kernel. Per call key a plan is built once (graph validated, operation
// graph, heuristics A then the fallback list, support check, plan) and kept in a bounded cache, failures too; it
// runs on the current stream with PyTorch's cuDNN handle and a workspace from PyTorch's caching allocator.
// Declared in every CUDA build; without cudnn-frontend at build time (PCONV_WITH_CUDNN_FRONTEND unset) each call
// reports why not and the flow falls back to aten_conv.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>

#include <string>
#include <vector>

#include "../common/maths.h"

namespace pconv {
namespace cuda {

// One forward call as the graph and its plan see it.
struct FusedCall {
  Geometry g;
  at::ScalarType dtype;
  bool nhwc;           // channels_last input (the graph is NHWC)
  bool bias;
  bool tf32;           // torch.backends.cudnn.allow_tf32: float32 may run on tensor cores as TF32
  bool deterministic;  // torch.use_deterministic_algorithms or torch.backends.cudnn.deterministic
  int device;
};

// The call's description, with the global flags read now.
inline FusedCall fused_call(const Geometry& g, const at::Tensor& input, bool bias) {
  const auto& ctx = at::globalContext();
  return FusedCall{g,
                   input.scalar_type(),
                   input.dim() == 4 && input.suggest_memory_format() == at::MemoryFormat::ChannelsLast,
                   bias,
                   ctx.allowTF32CuDNN(),
                   ctx.deterministicAlgorithms() || ctx.deterministicCuDNN(),
                   input.is_cuda() ? static_cast<int>(input.get_device()) : -1};
}

// What the call's description excludes, "" when nothing does: the graph is 2-D, NHWC, ungrouped, in a half type
// or float32 (its support surface for runtime fusion). Shared with the SIMT emulation's model of the route.
inline std::string fused_surface_reason(const FusedCall& c) {
  const Geometry& g = c.g;
  if (g.spatial_dims != 2) return "3-D convolution (the graph is 2-D)";
  if (g.N == 0 || g.C_in == 0 || g.C_out == 0 || g.Ho * g.Wo == 0) return "empty tensor";
  if (c.dtype != at::kHalf && c.dtype != at::kBFloat16 && c.dtype != at::kFloat) {
    return std::string("dtype ") + c10::toString(c.dtype) + " (the graph takes float16, bfloat16, float32)";
  }
  if (!c.nhwc) return "NCHW input (runtime fusion needs NHWC: pass channels_last tensors)";
  if (g.groups != 1) return "grouped convolution";
  return "";
}

// "" when the route is built into this extension, else why not.
std::string fused_build_status();

// Why the route cannot take this call, "" when it can. `stage` says how far to look:
//   Surface   what the call's description excludes (fused_surface_reason)
//   Validate  then the graph constructed and validated by cudnn-frontend (no GPU needed)
//   Plan      then the operation graph, heuristics, support check and plan on the current GPU (cached per key)
enum class FusedStage { Surface, Validate, Plan };
std::string fused_unsupported(const FusedCall& call, FusedStage stage);

// Runs the call's cached plan (fused_unsupported(call, Plan) must have returned ""): out (N, C_out, H', W'),
// channels_last, from conv_in = X*M (channels_last), the weight (made channels_last here), bias (or undefined),
// `factor` (scale with a bias, ratio without; float32, (mask_batch, 1, H', W')) and U. False if cuDNN failed to
// run it: the key is then marked unsupported and the caller falls back.
bool fused_run(const FusedCall& call, const at::Tensor& conv_in, const at::Tensor& weight, const at::Tensor& bias,
               const at::Tensor& factor, const at::Tensor& updated_mask, at::Tensor& out);

// The plan cache, most recently used first: "key -> plan (build ms, workspace bytes)" or "key -> unsupported:
// why (ms spent)". It holds at most kFusedCacheCapacity keys.
std::vector<std::string> fused_cache_entries();
constexpr int64_t kFusedCacheCapacity = 256;

}  // namespace cuda
}  // namespace pconv
