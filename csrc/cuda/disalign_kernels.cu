// CUDA kernels of the disalign ops (SPEC section 2). Torch-free: only CUDA's own headers, so the file
// compiles with plain nvcc (.ci/check_cuda.sh); csrc/cuda/disalign_cuda.cpp binds it to torch.
//
// One tile kernel serves cross_entropy (forward with the gradients of the reduced loss in the same
// pass, and the per-row backward of reduction "none") and calibrate_backward, for both layouts:
//   * kClassesContiguous ((N, C), NHWC): a tile is T rows x C classes, loaded along the classes;
//     T = 1 (block per row) for large C such as iNaturalist's 8142, T = 8 (a warp per row) for
//     C ~ 1000, more rows for small C.
//   * kPixelsContiguous (NCHW, transposed (N, C)): a tile is T consecutive pixels of one image x C
//     classes, loaded along the pixels (coalesced), padded in shared memory so that the per-class
//     sweep is free of bank conflicts.
// The tile is copied into shared memory once (cp.async, 16-byte units where aligned), so the logits
// are read from HBM exactly once; per row the kernel takes the max and the sum of exponentials
// (and sum p*(a*z + b) for ds) over the cached tile, then one sweep per class over the tile's rows
// computes dzhat, writes grad_logits (staged in place in the tile, stored coalesced) and accumulates
// the alpha/beta gradients in registers, then in per-block accumulators. Classes that do not fit in
// shared memory are processed in chunks, re-read per pass (very large C only).
//
// Determinism: every reduction has a fixed order. The per-class gradients go to per-block partials
// [blocks, C] summed by finalize_kernel in block order; the loss to per-block partials likewise; the
// grid depends only on the shapes and the device. No floating-point atomics.
#include "disalign_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace disalign::cuda {
namespace {

constexpr int kBlock = 256;
// Resident tile-kernel blocks per SM the register budget is sized for (<= 64 registers): left to
// its own heuristic, ptxas picks ~32-40 registers and spills.
constexpr int kTileBlocksPerSM = 4;
constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Shared memory aimed at per tile: large enough to amortise the per-tile barriers, small enough
// for several blocks per SM.
constexpr int64_t kTileTargetBytes = 48 * 1024;
// Partials of the per-class gradients take at most this fraction of the logits' size (SPEC peak
// memory: 5% of the logits in stage 2); below it the grid is capped, above it fills the GPU.
constexpr int64_t kPartialsFractionDenominator = 32;
constexpr int kMaxWeightBlocks = 1024;

// ---------------------------------------------------------------------------------------------
// Element types: storage type scalar_t, accumulation type acc_t (float, or double for double).

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <>
__device__ __forceinline__ float to_float<float>(float v) {
  return v;
}

template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t to_acc(scalar_t v) {
  return static_cast<acc_t>(to_float(v));
}
template <>
__device__ __forceinline__ double to_acc<double, double>(double v) {
  return v;
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ scalar_t from_acc(acc_t v);
template <>
__device__ __forceinline__ __half from_acc<__half, float>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ float from_acc<float, float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ double from_acc<double, double>(double v) {
  return v;
}

// exp(x) for x <= 0 (arguments are z - max or z - logsumexp): exp2 of the scaled difference keeps
// float accuracy without a full-range expf.
__device__ __forceinline__ float exp_nonpositive(float x) {
  return exp2f(x * 1.4426950408889634f);
}
__device__ __forceinline__ double exp_nonpositive(double x) {
  return exp(x);
}

// Correctly rounded reciprocal. Kernels multiply by it instead of dividing: IEEE division calls a
// slow-path subroutine whose register saves show up as spills.
__device__ __forceinline__ float reciprocal(float x) {
  return __frcp_rn(x);
}
__device__ __forceinline__ double reciprocal(double x) {
  return __drcp_rn(x);
}

template <typename acc_t>
__device__ __forceinline__ acc_t quiet_nan();
template <>
__device__ __forceinline__ float quiet_nan<float>() {
  return __int_as_float(0x7fc00000);
}
template <>
__device__ __forceinline__ double quiet_nan<double>() {
  return __longlong_as_double(0x7ff8000000000000LL);
}

// zhat = (1 + s*a) * z + s*b (paper eq. 6), one rounding sequence everywhere.
template <typename acc_t>
__device__ __forceinline__ acc_t calibrated(acc_t z, acc_t s, acc_t a, acc_t b) {
  return fma(z, fma(s, a, acc_t(1)), s * b);
}

// Division of non-negative int64 values below 2^63 by a divisor fixed at launch, by multiply-high
// and shift (the round-up method of Granlund and Montgomery, as in ATen's IntDivider): a hardware-less
// 64-bit division is a subroutine call, whose register saves would show up as spills.
struct FastDivider {
  uint64_t divisor;
  uint64_t magic;
  int shift;

  FastDivider() = default;
  explicit FastDivider(int64_t d) : divisor(static_cast<uint64_t>(d)), shift(0) {
    while ((uint64_t{1} << shift) < divisor) {
      ++shift;
    }
    const unsigned __int128 one = 1;
    magic = static_cast<uint64_t>(((one << 64) * ((one << shift) - divisor)) / divisor + 1);
  }
  __device__ __forceinline__ int64_t quotient(int64_t n) const {
    const uint64_t u = static_cast<uint64_t>(n);
    return static_cast<int64_t>((__umul64hi(u, magic) + u) >> shift);
  }
};

__device__ __forceinline__ int64_t load_target(const void* target, bool is_int64, int64_t row) {
  return is_int64 ? static_cast<const int64_t*>(target)[row] : static_cast<const int32_t*>(target)[row];
}

// ---------------------------------------------------------------------------------------------
// Fixed-order reductions.

struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return fmax(a, b);
  }
};
struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
};

// Butterfly over aligned groups of `width` lanes: every lane of a group ends with the same bits
// (each step adds the same two operands, in either order, and + and max are commutative).
template <typename T, typename Op>
__device__ __forceinline__ T group_reduce(T v, int width, Op op) {
  for (int offset = width / 2; offset > 0; offset /= 2) {
    v = op(v, __shfl_xor_sync(kFullMask, v, offset));
  }
  return v;
}

// Sum of values[0..n) by one warp in a fixed order; every lane returns the same bits.
template <typename acc_t>
__device__ acc_t warp_fixed_sum(const acc_t* values, int64_t n) {
  const int lane = threadIdx.x % kWarp;
  acc_t sum = 0;
  for (int64_t i = lane; i < n; i += kWarp) {
    sum += values[i];
  }
  return group_reduce(sum, kWarp, SumOp{});
}

// Sum over the block in a fixed order, valid in thread 0. `scratch` holds kBlock / kWarp values.
template <typename acc_t>
__device__ acc_t block_fixed_sum(acc_t v, acc_t* scratch) {
  v = group_reduce(v, kWarp, SumOp{});
  if (threadIdx.x % kWarp == 0) {
    scratch[threadIdx.x / kWarp] = v;
  }
  __syncthreads();
  acc_t sum = 0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kBlock / kWarp; ++w) {
      sum += scratch[w];
    }
  }
  return sum;
}

// ---------------------------------------------------------------------------------------------
// Tile copies between global and shared memory.

__device__ __forceinline__ void copy_unit_to_shared(void* shared, const void* global, int bytes) {
  switch (bytes) {
    case 16:
      __pipeline_memcpy_async(shared, global, 16);
      break;
    case 8:
      __pipeline_memcpy_async(shared, global, 8);
      break;
    case 4:
      __pipeline_memcpy_async(shared, global, 4);
      break;
    default:  // a lone 2-byte element (unaligned half tensors)
      *static_cast<unsigned short*>(shared) = *static_cast<const unsigned short*>(global);
  }
}

__device__ __forceinline__ void copy_unit_to_global(void* global, const void* shared, int bytes) {
  switch (bytes) {
    case 16:
      *static_cast<uint4*>(global) = *static_cast<const uint4*>(shared);
      break;
    case 8:
      *static_cast<uint2*>(global) = *static_cast<const uint2*>(shared);
      break;
    case 4:
      *static_cast<unsigned*>(global) = *static_cast<const unsigned*>(shared);
      break;
    default:
      *static_cast<unsigned short*>(global) = *static_cast<const unsigned short*>(shared);
  }
}

// Shared-memory index of tile element (row r, class j0 + jl): rows are lines for
// kClassesContiguous, classes are lines for kPixelsContiguous.
template <bool PIXELS>
__device__ __forceinline__ int tile_index(int r, int jl, int line_stride) {
  return PIXELS ? jl * line_stride + r : r * line_stride + jl;
}

// One operand's part of a tile: which rows (their base offsets in row_base), which classes.
struct TileSpan {
  const int64_t* row_base;  // per tile row: b*strides.batch + s*strides.spatial
  int rows;
  int first_class;
  int classes;
};

// Copies the tile's lines between global and shared memory in units of `unit` bytes along the
// contiguous axis (unit > sizeof(scalar_t) only where the planner found that axis of stride 1 and
// aligned). Global -> shared copies are asynchronous: the caller waits (wait_tile).
template <bool PIXELS, bool TO_SHARED, typename scalar_t>
__device__ void copy_tile(
    scalar_t* shared,
    int line_stride,
    scalar_t* global,
    const Strides& strides,
    const TileSpan& span,
    int unit) {
  const int per_unit = unit / static_cast<int>(sizeof(scalar_t));
  const int lines = PIXELS ? span.classes : span.rows;
  const int units_per_line = (PIXELS ? span.rows : span.classes) / per_unit;
  const int64_t along = PIXELS ? strides.spatial : strides.cls;
  const int total = lines * units_per_line;
  if (total == 0) {
    return;
  }
  // (line, k) of item i, advanced incrementally instead of a division per unit.
  int line = threadIdx.x / units_per_line;
  int k = threadIdx.x % units_per_line;
  const int line_step = kBlock / units_per_line;
  const int k_step = kBlock % units_per_line;
  for (int i = threadIdx.x; i < total; i += kBlock) {
    const int64_t line_base = PIXELS ? span.row_base[0] + (span.first_class + line) * strides.cls
                                     : span.row_base[line] + span.first_class * strides.cls;
    scalar_t* g = global + line_base + static_cast<int64_t>(k) * per_unit * along;
    scalar_t* s = shared + line * line_stride + k * per_unit;
    if (TO_SHARED) {
      copy_unit_to_shared(s, g, unit);
    } else {
      copy_unit_to_global(g, s, unit);
    }
    k += k_step;
    line += line_step;
    if (k >= units_per_line) {
      k -= units_per_line;
      ++line;
    }
  }
}

__device__ __forceinline__ void wait_tile() {
  __pipeline_commit();
  __pipeline_wait_prior(0);
  __syncthreads();
}

// ---------------------------------------------------------------------------------------------
// The tile kernel.

template <typename scalar_t, typename acc_t>
struct TileParams {
  int64_t classes;
  int64_t spatial;
  int64_t rows;
  // Plan (see plan_tiles).
  int tile_rows;      // T
  int group;          // threads per row in the row statistics, kBlock / T
  int chunk_classes;  // classes per pass over shared memory (all C unless very large)
  int num_chunks;
  int slices;       // the per-class sweep splits the tile's rows into this many interleaved slices
  int line_stride;  // shared elements between tile lines
  int64_t num_tiles;
  int64_t tiles_per_image;  // kPixelsContiguous
  FastDivider by_tiles_per_image;
  FastDivider by_spatial;
  bool acc_in_shared;
  int offset_tile2, offset_acc, offset_partials, offset_rows;  // bytes into shared memory
  // Operands.
  const scalar_t* logits;
  Strides logits_strides;
  int logits_unit;
  const scalar_t* grad_in;  // calibrate_backward: dzhat
  Strides grad_in_strides;
  int grad_in_unit;
  scalar_t* grad_logits;
  Strides grad_strides;
  int grad_unit;
  const acc_t* alpha;
  const acc_t* beta;
  const acc_t* weight;
  const acc_t* confidence;
  const void* target;
  bool target_is_int64;
  int64_t ignore_index;
  const acc_t* grad_loss;
  const acc_t* weight_partials;  // "mean": the rows' upstream gradient is 1 / their sum
  int num_weight_partials;
  // Outputs.
  acc_t* loss_rows;
  acc_t* loss_partials;  // [blocks]
  acc_t* grad_confidence;
  acc_t* alpha_partials;  // [blocks, C]
  acc_t* beta_partials;   // [blocks, C]
  int64_t* bad_target;
};

// Row-statistics mapping: G = kBlock / T threads per row. Rows are contiguous lane groups for
// kClassesContiguous (lanes walk the contiguous classes) and strided for kPixelsContiguous (lanes
// walk the contiguous pixels), so shared-memory reads are conflict free in both.
template <bool PIXELS>
struct RowGroup {
  int row;
  int member;
  __device__ RowGroup(int tile_rows, int group)
      : row(PIXELS ? threadIdx.x % tile_rows : threadIdx.x / group),
        member(PIXELS ? threadIdx.x / tile_rows : threadIdx.x % group) {}
};

// Stores this thread's partial of its row (pre-reduced across lanes where a row spans lanes).
template <bool PIXELS, typename T, typename Op>
__device__ void write_row_partial(T* partials, T v, const RowGroup<PIXELS>& rg, int group, Op op) {
  if (PIXELS) {
    partials[threadIdx.x] = v;
  } else {
    const int width = min(group, kWarp);
    v = group_reduce(v, width, op);
    if (rg.member % width == 0) {
      partials[rg.row * (group / width) + rg.member / width] = v;
    }
  }
}

// Folds the partials of `row` in a fixed order (after a barrier following write_row_partial).
template <bool PIXELS, typename T, typename Op>
__device__ T read_row_partials(const T* partials, int row, int tile_rows, int group, Op op) {
  if (PIXELS) {
    T v = partials[row];
    for (int k = 1; k < group; ++k) {
      v = op(v, partials[k * tile_rows + row]);
    }
    return v;
  }
  const int count = group / min(group, kWarp);
  T v = partials[row * count];
  for (int k = 1; k < count; ++k) {
    v = op(v, partials[row * count + k]);
  }
  return v;
}

template <typename scalar_t, typename acc_t, bool PIXELS, bool CALIBRATE>
__global__ void __launch_bounds__(kBlock, kTileBlocksPerSM) tile_kernel(const TileParams<scalar_t, acc_t> p) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  const int T = p.tile_rows;
  const int64_t C = p.classes;
  scalar_t* tile = reinterpret_cast<scalar_t*>(shared_bytes);
  scalar_t* tile2 = reinterpret_cast<scalar_t*>(shared_bytes + p.offset_tile2);
  acc_t* part_max = reinterpret_cast<acc_t*>(shared_bytes + p.offset_partials);
  acc_t* part_sum = part_max + kBlock;
  acc_t* part_dot = part_sum + kBlock;
  int64_t* row_base = reinterpret_cast<int64_t*>(shared_bytes + p.offset_rows);
  int64_t* row_base2 = row_base + T;
  int64_t* row_base_out = row_base2 + T;
  acc_t* row_s = reinterpret_cast<acc_t*>(row_base_out + T);
  acc_t* row_lse = row_s + T;
  acc_t* row_gw = row_lse + T;
  int* row_y = reinterpret_cast<int*>(row_gw + T);

  const bool want_alpha = p.alpha_partials != nullptr;
  const bool want_beta = p.beta_partials != nullptr;
  const bool want_ds = p.grad_confidence != nullptr;
  const bool want_sweep = want_alpha || want_beta || p.grad_logits != nullptr;
  acc_t* acc_alpha = p.acc_in_shared ? reinterpret_cast<acc_t*>(shared_bytes + p.offset_acc)
                                     : p.alpha_partials + blockIdx.x * C;
  acc_t* acc_beta = p.acc_in_shared ? acc_alpha + p.slices * C : p.beta_partials + blockIdx.x * C;

  // The rows' upstream gradient when it is uniform: 1, or 1 / total weight for "mean" (every
  // block sums the same partials in the same order, so all see the same bits).
  acc_t uniform_grad = 1;
  if (p.weight_partials != nullptr) {
    if (threadIdx.x < kWarp) {
      const acc_t total = warp_fixed_sum(p.weight_partials, p.num_weight_partials);
      if (threadIdx.x == 0) {
        part_max[0] = total;
      }
    }
    __syncthreads();
    uniform_grad = reciprocal(part_max[0]);
  }
  if (want_sweep) {
    for (int64_t i = threadIdx.x; i < p.slices * C; i += kBlock) {
      if (want_alpha) {
        acc_alpha[i] = 0;
      }
      if (want_beta) {
        acc_beta[i] = 0;
      }
    }
  }
  __syncthreads();

  const RowGroup<PIXELS> rg(T, p.group);
  acc_t loss_slot = 0;  // thread r: sum of the losses of the rows in tile slot r
  for (int64_t tile_id = blockIdx.x; tile_id < p.num_tiles; tile_id += gridDim.x) {
    // Rows of this tile: PIXELS, T pixels of one image; else T consecutive rows.
    int64_t first_row;
    int valid;
    if (PIXELS) {
      const int64_t image = p.by_tiles_per_image.quotient(tile_id);
      const int64_t first_pixel = (tile_id - image * p.tiles_per_image) * T;
      first_row = image * p.spatial + first_pixel;
      valid = static_cast<int>(min(static_cast<int64_t>(T), p.spatial - first_pixel));
    } else {
      first_row = tile_id * T;
      valid = static_cast<int>(min(static_cast<int64_t>(T), p.rows - first_row));
    }

    // Per-row metadata; thread r keeps its row's target and upstream gradient.
    int64_t target_value = 0;
    acc_t row_grad = uniform_grad;
    if (threadIdx.x < valid) {
      const int r = threadIdx.x;
      const int64_t row = first_row + r;
      const int64_t b = p.by_spatial.quotient(row);
      const int64_t s = row - b * p.spatial;
      row_base[r] = b * p.logits_strides.batch + s * p.logits_strides.spatial;
      if (CALIBRATE) {
        row_base2[r] = b * p.grad_in_strides.batch + s * p.grad_in_strides.spatial;
      }
      if (p.grad_logits != nullptr) {
        row_base_out[r] = b * p.grad_strides.batch + s * p.grad_strides.spatial;
      }
      row_s[r] = p.confidence != nullptr ? p.confidence[row] : acc_t(1);
      if (!CALIBRATE) {
        target_value = load_target(p.target, p.target_is_int64, row);
        if (p.grad_loss != nullptr) {
          row_grad = p.grad_loss[row];
        }
      }
    }
    __syncthreads();

    auto load_chunk = [&](int first_class, int classes) {
      copy_tile<PIXELS, true>(
          tile, p.line_stride, const_cast<scalar_t*>(p.logits), p.logits_strides,
          TileSpan{row_base, valid, first_class, classes}, p.logits_unit);
      if (CALIBRATE) {
        copy_tile<PIXELS, true>(
            tile2, p.line_stride, const_cast<scalar_t*>(p.grad_in), p.grad_in_strides,
            TileSpan{row_base2, valid, first_class, classes}, p.grad_in_unit);
      }
      wait_tile();
    };
    const bool single_chunk = p.num_chunks == 1;
    if (single_chunk) {
      load_chunk(0, static_cast<int>(C));
    }
    auto for_each_chunk = [&](auto&& body) {
      for (int c = 0; c < p.num_chunks; ++c) {
        const int first_class = c * p.chunk_classes;
        const int classes = static_cast<int>(min(static_cast<int64_t>(p.chunk_classes), C - first_class));
        if (!single_chunk) {
          load_chunk(first_class, classes);
        }
        body(first_class, classes);
        if (!single_chunk) {
          __syncthreads();  // the next chunk overwrites the tile
        }
      }
    };

    // Row statistics: max of zhat, then sum of exp(zhat - max) and of exp(zhat - max)*(a*z + b)
    // (cross entropy); sum of dzhat*(a*z + b) (calibrate_backward).
    const bool row_active = rg.row < valid;
    acc_t row_max = -INFINITY;
    if (!CALIBRATE) {
      for_each_chunk([&](int first_class, int classes) {
        if (!row_active) {
          return;
        }
        const acc_t s = row_s[rg.row];
        for (int jl = rg.member; jl < classes; jl += p.group) {
          const int j = first_class + jl;
          const acc_t z = to_acc<acc_t>(tile[tile_index<PIXELS>(rg.row, jl, p.line_stride)]);
          row_max = fmax(row_max, calibrated(z, s, p.alpha[j], p.beta[j]));
        }
      });
      write_row_partial(part_max, row_max, rg, p.group, MaxOp{});
      __syncthreads();
      row_max = read_row_partials<PIXELS>(part_max, rg.row, T, p.group, MaxOp{});
    }
    if (!CALIBRATE || want_ds) {
      acc_t sum_exp = 0;
      acc_t dot = 0;
      for_each_chunk([&](int first_class, int classes) {
        if (!row_active) {
          return;
        }
        const acc_t s = row_s[rg.row];
        for (int jl = rg.member; jl < classes; jl += p.group) {
          const int j = first_class + jl;
          const int index = tile_index<PIXELS>(rg.row, jl, p.line_stride);
          const acc_t z = to_acc<acc_t>(tile[index]);
          const acc_t a = p.alpha[j];
          const acc_t b = p.beta[j];
          if (CALIBRATE) {
            dot = fma(to_acc<acc_t>(tile2[index]), fma(a, z, b), dot);
          } else {
            const acc_t e = exp_nonpositive(calibrated(z, s, a, b) - row_max);
            sum_exp += e;
            if (want_ds) {
              dot = fma(e, fma(a, z, b), dot);
            }
          }
        }
      });
      if (!CALIBRATE) {
        write_row_partial(part_sum, sum_exp, rg, p.group, SumOp{});
      }
      if (want_ds) {
        write_row_partial(part_dot, dot, rg, p.group, SumOp{});
      }
      __syncthreads();
    }

    // Per-row results, by thread r for row r.
    if (threadIdx.x < valid) {
      const int r = threadIdx.x;
      const int64_t row = first_row + r;
      const acc_t dot = want_ds ? read_row_partials<PIXELS>(part_dot, r, T, p.group, SumOp{}) : acc_t(0);
      if (CALIBRATE) {
        if (want_ds) {
          p.grad_confidence[row] = dot;
        }
      } else {
        const acc_t sum_exp = read_row_partials<PIXELS>(part_sum, r, T, p.group, SumOp{});
        const acc_t lse = read_row_partials<PIXELS>(part_max, r, T, p.group, MaxOp{}) + log(sum_exp);
        const bool counted = target_value != p.ignore_index;
        const bool in_range = target_value >= 0 && target_value < C;
        acc_t loss = 0;
        acc_t grad_weight = 0;  // upstream gradient * w[y]; 0 for ignored rows
        acc_t ds = 0;
        int y = -1;
        if (counted && !in_range) {
          // Never used as an index; NaN makes the error visible without a device sync.
          if (p.bad_target != nullptr) {
            atomicCAS(
                reinterpret_cast<unsigned long long*>(p.bad_target), static_cast<unsigned long long>(p.ignore_index),
                static_cast<unsigned long long>(target_value));
          }
          loss = grad_weight = ds = quiet_nan<acc_t>();
        } else if (counted) {
          y = static_cast<int>(target_value);
          const acc_t s = row_s[r];
          const acc_t w = p.weight != nullptr ? p.weight[y] : acc_t(1);
          const acc_t z = to_acc<acc_t>(p.logits[row_base[r] + y * p.logits_strides.cls]);
          const acc_t u = fma(p.alpha[y], z, p.beta[y]);
          loss = w * (lse - calibrated(z, s, p.alpha[y], p.beta[y]));
          grad_weight = row_grad * w;
          ds = grad_weight * fma(dot, reciprocal(sum_exp), -u);
        }
        row_lse[r] = lse;
        row_gw[r] = grad_weight;
        row_y[r] = y;
        if (p.loss_rows != nullptr) {
          p.loss_rows[row] = loss;
        }
        loss_slot += loss;
        if (want_ds) {
          p.grad_confidence[row] = ds;
        }
      }
    }

    if (want_sweep) {
      __syncthreads();
      // Per-class sweep: item (slice q, class j) walks rows q, q + slices, ... of the tile.
      for_each_chunk([&](int first_class, int classes) {
        const int items = classes * p.slices;
        for (int item = threadIdx.x; item < items; item += kBlock) {
          const int q = item / classes;
          const int jl = item - q * classes;
          const int j = first_class + jl;
          const acc_t a = p.alpha[j];
          const acc_t b = p.beta[j];
          acc_t da = 0;
          acc_t db = 0;
          for (int r = q; r < valid; r += p.slices) {
            const int index = tile_index<PIXELS>(r, jl, p.line_stride);
            const acc_t s = row_s[r];
            const acc_t z = to_acc<acc_t>(tile[index]);
            const acc_t scale = fma(s, a, acc_t(1));
            acc_t dzhat;
            if (CALIBRATE) {
              dzhat = to_acc<acc_t>(tile2[index]);
            } else {
              const acc_t prob = exp_nonpositive(fma(z, scale, s * b) - row_lse[r]);
              dzhat = row_gw[r] * (j == row_y[r] ? prob - acc_t(1) : prob);
            }
            if (p.grad_logits != nullptr) {
              tile[index] = from_acc<scalar_t>(dzhat * scale);  // staged in place, stored below
            }
            const acc_t ds_dzhat = dzhat * s;
            da = fma(ds_dzhat, z, da);
            db += ds_dzhat;
          }
          if (want_alpha) {
            acc_alpha[q * C + j] += da;
          }
          if (want_beta) {
            acc_beta[q * C + j] += db;
          }
        }
        if (p.grad_logits != nullptr) {
          __syncthreads();
          copy_tile<PIXELS, false>(
              tile, p.line_stride, p.grad_logits, p.grad_strides,
              TileSpan{row_base_out, valid, first_class, classes}, p.grad_unit);
        }
      });
    }
    __syncthreads();  // the next tile overwrites the tile and the row metadata
  }

  // Block results: per-class partials (slices folded in order) and the loss partial.
  if (p.acc_in_shared) {
    for (int64_t j = threadIdx.x; j < C; j += kBlock) {
      acc_t da = 0;
      acc_t db = 0;
      for (int q = 0; q < p.slices; ++q) {
        if (want_alpha) {
          da += acc_alpha[q * C + j];
        }
        if (want_beta) {
          db += acc_beta[q * C + j];
        }
      }
      if (want_alpha) {
        p.alpha_partials[blockIdx.x * C + j] = da;
      }
      if (want_beta) {
        p.beta_partials[blockIdx.x * C + j] = db;
      }
    }
  }
  if (p.loss_partials != nullptr) {
    part_sum[threadIdx.x] = loss_slot;
    __syncthreads();
    if (threadIdx.x == 0) {
      acc_t total = 0;
      for (int r = 0; r < T; ++r) {
        total += part_sum[r];
      }
      p.loss_partials[blockIdx.x] = total;
    }
  }
}

// Sum of w[y] over the counted rows ("mean" denominator), as per-block partials. Out-of-range
// targets count as NaN (the loss kernel also makes their rows NaN).
template <typename acc_t>
__global__ void __launch_bounds__(kBlock) total_weight_kernel(
    const void* target,
    bool target_is_int64,
    const acc_t* weight,
    int64_t ignore_index,
    int64_t classes,
    int64_t rows,
    acc_t* partials) {
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

// grad_alpha / grad_beta from the per-block partials (in block order), and the reduced loss.
template <typename acc_t>
__global__ void __launch_bounds__(kBlock) finalize_kernel(
    int64_t classes,
    int blocks,
    const acc_t* alpha_partials,
    const acc_t* beta_partials,
    acc_t* grad_alpha,
    acc_t* grad_beta,
    const acc_t* loss_partials,
    const acc_t* weight_partials,
    int num_weight_partials,
    acc_t* loss) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x;
  if (j < classes) {
    if (grad_alpha != nullptr) {
      acc_t sum = 0;
      for (int b = 0; b < blocks; ++b) {
        sum += alpha_partials[b * classes + j];
      }
      grad_alpha[j] = sum;
    }
    if (grad_beta != nullptr) {
      acc_t sum = 0;
      for (int b = 0; b < blocks; ++b) {
        sum += beta_partials[b * classes + j];
      }
      grad_beta[j] = sum;
    }
  }
  if (loss != nullptr && blockIdx.x == 0 && threadIdx.x < kWarp) {
    acc_t total = warp_fixed_sum(loss_partials, blocks);
    if (weight_partials != nullptr) {
      total /= warp_fixed_sum(weight_partials, num_weight_partials);  // 0/0 = NaN without counted rows
    }
    if (threadIdx.x == 0) {
      *loss = total;
    }
  }
}

// zhat = (1 + s*alpha) * z + s*beta, elementwise in the logits' memory order.
template <typename scalar_t, typename acc_t, bool PIXELS>
__global__ void __launch_bounds__(kBlock) calibrate_kernel(
    Geometry g,
    FastDivider by_inner,   // C, or S for PIXELS
    FastDivider by_middle,  // S, or C for PIXELS
    const scalar_t* logits,
    Strides in,
    scalar_t* out,
    Strides os,
    const acc_t* alpha,
    const acc_t* beta,
    const acc_t* confidence) {
  const int64_t total = g.batch * g.classes * g.spatial;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * kBlock) {
    const int64_t outer = by_inner.quotient(e);
    const int64_t k = e - outer * static_cast<int64_t>(by_inner.divisor);
    const int64_t b = by_middle.quotient(outer);
    const int64_t m = outer - b * static_cast<int64_t>(by_middle.divisor);
    const int64_t j = PIXELS ? m : k;
    const int64_t s = PIXELS ? k : m;
    const acc_t sv = confidence != nullptr ? confidence[b * g.spatial + s] : acc_t(1);
    const acc_t z = to_acc<acc_t>(logits[b * in.batch + j * in.cls + s * in.spatial]);
    out[b * os.batch + j * os.cls + s * os.spatial] = from_acc<scalar_t>(fma(z, fma(sv, alpha[j], acc_t(1)), sv * beta[j]));
  }
}

// ---------------------------------------------------------------------------------------------
// Host side: planning and launches.

struct DeviceInfo {
  int multiprocessors;
  int max_shared;  // opt-in bytes of dynamic shared memory per block
};

cudaError_t device_info(DeviceInfo* info) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&info->multiprocessors, cudaDevAttrMultiProcessorCount, device);
  }
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&info->max_shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  }
  return err;
}

int64_t pow2_floor(int64_t v) {
  int64_t p = 1;
  while (p * 2 <= v) {
    p *= 2;
  }
  return p;
}

int64_t pow2_ceil(int64_t v) {
  int64_t p = 1;
  while (p < v) {
    p *= 2;
  }
  return p;
}

size_t align_up(size_t v, size_t a) {
  return (v + a - 1) / a * a;
}

// The widest unit (bytes) in which an operand's tile lines can be copied: 16-byte vectors along a
// stride-1 axis when every line start is aligned, down to one element.
int copy_unit(const void* data, const Strides& st, const Geometry& g, bool pixels, int tile_rows,
              int chunk_classes, int line_stride, int elem) {
  if ((pixels ? st.spatial : st.cls) != 1) {
    return elem;
  }
  const int widest = pixels ? std::max(elem, 4) : 16;  // padded pixel lines keep 4-byte alignment
  for (int unit = widest; unit > elem; unit /= 2) {
    const int64_t per = unit / elem;
    bool ok = reinterpret_cast<uintptr_t>(data) % unit == 0 && line_stride % per == 0;
    ok = ok && (g.batch == 1 || st.batch % per == 0);
    if (pixels) {
      ok = ok && g.spatial % per == 0 && tile_rows % per == 0 && (g.classes == 1 || st.cls % per == 0);
    } else {
      ok = ok && g.classes % per == 0 && chunk_classes % per == 0 && (g.spatial == 1 || st.spatial % per == 0);
    }
    if (ok) {
      return unit;
    }
  }
  return elem;
}

// Everything about a tile-kernel launch that depends on the shapes and the device.
struct TilePlan {
  int tile_rows = 1;
  int chunk_classes = 1;
  int num_chunks = 1;
  int slices = 1;
  int line_stride = 1;
  bool acc_in_shared = true;
  int64_t num_tiles = 0;
  int64_t tiles_per_image = 0;
  int offset_tile2 = 0, offset_acc = 0, offset_partials = 0, offset_rows = 0;
  int shared_bytes = 0;
  int blocks = 1;
  int weight_blocks = 0;  // "mean" only
  // Workspace byte offsets (SIZE_MAX: absent).
  size_t ws_alpha = SIZE_MAX, ws_beta = SIZE_MAX, ws_loss = SIZE_MAX, ws_weight = SIZE_MAX;
  size_t workspace_bytes = 0;
};

// What a tile-kernel call computes, independent of the dtype.
struct TileRequest {
  Geometry geometry;
  bool pixels;
  int elem;
  int acc;
  bool calibrate;  // two input tiles (logits and grad)
  bool want_alpha;
  bool want_beta;
  bool want_loss_partials;
  bool mean;
};

template <typename Kernel>
cudaError_t plan_tiles(const TileRequest& q, Kernel kernel, TilePlan* plan) {
  DeviceInfo dev{};
  cudaError_t err = device_info(&dev);
  if (err != cudaSuccess) {
    return err;
  }
  const Geometry& g = q.geometry;
  const int64_t rows = g.batch * g.spatial;
  const int64_t C = g.classes;
  const int tiles_in = q.calibrate ? 2 : 1;
  const bool class_grads = q.want_alpha || q.want_beta;

  // Rows per tile: about kTileTargetBytes of logits, at least 32 pixels (coalescing along pixels),
  // no more than the rows (or pixels of an image) there are.
  const int64_t row_bytes = C * q.elem * tiles_in;
  int64_t T = pow2_floor(std::max<int64_t>(1, std::min<int64_t>(kBlock, kTileTargetBytes / row_bytes)));
  if (q.pixels) {
    T = std::max<int64_t>(T, 32);
  }
  T = std::min(T, pow2_ceil(std::max<int64_t>(1, q.pixels ? g.spatial : rows)));
  const int pad = q.pixels ? (q.elem < 4 ? 4 / q.elem : 1) : 0;  // odd word stride between class lines

  const size_t partials_bytes = 3 * kBlock * q.acc;
  const size_t rows_meta_bytes = T * (3 * sizeof(int64_t) + 3 * q.acc + sizeof(int));
  const size_t fixed = align_up(partials_bytes, 16) + align_up(rows_meta_bytes, 16);
  auto tile_bytes = [&](int64_t classes) -> size_t {
    const int64_t line_elems = q.pixels ? (T + pad) * classes : T * classes;
    return align_up(static_cast<size_t>(line_elems * q.elem), 16) * tiles_in;
  };
  auto slices_for = [&](int64_t classes) {
    // Enough (slice, class) items to keep the block busy in the per-class sweep.
    return std::min<int64_t>(T, pow2_ceil((4 * kBlock + classes - 1) / classes));
  };

  int64_t slices = slices_for(C);
  size_t acc_bytes = class_grads ? align_up(2 * slices * C * q.acc, 16) : 0;
  plan->acc_in_shared = acc_bytes <= static_cast<size_t>(dev.max_shared) / 2;
  if (!plan->acc_in_shared) {
    // Accumulators in the block's own rows of the workspace partials: one slice.
    slices = 1;
    acc_bytes = 0;
  }
  size_t available = dev.max_shared - fixed - (plan->acc_in_shared ? acc_bytes : 0);
  int64_t chunk = C;
  if (tile_bytes(C) > available) {
    // Very large C: passes over chunks of classes (a multiple of 32), accumulators in the workspace.
    slices = 1;
    plan->acc_in_shared = !class_grads;
    acc_bytes = 0;
    available = dev.max_shared - fixed;
    chunk = std::max<int64_t>(32, (static_cast<int64_t>(available) / (tile_bytes(1) + 16)) / 32 * 32);
    while (chunk > 32 && tile_bytes(chunk) > available) {
      chunk -= 32;
    }
  }
  plan->tile_rows = static_cast<int>(T);
  plan->chunk_classes = static_cast<int>(chunk);
  plan->num_chunks = static_cast<int>((C + chunk - 1) / chunk);
  plan->slices = static_cast<int>(slices);
  plan->line_stride = static_cast<int>(q.pixels ? T + pad : chunk);
  plan->tiles_per_image = q.pixels ? (g.spatial + T - 1) / T : 0;
  plan->num_tiles = q.pixels ? g.batch * plan->tiles_per_image : (rows + T - 1) / T;

  const size_t one_tile = tile_bytes(chunk) / tiles_in;
  plan->offset_tile2 = static_cast<int>(one_tile);
  plan->offset_acc = static_cast<int>(one_tile * tiles_in);
  plan->offset_partials = static_cast<int>(plan->offset_acc + (plan->acc_in_shared ? acc_bytes : 0));
  plan->offset_rows = static_cast<int>(plan->offset_partials + align_up(partials_bytes, 16));
  plan->shared_bytes = static_cast<int>(plan->offset_rows + align_up(rows_meta_bytes, 16));

  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, plan->shared_bytes);
  int per_sm = 0;
  if (err == cudaSuccess) {
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kBlock, plan->shared_bytes);
  }
  if (err != cudaSuccess) {
    return err;
  }
  int64_t blocks = std::min<int64_t>(plan->num_tiles, static_cast<int64_t>(std::max(per_sm, 1)) * dev.multiprocessors);
  if (class_grads) {
    const int64_t logits_bytes = rows * C * q.elem;
    const int64_t per_block = 2 * C * q.acc;
    blocks = std::min(blocks, logits_bytes / kPartialsFractionDenominator / per_block);
  }
  plan->blocks = static_cast<int>(std::max<int64_t>(blocks, 1));

  size_t ws = 0;
  auto reserve = [&](size_t bytes) {
    const size_t at = ws;
    ws = align_up(ws + bytes, 256);
    return at;
  };
  if (q.want_alpha) {
    plan->ws_alpha = reserve(static_cast<size_t>(plan->blocks) * C * q.acc);
  }
  if (q.want_beta) {
    plan->ws_beta = reserve(static_cast<size_t>(plan->blocks) * C * q.acc);
  }
  if (q.want_loss_partials) {
    plan->ws_loss = reserve(static_cast<size_t>(plan->blocks) * q.acc);
  }
  if (q.mean) {
    plan->weight_blocks = static_cast<int>(
        std::min<int64_t>(kMaxWeightBlocks, std::max<int64_t>(1, (rows + 4 * kBlock - 1) / (4 * kBlock))));
    plan->ws_weight = reserve(static_cast<size_t>(plan->weight_blocks) * q.acc);
  }
  plan->workspace_bytes = ws;
  return cudaSuccess;
}

template <typename T>
T* at_offset(void* workspace, size_t offset) {
  return offset == SIZE_MAX ? nullptr : reinterpret_cast<T*>(static_cast<unsigned char*>(workspace) + offset);
}

template <typename scalar_t, typename acc_t>
void fill_plan(TileParams<scalar_t, acc_t>& p, const TilePlan& plan, const Geometry& g) {
  p.classes = g.classes;
  p.spatial = g.spatial;
  p.rows = g.batch * g.spatial;
  p.tile_rows = plan.tile_rows;
  p.group = kBlock / plan.tile_rows;
  p.chunk_classes = plan.chunk_classes;
  p.num_chunks = plan.num_chunks;
  p.slices = plan.slices;
  p.line_stride = plan.line_stride;
  p.num_tiles = plan.num_tiles;
  p.tiles_per_image = plan.tiles_per_image;
  p.by_tiles_per_image = FastDivider(std::max<int64_t>(plan.tiles_per_image, 1));
  p.by_spatial = FastDivider(std::max<int64_t>(g.spatial, 1));
  p.acc_in_shared = plan.acc_in_shared;
  p.offset_tile2 = plan.offset_tile2;
  p.offset_acc = plan.offset_acc;
  p.offset_partials = plan.offset_partials;
  p.offset_rows = plan.offset_rows;
}

template <typename acc_t>
cudaError_t launch_finalize(
    const Geometry& g, const TilePlan& plan, void* workspace, void* grad_alpha, void* grad_beta, void* loss,
    cudaStream_t stream) {
  if (grad_alpha == nullptr && grad_beta == nullptr && loss == nullptr) {
    return cudaSuccess;
  }
  const int grid = static_cast<int>(std::max<int64_t>(1, (g.classes + kBlock - 1) / kBlock));
  finalize_kernel<acc_t><<<grid, kBlock, 0, stream>>>(
      g.classes, plan.blocks, at_offset<acc_t>(workspace, plan.ws_alpha), at_offset<acc_t>(workspace, plan.ws_beta),
      static_cast<acc_t*>(grad_alpha), static_cast<acc_t*>(grad_beta), at_offset<acc_t>(workspace, plan.ws_loss),
      at_offset<acc_t>(workspace, plan.ws_weight), plan.weight_blocks, static_cast<acc_t*>(loss));
  return cudaGetLastError();
}

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

// The tile kernel of an op (cross_entropy: LossArgs, calibrate_backward: CalibrateBackwardArgs).
template <typename scalar_t, typename acc_t, typename Args>
auto tile_kernel_for(bool pixels) {
  constexpr bool kCalibrate = std::is_same_v<Args, CalibrateBackwardArgs>;
  return pixels ? tile_kernel<scalar_t, acc_t, true, kCalibrate> : tile_kernel<scalar_t, acc_t, false, kCalibrate>;
}

TileRequest tile_request(const LossArgs& a, int elem, int acc) {
  const bool reduced = a.reduction != Reduction::kNone && a.grad_loss == nullptr;
  return TileRequest{
      a.geometry, a.layout == Layout::kPixelsContiguous, elem, acc, false, a.grad_alpha != nullptr,
      a.grad_beta != nullptr, reduced && a.loss != nullptr, reduced && a.reduction == Reduction::kMean};
}

TileRequest tile_request(const CalibrateBackwardArgs& a, int elem, int acc) {
  return TileRequest{
      a.geometry, a.layout == Layout::kPixelsContiguous, elem, acc, true, a.grad_alpha != nullptr,
      a.grad_beta != nullptr, false, false};
}

// The widest copy unit of a tile operand under the plan.
template <typename scalar_t>
int tile_copy_unit(const void* data, const Strides& strides, const TileRequest& q, const TilePlan& plan) {
  return copy_unit(
      data, strides, q.geometry, q.pixels, plan.tile_rows, plan.chunk_classes, plan.line_stride, sizeof(scalar_t));
}

template <typename Args>
size_t tile_workspace_bytes(const Args& args) {
  return dispatch_dtype(args.dtype, [&](auto scalar, auto acc) -> size_t {
    using scalar_t = decltype(scalar);
    using acc_t = decltype(acc);
    const TileRequest q = tile_request(args, sizeof(scalar_t), sizeof(acc_t));
    TilePlan plan;
    if (plan_tiles(q, tile_kernel_for<scalar_t, acc_t, Args>(q.pixels), &plan) != cudaSuccess) {
      return 0;  // the launch reports the error
    }
    return plan.workspace_bytes;
  });
}

// Plans and launches the tile kernel of an op (cross_entropy: LossArgs, calibrate_backward:
// CalibrateBackwardArgs), then the reduction of its per-block partials.
template <typename Args>
cudaError_t launch_tiles(const Args& args, void* workspace, cudaStream_t stream) {
  return dispatch_dtype(args.dtype, [&](auto scalar, auto acc) -> cudaError_t {
    using scalar_t = decltype(scalar);
    using acc_t = decltype(acc);
    const TileRequest q = tile_request(args, sizeof(scalar_t), sizeof(acc_t));
    const auto kernel = tile_kernel_for<scalar_t, acc_t, Args>(q.pixels);
    TilePlan plan;
    cudaError_t err = plan_tiles(q, kernel, &plan);
    if (err != cudaSuccess) {
      return err;
    }
    TileParams<scalar_t, acc_t> p{};
    fill_plan(p, plan, args.geometry);
    p.logits = static_cast<const scalar_t*>(args.logits.data);
    p.logits_strides = args.logits.strides;
    p.logits_unit = tile_copy_unit<scalar_t>(args.logits.data, args.logits.strides, q, plan);
    p.grad_logits = static_cast<scalar_t*>(args.grad_logits.data);
    p.grad_strides = args.grad_logits.strides;
    p.grad_unit = p.grad_logits == nullptr
        ? static_cast<int>(sizeof(scalar_t))
        : tile_copy_unit<scalar_t>(args.grad_logits.data, args.grad_logits.strides, q, plan);
    p.alpha = static_cast<const acc_t*>(args.alpha);
    p.beta = static_cast<const acc_t*>(args.beta);
    p.confidence = static_cast<const acc_t*>(args.confidence);
    p.grad_confidence = static_cast<acc_t*>(args.grad_confidence);
    p.alpha_partials = at_offset<acc_t>(workspace, plan.ws_alpha);
    p.beta_partials = at_offset<acc_t>(workspace, plan.ws_beta);
    void* loss = nullptr;  // the scalar loss the per-block loss partials reduce into
    if constexpr (std::is_same_v<Args, CalibrateBackwardArgs>) {
      p.grad_in = static_cast<const scalar_t*>(args.grad.data);
      p.grad_in_strides = args.grad.strides;
      p.grad_in_unit = tile_copy_unit<scalar_t>(args.grad.data, args.grad.strides, q, plan);
    } else {
      const Geometry& g = args.geometry;
      if (q.mean) {
        total_weight_kernel<acc_t><<<plan.weight_blocks, kBlock, 0, stream>>>(
            args.target, args.target_is_int64, static_cast<const acc_t*>(args.weight), args.ignore_index, g.classes,
            g.batch * g.spatial, at_offset<acc_t>(workspace, plan.ws_weight));
      }
      p.weight = static_cast<const acc_t*>(args.weight);
      p.target = args.target;
      p.target_is_int64 = args.target_is_int64;
      p.ignore_index = args.ignore_index;
      p.grad_loss = static_cast<const acc_t*>(args.grad_loss);
      p.weight_partials = at_offset<acc_t>(workspace, plan.ws_weight);
      p.num_weight_partials = plan.weight_blocks;
      p.loss_rows = args.reduction == Reduction::kNone ? static_cast<acc_t*>(args.loss) : nullptr;
      p.loss_partials = at_offset<acc_t>(workspace, plan.ws_loss);
      p.bad_target = args.bad_target;
      if (q.want_loss_partials) {
        loss = args.loss;
      }
    }
    kernel<<<plan.blocks, kBlock, plan.shared_bytes, stream>>>(p);
    err = cudaGetLastError();
    if (err != cudaSuccess) {
      return err;
    }
    return launch_finalize<acc_t>(args.geometry, plan, workspace, args.grad_alpha, args.grad_beta, loss, stream);
  });
}

}  // namespace

size_t cross_entropy_workspace_bytes(const LossArgs& args) {
  return tile_workspace_bytes(args);
}

cudaError_t cross_entropy(const LossArgs& args, void* workspace, cudaStream_t stream) {
  return launch_tiles(args, workspace, stream);
}

size_t calibrate_backward_workspace_bytes(const CalibrateBackwardArgs& args) {
  return tile_workspace_bytes(args);
}

cudaError_t calibrate_backward(const CalibrateBackwardArgs& args, void* workspace, cudaStream_t stream) {
  return launch_tiles(args, workspace, stream);
}

cudaError_t calibrate(const CalibrateArgs& args, cudaStream_t stream) {
  return dispatch_dtype(args.dtype, [&](auto scalar, auto acc) -> cudaError_t {
    using scalar_t = decltype(scalar);
    using acc_t = decltype(acc);
    const Geometry& g = args.geometry;
    const int64_t total = g.batch * g.classes * g.spatial;
    if (total == 0) {
      return cudaSuccess;
    }
    DeviceInfo dev{};
    cudaError_t err = device_info(&dev);
    if (err != cudaSuccess) {
      return err;
    }
    const int grid = static_cast<int>(std::min<int64_t>((total + kBlock - 1) / kBlock, 32LL * dev.multiprocessors));
    const bool pixels = args.layout == Layout::kPixelsContiguous;
    const auto kernel =
        pixels ? calibrate_kernel<scalar_t, acc_t, true> : calibrate_kernel<scalar_t, acc_t, false>;
    const FastDivider by_classes(g.classes);
    const FastDivider by_spatial(std::max<int64_t>(g.spatial, 1));
    kernel<<<grid, kBlock, 0, stream>>>(
        g, pixels ? by_spatial : by_classes, pixels ? by_classes : by_spatial, static_cast<const scalar_t*>(args.logits.data), args.logits.strides, static_cast<scalar_t*>(args.out.data),
        args.out.strides, static_cast<const acc_t*>(args.alpha), static_cast<const acc_t*>(args.beta),
        static_cast<const acc_t*>(args.confidence));
    return cudaGetLastError();
  });
}

}  // namespace disalign::cuda
