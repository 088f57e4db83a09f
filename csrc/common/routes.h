// How a forward convolution is computed, and how the route is chosen (docs/architecture.md, "Routes").
//   aten_conv  ATen's convolution (cuDNN, oneDNN) on X*M, then our epilogue pass: the default.
//   gemm       our own GEMM over X*M (CPU: im2col + GEMM per image, then the epilogue pass; CUDA: an
//              implicit-GEMM kernel with the epilogue fused): it wins where the vendor's per-call cost outweighs a
//              small GEMM.
//   cudnn_fused  CUDA only: one cuDNN kernel runs the convolution and the epilogue, built through cuDNN's graph
//              API (cuda/cudnn_fused.h); calls its graph cannot take run aten_conv.
// The mask pass, the ratio map and the backward are the same on every route.
#pragma once

#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace pconv {

enum class Route { AtenConv, Gemm, CudnnFused };

const char* route_name(Route route);

// The route forced for a device type ("cpu" or "cuda"): pconv_cuda.routes.set_route's override if set, else the
// environment variable (PCONV_CPU_ROUTE / PCONV_CUDA_ROUTE), else none (the backend's automatic choice).
std::optional<Route> forced_route(const std::string& device_type);

// The override behind pconv_cuda.routes: "auto" clears it. Unknown names are errors.
void set_route_override(std::string device_type, std::string route);
std::string route_override(std::string device_type);

// The route the last forward on this thread took for a device type ("" before any), for tests and debugging.
std::string last_route(std::string device_type);
void record_route(const std::string& device_type, Route route);

// Autotuning: the route cached for `key`, or, the first time, each candidate timed once by time_ms(route) (which
// runs it) and the fastest cached. The cache lives for the process; clear_route_cache empties it.
Route tuned_route(const std::string& key, const std::vector<Route>& candidates,
                  const std::function<double(Route)>& time_ms);
void clear_route_cache();
std::vector<std::string> route_cache_entries();  // "key -> route" lines

// Test hook: "aten_conv=2.5,gemm=1" makes tuned_route use these times (the candidates still run); "" restores
// the real timer.
void set_route_timer(std::string spec);

}  // namespace pconv
