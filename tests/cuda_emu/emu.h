// The CUDA kernels of csrc/cuda run on the CPU, for tests without a GPU (tests/test_cuda_emulated.py).
//
// A launch runs its blocks one after another (in an order the schedule seed changes), or, launched in
// thread-block clusters, its clusters one after another with the blocks of a cluster together; a
// block's threads are cooperative fibers (ucontext) of one OS thread, each running the kernel from the start until it reaches a barrier
// (__syncthreads, or the cluster barrier), a warp exchange (__shfl_xor_sync) or its end. When every thread of the block
// waits or has ended, the scheduler releases the warps whose live lanes all wait at a warp exchange,
// else the block barrier, where every live thread must wait at the same barrier for the same time;
// anything else is reported as the launch's error (divergent barriers, a shuffle with exited lanes,
// a deadlock). The cluster barrier is released when every thread of the cluster waits at it (a
// thread that has exited while others wait is an error). A block's dynamic shared memory is refilled
// with 0xff bytes as its last thread exits, so another block of its cluster reading it afterwards
// (distributed shared memory without the final cluster barrier) reads NaN. Static __shared__
// variables are one per launch here, so kernels launched in clusters must use dynamic shared memory. Threads run in an order that the schedule seed changes between phases, so a result
// that depends on the order of threads between two barriers (a shared-memory race), or on the order
// of blocks, changes with it.
//
// The launch checks what the GPU would refuse (grid of 0 or > 2^31 - 1 blocks, more than 1024
// threads, dynamic shared memory above the device's opt-in limit, or above 48 KiB without
// cudaFuncSetAttribute for that kernel), fills the dynamic shared memory with 0xff bytes (NaN in
// every float type) before each block, so a read of an element no thread wrote shows, and checks a
// guard area past its end afterwards.
//
// What is not emulated: the GPU's rounding (nvcc contracts a*b + c into FMAs where it chooses;
// MUFU.EX2 is approximate; here the host compiler's rounding and exp2f), timing, memory-model
// subtleties beyond the barriers, out-of-bounds global accesses (the tests guard the operands).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace emu {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

// The emulated device: what cudaDeviceGetAttribute and the occupancy query answer. Each
// configuration gets its own device index, so the kernels' per-device caches stay right.
struct DeviceConfig {
  int multiprocessors = 4;
  int max_shared_per_block = 232448;  // opt-in limit (H200)
  int shared_per_sm = 233472;
  int registers_per_thread = 64;      // for the occupancy model (tests/cuda_plan/occupancy.h)
  // SMs per GPC of a device that launches thread-block clusters (sm_90: the kernels report PTX 9.0,
  // clusters of up to 16 blocks, cudaOccupancyMaxActiveClusters by the occupancy model); 0: no
  // clusters (sm_80, sm_86: PTX 8.0).
  int gpc_sms = 0;
};
void configure(const DeviceConfig& config, uint64_t schedule_seed);

// Device side (emu_device.h).
const Dim3& thread_idx();
const Dim3& block_index();
extern Dim3 grid_dim, block_dim;
void sync_block(int line);
void sync_cluster(int line);
unsigned cluster_rank();
// p (in the calling block's dynamic shared memory) at the same offset in block `rank` of its cluster.
const void* cluster_peer(const void* p, unsigned rank);
void sync_warp();
unsigned lane();
unsigned char* dynamic_shared();
unsigned char* warp_slot(unsigned lane);  // 8 bytes per lane of the calling thread's warp
[[noreturn]] void fail(const std::string& message);

// The faulty kernels of emu_selftest.cpp by name, launched with `grid` blocks of 64 threads and
// `shared_bytes` of dynamic shared memory; their 64 outputs, or std::runtime_error with the
// emulation's message.
std::vector<int> selftest(const std::string& name, int grid, size_t shared_bytes);

// The launches since the last configure(): grid (x), block threads and cluster size of each, in order.
struct LaunchRecord {
  unsigned grid, block, cluster;
};
const std::vector<LaunchRecord>& launches();

// Host side: runs body() in every thread of every block (clusters of `cluster` blocks along x);
// records the launch's error.
void launch(const void* kernel, Dim3 grid, Dim3 block, size_t shared_bytes, cudaStream_t stream,
            const std::function<void()>& body, unsigned cluster = 1);

// DISALIGN_LAUNCH(kernel, grid, block, shared, stream)(args...): the arguments are converted to the
// kernel's parameter types and copied once, as the GPU copies them to its constant bank.
template <typename... Params>
struct KernelCall {
  void (*kernel)(Params...);
  Dim3 grid, block;
  size_t shared_bytes;
  cudaStream_t stream;
  unsigned cluster;
  template <typename... Args>
  void operator()(Args&&... args) const {
    const std::function<void()> body = [k = kernel, params = std::make_tuple(static_cast<Params>(args)...)]() {
      std::apply(k, params);
    };
    launch(reinterpret_cast<const void*>(kernel), grid, block, shared_bytes, stream, body, cluster);
  }
};

template <typename... Params>
KernelCall<Params...> kernel_call(void (*kernel)(Params...), long long grid, long long block, size_t shared_bytes,
                                  cudaStream_t stream, long long cluster = 1) {
  // A grid a Dim3 cannot hold becomes one that launch() refuses, as the GPU would.
  const unsigned g = grid < 0 || grid > 0xffffffffLL ? 0xffffffffu : static_cast<unsigned>(grid);
  const unsigned k = cluster < 0 || cluster > 0xffffLL ? 0xffffu : static_cast<unsigned>(cluster);
  return KernelCall<Params...>{kernel, Dim3{g, 1, 1}, Dim3{static_cast<unsigned>(block), 1, 1}, shared_bytes, stream,
                               k};
}

}  // namespace emu
