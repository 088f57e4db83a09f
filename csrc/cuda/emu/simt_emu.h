// SIMT emulation: runs the project's __global__ kernels on the CPU with the CUDA execution model, so that the very
// same kernel source that nvcc compiles is executed (and tested) on a machine without a GPU.
//
// What is modelled:
//  - threadIdx / blockIdx / blockDim / gridDim, for every thread of every block of the grid;
//  - __syncthreads() as a real barrier: each thread of a block is a fiber with its own stack; a thread
//    that reaches the barrier yields, and the block resumes only when every thread has reached it. A barrier
//    reached by only part of the block (the others returned) is an error, as it is undefined behaviour on a GPU;
//  - __shared__ variables as block-local storage (blocks of one OS thread run one after another, and blocks on
//    different OS threads get their own copy through thread_local), and dynamic shared memory sized by the launch;
//  - atomicAdd / atomicMax / atomicOr on global memory, atomic across OS threads (blocks run in parallel);
//  - kernels that declare no barrier run their threads as plain loops (fast path); a __syncthreads() in such a
//    kernel is reported, so a wrong declaration cannot hide a barrier.
// Not modelled: warps (no warp intrinsics are used by the kernels), memory-model races inside a block (threads of a
// block interleave only at barriers), and bounds checks on shared memory.
// Include this header only in host-compiled (g++) translation units, after every library header: it defines
// CUDA's keywords as macros.
#pragma once

#if defined(__CUDACC__)
#error "simt_emu.h is the CPU emulation of CUDA; nvcc builds use the real thing"
#endif

#include <ucontext.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
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
    for (size_t t = 0; t < n; ++t) {
      Fiber& f = fibers_[t];
      f.coords = ThreadCoords{dim3(unsigned(t % block_dim.x), unsigned((t / block_dim.x) % block_dim.y),
                                   unsigned(t / (size_t(block_dim.x) * block_dim.y))),
                              block_idx, block_dim, grid_dim};
      f.done = false;
      f.at_barrier = false;
      f.ctx.start(&Block::entry, f.stack.get(), kStackBytes, &scheduler_);
    }
    Block* outer = g_block;
    g_block = this;
    for (;;) {
      size_t done = 0, waiting = 0;
      for (size_t t = 0; t < n; ++t) {
        Fiber& f = fibers_[t];
        if (f.done) {
          ++done;
          continue;
        }
        f.at_barrier = false;
        running_ = &f;
        g_current = &f.coords;
        Context::jump(scheduler_, f.ctx);
        if (error_) {  // thrown inside the fiber: rethrown here, on the scheduler's stack
          g_block = outer;
          g_current = nullptr;
          std::rethrow_exception(std::exchange(error_, nullptr));
        }
        if (f.at_barrier) ++waiting; else ++done;
      }
      if (waiting == 0) break;
      if (done != 0) {
        g_block = outer;
        throw std::runtime_error("SIMT emulation: __syncthreads() reached by " + std::to_string(waiting) + " of " +
                                 std::to_string(n) + " threads of a block while the others had returned");
      }
    }
    g_block = outer;
    g_current = nullptr;
  }

  void barrier() {
    Fiber* f = running_;
    f->at_barrier = true;
    Context::jump(f->ctx, scheduler_);
    g_current = &f->coords;
  }

 private:
  struct Fiber {
    Context ctx;
    std::unique_ptr<char[]> stack;
    ThreadCoords coords;
    bool done = false;
    bool at_barrier = false;
  };

  static void entry() {
    Block* b = g_block;
    try {
      (*b->body_)();
    } catch (...) {  // an exception must not unwind past the fiber's first frame
      b->error_ = std::current_exception();
    }
    Fiber* f = b->running_;
    f->done = true;
    Context::jump(f->ctx, b->scheduler_);  // never resumed
  }

  std::vector<Fiber> fibers_;
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

#define threadIdx (::pconv_emu::g_current->thread_idx)
#define blockIdx (::pconv_emu::g_current->block_idx)
#define blockDim (::pconv_emu::g_current->block_dim)
#define gridDim (::pconv_emu::g_current->grid_dim)
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static thread_local
#define __syncthreads() ::pconv_emu::syncthreads()
#define atomicAdd(address, value) ::pconv_emu::atomic_add(address, value)
#define atomicMax(address, value) ::pconv_emu::atomic_max(address, value)
#define atomicOr(address, value) ::pconv_emu::atomic_or(address, value)
// Dynamic shared memory: `PCONV_DYNAMIC_SHARED(float, buf);` declares `float* buf` over the launch's bytes.
#define PCONV_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(::pconv_emu::g_dynamic_shared.data())
