// Thread-block clusters (sm_90): the cluster barrier, a block's rank in its cluster, and another
// block's dynamic shared memory (distributed shared memory). The tile kernel sums its class-gradient
// accumulators across the blocks of a cluster with these (plan.h, TilePlan::cluster). Torch-free.
//
// The planner only makes cluster plans where the device launches clusters and the kernel was compiled
// for PTX >= 9.0 (cudaFuncGetAttributes' ptxVersion), so the code compiled for older targets never
// runs them; there the functions trap. tests/cuda_emu provides its own (emu_device.h), with the
// blocks of a cluster run together.
#pragma once

#if !defined(DISALIGN_CUDA_EMULATION)
#include <cooperative_groups.h>
#endif

namespace disalign::cuda {

#if defined(DISALIGN_CUDA_EMULATION)

__device__ inline void cluster_barrier() {
  ::emu::sync_cluster(__LINE__);
}
__device__ inline unsigned cluster_rank() {
  return ::emu::cluster_rank();
}
// `p` (in this block's dynamic shared memory) as the same offset in block `rank`'s.
template <typename T>
__device__ inline const T* cluster_peer(const T* p, unsigned rank) {
  return static_cast<const T*>(::emu::cluster_peer(p, rank));
}

#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900

// cluster.sync(): barrier.cluster.arrive (release) + wait (acquire), so shared-memory writes before it
// are visible to every block of the cluster after it.
__device__ __forceinline__ void cluster_barrier() {
  cooperative_groups::this_cluster().sync();
}
__device__ __forceinline__ unsigned cluster_rank() {
  return cooperative_groups::this_cluster().block_rank();
}
template <typename T>
__device__ __forceinline__ const T* cluster_peer(const T* p, unsigned rank) {
  return cooperative_groups::this_cluster().map_shared_rank(const_cast<T*>(p), rank);
}

#else

__device__ __forceinline__ void cluster_barrier() {
  __trap();
}
__device__ __forceinline__ unsigned cluster_rank() {
  __trap();
  return 0;
}
template <typename T>
__device__ __forceinline__ const T* cluster_peer(const T* p, unsigned) {
  __trap();
  return p;
}

#endif

}  // namespace disalign::cuda
