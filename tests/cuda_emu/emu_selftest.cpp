// Faulty kernels that the emulation must catch (tests/test_cuda_emulated.py checks that it does), so
// a clean run of csrc/cuda's kernels means something.
#include "emu_device.h"

#include "cuda/cluster.cuh"

#include <stdexcept>
#include <string>
#include <vector>

namespace {

constexpr int kThreads = 64;

// Reads a neighbour's shared slot without the barrier in between: the value depends on the order.
__global__ void missing_barrier(int* out) {
  __shared__ int slots[kThreads];
  slots[threadIdx.x] = static_cast<int>(threadIdx.x);
  out[threadIdx.x] = slots[(threadIdx.x + 1) % kThreads];
}

// The same with the barrier: no order dependence.
__global__ void with_barrier(int* out) {
  __shared__ int slots[kThreads];
  slots[threadIdx.x] = static_cast<int>(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = slots[(threadIdx.x + 1) % kThreads];
}

__global__ void divergent_barrier(int* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void shuffle_after_exit(int* out) {
  if (threadIdx.x % 32 >= 16) {
    return;
  }
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}

__global__ void shared_overrun(int* out) {
  DISALIGN_DYNAMIC_SHARED(bytes);
  bytes[256 + threadIdx.x] = 1;  // launched with 256 bytes
  out[threadIdx.x] = 1;
}

__global__ void uninitialised_shared(int* out) {
  DISALIGN_DYNAMIC_SHARED(bytes);
  int v;
  std::memcpy(&v, bytes + 4 * threadIdx.x, 4);  // nothing wrote it: 0xffffffff
  out[threadIdx.x] = v;
}

// Clusters of two blocks: each block stores its rank in its shared memory, and rank 0 reads its
// peer's after the cluster barrier. With the final cluster barrier, the peer's shared memory is still
// there; without it (cluster_no_final_barrier) the peer may have exited: its bytes are gone (0xff).
template <bool kFinalBarrier>
__global__ void cluster_peer_read(int* out) {
  DISALIGN_DYNAMIC_SHARED(bytes);
  int* slots = reinterpret_cast<int*>(bytes);
  const unsigned rank = disalign::cuda::cluster_rank();
  slots[threadIdx.x] = static_cast<int>(rank + 1);
  disalign::cuda::cluster_barrier();
  if (rank == 0 && blockIdx.x == 0) {
    out[threadIdx.x] = disalign::cuda::cluster_peer(slots, 1)[threadIdx.x];
  }
  if (kFinalBarrier) {
    disalign::cuda::cluster_barrier();
  }
}

// Half of the threads leave before the cluster barrier.
__global__ void cluster_barrier_after_exit(int* out) {
  if (threadIdx.x >= 32) {
    return;
  }
  disalign::cuda::cluster_barrier();
  out[threadIdx.x] = 1;
}

}  // namespace

namespace emu {

std::vector<int> selftest(const std::string& name, int grid, size_t shared_bytes) {
  std::vector<int> out(kThreads, 0);
  int* p = out.data();
  if (name == "missing_barrier") {
    DISALIGN_LAUNCH(missing_barrier, grid, kThreads, shared_bytes, nullptr)(p);
  } else if (name == "with_barrier") {
    DISALIGN_LAUNCH(with_barrier, grid, kThreads, shared_bytes, nullptr)(p);
  } else if (name == "divergent_barrier") {
    DISALIGN_LAUNCH(divergent_barrier, grid, kThreads, shared_bytes, nullptr)(p);
  } else if (name == "shuffle_after_exit") {
    DISALIGN_LAUNCH(shuffle_after_exit, grid, kThreads, shared_bytes, nullptr)(p);
  } else if (name == "shared_overrun") {
    DISALIGN_LAUNCH(shared_overrun, grid, kThreads, shared_bytes, nullptr)(p);
  } else if (name == "uninitialised_shared") {
    DISALIGN_LAUNCH(uninitialised_shared, grid, kThreads, shared_bytes, nullptr)(p);
  } else if (name == "cluster_peer_read") {
    DISALIGN_LAUNCH_CLUSTER(cluster_peer_read<true>, grid, kThreads, shared_bytes, nullptr, 2)(p);
  } else if (name == "cluster_no_final_barrier") {
    DISALIGN_LAUNCH_CLUSTER(cluster_peer_read<false>, grid, kThreads, shared_bytes, nullptr, 2)(p);
  } else if (name == "cluster_barrier_after_exit") {
    DISALIGN_LAUNCH_CLUSTER(cluster_barrier_after_exit, grid, kThreads, shared_bytes, nullptr, 2)(p);
  } else {
    throw std::invalid_argument("no self-test kernel " + name);
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(cudaGetErrorString(err));
  }
  return out;
}

}  // namespace emu
