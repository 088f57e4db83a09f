#include "routes.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <map>
#include <mutex>

namespace pconv {
namespace {

std::mutex g_mutex;
std::map<std::string, std::string> g_override;     // device type -> route name
std::map<std::string, Route> g_cache;              // tuning key -> winner
std::map<std::string, double> g_fake_times;        // route name -> ms (test hook)
thread_local std::map<std::string, std::string> g_last;

const char* env_variable(const std::string& device_type) {
  if (device_type == "cpu") return "PCONV_CPU_ROUTE";
  if (device_type == "cuda") return "PCONV_CUDA_ROUTE";
  TORCH_CHECK(false, "pconv_cuda routes: device_type must be 'cpu' or 'cuda', got '", device_type, "'");
}

// "auto" -> nullopt; the old names "vendor" and "one_pass" are still accepted. cudnn_fused exists on CUDA only.
std::optional<Route> parse_route(const std::string& name, const std::string& what, const std::string& device_type) {
  if (name == "auto") return std::nullopt;
  if (name == "aten_conv" || name == "vendor") return Route::AtenConv;
  if (name == "gemm" || name == "one_pass") return Route::Gemm;
  if (name == "cudnn_fused" && device_type != "cpu") return Route::CudnnFused;
  TORCH_CHECK(false, what, " must be ",
              device_type == "cpu" ? "'auto', 'aten_conv' or 'gemm'" : "'auto', 'aten_conv', 'gemm' or 'cudnn_fused'",
              " (old names: 'vendor', 'one_pass'), got '", name, "'",
              name == "cudnn_fused" ? " (cudnn_fused is a CUDA route)" : "");
}

}  // namespace

const char* route_name(Route route) {
  switch (route) {
    case Route::AtenConv:
      return "aten_conv";
    case Route::Gemm:
      return "gemm";
    case Route::CudnnFused:
      return "cudnn_fused";
  }
  return "?";
}

std::optional<Route> forced_route(const std::string& device_type) {
  const char* variable = env_variable(device_type);
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = g_override.find(device_type);
    if (it != g_override.end()) return parse_route(it->second, "the route override", device_type);
  }
  const char* env = std::getenv(variable);
  return parse_route(env ? env : "auto", variable, device_type);
}

void set_route_override(std::string device_type, std::string route) {
  env_variable(device_type);
  const auto parsed = parse_route(route, "route", device_type);
  std::lock_guard<std::mutex> lock(g_mutex);
  if (!parsed) {
    g_override.erase(device_type);
  } else {
    g_override[device_type] = route_name(*parsed);  // old names are stored under the current ones
  }
}

std::string route_override(std::string device_type) {
  env_variable(device_type);
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_override.find(device_type);
  return it == g_override.end() ? "auto" : it->second;
}

std::string last_route(std::string device_type) {
  env_variable(device_type);
  auto it = g_last.find(device_type);
  return it == g_last.end() ? "" : it->second;
}

void record_route(const std::string& device_type, Route route) { g_last[device_type] = route_name(route); }

Route tuned_route(const std::string& key, const std::vector<Route>& candidates,
                  const std::function<double(Route)>& time_ms) {
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = g_cache.find(key);
    if (it != g_cache.end()) return it->second;
  }
  Route best = candidates.front();
  double best_ms = 0;
  for (size_t i = 0; i < candidates.size(); ++i) {
    double ms = time_ms(candidates[i]);  // outside the lock: it runs kernels
    {
      std::lock_guard<std::mutex> lock(g_mutex);
      auto fake = g_fake_times.find(route_name(candidates[i]));
      if (fake != g_fake_times.end()) ms = fake->second;
    }
    if (i == 0 || ms < best_ms) {
      best = candidates[i];
      best_ms = ms;
    }
  }
  std::lock_guard<std::mutex> lock(g_mutex);
  g_cache.emplace(key, best);
  return best;
}

void clear_route_cache() {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_cache.clear();
}

std::vector<std::string> route_cache_entries() {
  std::lock_guard<std::mutex> lock(g_mutex);
  std::vector<std::string> out;
  for (const auto& [key, route] : g_cache) out.push_back(key + " -> " + route_name(route));
  return out;
}

void set_route_timer(std::string spec) {
  std::map<std::string, double> times;
  size_t pos = 0;
  while (pos < spec.size()) {
    const size_t end = std::min(spec.find(',', pos), spec.size());
    const std::string item = spec.substr(pos, end - pos);
    const size_t eq = item.find('=');
    TORCH_CHECK(eq != std::string::npos, "route timer spec must be 'route=ms,...', got '", spec, "'");
    const std::string name = item.substr(0, eq);
    const auto route = parse_route(name, "route timer spec", "cuda");
    TORCH_CHECK(route.has_value(), "route timer spec names a route, not 'auto'");
    times[route_name(*route)] = std::stod(item.substr(eq + 1));
    pos = end + 1;
  }
  std::lock_guard<std::mutex> lock(g_mutex);
  g_fake_times = std::move(times);
}

}  // namespace pconv
