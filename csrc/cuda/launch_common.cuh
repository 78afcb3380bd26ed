// Host-side helpers shared by the launchers of csrc/cuda: the dtype dispatch, device limits and
// kernel occupancy cached per (device, kernel, shared bytes), and the reductions of per-block
// partials (reduce_kernels.cu). Torch-free.
#pragma once

#include "cuda/device_math.cuh"
#include "cuda/disalign_cuda.h"
#include "cuda/plan.h"

#include <cstddef>
#include <cstdint>

namespace disalign::cuda {

// kernel<<<grid, block, shared_bytes, stream>>>: a macro so that tests/cuda_emu can launch the same
// kernels on the CPU.
#ifndef DISALIGN_LAUNCH
#define DISALIGN_LAUNCH(kernel, grid, block, shared_bytes, stream) kernel<<<grid, block, shared_bytes, stream>>>
#endif

// A launch configuration in thread-block clusters of `cluster` blocks along x, its cluster attribute
// in *attribute (cudaLaunchKernelEx, cudaOccupancyMaxActiveClusters). The fields in order, not by
// name: the CPU emulation's gridDim / blockDim are macros.
inline cudaLaunchConfig_t cluster_config(unsigned grid, unsigned block, size_t shared_bytes, cudaStream_t stream,
                                         unsigned cluster, cudaLaunchAttribute* attribute) {
  *attribute = cudaLaunchAttribute{};
  attribute->id = cudaLaunchAttributeClusterDimension;
  attribute->val.clusterDim.x = cluster;
  attribute->val.clusterDim.y = 1;
  attribute->val.clusterDim.z = 1;
  return cudaLaunchConfig_t{dim3(grid), dim3(block), shared_bytes, stream, attribute, 1};
}

// DISALIGN_LAUNCH in thread-block clusters (cudaLaunchKernelEx); errors are read with
// cudaGetLastError, as after <<<>>>.
#ifndef DISALIGN_LAUNCH_CLUSTER
template <typename... Params>
struct ClusterLaunch {
  void (*kernel)(Params...);
  unsigned grid, block, cluster;
  size_t shared_bytes;
  cudaStream_t stream;
  template <typename... Args>
  void operator()(Args&&... args) const {
    cudaLaunchAttribute attribute;
    const cudaLaunchConfig_t config = cluster_config(grid, block, shared_bytes, stream, cluster, &attribute);
    (void)cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...);
  }
};
template <typename... Params>
ClusterLaunch<Params...> cluster_launch(void (*kernel)(Params...), unsigned grid, unsigned block, size_t shared_bytes,
                                        cudaStream_t stream, unsigned cluster) {
  return ClusterLaunch<Params...>{kernel, grid, block, cluster, shared_bytes, stream};
}
#define DISALIGN_LAUNCH_CLUSTER(kernel, grid, block, shared_bytes, stream, cluster) \
  ::disalign::cuda::cluster_launch(kernel, grid, block, shared_bytes, stream, cluster)
#endif

static_assert(kBlock == kTileThreads, "plan.h and device_math.cuh describe the same block size");

// Calls f(scalar_t{}, acc_t{}) for the dtype.
template <typename F>
auto dispatch_dtype(ScalarType dtype, F&& f) {
  switch (dtype) {
    case ScalarType::kHalf:
      return f(__half{}, float{});
    case ScalarType::kBFloat16:
      return f(__nv_bfloat16{}, float{});
    case ScalarType::kFloat:
      return f(float{}, float{});
    case ScalarType::kDouble:
      break;
  }
  return f(double{}, double{});
}

// The current device's limits, queried once per device.
cudaError_t current_device_limits(int* device, DeviceLimits* limits);

// Resident blocks per SM of `kernel` (kBlock threads) with `shared_bytes` of dynamic shared memory,
// cached per (device, kernel, shared bytes); the kernel's dynamic shared memory limit is raised to
// the device's opt-in maximum once per (device, kernel). 0 on error (err set).
int cached_blocks_per_sm(int device, const void* kernel, int shared_bytes, int max_shared, cudaError_t* err);

// The largest cluster `kernel` can be launched in on `device` (device_max: 8 where the device
// launches clusters, else 1): 1 when the kernel's PTX target is older than 9.0 (its cluster code
// traps) or the environment has DISALIGN_CUDA_CLUSTERS=0 (read at every call: one partial row per
// block, as before clusters, e.g. to compare the two on a GPU), 16 where the non-portable size is
// allowed. Cached per (device, kernel); failed probes leave no error behind.
int cached_max_cluster(int device, const void* kernel, int device_max);

// cudaOccupancyMaxActiveClusters for clusters of `cluster` kBlock-thread blocks with `shared_bytes`,
// cached per (device, kernel, shared bytes, cluster). 0 on error (err set).
int cached_active_clusters(int device, const void* kernel, int shared_bytes, int cluster, int max_shared,
                           cudaError_t* err);

template <typename T>
T* at_offset(void* workspace, size_t offset) {
  return offset == SIZE_MAX ? nullptr : reinterpret_cast<T*>(static_cast<unsigned char*>(workspace) + offset);
}

// "mean" denominator: per-block partial sums of w[y] over the counted rows (reduce_kernels.cu).
template <typename acc_t>
cudaError_t launch_total_weight(const void* target, bool target_is_int64, const acc_t* weight, int64_t ignore_index,
                                int64_t classes, int64_t rows, int blocks, acc_t* partials, cudaStream_t stream);

// grad_alpha / grad_beta from the `rows` partial rows (row stride row_stride, in order) and the
// reduced loss from its `loss_blocks` partials (divided by the total weight for "mean").
template <typename acc_t>
cudaError_t launch_finalize(int64_t classes, int rows, int64_t row_stride, const acc_t* alpha_partials,
                            const acc_t* beta_partials, acc_t* grad_alpha, acc_t* grad_beta, int loss_blocks,
                            const acc_t* loss_partials, const acc_t* weight_partials, int num_weight_partials,
                            acc_t* loss, cudaStream_t stream);

}  // namespace disalign::cuda
