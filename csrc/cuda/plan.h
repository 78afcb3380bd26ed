// Host-side planning of the CUDA tile kernels: tile sizes, shared-memory layout, grid and workspace.
// Pure C++ (no CUDA or torch header), so tests/cuda_plan/ compiles it with the host compiler and checks
// the plans of the benchmark shapes on a machine without a GPU; the device-dependent inputs (SM count,
// shared memory, the kernel's occupancy for a shared size) come in as DeviceLimits and a callback.
//
// The partial-sum budget comes from disalign_ops/_gpu_plan.py (setup.py passes it as macros), the one
// definition shared with the Triton backend.
#pragma once

#include "common/layout.h"

#include <cstddef>
#include <cstdint>
#include <functional>

#ifndef DISALIGN_PARTIALS_BUDGET_FRACTION
#error "DISALIGN_PARTIALS_BUDGET_FRACTION comes from disalign_ops/_gpu_plan.py (setup.py defines it)"
#endif
#ifndef DISALIGN_MIN_BLOCKS_PER_SM
#error "DISALIGN_MIN_BLOCKS_PER_SM comes from disalign_ops/_gpu_plan.py (setup.py defines it)"
#endif

#if defined(__CUDACC__)
#define DISALIGN_HOST_DEVICE __host__ __device__
#else
#define DISALIGN_HOST_DEVICE
#endif

namespace disalign::cuda {

constexpr int kTileThreads = 256;  // == kBlock of device_math.cuh
// Shared memory aimed at per tile (logits, second input, cached exponentials): large enough to
// amortise the per-tile barriers, small enough for two to three blocks per SM.
constexpr int64_t kTileTargetBytes = 48 * 1024;
constexpr int kMaxWeightBlocks = 1024;

// Division of non-negative int64 values below 2^63 by a divisor fixed at launch, by multiply-high
// and shift (the round-up method of Granlund and Montgomery, as in ATen's IntDivider). Used per
// tile / per line, never per element.
struct FastDivider {
  uint64_t divisor = 1;
  uint64_t magic = 0;
  int shift = 0;

  FastDivider() = default;
  explicit FastDivider(int64_t d) : divisor(static_cast<uint64_t>(d)), shift(0) {
    while ((uint64_t{1} << shift) < divisor) {
      ++shift;
    }
    const unsigned __int128 one = 1;
    magic = static_cast<uint64_t>(((one << 64) * ((one << shift) - divisor)) / divisor + 1);
  }
  DISALIGN_HOST_DEVICE int64_t quotient(int64_t n) const {
    const uint64_t u = static_cast<uint64_t>(n);
#if defined(__CUDA_ARCH__)
    const uint64_t hi = __umul64hi(u, magic);
#else
    const uint64_t hi = static_cast<uint64_t>((static_cast<unsigned __int128>(u) * magic) >> 64);
#endif
    return static_cast<int64_t>((hi + u) >> shift);
  }
};

struct DeviceLimits {
  int multiprocessors = 0;
  int max_shared_per_block = 0;  // opt-in bytes of dynamic shared memory per block
  // Largest thread-block cluster a kernel can be launched in: 1 where clusters are not available
  // (before sm_90, or code compiled for an older PTX target), 8 (portable), 16 (non-portable size
  // allowed).
  int max_cluster = 1;
};

// A cluster plan keeps resident at least this fraction of the grid it aims at (b blocks per SM): the
// blocks of a cluster are co-scheduled on one GPC, and GPCs of 16-18 SMs hold whole clusters of 8 or
// 16 only (H100 / H200: ~120-128 of 132 SMs busy at one block per SM, cudaOccupancyMaxActiveClusters).
constexpr double kClusterMinResidentFraction = 0.875;

// Class-gradient accumulators in registers (the tile kernel's REG_ACC variant): in (N, C) plans of one
// block per SM whose sweep has one slice, a thread walks the same class vectors in every tile, so it
// keeps their da / db (up to this many classes per thread, 64 float registers) in registers over all
// its tiles instead of loading and storing the shared accumulators per (vector, tile); they reach
// shared memory once, after the last tile. Float accumulation only.
constexpr int kRegAccClasses = 32;

// What a tile-kernel call computes, independent of the dtype.
struct TileRequest {
  Geometry geometry;
  bool pixels;  // Layout::kPixelsContiguous
  int elem;     // bytes of the logits' dtype
  int acc;      // bytes of the accumulation type
  bool calibrate;  // calibrate_backward: two input tiles, no softmax
  bool want_alpha;
  bool want_beta;
  bool want_loss_partials;
  bool mean;
};

// Everything about a tile-kernel launch that depends on the shapes and the device. Shared memory,
// in this order: tile (lines x line_stride elements), tile2 (calibrate), exponentials (lines x
// e_stride acc values, when e_cached), alpha and beta of the chunk (ab_stride each), class-gradient
// accumulators (slices x 2 x ab_stride... see acc_stride, when acc_in_shared), row partials, row
// metadata, and when pipelined the next tile's buffer (offset_tile_next) and row bases. Lines are
// rows (classes contiguous) or classes (pixels contiguous).
struct TilePlan {
  int vec = 1;            // elements per 16-byte vector of the logits' dtype
  int tile_rows = 1;      // T
  int pixel_vectors = 1;  // pixels layout: T / vec pixel vectors per tile (at least 1)
  int group = 1;          // threads per row (classes) / per pixel vector (pixels)
  int chunk_classes = 1;
  int num_chunks = 1;
  int slices = 1;       // class-gradient accumulator slices (pixels: one per pixel vector)
  int line_stride = 1;  // elements between tile lines (16-byte multiple)
  int e_stride = 0;     // acc values between exponential lines
  int ab_stride = 0;    // acc values per alpha / beta array in shared memory
  int acc_stride = 0;   // acc values per accumulator slice (shared or workspace)
  bool e_cached = false;
  bool acc_in_shared = true;
  // The next tile's logits are copied (cp.async) into a second buffer while this tile is computed:
  // single-chunk cross-entropy plans where the buffer costs no resident block.
  bool pipelined = false;
  int64_t num_tiles = 0;
  int64_t tiles_per_image = 0;
  int offset_tile2 = 0, offset_e = 0, offset_ab = 0, offset_acc = 0, offset_partials = 0, offset_rows = 0;
  int offset_tile_next = 0, offset_rows_next = 0;  // pipelined: the second tile buffer, its row bases
  int shared_bytes = 0;
  int blocks_per_sm = 0;
  int blocks = 1;
  // Class-gradient reduction across the blocks of a thread-block cluster (sm_90): the `cluster`
  // blocks of a cluster sum their shared accumulators through distributed shared memory, so one
  // partial row per cluster reaches the workspace (partial_rows = blocks / cluster).
  int cluster = 1;
  int partial_rows = 1;
  // The REG_ACC kernel (kRegAccClasses). The planner proposes it; the launcher keeps it where that
  // kernel's own occupancy (blocks per SM, resident clusters) is the plan's.
  bool reg_acc = false;
  int weight_blocks = 0;  // "mean" only
  int ws_slices = 1;      // accumulator slices per block in the workspace partials
  // Workspace byte offsets (SIZE_MAX: absent).
  size_t ws_alpha = SIZE_MAX, ws_beta = SIZE_MAX, ws_loss = SIZE_MAX, ws_weight = SIZE_MAX;
  size_t workspace_bytes = 0;
};

// Shared bytes per row partial array and per row of metadata (the kernel lays them out the same way).
size_t row_partial_entries(const TileRequest& q, const TilePlan& plan);
size_t row_meta_bytes(const TileRequest& q, int tile_rows);

// Blocks of a launch that writes class partial rows of `row_bytes` each (disalign_ops/_gpu_plan.py,
// partial_rows: the same rule on the same constants).
int64_t partial_rows(int64_t logits_bytes, int64_t row_bytes, int multiprocessors, int64_t wanted_blocks);

// The kernel's occupancy for a dynamic shared size: resident blocks per SM, and resident clusters of
// `cluster` blocks on the device (cudaOccupancyMaxActiveClusters; only asked when dev.max_cluster > 1).
using BlocksPerSM = std::function<int(int shared_bytes)>;
using ActiveClusters = std::function<int(int shared_bytes, int cluster)>;

// The plan. Clusters are planned where partial_rows' blocks exceed the budget (the one-block-per-SM
// floor wins), the accumulators are in shared memory and the device allows them: the most blocks per
// SM, in whole clusters of the smallest size that brings the partial rows within the budget, among
// the sizes keeping kClusterMinResidentFraction of that grid resident; where no grid fits, the
// one-block-per-SM grid with the fewest rows.
TilePlan plan_tiles(const TileRequest& q, const DeviceLimits& dev, const BlocksPerSM& blocks_per_sm,
                    const ActiveClusters& active_clusters = nullptr);

// copy_unit's answer for lines copied by line_copy.h: 16-byte accesses to each line's aligned body,
// realigned in registers, head and tail element by element.
constexpr int kCopyRealign = 0;

// How an operand's tile lines are copied: the widest unit (bytes) of cp.async / vector stores along
// a stride-1 axis when every line start is aligned to it (16, 8, 4); for 2-byte types along a
// stride-1 axis where no 4-byte unit fits (odd C or H*W, odd strides, misaligned slices),
// kCopyRealign; otherwise one element.
int copy_unit(uintptr_t data, const Strides& st, const TileRequest& q, const TilePlan& plan);

}  // namespace disalign::cuda
