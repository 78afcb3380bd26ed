// Reductions of per-block partials in a fixed order, and the cached device queries of
// launch_common.cuh. Torch-free.
#include "cuda/launch_common.cuh"

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>

namespace disalign::cuda {
namespace {

// Out-of-range targets count as NaN (the loss kernel also makes their rows NaN).
template <typename acc_t>
__global__ void __launch_bounds__(kBlock) total_weight_kernel(
    const void* target, bool target_is_int64, const acc_t* weight, int64_t ignore_index, int64_t classes,
    int64_t rows, acc_t* partials) {
  __shared__ acc_t scratch[kBlock / kWarp];
  acc_t sum = 0;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kBlock) {
    const int64_t y = load_target(target, target_is_int64, row);
    if (y != ignore_index) {
      sum += (y >= 0 && y < classes) ? (weight != nullptr ? weight[y] : acc_t(1)) : quiet_nan<acc_t>();
    }
  }
  sum = block_fixed_sum(sum, scratch);
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = sum;
  }
}

// One warp per (class, gradient): lanes stride over the partial rows, then a butterfly; so C = 150
// spreads over 38 blocks instead of one. The warp after the class items reduces the loss.
template <typename acc_t>
__global__ void __launch_bounds__(kBlock) finalize_kernel(
    int64_t classes, int rows, int64_t row_stride, const acc_t* alpha_partials, const acc_t* beta_partials,
    acc_t* grad_alpha, acc_t* grad_beta, int loss_blocks, const acc_t* loss_partials, const acc_t* weight_partials,
    int num_weight_partials, acc_t* loss) {
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * (kBlock / kWarp) + threadIdx.x / kWarp;
  const int arrays = (grad_alpha != nullptr ? 1 : 0) + (grad_beta != nullptr ? 1 : 0);
  const int64_t items = arrays * classes;
  if (warp < items) {
    const bool is_alpha = grad_alpha != nullptr && warp < classes;
    const int64_t j = warp - (grad_alpha != nullptr && !is_alpha ? classes : 0);
    const acc_t* partials = is_alpha ? alpha_partials : beta_partials;
    const acc_t sum = warp_fixed_sum(partials + j, rows, row_stride);
    if (threadIdx.x % kWarp == 0) {
      (is_alpha ? grad_alpha : grad_beta)[j] = sum;
    }
  } else if (warp == items && loss != nullptr) {
    acc_t total = warp_fixed_sum(loss_partials, loss_blocks);
    if (weight_partials != nullptr) {
      total /= warp_fixed_sum(weight_partials, num_weight_partials);  // 0/0 = NaN without counted rows
    }
    if (threadIdx.x % kWarp == 0) {
      *loss = total;
    }
  }
}

struct OccupancyKey {
  int device;
  const void* kernel;
  int shared_bytes;
  bool operator==(const OccupancyKey& o) const {
    return device == o.device && kernel == o.kernel && shared_bytes == o.shared_bytes;
  }
};
struct OccupancyHash {
  size_t operator()(const OccupancyKey& k) const {
    return std::hash<const void*>()(k.kernel) ^ (static_cast<size_t>(k.device) << 48) ^
        (static_cast<size_t>(k.shared_bytes) * 0x9e3779b97f4a7c15ull);
  }
};

std::mutex cache_mutex;

}  // namespace

cudaError_t current_device_limits(int* device, DeviceLimits* limits) {
  static std::unordered_map<int, DeviceLimits> cache;
  cudaError_t err = cudaGetDevice(device);
  if (err != cudaSuccess) {
    return err;
  }
  std::lock_guard<std::mutex> lock(cache_mutex);
  auto it = cache.find(*device);
  if (it != cache.end()) {
    *limits = it->second;
    return cudaSuccess;
  }
  DeviceLimits dev;
  err = cudaDeviceGetAttribute(&dev.multiprocessors, cudaDevAttrMultiProcessorCount, *device);
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&dev.max_shared_per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, *device);
  }
  int cluster_launch = 0;
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&cluster_launch, cudaDevAttrClusterLaunch, *device);
  }
  dev.max_cluster = cluster_launch != 0 ? 8 : 1;
  if (err == cudaSuccess) {
    cache.emplace(*device, dev);
    *limits = dev;
  }
  return err;
}

int cached_blocks_per_sm(int device, const void* kernel, int shared_bytes, int max_shared, cudaError_t* err) {
  static std::unordered_map<OccupancyKey, int, OccupancyHash> occupancy;
  static std::unordered_map<OccupancyKey, bool, OccupancyHash> attribute_set;
  std::lock_guard<std::mutex> lock(cache_mutex);
  const OccupancyKey key{device, kernel, shared_bytes};
  auto it = occupancy.find(key);
  if (it != occupancy.end()) {
    return it->second;
  }
  const OccupancyKey attr_key{device, kernel, -1};
  if (attribute_set.find(attr_key) == attribute_set.end()) {
    *err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, max_shared);
    if (*err != cudaSuccess) {
      return 0;
    }
    attribute_set.emplace(attr_key, true);
  }
  int per_sm = 0;
  *err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kBlock, shared_bytes);
  if (*err != cudaSuccess) {
    return 0;
  }
  occupancy.emplace(key, per_sm);
  return per_sm;
}

int cached_max_cluster(int device, const void* kernel, int device_max) {
  static std::unordered_map<OccupancyKey, int, OccupancyHash> limits;
  const char* env = std::getenv("DISALIGN_CUDA_CLUSTERS");
  if (device_max <= 1 || (env != nullptr && std::strcmp(env, "0") == 0)) {
    return 1;
  }
  std::lock_guard<std::mutex> lock(cache_mutex);
  const OccupancyKey key{device, kernel, -1};
  auto it = limits.find(key);
  if (it != limits.end()) {
    return it->second;
  }
  int limit = 1;
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, kernel) == cudaSuccess && attr.ptxVersion >= 90) {
    limit = device_max;
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) == cudaSuccess) {
      limit = 16;
    }
  }
  (void)cudaGetLastError();  // a refused probe is an answer, not the next launch's error
  limits.emplace(key, limit);
  return limit;
}

int cached_active_clusters(int device, const void* kernel, int shared_bytes, int cluster, int max_shared,
                           cudaError_t* err) {
  static std::unordered_map<OccupancyKey, int, OccupancyHash> active;
  cudaError_t e = cudaSuccess;
  cached_blocks_per_sm(device, kernel, shared_bytes, max_shared, &e);  // raises the kernel's shared limit
  if (e != cudaSuccess) {
    *err = e;
    return 0;
  }
  std::lock_guard<std::mutex> lock(cache_mutex);
  const OccupancyKey key{device, kernel, shared_bytes * 32 + cluster};
  auto it = active.find(key);
  if (it != active.end()) {
    return it->second;
  }
  cudaLaunchAttribute attribute;
  const cudaLaunchConfig_t config = cluster_config(static_cast<unsigned>(cluster), kBlock,
                                                   static_cast<size_t>(shared_bytes), nullptr,
                                                   static_cast<unsigned>(cluster), &attribute);
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) != cudaSuccess) {
    clusters = 0;  // a size the device refuses for this kernel: not planned
    (void)cudaGetLastError();
  }
  active.emplace(key, clusters);
  return clusters;
}

template <typename acc_t>
cudaError_t launch_total_weight(const void* target, bool target_is_int64, const acc_t* weight, int64_t ignore_index,
                                int64_t classes, int64_t rows, int blocks, acc_t* partials, cudaStream_t stream) {
  DISALIGN_LAUNCH(total_weight_kernel<acc_t>, blocks, kBlock, 0, stream)(
      target, target_is_int64, weight, ignore_index, classes, rows, partials);
  return cudaGetLastError();
}

template <typename acc_t>
cudaError_t launch_finalize(int64_t classes, int rows, int64_t row_stride, const acc_t* alpha_partials,
                            const acc_t* beta_partials, acc_t* grad_alpha, acc_t* grad_beta, int loss_blocks,
                            const acc_t* loss_partials, const acc_t* weight_partials, int num_weight_partials,
                            acc_t* loss, cudaStream_t stream) {
  if (grad_alpha == nullptr && grad_beta == nullptr && loss == nullptr) {
    return cudaSuccess;
  }
  const int64_t items = ((grad_alpha != nullptr) + (grad_beta != nullptr)) * classes + 1;
  const int warps_per_block = kBlock / kWarp;
  const int grid = static_cast<int>((items + warps_per_block - 1) / warps_per_block);
  DISALIGN_LAUNCH(finalize_kernel<acc_t>, grid, kBlock, 0, stream)(
      classes, rows, row_stride, alpha_partials, beta_partials, grad_alpha, grad_beta, loss_blocks, loss_partials,
      weight_partials, num_weight_partials, loss);
  return cudaGetLastError();
}

template cudaError_t launch_total_weight<float>(const void*, bool, const float*, int64_t, int64_t, int64_t, int,
                                                float*, cudaStream_t);
template cudaError_t launch_total_weight<double>(const void*, bool, const double*, int64_t, int64_t, int64_t, int,
                                                 double*, cudaStream_t);
template cudaError_t launch_finalize<float>(int64_t, int, int64_t, const float*, const float*, float*, float*, int,
                                            const float*, const float*, int, float*, cudaStream_t);
template cudaError_t launch_finalize<double>(int64_t, int, int64_t, const double*, const double*, double*, double*, int,
                                             const double*, const double*, int, double*, cudaStream_t);

}  // namespace disalign::cuda
