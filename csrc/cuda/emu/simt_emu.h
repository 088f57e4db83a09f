// SIMT emulation: runs the project's __global__ kernels on the CPU with the CUDA execution model, so that the very
// same kernel source that nvcc compiles is executed (and tested) on a machine without a GPU.
//
// What is modelled:
//  - threadIdx / blockIdx / blockDim / gridDim, for every thread of every block of the grid;
//  - __syncthreads() as a real barrier: each thread of a block is a fiber with its own stack; a thread
//    that reaches the barrier yields, and the block resumes only when every thread has reached it. A barrier
//    reached by only part of the block (the others returned) is an error, as it is undefined behaviour on a GPU;
//  - warps: lane = linear thread index % 32, warp = linear thread index / 32; a block whose size is not a multiple
//    of 32 ends in a partial warp whose missing lanes are absent (a mask naming them is stripped of them; a shuffle
//    reading one returns all-ones bytes: NaN for floats, -1 for integers, as its value is undefined on a GPU);
//  - warp collectives __syncwarp, __shfl_sync, __shfl_xor_sync, __shfl_down_sync, __shfl_up_sync, __ballot_sync
//    (with PTX's segment rules for `width`) and nvcuda::wmma (below), each a rendezvous of the lanes named in its
//    mask. Checked as the CUDA guide requires: the calling lane is in its mask; every lane the mask names reaches the
//    same collective with the same mask (a lane that returned, waits at __syncthreads() or at another collective is
//    an error; stricter than the guide's letter, which lets exited lanes be named); `width` a power of 2 <= 32;
//    WMMA operations on all 32 lanes with identical arguments;
//  - __shared__ variables as block-local storage (blocks of one OS thread run one after another, and blocks on
//    different OS threads get their own copy through thread_local), and dynamic shared memory sized by the launch;
//  - atomicAdd / atomicMax / atomicOr on global memory, atomic across OS threads (blocks run in parallel);
//  - kernels that declare no barrier (LaunchConfig::barriers, which covers warp collectives too) run their threads
//    as plain loops (fast path); a __syncthreads() or warp collective in such a kernel is reported, so a wrong
//    declaration cannot hide a rendezvous.
// Threads of a block interleave only at __syncthreads() and warp collectives (in thread order), so a missing one
// gives wrong results.
// Not modelled: memory-model races inside a block, bounds checks on shared memory, independent thread scheduling
// beyond the rendezvous points.
//
// nvcuda::wmma (emulation only; nvcc builds use <mma.h>): fragment<matrix_a | matrix_b | accumulator, M, N, K, T,
// row_major | col_major> for m16n16k16 with T = c10::Half or c10::BFloat16 (the kernels' scalar_t; __half and
// __nv_bfloat16 under nvcc) and m16n16k8 with T = precision::tf32 (float storage), float accumulators;
// fill_fragment, load_matrix_sync, store_matrix_sync, mma_sync. Each is a warp collective: all 32 lanes, the same
// arguments (pointer, ldm, layout, fill value); the pointer 32-byte aligned, ldm a multiple of 16 bytes (8 16-bit
// or 4 float elements). mma_sync multiplies exactly and accumulates in float in k order; tf32 inputs are rounded to
// nearest (ties away, as cvt.rna.tf32.f32) in mma_sync, so x[] holds the loaded floats as on a GPU and a kernel's
// own __float_to_tf32 is idempotent with it. Each lane holds rows*cols/32 elements in a fixed permuted order (not
// row-major, not the GPU's): only element-wise operations applied to all of x[] are portable, as the guide says.
// Include this header only in host-compiled (g++) translation units, after every library header: it defines
// CUDA's keywords as macros.
#pragma once

#if defined(__CUDACC__)
#error "simt_emu.h is the CPU emulation of CUDA; nvcc builds use the real thing"
#endif

#include <ucontext.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <atomic>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace pconv_emu {

// Switching between the threads of a block. x86-64: a 14-instruction switch of the callee-saved registers (glibc's
// swapcontext also saves the signal mask with a system call: 10x slower on kernels with barriers); elsewhere
// ucontext. This header must be included by one translation unit only (it defines the switch routine).
#if defined(__x86_64__)
extern "C" void pconv_emu_switch(void** save_sp, void* next_sp);
asm(R"(
  .text
  .globl pconv_emu_switch
  .hidden pconv_emu_switch
  .type pconv_emu_switch,@function
pconv_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size pconv_emu_switch, .-pconv_emu_switch
)");

struct Context {
  void* sp = nullptr;
  // A fresh context that starts in fn() on [stack, stack + bytes); fn must never return.
  void start(void (*fn)(), char* stack, size_t bytes, Context*) {
    uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t(15);
    void** p = reinterpret_cast<void**>(top);
    *--p = nullptr;                        // fn's return address slot: keeps the ABI's 16-byte alignment
    *--p = reinterpret_cast<void*>(fn);    // where the switch's ret lands
    for (int i = 0; i < 6; ++i) *--p = nullptr;  // rbp rbx r12-r15
    sp = p;
  }
  static void jump(Context& from, Context& to) { pconv_emu_switch(&from.sp, to.sp); }
};
#else
struct Context {
  ucontext_t uc;
  void start(void (*fn)(), char* stack, size_t bytes, Context* link) {
    getcontext(&uc);
    uc.uc_stack.ss_sp = stack;
    uc.uc_stack.ss_size = bytes;
    uc.uc_link = &link->uc;
    makecontext(&uc, fn, 0);
  }
  static void jump(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
};
#endif

struct ThreadCoords {
  dim3 thread_idx, block_idx, block_dim, grid_dim;
};

// The coordinates of the emulated thread running on this OS thread right now.
inline thread_local ThreadCoords* g_current = nullptr;

class Block;
inline thread_local Block* g_block = nullptr;

// Dynamic shared memory of the block running on this OS thread.
inline thread_local std::vector<unsigned char> g_dynamic_shared;

// One lane's side of a warp collective, on the lane's stack while it waits for the rest of its mask.
struct WarpCall {
  const char* name;  // for messages: "__shfl_sync", "wmma::load_matrix_sync", ...
  unsigned mask;
  // Runs the collective once for the lanes of its mask: lanes[l] is lane l's call, nullptr for a lane outside the
  // mask (or absent from a partial warp). Its address also identifies the collective (operation and types).
  void (*run)(WarpCall* const* lanes);
  // Arguments that must agree on every lane (WMMA): pointer, ldm, layout, fill value.
  const void* ptr = nullptr;
  uint64_t args[3] = {0, 0, 0};
  bool same_args = false;  // compare ptr and args between lanes
  // The lane's operands and result.
  uint64_t value = 0;
  uint32_t arg = 0;
  uint32_t width = 32;
  uint64_t result = 0;
  void* frag[4] = {nullptr, nullptr, nullptr, nullptr};
};

inline std::string hex_mask(unsigned m) {
  static const char digits[] = "0123456789abcdef";
  std::string s = "0x";
  for (int i = 28; i >= 0; i -= 4) s += digits[(m >> i) & 15];
  return s;
}

class Block {
 public:
  static constexpr size_t kStackBytes = 64 * 1024;

  // Runs one block of `body` with `block_dim` threads, each as a fiber; returns when every thread has returned.
  void run(const std::function<void()>& body, dim3 block_idx, dim3 block_dim, dim3 grid_dim) {
    const size_t n = size_t(block_dim.x) * block_dim.y * block_dim.z;
    if (fibers_.size() < n) {
      fibers_.resize(n);
      for (auto& f : fibers_) {
        if (!f.stack) f.stack.reset(new char[kStackBytes]);
      }
    }
    body_ = &body;
    n_ = n;
    for (size_t t = 0; t < n; ++t) {
      Fiber& f = fibers_[t];
      f.coords = ThreadCoords{dim3(unsigned(t % block_dim.x), unsigned((t / block_dim.x) % block_dim.y),
                                   unsigned(t / (size_t(block_dim.x) * block_dim.y))),
                              block_idx, block_dim, grid_dim};
      f.state = State::ready;
      f.ctx.start(&Block::entry, f.stack.get(), kStackBytes, &scheduler_);
    }
    Block* outer = g_block;
    g_block = this;
    struct Restore {  // also when a check throws
      Block* outer;
      ~Restore() {
        g_block = outer;
        g_current = nullptr;
      }
    } restore{outer};
    bool released = false;  // every thread reached the barrier: they run on
    for (;;) {
      // Runs every ready thread until it returns or waits at a barrier or a warp collective.
      size_t at_barrier = 0, at_warp = 0;
      for (size_t t = 0; t < n; ++t) {
        Fiber& f = fibers_[t];
        if (f.state == State::ready || (released && f.state == State::barrier)) {
          f.state = State::ready;
          running_ = &f;
          g_current = &f.coords;
          Context::jump(scheduler_, f.ctx);
          if (error_) std::rethrow_exception(std::exchange(error_, nullptr));  // thrown inside the fiber
        }
        if (f.state == State::barrier) ++at_barrier;
        else if (f.state == State::warp) ++at_warp;
      }
      released = false;
      if (at_warp != 0) {  // every live thread waits: the warp collectives complete (or are reported) first
        resolve_warps();
        continue;
      }
      if (at_barrier == 0) break;
      if (at_barrier != n) {
        throw std::runtime_error("SIMT emulation: __syncthreads() reached by " + std::to_string(at_barrier) + " of " +
                                 std::to_string(n) + " threads of a block while the others had returned");
      }
      released = true;
    }
  }

  void barrier() {
    Fiber* f = running_;
    f->state = State::barrier;
    Context::jump(f->ctx, scheduler_);
    g_current = &f->coords;
  }

  // The running thread's lane and the number of lanes of its warp (32, or fewer in a partial last warp).
  unsigned lane() const { return unsigned(running_ - fibers_.data()) % 32; }
  unsigned warp_lanes() const {
    const size_t base = size_t(running_ - fibers_.data()) / 32 * 32;
    return unsigned(n_ - base < 32 ? n_ - base : 32);
  }

  // Waits until every lane of c.mask has arrived at the same collective; then c.result is set.
  void warp_collective(WarpCall& c) {
    Fiber* f = running_;
    const unsigned l = lane();
    if (!((c.mask >> l) & 1u)) {
      throw std::runtime_error(std::string("SIMT emulation: lane ") + std::to_string(l) + " calls " + c.name +
                               " with mask " + hex_mask(c.mask) + ", which does not include the calling lane");
    }
    f->call = &c;
    f->state = State::warp;
    Context::jump(f->ctx, scheduler_);
    g_current = &f->coords;
  }

 private:
  enum class State : unsigned char { ready, barrier, warp, done };
  struct Fiber {
    Context ctx;
    std::unique_ptr<char[]> stack;
    ThreadCoords coords;
    State state = State::ready;
    WarpCall* call = nullptr;
  };

  [[noreturn, gnu::cold, gnu::noinline]] static void warp_error(size_t warp, unsigned lane, const WarpCall& c,
                                                                const std::string& what) {
    throw std::runtime_error("SIMT emulation: warp " + std::to_string(warp) + " of a block: lane " +
                             std::to_string(lane) + " is at " + c.name + "(mask " + hex_mask(c.mask) + ") while " +
                             what);
  }

  // Every live thread waits. Checks each waiting lane's mask, then runs each collective once and readies its lanes.
  [[gnu::noinline]] void resolve_warps() {
    for (size_t base = 0, w = 0; base < n_; base += 32, ++w) {
      const unsigned lanes = unsigned(n_ - base < 32 ? n_ - base : 32);
      const unsigned present = lanes == 32 ? ~0u : (1u << lanes) - 1u;
      for (unsigned l = 0; l < lanes; ++l) {
        const Fiber& f = fibers_[base + l];
        if (f.state != State::warp) continue;
        const WarpCall& c = *f.call;
        for (unsigned m = c.mask & present; m != 0; m &= m - 1) {
          const unsigned j = unsigned(__builtin_ctz(m));
          const Fiber& g = fibers_[base + j];
          const std::string other = "lane " + std::to_string(j) + ", named in the mask, ";
          if (g.state == State::done) warp_error(w, l, c, other + "had returned");
          if (g.state == State::barrier) warp_error(w, l, c, other + "is at __syncthreads()");
          const WarpCall& d = *g.call;
          if (d.run != c.run) {
            warp_error(w, l, c, other + "is at " + d.name + "(mask " + hex_mask(d.mask) +
                                    "): the lanes of a mask must reach the same collective");
          }
          if (d.mask != c.mask) {
            warp_error(w, l, c, other + "is there with mask " + hex_mask(d.mask) + ": the masks must be equal");
          }
          if (c.same_args && (d.ptr != c.ptr || d.args[0] != c.args[0] || d.args[1] != c.args[1] ||
                              d.args[2] != c.args[2])) {
            warp_error(w, l, c, other + "passes different arguments (pointer, ldm, layout or value): a WMMA "
                                        "operation takes the same arguments on all 32 lanes");
          }
        }
      }
      unsigned handled = 0;
      for (unsigned l = 0; l < lanes; ++l) {
        Fiber& f = fibers_[base + l];
        if (f.state != State::warp || ((handled >> l) & 1u)) continue;
        const unsigned m = f.call->mask & present;
        WarpCall* group[32] = {};
        for (unsigned r = m; r != 0; r &= r - 1) group[__builtin_ctz(r)] = fibers_[base + __builtin_ctz(r)].call;
        f.call->run(group);
        for (unsigned r = m; r != 0; r &= r - 1) fibers_[base + __builtin_ctz(r)].state = State::ready;
        handled |= m;
      }
    }
  }

  static void entry() {
    Block* b = g_block;
    try {
      (*b->body_)();
    } catch (...) {  // an exception must not unwind past the fiber's first frame
      b->error_ = std::current_exception();
    }
    Fiber* f = b->running_;
    f->state = State::done;
    Context::jump(f->ctx, b->scheduler_);  // never resumed
  }

  std::vector<Fiber> fibers_;
  size_t n_ = 0;
  Context scheduler_;
  Fiber* running_ = nullptr;
  const std::function<void()>* body_ = nullptr;
  std::exception_ptr error_;
};

inline thread_local ThreadCoords g_loop_coords;
inline thread_local bool g_in_barrier_free_kernel = false;

// Runs a barrier-free block as a plain loop over its threads.
inline void run_block_as_loop(const std::function<void()>& body, dim3 block_idx, dim3 block_dim, dim3 grid_dim) {
  g_loop_coords.block_idx = block_idx;
  g_loop_coords.block_dim = block_dim;
  g_loop_coords.grid_dim = grid_dim;
  struct Reset {  // also when the kernel throws
    ~Reset() {
      g_in_barrier_free_kernel = false;
      g_current = nullptr;
    }
  } reset;
  g_current = &g_loop_coords;
  g_in_barrier_free_kernel = true;
  for (unsigned z = 0; z < block_dim.z; ++z)
    for (unsigned y = 0; y < block_dim.y; ++y)
      for (unsigned x = 0; x < block_dim.x; ++x) {
        g_loop_coords.thread_idx = dim3(x, y, z);
        body();
      }
}

inline void syncthreads() {
  if (g_in_barrier_free_kernel || g_block == nullptr) {
    throw std::logic_error(
        "SIMT emulation: __syncthreads() in a kernel launched as barrier-free; declare barriers=true in its "
        "launch configuration");
  }
  g_block->barrier();
}

// The block running the calling thread, for a warp collective.
inline Block& warp_block(const char* name) {
  if (g_in_barrier_free_kernel || g_block == nullptr) {
    throw std::logic_error(std::string("SIMT emulation: ") + name +
                           " in a kernel launched as barrier-free; a warp collective needs barriers=true in its "
                           "launch configuration");
  }
  return *g_block;
}

template <typename T>
uint64_t to_bits(const T& v) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "warp shuffles move types of up to 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}

template <typename T>
T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

inline void run_nothing(WarpCall* const*) {}

inline void run_ballot(WarpCall* const* lanes) {
  unsigned bits = 0;
  for (unsigned l = 0; l < 32; ++l) {
    if (lanes[l] && lanes[l]->value) bits |= 1u << l;
  }
  for (unsigned l = 0; l < 32; ++l) {
    if (lanes[l]) lanes[l]->result = bits;
  }
}

enum class ShflMode { idx, bfly, down, up };

// PTX shfl.sync with c = ((32 - width) << 8) | (up ? 0 : 31), as CUDA's intrinsics issue it: a lane reads lane j of
// its segment of `width` lanes (bfly may read an earlier segment), its own value when j is past the segment's end.
// A source lane outside the mask (or absent) yields all-ones bytes: its value is undefined on a GPU.
template <ShflMode kMode>
void run_shfl(WarpCall* const* lanes) {
  for (unsigned l = 0; l < 32; ++l) {
    WarpCall* c = lanes[l];
    if (!c) continue;
    const unsigned seg = 32 - c->width, b = c->arg & 31u;
    const unsigned min_lane = l & seg, max_lane = kMode == ShflMode::up ? min_lane : (l & seg) | (31u & ~seg);
    unsigned j = l;
    bool ok = true;
    if constexpr (kMode == ShflMode::idx) {
      j = min_lane | (b & ~seg);
      ok = j <= max_lane;
    } else if constexpr (kMode == ShflMode::bfly) {
      j = l ^ b;
      ok = j <= max_lane;
    } else if constexpr (kMode == ShflMode::down) {
      j = l + b;
      ok = j <= max_lane;
    } else {
      ok = l >= b && l - b >= max_lane;
      j = l - b;
    }
    if (!ok) j = l;
    c->result = lanes[j] ? lanes[j]->value : ~uint64_t(0);
  }
}

template <ShflMode kMode, typename T>
T shfl(const char* name, unsigned mask, T var, unsigned arg, int width) {
  Block& b = warp_block(name);
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    throw std::runtime_error(std::string("SIMT emulation: ") + name + " with width " + std::to_string(width) +
                             ": width must be a power of 2 no larger than 32");
  }
  WarpCall c{name, mask, &run_shfl<kMode>};
  c.value = to_bits(var);
  c.arg = arg;
  c.width = unsigned(width);
  b.warp_collective(c);
  return from_bits<T>(c.result);
}

// `for_each_block(count, fn)` runs fn(block_linear_index) for every block, possibly on several OS threads.
template <class ForEachBlock>
void launch(dim3 grid, dim3 block, size_t dynamic_shared_bytes, bool barriers, const std::function<void()>& body,
            ForEachBlock&& for_each_block) {
  const int64_t threads = int64_t(block.x) * block.y * block.z;
  const int64_t blocks = int64_t(grid.x) * grid.y * grid.z;
  if (threads == 0 || blocks == 0) return;
  // The hardware limits a GPU would reject the launch for (cudaErrorInvalidConfiguration).
  if (threads > 1024) throw std::invalid_argument("SIMT emulation: more than 1024 threads per block");
  if (block.z > 64) throw std::invalid_argument("SIMT emulation: blockDim.z > 64");
  if (grid.y > 65535 || grid.z > 65535) {
    throw std::invalid_argument("SIMT emulation: gridDim.y or gridDim.z > 65535");
  }
  for_each_block(blocks, [&](int64_t b) {
    thread_local Block runner;
    if (g_dynamic_shared.size() < dynamic_shared_bytes) g_dynamic_shared.resize(dynamic_shared_bytes);
    const dim3 idx(unsigned(b % grid.x), unsigned((b / grid.x) % grid.y), unsigned(b / (int64_t(grid.x) * grid.y)));
    if (barriers) {
      runner.run(body, idx, block, grid);
    } else {
      run_block_as_loop(body, idx, block, grid);
    }
  });
}

template <typename T>
T atomic_add(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value, std::memory_order_relaxed);
}

template <typename T>
T atomic_max(T* address, T value) {
  std::atomic_ref<T> ref(*address);
  T old = ref.load(std::memory_order_relaxed);
  while (old < value && !ref.compare_exchange_weak(old, value, std::memory_order_relaxed)) {
  }
  return old;
}

template <typename T>
T atomic_or(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_or(value, std::memory_order_relaxed);
}

}  // namespace pconv_emu

// CUDA's warp intrinsics, for kernels compiled by g++ under this emulation.
constexpr int warpSize = 32;

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::pconv_emu::WarpCall c{"__syncwarp", mask, &::pconv_emu::run_nothing};
  ::pconv_emu::warp_block("__syncwarp").warp_collective(c);
}

template <typename T>
T __shfl_sync(unsigned mask, T var, int srcLane, int width = 32) {
  return ::pconv_emu::shfl<::pconv_emu::ShflMode::idx>("__shfl_sync", mask, var, unsigned(srcLane), width);
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = 32) {
  return ::pconv_emu::shfl<::pconv_emu::ShflMode::bfly>("__shfl_xor_sync", mask, var, unsigned(laneMask), width);
}

template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned int delta, int width = 32) {
  return ::pconv_emu::shfl<::pconv_emu::ShflMode::down>("__shfl_down_sync", mask, var, delta, width);
}

template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned int delta, int width = 32) {
  return ::pconv_emu::shfl<::pconv_emu::ShflMode::up>("__shfl_up_sync", mask, var, delta, width);
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  ::pconv_emu::Block& b = ::pconv_emu::warp_block("__ballot_sync");
  ::pconv_emu::WarpCall c{"__ballot_sync", mask, &::pconv_emu::run_ballot};
  c.value = predicate != 0;
  b.warp_collective(c);
  return unsigned(c.result);
}

// nvcuda::wmma under the emulation (see the header comment).
namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}  // namespace precision

// cvt.rna.tf32.f32: round to 10 mantissa bits, to nearest, ties away from zero; Inf and NaN unchanged.
inline float __float_to_tf32(float v) {
  uint32_t b = std::bit_cast<uint32_t>(v);
  if ((b & 0x7f800000u) != 0x7f800000u) b = (b + 0x1000u) & 0xffffe000u;
  return std::bit_cast<float>(b);
}

namespace detail {

template <class T>
struct storage {
  using type = T;
};
template <>
struct storage<precision::tf32> {
  using type = float;
};

template <class Use, int M, int N, int K>
struct tile_shape;
template <int M, int N, int K>
struct tile_shape<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
  static constexpr const char* name = "matrix_a";
};
template <int M, int N, int K>
struct tile_shape<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
  static constexpr const char* name = "matrix_b";
};
template <int M, int N, int K>
struct tile_shape<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
  static constexpr const char* name = "accumulator";
};

template <class Use, int M, int N, int K, class T, class Layout>
constexpr bool supported() {
  constexpr bool shape16 = M == 16 && N == 16 && K == 16, shape8 = M == 16 && N == 16 && K == 8;
  if constexpr (std::is_same_v<Use, accumulator>) {
    return std::is_same_v<T, float> && std::is_void_v<Layout> && (shape16 || shape8);
  } else {
    constexpr bool layout = std::is_same_v<Layout, row_major> || std::is_same_v<Layout, col_major>;
    constexpr bool half = std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>;
    return layout && ((half && shape16) || (std::is_same_v<T, precision::tf32> && shape8));
  }
}

}  // namespace detail

// Element (r, c) of the tile, e = r * cols + c, is element p / 32 of lane p % 32, p = (37 e + 11) mod (rows * cols):
// a fixed permutation, neither row-major nor the GPU's layout.
template <class Use, int M, int N, int K, class T, class Layout = void>
class fragment {
  static_assert(detail::supported<Use, M, N, K, T, Layout>(),
                "SIMT emulation: WMMA supports m16n16k16 half/bfloat16 (row_major or col_major), m16n16k8 tf32, "
                "and float accumulators of those shapes");

 public:
  using element_type = typename detail::storage<T>::type;
  static constexpr int rows = detail::tile_shape<Use, M, N, K>::rows;
  static constexpr int cols = detail::tile_shape<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols / 32;
  element_type x[num_elements];

  // Lane and index within x[] of element (r, c).
  static constexpr unsigned slot(int r, int c) { return unsigned((37 * (r * cols + c) + 11) % (rows * cols)); }
};

namespace detail {

using ::pconv_emu::WarpCall;

template <class Frag>
typename Frag::element_type& element(WarpCall* const* lanes, int slot_of_frag, int r, int c) {
  const unsigned p = Frag::slot(r, c);
  return static_cast<Frag*>(lanes[p % 32]->frag[slot_of_frag])->x[p / 32];
}

// The checks every lane makes before a WMMA collective: a full warp, the guide's pointer and ldm rules.
inline ::pconv_emu::Block& wmma_block(const char* name, const void* ptr, unsigned ldm, size_t element_bytes) {
  ::pconv_emu::Block& b = ::pconv_emu::warp_block(name);
  if (b.warp_lanes() != 32) {
    throw std::runtime_error(std::string("SIMT emulation: ") + name + " needs all 32 lanes of a warp; this warp has " +
                             std::to_string(b.warp_lanes()) + " (the block size is not a multiple of 32)");
  }
  if (ptr != nullptr && reinterpret_cast<uintptr_t>(ptr) % 32 != 0) {
    throw std::runtime_error(std::string("SIMT emulation: ") + name + " with a pointer that is not 256-bit " +
                             "(32-byte) aligned");
  }
  if (ptr != nullptr && (ldm * element_bytes) % 16 != 0) {
    throw std::runtime_error(std::string("SIMT emulation: ") + name + " with ldm " + std::to_string(ldm) +
                             ", which is not a multiple of " + std::to_string(16 / element_bytes) + " for " +
                             std::to_string(element_bytes) + "-byte elements");
  }
  return b;
}

// load_matrix_sync / store_matrix_sync: the same collective over (pointer, ldm, memory layout, one fragment).
inline void memory_collective(const char* name, void (*run)(WarpCall* const*), const void* ptr, unsigned ldm,
                              size_t element_bytes, layout_t layout, void* frag) {
  ::pconv_emu::Block& b = wmma_block(name, ptr, ldm, element_bytes);
  WarpCall c{name, ~0u, run};
  c.same_args = true;
  c.ptr = ptr;
  c.args[0] = ldm;
  c.args[1] = layout;
  c.frag[0] = frag;
  b.warp_collective(c);
}

template <class Frag>
void run_load(WarpCall* const* lanes) {
  using E = typename Frag::element_type;
  const E* p = static_cast<const E*>(lanes[0]->ptr);
  const size_t ldm = lanes[0]->args[0];
  const bool row_major = lanes[0]->args[1] == mem_row_major;
  for (int r = 0; r < Frag::rows; ++r)
    for (int c = 0; c < Frag::cols; ++c) element<Frag>(lanes, 0, r, c) = p[row_major ? r * ldm + c : c * ldm + r];
}

template <class Frag>
void run_store(WarpCall* const* lanes) {
  using E = typename Frag::element_type;
  E* p = static_cast<E*>(const_cast<void*>(lanes[0]->ptr));
  const size_t ldm = lanes[0]->args[0];
  const bool row_major = lanes[0]->args[1] == mem_row_major;
  for (int r = 0; r < Frag::rows; ++r)
    for (int c = 0; c < Frag::cols; ++c) p[row_major ? r * ldm + c : c * ldm + r] = element<Frag>(lanes, 0, r, c);
}

template <class Frag>
void run_fill(WarpCall* const* lanes) {
  for (unsigned l = 0; l < 32; ++l) {
    auto* f = static_cast<Frag*>(lanes[l]->frag[0]);
    for (auto& v : f->x) v = ::pconv_emu::from_bits<typename Frag::element_type>(lanes[l]->args[0]);
  }
}

template <class T>
float mma_input(T v) {
  if constexpr (std::is_same_v<T, float>) {
    return __float_to_tf32(v);  // float storage only for tf32
  } else {
    return static_cast<float>(v);
  }
}

// d = a b + c: exact products (at most 11-bit significands), accumulated in float in k order.
template <class D, class A, class B, class C>
void run_mma(WarpCall* const* lanes) {
  constexpr int M = A::rows, K = A::cols, N = B::cols;
  float a[M][K], b[K][N], acc[M][N];
  for (int r = 0; r < M; ++r)
    for (int k = 0; k < K; ++k) a[r][k] = mma_input(element<A>(lanes, 1, r, k));
  for (int k = 0; k < K; ++k)
    for (int c = 0; c < N; ++c) b[k][c] = mma_input(element<B>(lanes, 2, k, c));
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) {
      float s = element<C>(lanes, 3, r, c);
      for (int k = 0; k < K; ++k) s += a[r][k] * b[k][c];
      acc[r][c] = s;
    }
  for (int r = 0; r < M; ++r)  // after every read: d may be a, b or c
    for (int c = 0; c < N; ++c) element<D>(lanes, 0, r, c) = acc[r][c];
}

}  // namespace detail

template <class Use, int M, int N, int K, class T, class Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& a,
                   const std::type_identity_t<typename fragment<Use, M, N, K, T, Layout>::element_type>& v) {
  using Frag = fragment<Use, M, N, K, T, Layout>;
  ::pconv_emu::Block& b = detail::wmma_block("wmma::fill_fragment", nullptr, 0, 0);
  ::pconv_emu::WarpCall c{"wmma::fill_fragment", ~0u, &detail::run_fill<Frag>};
  c.same_args = true;
  c.args[0] = ::pconv_emu::to_bits(v);
  c.frag[0] = &a;
  b.warp_collective(c);
}

// matrix_a / matrix_b: the memory layout is the fragment's.
template <class Use, int M, int N, int K, class T, class Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& a,
                      const typename fragment<Use, M, N, K, T, Layout>::element_type* mptr, unsigned ldm) {
  static_assert(!std::is_same_v<Use, accumulator>, "an accumulator load takes a layout_t");
  detail::memory_collective("wmma::load_matrix_sync", &detail::run_load<fragment<Use, M, N, K, T, Layout>>, mptr, ldm,
                            sizeof(*mptr), std::is_same_v<Layout, row_major> ? mem_row_major : mem_col_major, &a);
}

template <int M, int N, int K, class T>
void load_matrix_sync(fragment<accumulator, M, N, K, T>& a, const T* mptr, unsigned ldm, layout_t layout) {
  detail::memory_collective("wmma::load_matrix_sync", &detail::run_load<fragment<accumulator, M, N, K, T>>, mptr, ldm,
                            sizeof(T), layout, &a);
}

template <int M, int N, int K, class T>
void store_matrix_sync(T* mptr, const fragment<accumulator, M, N, K, T>& a, unsigned ldm, layout_t layout) {
  using Frag = fragment<accumulator, M, N, K, T>;
  detail::memory_collective("wmma::store_matrix_sync", &detail::run_store<Frag>, mptr, ldm, sizeof(T), layout,
                            const_cast<Frag*>(&a));
}

template <int M, int N, int K, class T, class LA, class LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  using D = fragment<accumulator, M, N, K, float>;
  using A = fragment<matrix_a, M, N, K, T, LA>;
  using B = fragment<matrix_b, M, N, K, T, LB>;
  ::pconv_emu::Block& blk = detail::wmma_block("wmma::mma_sync", nullptr, 0, 0);
  ::pconv_emu::WarpCall call{"wmma::mma_sync", ~0u, &detail::run_mma<D, A, B, D>};
  call.frag[0] = &d;
  call.frag[1] = const_cast<A*>(&a);
  call.frag[2] = const_cast<B*>(&b);
  call.frag[3] = const_cast<D*>(&c);
  blk.warp_collective(call);
}

}  // namespace wmma
}  // namespace nvcuda

#define threadIdx (::pconv_emu::g_current->thread_idx)
#define blockIdx (::pconv_emu::g_current->block_idx)
#define blockDim (::pconv_emu::g_current->block_dim)
#define gridDim (::pconv_emu::g_current->grid_dim)
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static thread_local
#define __syncthreads() ::pconv_emu::syncthreads()
#define atomicAdd(address, value) ::pconv_emu::atomic_add(address, value)
#define atomicMax(address, value) ::pconv_emu::atomic_max(address, value)
#define atomicOr(address, value) ::pconv_emu::atomic_or(address, value)
// Dynamic shared memory: `PCONV_DYNAMIC_SHARED(float, buf);` declares `float* buf` over the launch's bytes.
#define PCONV_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(::pconv_emu::g_dynamic_shared.data())
