// The scheduler of the CPU emulation of CUDA kernels (emu.h), and the functions of CUDA's runtime API
// that csrc/cuda calls, answered for the emulated device (CUDA's own declarations; the library is
// built with -fvisibility=hidden and linked with -Bsymbolic, so its calls reach these definitions
// and no other library's calls do, also where libcudart is loaded).
#include "emu.h"

#include "../cuda_plan/occupancy.h"

#include <sys/mman.h>
#include <setjmp.h>
#include <ucontext.h>

#include <algorithm>
#include <cstring>
#include <deque>
#include <map>
#include <numeric>
#include <sstream>
#include <stdexcept>
#include <vector>

namespace emu {

Dim3 block_idx, grid_dim, block_dim;

namespace {

enum class State { kRunning, kAtBarrier, kAtWarpSync, kDone };

// A cp.async not yet completed: its destination and the source bytes read at issue.
struct PendingCopy {
  void* dst;
  size_t bytes;
  unsigned char data[16];
};

struct Thread {
  Dim3 idx;
  unsigned linear = 0;
  ucontext_t context;  // its start (makecontext); afterwards it is resumed by _longjmp to `resume`
  jmp_buf resume;
  bool started = false;
  State state = State::kDone;
  int barrier_line = 0;     // the __syncthreads this thread waits at
  long barriers = 0;        // how many it has passed
  long warp_syncs = 0;      // warp exchanges passed
  std::vector<PendingCopy> open_group;             // cp.async issued since the last commit
  std::deque<std::vector<PendingCopy>> committed;  // committed groups, oldest first
};

void complete(std::vector<PendingCopy>& group) {
  for (const PendingCopy& c : group) {
    std::memcpy(c.dst, c.data, c.bytes);
  }
  group.clear();
}

constexpr size_t kStackBytes = 256 * 1024;
constexpr unsigned kMaxThreads = 1024;
constexpr size_t kSharedGuard = 4096;
constexpr int kLegacySharedLimit = 48 * 1024;

struct Emulator {
  std::vector<DeviceConfig> configs{DeviceConfig{}};
  int device = 0;
  uint64_t seed = 0;
  std::map<std::pair<int, const void*>, int> shared_limit;  // cudaFuncSetAttribute per (device, kernel)
  cudaError_t last_error = cudaSuccess;
  std::string message;

  // The block being run.
  std::vector<Thread> threads = std::vector<Thread>(kMaxThreads);
  unsigned char* stacks = nullptr;
  std::vector<unsigned char> shared;
  std::vector<unsigned char> warp_slots = std::vector<unsigned char>(kMaxThreads * 8);
  Thread* current = nullptr;
  ucontext_t scheduler;
  jmp_buf scheduler_resume;
  const std::function<void()>* body = nullptr;
  std::string error;  // of the launch being run

  const DeviceConfig& config() const {
    return configs[device];
  }
};

Emulator& emulator() {
  static Emulator e;
  return e;
}

void thread_entry() {
  Emulator& e = emulator();
  Thread* t = e.current;
  try {
    (*e.body)();
  } catch (const std::exception& ex) {
    if (e.error.empty()) {
      e.error = ex.what();
    }
  }
  // Copies never waited for complete at the thread's exit (after everything it did).
  for (auto& group : t->committed) {
    complete(group);
  }
  t->committed.clear();
  complete(t->open_group);
  t->state = State::kDone;
  _longjmp(e.scheduler_resume, 1);  // never resumed
}

// Back to the scheduler until released. Switches are _setjmp / _longjmp between the stacks that
// makecontext set up (swapcontext would also save and restore the signal mask: a system call per switch).
void yield(State waiting) {
  Emulator& e = emulator();
  Thread* t = e.current;
  t->state = waiting;
  if (_setjmp(t->resume) == 0) {
    _longjmp(e.scheduler_resume, 1);
  }
}

void resume(Thread& t) {
  Emulator& e = emulator();
  e.current = &t;
  if (_setjmp(e.scheduler_resume) == 0) {
    if (t.started) {
      _longjmp(t.resume, 1);
    }
    t.started = true;
    swapcontext(&e.scheduler, &t.context);
  }
  e.current = nullptr;
}

uint64_t mix(uint64_t x) {  // splitmix64
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

std::string where(const Thread& t) {
  std::ostringstream s;
  s << "thread " << t.linear << " of block " << block_idx.x;
  return s.str();
}

// The order threads run in between two releases: as numbered for seed 0, else reversed or shuffled.
void order_for(std::vector<unsigned>& order, unsigned n, uint64_t seed, long phase) {
  order.resize(n);
  std::iota(order.begin(), order.end(), 0u);
  if (seed == 0) {
    return;
  }
  uint64_t r = mix(seed * 1000003u + static_cast<uint64_t>(phase));
  if (r % 3 == 0) {
    std::reverse(order.begin(), order.end());
    return;
  }
  for (unsigned i = n; i > 1; --i) {
    r = mix(r);
    std::swap(order[i - 1], order[r % i]);
  }
}

// Runs one block to its end; returns false with e.error set on a failure.
bool run_block(unsigned nthreads, size_t shared_bytes) {
  Emulator& e = emulator();
  std::fill(e.shared.begin(), e.shared.begin() + static_cast<long>(shared_bytes), 0xff);
  std::fill(e.shared.begin() + static_cast<long>(shared_bytes), e.shared.end(), 0xa5);
  for (unsigned i = 0; i < nthreads; ++i) {
    Thread& t = e.threads[i];
    t.linear = i;
    t.idx = Dim3{i % block_dim.x, (i / block_dim.x) % block_dim.y, i / (block_dim.x * block_dim.y)};
    t.state = State::kRunning;
    t.started = false;
    t.barriers = t.warp_syncs = 0;
    t.open_group.clear();
    t.committed.clear();
    getcontext(&t.context);
    t.context.uc_stack.ss_sp = e.stacks + i * kStackBytes;
    t.context.uc_stack.ss_size = kStackBytes;
    t.context.uc_link = nullptr;
    makecontext(&t.context, thread_entry, 0);
  }
  std::vector<unsigned> order;
  const unsigned warps = (nthreads + 31) / 32;
  for (long phase = 0;; ++phase) {
    order_for(order, nthreads, e.seed, phase);
    for (unsigned i : order) {
      Thread& t = e.threads[i];
      if (t.state == State::kRunning) {
        resume(t);
        if (!e.error.empty()) {
          return false;
        }
      }
    }
    bool released = false;
    bool live = false;
    for (unsigned w = 0; w < warps; ++w) {
      const unsigned first = w * 32, last = std::min(nthreads, first + 32);
      unsigned waiting = 0, alive = 0;
      const Thread* a = nullptr;
      for (unsigned i = first; i < last; ++i) {
        const Thread& t = e.threads[i];
        alive += t.state != State::kDone;
        if (t.state == State::kAtWarpSync) {
          if (a != nullptr && t.warp_syncs != a->warp_syncs) {
            e.error = "warp exchange out of step: " + where(*a) + " is at its exchange " +
                std::to_string(a->warp_syncs) + ", " + where(t) + " at " + std::to_string(t.warp_syncs);
            return false;
          }
          a = &t;
          ++waiting;
        }
      }
      live = live || alive > 0;
      if (waiting > 0 && waiting == alive) {
        if (alive != last - first) {
          e.error = "__shfl_xor_sync with the full mask in a warp with exited lanes (" + where(*a) + ")";
          return false;
        }
        for (unsigned i = first; i < last; ++i) {
          e.threads[i].state = State::kRunning;
          ++e.threads[i].warp_syncs;
        }
        released = true;
      }
    }
    if (!live) {
      return true;
    }
    if (released) {
      continue;
    }
    const Thread* a = nullptr;
    for (unsigned i = 0; i < nthreads; ++i) {
      const Thread& t = e.threads[i];
      if (t.state == State::kDone) {
        continue;
      }
      if (t.state != State::kAtBarrier) {
        e.error = "deadlock: " + where(t) + " waits at a warp exchange while others wait at __syncthreads";
        return false;
      }
      if (a != nullptr && (t.barrier_line != a->barrier_line || t.barriers != a->barriers)) {
        e.error = "divergent __syncthreads: " + where(*a) + " waits at line " + std::to_string(a->barrier_line) +
            " (barrier " + std::to_string(a->barriers) + "), " + where(t) + " at line " +
            std::to_string(t.barrier_line) + " (barrier " + std::to_string(t.barriers) + ")";
        return false;
      }
      a = &t;
    }
    for (unsigned i = 0; i < nthreads; ++i) {
      Thread& t = e.threads[i];
      if (t.state == State::kAtBarrier) {
        t.state = State::kRunning;
        ++t.barriers;
      }
    }
  }
}

cudaError_t fail_launch(cudaError_t err, const std::string& message) {
  Emulator& e = emulator();
  e.last_error = err;
  e.message = message;
  return err;
}

}  // namespace

void configure(const DeviceConfig& config, uint64_t schedule_seed) {
  Emulator& e = emulator();
  auto same = [&](const DeviceConfig& c) {
    return c.multiprocessors == config.multiprocessors && c.max_shared_per_block == config.max_shared_per_block &&
        c.shared_per_sm == config.shared_per_sm && c.registers_per_thread == config.registers_per_thread;
  };
  auto it = std::find_if(e.configs.begin(), e.configs.end(), same);
  if (it == e.configs.end()) {
    e.configs.push_back(config);
    it = e.configs.end() - 1;
  }
  e.device = static_cast<int>(it - e.configs.begin());
  e.seed = schedule_seed;
}

const Dim3& thread_idx() {
  return emulator().current->idx;
}

void sync_block(int line) {
  emulator().current->barrier_line = line;
  yield(State::kAtBarrier);
}

void pipeline_copy(void* dst, const void* src, size_t bytes) {
  if (bytes > sizeof(PendingCopy::data)) {
    fail("cp.async of " + std::to_string(bytes) + " bytes (at most 16)");
  }
  PendingCopy c{dst, bytes, {}};
  std::memcpy(c.data, src, bytes);
  emulator().current->open_group.push_back(c);
}

void pipeline_commit() {
  Thread* t = emulator().current;
  t->committed.push_back(std::move(t->open_group));
  t->open_group.clear();
}

void pipeline_wait_prior(size_t groups) {
  Thread* t = emulator().current;
  while (t->committed.size() > groups) {
    complete(t->committed.front());
    t->committed.pop_front();
  }
}

void sync_warp() {
  yield(State::kAtWarpSync);
}

unsigned lane() {
  return emulator().current->linear % 32;
}

unsigned char* dynamic_shared() {
  return emulator().shared.data();
}

unsigned char* warp_slot(unsigned lane) {
  Emulator& e = emulator();
  return e.warp_slots.data() + (e.current->linear / 32 * 32 + lane) * 8;
}

void fail(const std::string& message) {
  Emulator& e = emulator();
  if (e.error.empty()) {
    e.error = message + " (" + where(*e.current) + ")";
  }
  e.current->state = State::kDone;
  _longjmp(e.scheduler_resume, 1);  // never resumed
}

void launch(const void* kernel, Dim3 grid, Dim3 block, size_t shared_bytes, cudaStream_t,
            const std::function<void()>& body) {
  Emulator& e = emulator();
  const unsigned nthreads = block.x * block.y * block.z;
  const uint64_t blocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  if (blocks == 0 || grid.x > 0x7fffffffu || nthreads == 0 || nthreads > kMaxThreads) {
    fail_launch(cudaErrorInvalidConfiguration,
                "invalid launch configuration: grid " + std::to_string(grid.x) + ", block " + std::to_string(nthreads));
    return;
  }
  const DeviceConfig& c = e.config();
  auto limit = e.shared_limit.find({e.device, kernel});
  const int allowed = limit == e.shared_limit.end() ? kLegacySharedLimit : limit->second;
  if (shared_bytes > static_cast<size_t>(std::min(allowed, c.max_shared_per_block))) {
    fail_launch(cudaErrorInvalidValue, "dynamic shared memory " + std::to_string(shared_bytes) +
                                           " bytes above the kernel's limit " + std::to_string(allowed) +
                                           " (device opt-in limit " + std::to_string(c.max_shared_per_block) + ")");
    return;
  }
  if (e.stacks == nullptr) {
    void* p = mmap(nullptr, kMaxThreads * kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (p == MAP_FAILED) {
      fail_launch(cudaErrorLaunchFailure, "emulation: no memory for the thread stacks");
      return;
    }
    e.stacks = static_cast<unsigned char*>(p);
  }
  e.shared.assign(shared_bytes + kSharedGuard, 0);
  grid_dim = grid;
  block_dim = block;
  e.body = &body;
  e.error.clear();
  // Blocks in the schedule's order too: a block that relied on another block's results of the same
  // launch would see them or not.
  if (blocks > (1u << 20)) {
    fail_launch(cudaErrorLaunchFailure, "emulation: grids above 2^20 blocks are not emulated");
    return;
  }
  std::vector<unsigned> block_order;
  order_for(block_order, static_cast<unsigned>(blocks), e.seed, -1);
  for (uint64_t b : block_order) {
    block_idx = Dim3{static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                     static_cast<unsigned>(b / (static_cast<uint64_t>(grid.x) * grid.y))};
    if (!run_block(nthreads, shared_bytes)) {
      fail_launch(cudaErrorLaunchFailure, "kernel failed in block " + std::to_string(b) + ": " + e.error);
      return;
    }
    for (size_t i = shared_bytes; i < e.shared.size(); ++i) {
      if (e.shared[i] != 0xa5) {
        fail_launch(cudaErrorLaunchFailure, "block " + std::to_string(b) + " wrote byte " + std::to_string(i) +
                                                " of dynamic shared memory, past the " + std::to_string(shared_bytes) +
                                                " bytes of the launch");
        return;
      }
    }
  }
}

}  // namespace emu

// ------------------------------------------------------------------------------------------------ runtime API

cudaError_t cudaGetDevice(int* device) {
  *device = emu::emulator().device;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  emu::Emulator& e = emu::emulator();
  if (device < 0 || device >= static_cast<int>(e.configs.size())) {
    return cudaErrorInvalidValue;
  }
  const emu::DeviceConfig& c = e.configs[device];
  switch (attr) {
    case cudaDevAttrMultiProcessorCount:
      *value = c.multiprocessors;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = c.max_shared_per_block;
      return cudaSuccess;
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  emu::Emulator& e = emu::emulator();
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > e.config().max_shared_per_block) {
    return cudaErrorInvalidValue;
  }
  e.shared_limit[{e.device, func}] = value;
  return cudaSuccess;
}

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void*, int block_size,
                                                          size_t dynamic_shared_bytes) {
  const emu::DeviceConfig& c = emu::emulator().config();
  *blocks = disalign::cuda::modelled_blocks_per_sm(block_size, c.registers_per_thread, c.shared_per_sm,
                                                   static_cast<int>(dynamic_shared_bytes));
  return cudaSuccess;
}

cudaError_t cudaGetLastError() {
  emu::Emulator& e = emu::emulator();
  const cudaError_t err = e.last_error;
  e.last_error = cudaSuccess;
  return err;
}

const char* cudaGetErrorString(cudaError_t err) {
  emu::Emulator& e = emu::emulator();
  if (err != cudaSuccess && !e.message.empty()) {
    return e.message.c_str();
  }
  return err == cudaSuccess ? "no error" : "emulated CUDA error";
}
