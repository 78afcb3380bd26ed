// The occupancy model that stands in for cudaOccupancyMaxActiveBlocksPerMultiprocessor (and
// cudaOccupancyMaxActiveClusters) where no GPU
// answers it (the planner driver plan_main.cpp, the kernel emulation tests/cuda_emu): threads,
// registers (256-register warp granules) and shared memory (1 KiB reserved per block), at most 32
// blocks, for blocks of `threads` threads on an SM of 2048 threads and 64K registers.
#pragma once

#include <algorithm>

namespace disalign::cuda {

inline int modelled_blocks_per_sm(int threads, int registers_per_thread, int shared_per_sm, int shared_bytes) {
  const int warps = (threads + 31) / 32;
  const int by_threads = 2048 / threads;
  const int regs_per_warp = (registers_per_thread * 32 + 255) / 256 * 256;
  const int by_regs = (65536 / regs_per_warp) / warps;
  const int by_smem = shared_per_sm / (shared_bytes + 1024);
  return std::max(0, std::min({by_threads, by_regs, by_smem, 32}));
}

// Stands in for cudaOccupancyMaxActiveClusters: the blocks of a cluster are co-scheduled on one GPC,
// so each GPC (gpc_sms SMs; the last one the remainder of the device's SMs) holds whole clusters of
// its blocks_per_sm * SMs. An H100 / H200 has 132 SMs in GPCs of 16-18; with gpc_sms = 16 this
// model gives 16 clusters of 8 (128 blocks) at one block per SM.
inline int modelled_active_clusters(int multiprocessors, int gpc_sms, int blocks_per_sm, int cluster) {
  if (gpc_sms <= 0 || cluster <= 0) {
    return 0;
  }
  int clusters = 0;
  for (int first = 0; first < multiprocessors; first += gpc_sms) {
    clusters += std::min(gpc_sms, multiprocessors - first) * blocks_per_sm / cluster;
  }
  return clusters;
}

}  // namespace disalign::cuda
