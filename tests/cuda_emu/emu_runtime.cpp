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

Dim3 grid_dim, block_dim;

namespace {

enum class State { kRunning, kAtBarrier, kAtClusterBarrier, kAtWarpSync, kDone };

// A cp.async not yet completed: its destination and the source bytes read at issue.
struct PendingCopy {
  void* dst;
  size_t bytes;
  unsigned char data[16];
};

struct Thread {
  Dim3 idx;
  unsigned linear = 0;  // in its block
  unsigned block = 0;   // its block's rank in the cluster being run
  ucontext_t context;  // its start (makecontext); afterwards it is resumed by _longjmp to `resume`
  jmp_buf resume;
  bool started = false;
  State state = State::kDone;
  int barrier_line = 0;     // the __syncthreads (or cluster barrier) this thread waits at
  long barriers = 0;        // how many __syncthreads it has passed
  long cluster_barriers = 0;
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
constexpr unsigned kMaxThreads = 1024;   // per block
constexpr unsigned kMaxFibers = 4096;    // per cluster
constexpr unsigned kPortableCluster = 8;
constexpr unsigned kMaxCluster = 16;     // with cudaFuncAttributeNonPortableClusterSizeAllowed
constexpr size_t kSharedGuard = 4096;
constexpr int kLegacySharedLimit = 48 * 1024;

struct Emulator {
  std::vector<DeviceConfig> configs{DeviceConfig{}};
  int device = 0;
  uint64_t seed = 0;
  std::map<std::pair<int, const void*>, int> shared_limit;  // cudaFuncSetAttribute per (device, kernel)
  std::map<std::pair<int, const void*>, bool> non_portable;  // cluster sizes above 8 allowed
  std::vector<LaunchRecord> launched;
  cudaError_t last_error = cudaSuccess;
  std::string message;

  // The cluster (or block) being run.
  std::vector<Thread> threads = std::vector<Thread>(kMaxFibers);
  unsigned char* stacks = nullptr;
  std::vector<std::vector<unsigned char>> shared;  // per block of the cluster
  std::vector<Dim3> block_ids;                     // per block of the cluster
  std::vector<unsigned> block_live;                // threads of the block not done
  unsigned nthreads = 0;                           // per block
  size_t shared_bytes = 0;
  std::vector<unsigned char> warp_slots = std::vector<unsigned char>(kMaxFibers * 8);
  Thread* current = nullptr;
  ucontext_t scheduler;
  jmp_buf scheduler_resume;
  const std::function<void()>* body = nullptr;
  std::string error;  // of the launch being run

  const DeviceConfig& config() const {
    return configs[device];
  }
  unsigned fiber(const Thread& t) const {
    return t.block * nthreads + t.linear;
  }
};

Emulator& emulator() {
  static Emulator e;
  return e;
}

// A block whose last thread has exited: its shared memory is gone (NaN for a late reader in the cluster).
void block_exited(unsigned block) {
  Emulator& e = emulator();
  if (--e.block_live[block] == 0 && e.shared.size() > 1) {
    std::fill(e.shared[block].begin(), e.shared[block].begin() + static_cast<long>(e.shared_bytes), 0xff);
  }
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
  block_exited(t->block);
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
  s << "thread " << t.linear << " of block " << emulator().block_ids[t.block].x;
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

// Releases the warps of `block` whose live lanes all wait at a warp exchange; false with e.error set
// on a failure.
bool release_warps(unsigned block, bool& released, bool& live) {
  Emulator& e = emulator();
  const unsigned n = e.nthreads;
  for (unsigned first = 0; first < n; first += 32) {
    const unsigned last = std::min(n, first + 32);
    unsigned waiting = 0, alive = 0;
    const Thread* a = nullptr;
    for (unsigned i = first; i < last; ++i) {
      const Thread& t = e.threads[block * n + i];
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
        e.threads[block * n + i].state = State::kRunning;
        ++e.threads[block * n + i].warp_syncs;
      }
      released = true;
    }
  }
  return true;
}

// Releases `block` from its __syncthreads when every live thread waits there (at the same barrier);
// `blocked` when some wait elsewhere (a cluster barrier, a warp exchange). False with e.error set.
bool release_block(unsigned block, bool& released) {
  Emulator& e = emulator();
  const unsigned n = e.nthreads;
  const Thread* a = nullptr;
  bool other = false;
  for (unsigned i = 0; i < n; ++i) {
    const Thread& t = e.threads[block * n + i];
    if (t.state == State::kDone) {
      continue;
    }
    if (t.state != State::kAtBarrier) {
      other = true;
      continue;
    }
    if (a != nullptr && (t.barrier_line != a->barrier_line || t.barriers != a->barriers)) {
      e.error = "divergent __syncthreads: " + where(*a) + " waits at line " + std::to_string(a->barrier_line) +
          " (barrier " + std::to_string(a->barriers) + "), " + where(t) + " at line " +
          std::to_string(t.barrier_line) + " (barrier " + std::to_string(t.barriers) + ")";
      return false;
    }
    a = &t;
  }
  if (a == nullptr || other) {
    return true;
  }
  for (unsigned i = 0; i < n; ++i) {
    Thread& t = e.threads[block * n + i];
    if (t.state == State::kAtBarrier) {
      t.state = State::kRunning;
      ++t.barriers;
    }
  }
  released = true;
  return true;
}

// Releases the cluster barrier when every thread of every block of the cluster waits at it.
bool release_cluster(unsigned blocks, bool& released) {
  Emulator& e = emulator();
  const unsigned total = blocks * e.nthreads;
  const Thread* a = nullptr;
  const Thread* exited = nullptr;
  for (unsigned i = 0; i < total; ++i) {
    const Thread& t = e.threads[i];
    if (t.state == State::kDone) {
      exited = &t;
      continue;
    }
    if (t.state != State::kAtClusterBarrier) {
      return true;
    }
    if (a != nullptr && (t.barrier_line != a->barrier_line || t.cluster_barriers != a->cluster_barriers)) {
      e.error = "divergent cluster barrier: " + where(*a) + " waits at line " + std::to_string(a->barrier_line) +
          ", " + where(t) + " at line " + std::to_string(t.barrier_line);
      return false;
    }
    a = &t;
  }
  if (a == nullptr) {
    return true;
  }
  if (exited != nullptr) {
    e.error = "cluster barrier at line " + std::to_string(a->barrier_line) + " while " + where(*exited) +
        " has exited";
    return false;
  }
  for (unsigned i = 0; i < total; ++i) {
    e.threads[i].state = State::kRunning;
    ++e.threads[i].cluster_barriers;
  }
  released = true;
  return true;
}

// Runs the blocks of one cluster (one block without clusters) to their end; returns false with
// e.error set on a failure.
bool run_cluster(unsigned blocks) {
  Emulator& e = emulator();
  const unsigned n = e.nthreads;
  e.block_live.assign(blocks, n);
  for (unsigned b = 0; b < blocks; ++b) {
    std::fill(e.shared[b].begin(), e.shared[b].begin() + static_cast<long>(e.shared_bytes), 0xff);
    std::fill(e.shared[b].begin() + static_cast<long>(e.shared_bytes), e.shared[b].end(), 0xa5);
  }
  for (unsigned f = 0; f < blocks * n; ++f) {
    Thread& t = e.threads[f];
    const unsigned i = f % n;
    t.linear = i;
    t.block = f / n;
    t.idx = Dim3{i % block_dim.x, (i / block_dim.x) % block_dim.y, i / (block_dim.x * block_dim.y)};
    t.state = State::kRunning;
    t.started = false;
    t.barriers = t.cluster_barriers = t.warp_syncs = 0;
    t.open_group.clear();
    t.committed.clear();
    getcontext(&t.context);
    t.context.uc_stack.ss_sp = e.stacks + f * kStackBytes;
    t.context.uc_stack.ss_size = kStackBytes;
    t.context.uc_link = nullptr;
    makecontext(&t.context, thread_entry, 0);
  }
  std::vector<unsigned> order;
  std::vector<char> stalled(blocks, 0);
  for (long phase = 0;; ++phase) {
    order_for(order, blocks * n, e.seed, phase);
    // The blocks of a cluster run at their own speeds: with a schedule seed, each phase leaves some of
    // them stalled (at least one that can run runs), so one block may pass its barriers, or exit,
    // before another has resumed from the cluster barrier they both left.
    bool waiting_to_run = false;
    if (blocks > 1 && e.seed != 0) {
      std::vector<unsigned> runnable;
      bool one_runs = false;
      const uint64_t r = mix(e.seed * 7919u + static_cast<uint64_t>(phase));
      for (unsigned b = 0; b < blocks; ++b) {
        bool can_run = false;
        for (unsigned i = 0; i < n && !can_run; ++i) {
          can_run = e.threads[b * n + i].state == State::kRunning;
        }
        stalled[b] = can_run && (mix(r + b) & 1u) != 0;
        if (can_run) {
          runnable.push_back(b);
        }
        one_runs = one_runs || (can_run && !stalled[b]);
      }
      if (!one_runs && !runnable.empty()) {
        stalled[runnable[r % runnable.size()]] = 0;
      }
    }
    for (unsigned f : order) {
      Thread& t = e.threads[f];
      if (t.state == State::kRunning) {
        if (stalled[t.block]) {
          waiting_to_run = true;
          continue;
        }
        resume(t);
        if (!e.error.empty()) {
          return false;
        }
      }
    }
    bool released = false;
    bool live = false;
    for (unsigned b = 0; b < blocks; ++b) {
      if (!release_warps(b, released, live)) {
        return false;
      }
    }
    if (!live) {
      return true;
    }
    if (released) {
      continue;
    }
    for (unsigned b = 0; b < blocks; ++b) {
      if (!release_block(b, released)) {
        return false;
      }
    }
    if (!released && !release_cluster(blocks, released)) {
      return false;
    }
    if (!released && !waiting_to_run) {
      for (unsigned f = 0; f < blocks * n; ++f) {
        const Thread& t = e.threads[f];
        if (t.state == State::kAtWarpSync) {
          e.error = "deadlock: " + where(t) + " waits at a warp exchange while others wait at a barrier";
          return false;
        }
      }
      e.error = blocks > 1 ? "deadlock: some threads of the cluster wait at __syncthreads, others at the cluster barrier"
                           : "deadlock: threads wait at a cluster barrier outside a cluster launch";
      return false;
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
        c.shared_per_sm == config.shared_per_sm && c.registers_per_thread == config.registers_per_thread &&
        c.gpc_sms == config.gpc_sms;
  };
  auto it = std::find_if(e.configs.begin(), e.configs.end(), same);
  if (it == e.configs.end()) {
    e.configs.push_back(config);
    it = e.configs.end() - 1;
  }
  e.device = static_cast<int>(it - e.configs.begin());
  e.seed = schedule_seed;
  e.launched.clear();
}

const std::vector<LaunchRecord>& launches() {
  return emulator().launched;
}

const Dim3& thread_idx() {
  return emulator().current->idx;
}

const Dim3& block_index() {
  Emulator& e = emulator();
  return e.block_ids[e.current->block];
}

void sync_block(int line) {
  emulator().current->barrier_line = line;
  yield(State::kAtBarrier);
}

void sync_cluster(int line) {
  emulator().current->barrier_line = line;
  yield(State::kAtClusterBarrier);
}

unsigned cluster_rank() {
  return emulator().current->block;
}

const void* cluster_peer(const void* p, unsigned rank) {
  Emulator& e = emulator();
  const unsigned char* own = e.shared[e.current->block].data();
  const auto* q = static_cast<const unsigned char*>(p);
  if (rank >= e.shared.size()) {
    fail("distributed shared memory of block rank " + std::to_string(rank) + " in a cluster of " +
         std::to_string(e.shared.size()));
  }
  if (q < own || q >= own + e.shared_bytes) {
    fail("distributed shared memory: the pointer is not in the block's dynamic shared memory");
  }
  return e.shared[rank].data() + (q - own);
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
  Emulator& e = emulator();
  return e.shared[e.current->block].data();
}

unsigned char* warp_slot(unsigned lane) {
  Emulator& e = emulator();
  return e.warp_slots.data() + (e.current->block * e.nthreads + e.current->linear / 32 * 32 + lane) * 8;
}

void fail(const std::string& message) {
  Emulator& e = emulator();
  if (e.error.empty()) {
    e.error = message + " (" + where(*e.current) + ")";
  }
  e.current->state = State::kDone;
  block_exited(e.current->block);
  _longjmp(e.scheduler_resume, 1);  // never resumed
}

void launch(const void* kernel, Dim3 grid, Dim3 block, size_t shared_bytes, cudaStream_t,
            const std::function<void()>& body, unsigned cluster) {
  Emulator& e = emulator();
  const unsigned nthreads = block.x * block.y * block.z;
  const uint64_t blocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  if (blocks == 0 || grid.x > 0x7fffffffu || nthreads == 0 || nthreads > kMaxThreads) {
    fail_launch(cudaErrorInvalidConfiguration,
                "invalid launch configuration: grid " + std::to_string(grid.x) + ", block " + std::to_string(nthreads));
    return;
  }
  const DeviceConfig& c = e.config();
  if (cluster != 1) {
    const bool allowed = e.non_portable.count({e.device, kernel}) != 0;
    const unsigned max_cluster = allowed ? kMaxCluster : kPortableCluster;
    std::string why;
    if (c.gpc_sms == 0) {
      why = "the device does not launch thread-block clusters";
    } else if (cluster == 0 || cluster > max_cluster) {
      why = "cluster of " + std::to_string(cluster) + " blocks (at most " + std::to_string(max_cluster) + ")";
    } else if (grid.x % cluster != 0 || grid.y != 1 || grid.z != 1) {
      why = "grid " + std::to_string(grid.x) + " is not a multiple of the cluster " + std::to_string(cluster);
    } else if (cluster * nthreads > kMaxFibers) {
      why = "emulation: clusters of more than " + std::to_string(kMaxFibers) + " threads are not emulated";
    }
    if (!why.empty()) {
      fail_launch(cudaErrorInvalidClusterSize, "invalid cluster launch: " + why);
      return;
    }
  }
  auto limit = e.shared_limit.find({e.device, kernel});
  const int allowed = limit == e.shared_limit.end() ? kLegacySharedLimit : limit->second;
  if (shared_bytes > static_cast<size_t>(std::min(allowed, c.max_shared_per_block))) {
    fail_launch(cudaErrorInvalidValue, "dynamic shared memory " + std::to_string(shared_bytes) +
                                           " bytes above the kernel's limit " + std::to_string(allowed) +
                                           " (device opt-in limit " + std::to_string(c.max_shared_per_block) + ")");
    return;
  }
  if (e.stacks == nullptr) {
    void* p = mmap(nullptr, kMaxFibers * kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (p == MAP_FAILED) {
      fail_launch(cudaErrorLaunchFailure, "emulation: no memory for the thread stacks");
      return;
    }
    e.stacks = static_cast<unsigned char*>(p);
  }
  e.launched.push_back(LaunchRecord{grid.x, nthreads, cluster});
  e.shared.assign(cluster, std::vector<unsigned char>(shared_bytes + kSharedGuard, 0));
  e.block_ids.assign(cluster, Dim3{});
  e.nthreads = nthreads;
  e.shared_bytes = shared_bytes;
  grid_dim = grid;
  block_dim = block;
  e.body = &body;
  e.error.clear();
  // Clusters (blocks) in the schedule's order too: a block that relied on another block's results of
  // the same launch, other than through its cluster's barrier, would see them or not.
  if (blocks > (1u << 20)) {
    fail_launch(cudaErrorLaunchFailure, "emulation: grids above 2^20 blocks are not emulated");
    return;
  }
  std::vector<unsigned> cluster_order;
  order_for(cluster_order, static_cast<unsigned>(blocks / cluster), e.seed, -1);
  for (uint64_t k : cluster_order) {
    for (unsigned r = 0; r < cluster; ++r) {
      const uint64_t b = k * cluster + r;
      e.block_ids[r] = Dim3{static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                            static_cast<unsigned>(b / (static_cast<uint64_t>(grid.x) * grid.y))};
    }
    if (!run_cluster(cluster)) {
      fail_launch(cudaErrorLaunchFailure,
                  (cluster > 1 ? "kernel failed in cluster " + std::to_string(k) : "kernel failed in block " +
                   std::to_string(k)) + ": " + e.error);
      return;
    }
    for (unsigned r = 0; r < cluster; ++r) {
      for (size_t i = shared_bytes; i < e.shared[r].size(); ++i) {
        if (e.shared[r][i] != 0xa5) {
          fail_launch(cudaErrorLaunchFailure, "block " + std::to_string(k * cluster + r) + " wrote byte " +
                                                  std::to_string(i) + " of dynamic shared memory, past the " +
                                                  std::to_string(shared_bytes) + " bytes of the launch");
          return;
        }
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
    case cudaDevAttrClusterLaunch:
      *value = c.gpc_sms > 0 ? 1 : 0;
      return cudaSuccess;
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  emu::Emulator& e = emu::emulator();
  if (attr == cudaFuncAttributeNonPortableClusterSizeAllowed) {
    if (e.config().gpc_sms == 0 || (value != 0 && value != 1)) {
      return e.last_error = cudaErrorInvalidValue;
    }
    if (value == 1) {
      e.non_portable[{e.device, func}] = true;
    } else {
      e.non_portable.erase({e.device, func});
    }
    return cudaSuccess;
  }
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > e.config().max_shared_per_block) {
    return e.last_error = cudaErrorInvalidValue;
  }
  e.shared_limit[{e.device, func}] = value;
  return cudaSuccess;
}

// The PTX target the kernels were "compiled for": 9.0 on a device with clusters, else 8.0.
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, const void*) {
  *attr = cudaFuncAttributes{};
  attr->ptxVersion = emu::emulator().config().gpc_sms > 0 ? 90 : 80;
  attr->binaryVersion = attr->ptxVersion;
  attr->maxThreadsPerBlock = 1024;
  return cudaSuccess;
}

// Clusters of the launch's cluster size resident at once: whole clusters per GPC (gpc_sms SMs, the
// last GPC the remainder), each SM holding the occupancy model's blocks.
cudaError_t cudaOccupancyMaxActiveClusters(int* clusters, const void* func, const cudaLaunchConfig_t* config) {
  emu::Emulator& e = emu::emulator();
  const emu::DeviceConfig& c = e.config();
  unsigned cluster = 1;
  for (unsigned i = 0; i < config->numAttrs; ++i) {
    if (config->attrs[i].id == cudaLaunchAttributeClusterDimension) {
      cluster = config->attrs[i].val.clusterDim.x * config->attrs[i].val.clusterDim.y *
          config->attrs[i].val.clusterDim.z;
    }
  }
  const bool allowed = e.non_portable.count({e.device, func}) != 0;
  if (c.gpc_sms == 0 || cluster == 0 || cluster > (allowed ? 16u : 8u)) {
    return e.last_error = cudaErrorInvalidClusterSize;
  }
  const int threads = static_cast<int>(config->blockDim.x * config->blockDim.y * config->blockDim.z);
  const int per_sm = disalign::cuda::modelled_blocks_per_sm(threads, c.registers_per_thread, c.shared_per_sm,
                                                            static_cast<int>(config->dynamicSmemBytes));
  *clusters = disalign::cuda::modelled_active_clusters(c.multiprocessors, c.gpc_sms, per_sm, static_cast<int>(cluster));
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
