// The cudnn_fused route's graph, plan cache and execution (cudnn_fused.h). Compiled in every CUDA build; the
// graph code only where setup.py found cudnn-frontend's headers and cudnn.h (PCONV_WITH_CUDNN_FRONTEND).
#include "cudnn_fused.h"

#include <torch/library.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>

#include "../common/arg_checks.h"

#include <chrono>
#include <list>
#include <memory>
#include <mutex>
#include <sstream>
#include <unordered_map>
#include <vector>

#if PCONV_WITH_CUDNN_FRONTEND
#include <c10/cuda/CUDAStream.h>
#include <ATen/cudnn/Handle.h>
#include <cudnn_frontend.h>
#endif

namespace pconv {
namespace cuda {

#if PCONV_WITH_CUDNN_FRONTEND

namespace fe = cudnn_frontend;

namespace {

enum Uid : int64_t { kX = 1, kW, kFactor, kBias, kUpdate, kY };

fe::DataType_t io_type(at::ScalarType t) {
  return t == at::kHalf ? fe::DataType_t::HALF : t == at::kBFloat16 ? fe::DataType_t::BFLOAT16 : fe::DataType_t::FLOAT;
}

// NHWC strides of an (N, C, H, W) tensor (the batch does not enter them).
std::vector<int64_t> nhwc_strides(int64_t c, int64_t h, int64_t w) { return {h * w * c, 1, w * c, c}; }

std::shared_ptr<fe::graph::Graph> make_graph(const FusedCall& c) {
  const Geometry& g = c.g;
  const int64_t N = g.N, C = g.C_in, H = g.H, W = g.W, K = g.C_out, R = g.win.kh, S = g.win.kw, P = g.Ho, Q = g.Wo;
  auto graph = std::make_shared<fe::graph::Graph>();
  graph->set_io_data_type(io_type(c.dtype))
      .set_intermediate_data_type(fe::DataType_t::FLOAT)
      .set_compute_data_type(fe::DataType_t::FLOAT);
  auto x = graph->tensor(fe::graph::Tensor_attributes().set_name("masked_input").set_uid(kX).set_dim({N, C, H, W})
                             .set_stride(nhwc_strides(C, H, W)));
  auto w = graph->tensor(fe::graph::Tensor_attributes().set_name("weight").set_uid(kW).set_dim({K, C, R, S})
                             .set_stride(nhwc_strides(C, R, S)));
  auto conv = graph->conv_fprop(x, w, fe::graph::Conv_fprop_attributes()
                                          .set_name("conv")
                                          .set_padding({g.win.ph, g.win.pw})
                                          .set_stride({g.win.sh, g.win.sw})
                                          .set_dilation({g.win.dh, g.win.dw}));
  // The per-pixel maps: (N, 1, P, Q), one value per output pixel, broadcast over the output channels.
  auto map = [&](const char* name, int64_t uid, fe::DataType_t type) {
    return graph->tensor(fe::graph::Tensor_attributes().set_name(name).set_uid(uid).set_dim({N, 1, P, Q})
                             .set_stride({P * Q, 1, Q, 1}).set_data_type(type));
  };
  auto pointwise = [&](const char* name, fe::PointwiseMode_t mode) {
    return fe::graph::Pointwise_attributes().set_name(name).set_mode(mode).set_compute_data_type(
        fe::DataType_t::FLOAT);
  };
  std::shared_ptr<fe::graph::Tensor_attributes> y;
  if (c.bias) {
    auto scaled = graph->pointwise(conv, map("scale", kFactor, fe::DataType_t::FLOAT),
                                   pointwise("times_scale", fe::PointwiseMode_t::MUL));
    auto b = graph->tensor(fe::graph::Tensor_attributes().set_name("bias").set_uid(kBias).set_dim({1, K, 1, 1})
                               .set_stride({K, 1, K, K}));
    auto biased = graph->pointwise(scaled, b, pointwise("plus_bias", fe::PointwiseMode_t::ADD));
    y = graph->pointwise(biased, map("updated_mask", kUpdate, io_type(c.dtype)),
                         pointwise("times_update", fe::PointwiseMode_t::MUL));
  } else {
    y = graph->pointwise(conv, map("ratio", kFactor, fe::DataType_t::FLOAT),
                         pointwise("times_ratio", fe::PointwiseMode_t::MUL));
  }
  y->set_output(true).set_name("output").set_uid(kY).set_data_type(io_type(c.dtype)).set_dim({N, K, P, Q})
      .set_stride(nhwc_strides(K, P, Q));
  return graph;
}

std::string status_text(const char* step, fe::error_t status) {
  return std::string(step) + ": " + status.get_message();
}

// The graph validated (no GPU): nullptr and why not, or the graph.
std::shared_ptr<fe::graph::Graph> validated_graph(const FusedCall& c, std::string* why) {
  *why = fused_surface_reason(c);
  if (!why->empty()) return nullptr;
  auto graph = make_graph(c);
  const auto status = graph->validate();
  if (!status.is_good()) {
    *why = status_text("graph validation", status);
    return nullptr;
  }
  return graph;
}

struct Plan {
  std::shared_ptr<fe::graph::Graph> graph;  // null: unsupported, `why` says why
  std::string why;
  int64_t workspace = 0;
  double build_ms = 0;
  std::mutex run;  // Graph::execute updates the graph's own caches: one thread at a time (it only enqueues work)
};

std::string plan_key(const FusedCall& c) {
  const Geometry& g = c.g;
  std::ostringstream k;
  k << "cuda:" << c.device << ' ' << c10::toString(c.dtype) << " N" << g.N << " C" << g.C_in << " H" << g.H << " W"
    << g.W << " O" << g.C_out << " k" << g.win.kh << 'x' << g.win.kw << " s" << g.win.sh << 'x' << g.win.sw << " p"
    << g.win.ph << 'x' << g.win.pw << " d" << g.win.dh << 'x' << g.win.dw << (c.bias ? " bias" : "")
    << " tf32=" << c.tf32 << " det=" << c.deterministic;
  return k.str();
}

// The graph's plan on the current device: heuristics mode A, then the fallback list; engines that would change
// the numbers PyTorch's own cuDNN calls promise are deselected (down-converted inputs always; tensor cores for
// float32 without TF32; non-deterministic engines under the determinism flags).
std::shared_ptr<Plan> build_plan(const FusedCall& c) {
  auto plan = std::make_shared<Plan>();
  const auto start = std::chrono::steady_clock::now();
  auto graph = validated_graph(c, &plan->why);
  if (graph) {
    cudnnHandle_t handle = at::native::getCudnnHandle();
    fe::error_t status = graph->build_operation_graph(handle);
    const char* step = "operation graph";
    if (status.is_good()) {
      step = "heuristics";
      status = graph->create_execution_plans({fe::HeurMode_t::A, fe::HeurMode_t::FALLBACK});
    }
    if (status.is_good()) {
      std::vector<fe::NumericalNote_t> barred{fe::NumericalNote_t::DOWN_CONVERT_INPUTS};
      if (c.dtype == at::kFloat && !c.tf32) barred.push_back(fe::NumericalNote_t::TENSOR_CORE);
      if (c.deterministic) barred.push_back(fe::NumericalNote_t::NONDETERMINISTIC);
      graph->deselect_numeric_notes(barred);
      step = "support check";
      status = graph->check_support(handle);
    }
    if (status.is_good()) {
      step = "plan build";
      status = graph->build_plans(fe::BuildPlanPolicy_t::HEURISTICS_CHOICE);
    }
    if (status.is_good()) {
      step = "workspace size";
      status = graph->get_workspace_size(plan->workspace);
    }
    if (status.is_good()) {
      plan->graph = graph;
    } else {
      plan->why = status_text(step, status);
    }
  }
  plan->build_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  return plan;
}

// A bounded LRU cache of plans by key, failures included (a call that cannot fuse is not retried).
class PlanCache {
 public:
  std::shared_ptr<Plan> get(const FusedCall& c) {
    const std::string key = plan_key(c);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = index_.find(key);
      if (it != index_.end()) {
        order_.splice(order_.begin(), order_, it->second);
        return it->second->second;
      }
    }
    auto plan = build_plan(c);  // outside the lock: it compiles kernels
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = index_.find(key);
    if (it != index_.end()) return it->second->second;  // another thread built it meanwhile
    order_.emplace_front(key, plan);
    index_[key] = order_.begin();
    if (static_cast<int64_t>(order_.size()) > kFusedCacheCapacity) {
      index_.erase(order_.back().first);
      order_.pop_back();
    }
    return plan;
  }

  void mark_failed(const FusedCall& c, const std::string& why) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = index_.find(plan_key(c));
    if (it == index_.end()) return;
    auto failed = std::make_shared<Plan>();
    failed->why = why;
    failed->build_ms = it->second->second->build_ms;
    it->second->second = failed;
  }

  std::vector<std::string> entries() {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<std::string> out;
    for (const auto& [key, plan] : order_) {
      std::ostringstream line;
      line << key << " -> ";
      if (plan->graph) {
        line << "plan (" << plan->build_ms << " ms to build, workspace " << plan->workspace << " bytes)";
      } else {
        line << "unsupported: " << plan->why << " (" << plan->build_ms << " ms)";
      }
      out.push_back(line.str());
    }
    return out;
  }

 private:
  std::mutex mutex_;
  std::list<std::pair<std::string, std::shared_ptr<Plan>>> order_;  // most recently used first
  std::unordered_map<std::string, decltype(order_)::iterator> index_;
};

PlanCache& cache() {
  static PlanCache* c = new PlanCache();  // never destroyed: plans outlive Python's teardown of the handle pool
  return *c;
}

// A (mask_batch, 1, H', W') map as the graph's (N, 1, H', W') operand: a batch-1 mask's maps are copied per image
// (maps are small; the graph's broadcast operands are (1,1,1,1), (1,K,1,1), (N,1,P,Q) or (N,K,P,Q)).
at::Tensor per_image(const at::Tensor& map, int64_t n) {
  return map.size(0) == n ? map.contiguous() : map.expand({n, map.size(1), map.size(2), map.size(3)}).contiguous();
}

}  // namespace

std::string fused_build_status() { return ""; }

std::string fused_unsupported(const FusedCall& call, FusedStage stage) {
  if (stage == FusedStage::Surface) return fused_surface_reason(call);
  if (stage == FusedStage::Validate) {
    std::string why;
    validated_graph(call, &why);
    return why;
  }
  const std::string surface = fused_surface_reason(call);
  if (!surface.empty()) return surface;  // not cached: no plan was attempted
  TORCH_CHECK(call.device >= 0, "cudnn_fused: a plan needs a CUDA tensor");
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(call.device));
  return cache().get(call)->why;
}

bool fused_run(const FusedCall& call, const at::Tensor& conv_in, const at::Tensor& weight, const at::Tensor& bias,
               const at::Tensor& factor, const at::Tensor& updated_mask, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(conv_in.device());
  const std::shared_ptr<Plan> plan = cache().get(call);
  if (!plan->graph) return false;
  const int64_t N = call.g.N;
  const at::Tensor x = conv_in.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor w = weight.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor f = per_image(factor, N);
  const at::Tensor u = call.bias ? per_image(updated_mask, N) : at::Tensor();
  const at::Tensor b = call.bias ? bias.contiguous() : at::Tensor();
  out = at::empty({N, call.g.C_out, call.g.Ho, call.g.Wo}, conv_in.options(), at::MemoryFormat::ChannelsLast);
  std::unordered_map<int64_t, void*> pack{{kX, x.data_ptr()}, {kW, w.data_ptr()}, {kFactor, f.data_ptr()},
                                          {kY, out.data_ptr()}};
  if (call.bias) {
    pack[kBias] = b.data_ptr();
    pack[kUpdate] = u.data_ptr();
  }
  // From PyTorch's caching allocator on the current stream: safe under CUDA-graph capture.
  const at::Tensor workspace = at::empty({std::max<int64_t>(plan->workspace, 1)}, conv_in.options().dtype(at::kByte));
  cudnnHandle_t handle = at::native::getCudnnHandle();
  TORCH_CHECK(cudnnSetStream(handle, c10::cuda::getCurrentCUDAStream().stream()) == CUDNN_STATUS_SUCCESS,
              "cudnn_fused: cudnnSetStream failed");
  fe::error_t status;
  {
    std::lock_guard<std::mutex> lock(plan->run);
    status = plan->graph->execute(handle, pack, workspace.data_ptr());
  }
  if (!status.is_good()) {
    cache().mark_failed(call, status_text("execute", status));
    return false;
  }
  return true;
}

std::vector<std::string> fused_cache_entries() { return cache().entries(); }

#else  // built without cudnn-frontend

std::string fused_build_status() {
  return "pconv_cuda was built without cudnn-frontend (pip install nvidia-cudnn-frontend, or set "
         "CUDNN_FRONTEND_INCLUDE, then rebuild)";
}

std::string fused_unsupported(const FusedCall& call, FusedStage stage) {
  const std::string surface = fused_surface_reason(call);
  return stage == FusedStage::Surface || !surface.empty() ? surface : fused_build_status();
}

bool fused_run(const FusedCall&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
               const at::Tensor&, at::Tensor&) {
  return false;
}

std::vector<std::string> fused_cache_entries() { return {}; }

#endif

namespace {

// pconv_cuda.routes.cudnn_fused_support: why the route would not take a call described by (CPU, meta or CUDA)
// tensors, "" when it would, looking as far as `stage` ("surface", "validate": no GPU needed; "plan": this GPU).
std::string support_op(const at::Tensor& input, const c10::optional<at::Tensor>& mask, const at::Tensor& weight,
                       const c10::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, int64_t groups, bool multi_channel, std::string stage) {
  const char* op = "pconv_cuda::_cudnn_fused_support";
  TORCH_CHECK(input.dim() == 4 || input.dim() == 5, op, ": input must be 4-D or 5-D, got ", input.dim(), "-D");
  const Geometry g = check_conv_args(op, input.dim() - 2, input, mask, weight, bias, stride, padding, dilation,
                                     groups, multi_channel);
  FusedStage s = FusedStage::Plan;
  if (stage == "surface") {
    s = FusedStage::Surface;
  } else if (stage == "validate") {
    s = FusedStage::Validate;
  } else {
    TORCH_CHECK(stage == "plan", op, ": stage must be 'surface', 'validate' or 'plan', got '", stage, "'");
  }
  return fused_unsupported(fused_call(g, input, bias.has_value() && bias->defined()), s);
}

}  // namespace

}  // namespace cuda
}  // namespace pconv

TORCH_LIBRARY_FRAGMENT(pconv_cuda, m) {
  m.def("_cudnn_fused_support(Tensor input, Tensor? mask, Tensor weight, Tensor? bias, int[] stride, int[] padding, "
        "int[] dilation, int groups, bool multi_channel, str stage) -> str",
        &pconv::cuda::support_op);
  m.def("_cudnn_fused_status() -> str", &pconv::cuda::fused_build_status);
  m.def("_cudnn_fused_plans() -> str[]", &pconv::cuda::fused_cache_entries);
}
