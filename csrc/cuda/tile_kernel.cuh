// The tile kernel of cross_entropy (forward with the gradients of the reduced loss in the same pass,
// and the per-row backward of reduction "none") and of calibrate_backward, for both layouts. Torch-free.
//
// A tile is T rows x the classes of a chunk (all C unless very large), copied into shared memory
// once (tile_copy.cuh), so the logits are read from HBM exactly once. Lines of the shared tile are
// rows (kClassesContiguous: (N, C), NHWC) or classes (kPixelsContiguous: NCHW, transposed (N, C)),
// 16-byte aligned, so every hot loop reads 16-byte vectors (8 half / bf16, 4 float elements):
//   1. row max of zhat, with zhat kept in the exponentials' buffer (e_cached);
//   2. exponentials e = exp(zhat - max) of that zhat and their sum, with e kept in shared memory
//      (e_cached) for the sweep: one exponential per element; the row's thread subtracts the sum
//      from its target's e, which puts the one-hot term into e;
//   3. the sweep: dzhat = w_y * upstream * e / sum, grad_logits (staged in place in the tile,
//      stored coalesced), and the alpha / beta gradients accumulated in registers, then in
//      per-block accumulators; with the cache, also dconfidence's dot sum_j e_j * u_j
//      (u = a*z + b: the sweep has z, a and b at hand), folded per row after the sweep
//      (dot_in_sweep). Without the cache (chunked plans) pass 2 takes the dot, passes 2 and 3
//      recompute e, and the sweep subtracts the one-hot term per element.
// Classes contiguous: the row passes give each row G = 256 / T threads walking its class vectors;
// the sweep walks columns (a thread owns a class vector, alpha / beta / the accumulators stay in
// registers across the rows). Pixels contiguous: a thread owns a vector of pixels (their s, max,
// gradient scale, target stay in registers) and walks classes in all three passes.
// Plans that do not fit (very large C) recompute the exponential in the sweep (e_cached false).
// Pipelined plans (single chunk, cross entropy; plan.cpp) double-buffer the logits tile: the next
// tile's cp.async copy is issued before this tile's is awaited, so the block's HBM reads overlap its
// passes (one resident block per SM on cls-inat, and the partial-row budget leaves one on every
// (N, C) benchmark shape, would otherwise alternate between reading and computing).
//
// Determinism: every reduction has a fixed order; the per-class gradients go to per-block partials
// summed by finalize_kernel in block order; the grid depends only on the shapes and the device.
// Cluster plans (sm_90, plan.h TilePlan::cluster) first sum the blocks of a thread-block cluster
// through distributed shared memory, in rank order, so one partial row per cluster reaches the
// workspace: the stage-2 extra memory of (N, C) logits, whose grid is one block per SM, drops by the
// cluster size (8-16).
// Loops marked SASS_LOOP(name, V) are the steady state benches/sass_budget.py counts (V elements
// per lane per iteration).
#pragma once

#include "cuda/cluster.cuh"
#include "cuda/device_math.cuh"
#include "cuda/plan.h"
#include "cuda/tile_copy.cuh"

#include <type_traits>

namespace disalign::cuda {

// Resident blocks per SM the register budget is sized for: 2 (<= 128 registers) where the vector
// loops keep 8-element arrays live (half / bf16) or values are 8 bytes; 3 (<= 80 registers) for
// float, whose 4-element vectors fit, so that register use never drops float plans below the 3 blocks
// their shared memory allows (shared memory usually limits residency to 2-3 blocks anyway).
template <typename scalar_t>
constexpr int kTileBlocksPerSM = sizeof(scalar_t) == 4 ? 3 : 2;

template <typename scalar_t, typename acc_t>
struct TileParams {
  int64_t classes;
  int64_t spatial;
  int64_t rows;
  // Plan (plan.h).
  int tile_rows, pixel_vectors, group, chunk_classes, num_chunks, slices;
  int line_stride, e_stride, ab_stride, acc_stride, ws_slices;
  bool e_cached, acc_in_shared;
  int cluster;  // blocks per thread-block cluster reducing the class gradients (1: none)
  int64_t num_tiles;
  int64_t tiles_per_image;
  FastDivider by_tiles_per_image;
  FastDivider by_spatial;
  FastDivider by_vectors;  // by the full class vectors of a chunk, chunk_classes / V (column walk)
  int offset_tile2, offset_e, offset_ab, offset_acc, offset_partials, offset_rows;
  bool pipelined;
  int offset_tile_next, offset_rows_next;
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
  acc_t* alpha_partials;  // [blocks][ws_slices][acc_stride]; slice 0 holds the block's sums
  acc_t* beta_partials;
};

// Classes contiguous: stores this thread's partial of its row, pre-reduced across the lanes of the row.
template <typename T, typename Op>
__device__ void write_row_partial(T* partials, T v, int row, int member, int group, Op op) {
  const int width = min(group, kWarp);
  v = group_reduce(v, width, op);
  if (member % width == 0) {
    partials[row * (group / width) + member / width] = v;
  }
}

template <typename T, typename Op>
__device__ T read_row_partials(const T* partials, int row, int group, Op op) {
  const int count = group / min(group, kWarp);
  T v = partials[row * count];
  for (int k = 1; k < count; ++k) {
    v = op(v, partials[row * count + k]);
  }
  return v;
}

// Pixels contiguous: partial of (member, pixel r) at member * pixels + r; folded by member.
template <typename T, typename Op>
__device__ T fold_pixel_partials(const T* partials, int r, int pixels, int group, Op op) {
  T v = partials[r];
  for (int k = 1; k < group; ++k) {
    v = op(v, partials[k * pixels + r]);
  }
  return v;
}

template <bool B>
using Flag = std::integral_constant<bool, B>;

// zhat values a thread of the pixels layout keeps in registers from the max pass to the exponential
// pass, 16-bit logits (kPixelRegClasses = kPixelRegValues / V classes of V pixels: 3 of 8; G = 64
// threads a pixel vector then hold up to 192 classes; benches/sass_budget.py reads it).
constexpr int kPixelRegValues = 24;

// REG_ACC (plan.h kRegAccClasses; (N, C) cross entropy, float accumulation, plans of one block per SM):
// the one-slice sweep accumulates each thread's class vectors in registers over all its tiles.
template <typename scalar_t, typename acc_t, bool PIXELS, bool CALIBRATE, bool GRAD, bool REG_ACC = false>
__global__ void __launch_bounds__(kBlock, REG_ACC ? 1 : kTileBlocksPerSM<scalar_t>)
    tile_kernel(const TileParams<scalar_t, acc_t> p) {
  static_assert(!REG_ACC || (!PIXELS && !CALIBRATE && std::is_same_v<acc_t, float>), "REG_ACC: (N, C) cross entropy");
  constexpr int V = kVec<scalar_t>;
  // Pixels-layout cross entropy of 16-bit logits: the classes a thread keeps zhat of in registers
  // between the max and exponential passes (kPixelRegValues values, V per class). Not for float
  // logits: their kernels are bounded to 80 registers (kTileBlocksPerSM), where these spill.
  constexpr int kPixelRegClasses =
      PIXELS && !CALIBRATE && sizeof(scalar_t) == 2 && std::is_same_v<acc_t, float> ? kPixelRegValues / V : 1;
  DISALIGN_DYNAMIC_SHARED(shared_bytes);
  const int T = p.tile_rows;
  const int64_t C = p.classes;
  const int LS = p.line_stride;
  const int ES = p.e_stride;
  const int AS = p.acc_stride;
  const int G = p.group;
  scalar_t* tile = reinterpret_cast<scalar_t*>(shared_bytes);
  scalar_t* tile2 = reinterpret_cast<scalar_t*>(shared_bytes + p.offset_tile2);
  acc_t* ebuf = reinterpret_cast<acc_t*>(shared_bytes + p.offset_e);
  acc_t* sa = reinterpret_cast<acc_t*>(shared_bytes + p.offset_ab);
  acc_t* sb = sa + p.ab_stride;
  acc_t* part0 = reinterpret_cast<acc_t*>(shared_bytes + p.offset_partials);
  acc_t* part1 = part0 + (PIXELS ? kBlock * V : kBlock);
  int64_t* row_base = reinterpret_cast<int64_t*>(shared_bytes + p.offset_rows);
  int64_t* row_base2 = row_base + T;
  int64_t* row_base_out = row_base2 + T;
  acc_t* row_s = reinterpret_cast<acc_t*>(row_base_out + T);
  acc_t* row_max = row_s + T;
  acc_t* row_gwp = row_max + T;  // upstream * w[y] / sum of exponentials
  acc_t* row_gw = row_gwp + T;   // upstream * w[y]
  acc_t* row_gwps = row_gw + T;  // upstream * w[y] * s / sum of exponentials
  int* row_y = reinterpret_cast<int*>(row_gwps + T);

  const bool want_alpha = p.alpha_partials != nullptr;
  const bool want_beta = p.beta_partials != nullptr;
  const bool want_ds = p.grad_confidence != nullptr;
  const bool want_sweep = want_alpha || want_beta || GRAD;
  // With cached exponentials and a sweep, dconfidence's dot sum_j e_j * u_j (u = a*z + b) is taken in
  // the sweep, which holds z, a and b anyway, instead of the exponential pass (which then reads only
  // zhat): one pass computes u instead of two.
  const bool dot_in_sweep = !CALIBRATE && p.e_cached && want_ds && want_sweep;
  const int64_t block_row = static_cast<int64_t>(blockIdx.x) * p.ws_slices * AS;
  acc_t* acc_alpha = p.acc_in_shared ? reinterpret_cast<acc_t*>(shared_bytes + p.offset_acc)
                                     : (want_alpha ? p.alpha_partials + block_row : nullptr);
  acc_t* acc_beta = p.acc_in_shared ? acc_alpha + p.slices * AS : (want_beta ? p.beta_partials + block_row : nullptr);

  // The rows' upstream gradient when it is uniform: 1, or 1 / total weight for "mean" (every block
  // sums the same partials in the same order, so all see the same bits).
  acc_t uniform_grad = 1;
  if (p.weight_partials != nullptr) {
    if (threadIdx.x < kWarp) {
      const acc_t total = warp_fixed_sum(p.weight_partials, p.num_weight_partials);
      if (threadIdx.x == 0) {
        part0[0] = total;
      }
    }
    __syncthreads();
    uniform_grad = reciprocal(part0[0]);
  }
  if (want_sweep) {
    // In shared memory both accumulators exist whenever one is wanted (plan.cpp), and the cached
    // sweeps accumulate into both without testing which is wanted.
    const bool both = p.acc_in_shared && (want_alpha || want_beta);
    for (int64_t i = threadIdx.x; i < static_cast<int64_t>(p.slices) * AS; i += kBlock) {
      if (want_alpha || both) {
        acc_alpha[i] = 0;
      }
      if (want_beta || both) {
        acc_beta[i] = 0;
      }
    }
  }
  const bool single_chunk = p.num_chunks == 1;
  auto load_ab = [&](int first_class, int classes) {
    for (int jl = threadIdx.x; jl < p.ab_stride; jl += kBlock) {
      sa[jl] = jl < classes ? p.alpha[first_class + jl] : acc_t(0);
      sb[jl] = jl < classes ? p.beta[first_class + jl] : acc_t(0);
    }
  };
  if (single_chunk) {
    load_ab(0, static_cast<int>(C));
  }
  __syncthreads();
  // REG_ACC: per class vector tid + k * kBlock of the thread, da, db (accumulated over the tiles),
  // alpha and beta (V values each), where the plan allows it (one chunk, one slice, the cached sweep
  // on shared accumulators, every vector covered); otherwise the kernel runs as without REG_ACC.
  constexpr int kRegVectors = REG_ACC ? kRegAccClasses / V : 1;
  const bool in_regs = REG_ACC && single_chunk && p.slices == 1 && p.e_cached && p.acc_in_shared &&
                       (want_alpha || want_beta) && C / V <= static_cast<int64_t>(kRegVectors) * kBlock;
  acc_t reg_cls[kRegVectors][4 * V];
#pragma unroll
  for (int k = 0; k < kRegVectors; ++k) {
    const int64_t jl0 = static_cast<int64_t>(threadIdx.x + k * kBlock) * V;
    const bool mine = REG_ACC && in_regs && jl0 < C / V * V;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      reg_cls[k][i] = 0;
      reg_cls[k][V + i] = 0;
      reg_cls[k][2 * V + i] = mine ? sa[jl0 + i] : acc_t(0);
      reg_cls[k][3 * V + i] = mine ? sb[jl0 + i] : acc_t(0);
    }
  }

  // Thread roles. Classes contiguous: row `row` (tid / G), member `member` of its G threads.
  // Pixels contiguous: pixel vector `pv` (pixels p0 .. p0 + V - 1 of the tile), member of G.
  const int row = PIXELS ? 0 : threadIdx.x / G;
  const int pv = PIXELS ? threadIdx.x % p.pixel_vectors : 0;
  const int member = PIXELS ? threadIdx.x / p.pixel_vectors : threadIdx.x % G;
  const int p0 = pv * V;
  const int pixel_slots = p.pixel_vectors * V;

  // The rows of a tile: the first (a global row index) and how many are valid.
  auto tile_rows_of = [&](int64_t tile_id, int64_t& first_row, int& valid) {
    if (PIXELS) {
      const int64_t image = p.by_tiles_per_image.quotient(tile_id);
      const int64_t first_pixel = (tile_id - image * p.tiles_per_image) * T;
      first_row = image * p.spatial + first_pixel;
      valid = static_cast<int>(min(static_cast<int64_t>(T), p.spatial - first_pixel));
    } else {
      first_row = tile_id * T;
      valid = static_cast<int>(min(static_cast<int64_t>(T), p.rows - first_row));
    }
  };
  // Pipelined plans (single chunk, cross entropy): tile k + 1's logits are copied (cp.async) into the
  // other buffer while tile k is computed; `tile` and `row_base` point at the current tile's buffer.
  // (Offsets from the shared array, not an array of pointers: the compiler then keeps every access
  // to them a shared-memory one.)
  auto tile_buf = [&](int slot) {
    return reinterpret_cast<scalar_t*>(shared_bytes + (slot != 0 ? p.offset_tile_next : 0));
  };
  auto base_buf = [&](int slot) {
    return reinterpret_cast<int64_t*>(shared_bytes + (slot != 0 ? p.offset_rows_next : p.offset_rows));
  };
  // Offset of row (image b, spatial position s) in an operand with strides st.
  auto row_offset = [&](const Strides& st, int64_t b, int64_t s) { return b * st.batch + s * st.spatial; };
  // Row bases of tile_id into base_buf[slot], then its copy, committed as one cp.async group.
  auto issue_tile = [&](int slot, int64_t tile_id) {
    int64_t first_row;
    int valid;
    tile_rows_of(tile_id, first_row, valid);
    if (threadIdx.x < valid) {
      const int64_t rowg = first_row + threadIdx.x;
      const int64_t b = p.by_spatial.quotient(rowg);
      base_buf(slot)[threadIdx.x] = row_offset(p.logits_strides, b, rowg - b * p.spatial);
    }
    __syncthreads();
    copy_tile<PIXELS, true>(
        tile_buf(slot), LS, const_cast<scalar_t*>(p.logits), p.logits_strides,
        TileSpan{base_buf(slot), valid, 0, static_cast<int>(C)}, p.logits_unit);
    __pipeline_commit();
  };
  int slot = 0;
  if (p.pipelined && blockIdx.x < p.num_tiles) {
    issue_tile(0, blockIdx.x);
  }

  acc_t loss_slot = 0;  // thread r: sum of the losses of the rows in tile slot r
  for (int64_t tile_id = blockIdx.x; tile_id < p.num_tiles; tile_id += gridDim.x, slot ^= 1) {
    int64_t first_row;
    int valid;
    tile_rows_of(tile_id, first_row, valid);
    if (p.pipelined) {
      tile = tile_buf(slot);
      row_base = base_buf(slot);
    }

    // Per-row metadata; thread r keeps its row's target and upstream gradient.
    int64_t target_value = 0;
    acc_t row_grad = uniform_grad;
    if (threadIdx.x < valid) {
      const int r = threadIdx.x;
      const int64_t rowg = first_row + r;
      const int64_t b = p.by_spatial.quotient(rowg);
      const int64_t s = rowg - b * p.spatial;
      if (!p.pipelined) {  // pipelined: issue_tile wrote them
        row_base[r] = row_offset(p.logits_strides, b, s);
      }
      if (CALIBRATE) {
        row_base2[r] = row_offset(p.grad_in_strides, b, s);
      }
      if (GRAD) {
        row_base_out[r] = row_offset(p.grad_strides, b, s);
      }
      row_s[r] = p.confidence != nullptr ? p.confidence[rowg] : acc_t(1);
      if (!CALIBRATE) {
        target_value = load_target(p.target, p.target_is_int64, rowg);
        if (p.grad_loss != nullptr) {
          row_grad = p.grad_loss[rowg];
        }
      }
    }
    __syncthreads();

    auto load_chunk = [&](int first_class, int classes) {
      copy_tile<PIXELS, true>(
          tile, LS, const_cast<scalar_t*>(p.logits), p.logits_strides, TileSpan{row_base, valid, first_class, classes},
          p.logits_unit);
      if (CALIBRATE) {
        copy_tile<PIXELS, true>(
            tile2, LS, const_cast<scalar_t*>(p.grad_in), p.grad_in_strides,
            TileSpan{row_base2, valid, first_class, classes}, p.grad_in_unit);
      }
      if (!single_chunk) {
        load_ab(first_class, classes);
      }
      wait_tile();
    };
    if (p.pipelined) {
      // The next tile's copy goes out before this one's is awaited (the oldest group).
      const int64_t next = tile_id + gridDim.x;
      if (next < p.num_tiles) {
        issue_tile(slot ^ 1, next);
        __pipeline_wait_prior(1);
      } else {
        __pipeline_wait_prior(0);
      }
      __syncthreads();
    } else if (single_chunk) {
      load_chunk(0, static_cast<int>(C));
    }
    // Calls body(first_class, classes) per chunk; every thread must call it (barriers inside).
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

    // This thread's pixels (pixels layout): n of V valid; their s, hoisted.
    const int n_pix = PIXELS ? max(0, min(V, valid - p0)) : 0;
    // Pixels layout, cached exponentials, a full pixel vector, at most kPixelRegClasses classes a
    // thread (C <= that x G; one chunk, as e_cached implies): zhat of the thread's classes stays in
    // registers from the max pass to the exponential pass instead of going through the e cache.
    const bool px_in_regs = kPixelRegClasses > 1 && p.e_cached && n_pix == V &&
                            C <= static_cast<int64_t>(kPixelRegClasses) * G;
    acc_t px_x[kPixelRegClasses][V];
    acc_t reg_x[kRegVectors][V];  // REG_ACC one-row tiles: zhat of the thread's class vectors
    acc_t px_s[V];
#pragma unroll
    for (int i = 0; i < V; ++i) {
      px_s[i] = PIXELS && i < n_pix ? row_s[p0 + i] : acc_t(1);
    }
    const bool row_active = !PIXELS && row < valid;

    // 1. Row max of zhat (cross entropy).
    if (!CALIBRATE) {
      acc_t mx[PIXELS ? V : 1];
#pragma unroll
      for (int i = 0; i < (PIXELS ? V : 1); ++i) {
        mx[i] = -INFINITY;
      }
      for_each_chunk([&](int first_class, int classes) {
        if (PIXELS) {
          if (px_in_regs) {  // (a full pixel vector)
            if constexpr (kPixelRegClasses > 1) {
#pragma unroll
              for (int k = 0; k < kPixelRegClasses; ++k) {  // SASS_TAG(px-reg-max)
                const int jl = member + k * G;                // SASS_TAG(px-reg-max)
                if (jl < classes) {                           // SASS_TAG(px-reg-max)
                  acc_t z[V];                                 // SASS_TAG(px-reg-max)
                  load_n<V>(tile + jl * LS + p0, z);          // SASS_TAG(px-reg-max)
                  const acc_t a = sa[jl];                     // SASS_TAG(px-reg-max)
                  const acc_t b = sb[jl];                     // SASS_TAG(px-reg-max)
#pragma unroll
                  for (int i = 0; i < V; ++i) {               // SASS_TAG(px-reg-max)
                    px_x[k][i] = calibrated(z[i], px_s[i], a, b);  // SASS_TAG(px-reg-max)
                    mx[i] = fmax(mx[i], px_x[k][i]);          // SASS_TAG(px-reg-max)
                  }
                }
              }
            }
          } else if (n_pix == V) {
            // Hot loops step their shared-memory pointers (no address recomputed from the index).
            const scalar_t* zp = tile + member * LS + p0;
            acc_t* ep = ebuf + member * ES + p0;
            const acc_t* ap = sa + member;
            for (int jl = member; jl < classes;  // SASS_LOOP(ce-pixels-max, V)
                 jl += G, zp += G * LS, ep += G * ES, ap += G) {
              const acc_t a = ap[0];
              const acc_t b = ap[p.ab_stride];
              acc_t z[V], x[V];
              load_n<V>(zp, z);
#pragma unroll
              for (int i = 0; i < V; ++i) {
                x[i] = calibrated(z[i], px_s[i], a, b);
                mx[i] = fmax(mx[i], x[i]);
              }
              if (p.e_cached) {
                store_n<V>(ep, x);  // zhat for the exponential pass, which overwrites it with e
              }
            }
          } else {
            for (int jl = member; jl < classes; jl += G) {
#pragma unroll
              for (int i = 0; i < V; ++i) {  // compile-time indices: the arrays stay in registers
                if (i < n_pix) {
                  const acc_t z = to_acc<acc_t>(tile[jl * LS + p0 + i]);
                  mx[i] = fmax(mx[i], calibrated(z, px_s[i], sa[jl], sb[jl]));
                }
              }
            }
          }
        } else if (row_active) {
          const acc_t s = row_s[row];
          const scalar_t* line = tile + row * LS;
          acc_t* eline = ebuf + row * ES;
          const int nfull = classes / V;
          // Hot loops step their shared-memory pointers (no address recomputed from the index).
          // zhat of a class vector into x, and the running max.
          auto max_vector = [&](const scalar_t* zp, acc_t (&x)[V], const acc_t* a, const acc_t* b) {
            acc_t z[V];
            load_n<V>(zp, z);
#pragma unroll
            for (int i = 0; i < V; ++i) {
              x[i] = calibrated(z[i], s, a[i], b[i]);
              mx[0] = fmax(mx[0], x[i]);
            }
          };
          // One row a tile: the thread's vectors, alpha / beta in registers, zhat kept in registers for the
          // exponential pass (no store and reload through the e cache).
          if (REG_ACC && in_regs && G == kBlock) {
            if constexpr (REG_ACC) {
#pragma unroll
              for (int k = 0; k < kRegVectors; ++k) {  // SASS_TAG(reg-max)
                const int v = threadIdx.x + k * kBlock;  // SASS_TAG(reg-max)
                if (v < nfull) {                         // SASS_TAG(reg-max)
                  max_vector(line + v * V, reg_x[k], reg_cls[k] + 2 * V, reg_cls[k] + 3 * V);  // SASS_TAG(reg-max)
                }
              }
            }
          } else {
            const scalar_t* zp = line + member * V;
            acc_t* ep = eline + member * V;
            const acc_t* ap = sa + member * V;
            for (int k = member; k < nfull;  // SASS_LOOP(ce-classes-max, V)
                 k += G, zp += G * V, ep += G * V, ap += G * V) {
              acc_t a[V], b[V], x[V];
              load_n<V>(ap, a);
              load_n<V>(ap + p.ab_stride, b);
              max_vector(zp, x, a, b);
              if (p.e_cached) {
                store_n<V>(ep, x);  // zhat for the exponential pass, which overwrites it with e
              }
            }
          }
          for (int jl = nfull * V + member; jl < classes; jl += G) {
            mx[0] = fmax(mx[0], calibrated(to_acc<acc_t>(line[jl]), s, sa[jl], sb[jl]));
          }
        }
      });
      if (PIXELS) {
#pragma unroll
        for (int i = 0; i < V; ++i) {
          part0[member * pixel_slots + p0 + i] = mx[i];
        }
      } else {
        write_row_partial(part0, mx[0], row, member, G, MaxOp{});
      }
      __syncthreads();
      if (threadIdx.x < valid) {
        row_max[threadIdx.x] = PIXELS ? fold_pixel_partials(part0, threadIdx.x, pixel_slots, G, MaxOp{})
                                      : read_row_partials(part0, threadIdx.x, G, MaxOp{});
      }
      __syncthreads();
    }

    // 2. Sum of exponentials (kept for the sweep) and sum e * (a*z + b) (cross entropy); sum of
    // dzhat * (a*z + b) (calibrate_backward, for ds).
    if (!CALIBRATE || want_ds) {
      acc_t sum[PIXELS ? V : 1], dot[PIXELS ? V : 1];
      acc_t mrow[PIXELS ? V : 1];
#pragma unroll
      for (int i = 0; i < (PIXELS ? V : 1); ++i) {
        sum[i] = 0;
        dot[i] = 0;
        mrow[i] = 0;
      }
      if (!CALIBRATE) {
        if (PIXELS) {
#pragma unroll
          for (int i = 0; i < V; ++i) {
            mrow[i] = i < n_pix ? scaled_max(row_max[p0 + i]) : acc_t(0);
          }
        } else if (row_active) {
          mrow[0] = scaled_max(row_max[row]);
        }
      }
      const bool cache = !CALIBRATE && p.e_cached;
      for_each_chunk([&](int first_class, int classes) {
        if (PIXELS) {
          if (n_pix == V) {
            if (!CALIBRATE && cache) {
              // zhat from the max pass (full vectors only, as here): in registers or in the e cache.
              auto exp_pass = [&](auto with_dot) {
                auto exp_vector = [&](int jl, const acc_t (&x)[V], acc_t* ep) {
                  acc_t e[V];
#pragma unroll
                  for (int i = 0; i < V; ++i) {
                    e[i] = exp_from_max(x[i], mrow[i]);
                    sum[i] += e[i];
                  }
                  if constexpr (decltype(with_dot)::value) {
                    const acc_t a = sa[jl];
                    const acc_t b = sb[jl];
                    acc_t z[V];
                    load_n<V>(tile + jl * LS + p0, z);
#pragma unroll
                    for (int i = 0; i < V; ++i) {
                      dot[i] = fma(e[i], affine_u(z[i], a, b), dot[i]);  // SASS_TAG(dot)
                    }
                  }
                  store_n<V>(ep, e);
                };
                if (px_in_regs) {
                  if constexpr (kPixelRegClasses > 1) {
#pragma unroll
                    for (int k = 0; k < kPixelRegClasses; ++k) {  // SASS_TAG(px-reg-exp)
                      const int jl = member + k * G;                // SASS_TAG(px-reg-exp)
                      if (jl < classes) {                           // SASS_TAG(px-reg-exp)
                        exp_vector(jl, px_x[k], ebuf + jl * ES + p0);  // SASS_TAG(px-reg-exp)
                      }
                    }
                  }
                } else {
                  acc_t* ep = ebuf + member * ES + p0;
                  for (int jl = member; jl < classes; jl += G, ep += G * ES) {  // SASS_LOOP(ce-pixels-exp, V)
                    acc_t x[V];
                    load_n<V>(ep, x);
                    exp_vector(jl, x, ep);
                  }
                }
              };
              if (dot_in_sweep) {
                exp_pass(Flag<false>{});
              } else {
                exp_pass(Flag<true>{});
              }
            } else {
              for (int jl = member; jl < classes; jl += G) {  // SASS_LOOP(ce-pixels-exp-uncached, V)
                const acc_t a = sa[jl];
                const acc_t b = sb[jl];
                acc_t z[V];
                load_n<V>(tile + jl * LS + p0, z);
                if (CALIBRATE) {
                  acc_t d[V];
                  load_n<V>(tile2 + jl * LS + p0, d);
#pragma unroll
                  for (int i = 0; i < V; ++i) {
                    dot[i] = fma(d[i], affine_u(z[i], a, b), dot[i]);
                  }
                } else {  // exponentials not cached (chunked plans)
#pragma unroll
                  for (int i = 0; i < V; ++i) {
                    const acc_t e = exp_from_max(calibrated(z[i], px_s[i], a, b), mrow[i]);
                    sum[i] += e;
                    dot[i] = fma(e, affine_u(z[i], a, b), dot[i]);
                  }
                }
              }
            }
          } else {
            for (int jl = member; jl < classes; jl += G) {
#pragma unroll
              for (int i = 0; i < V; ++i) {
                if (i >= n_pix) {
                  continue;
                }
                const acc_t z = to_acc<acc_t>(tile[jl * LS + p0 + i]);
                const acc_t a = sa[jl];
                const acc_t b = sb[jl];
                const acc_t u = affine_u(z, a, b);
                if (CALIBRATE) {
                  dot[i] = fma(to_acc<acc_t>(tile2[jl * LS + p0 + i]), u, dot[i]);
                } else {
                  const acc_t e = exp_from_max(calibrated(z, px_s[i], a, b), mrow[i]);
                  sum[i] += e;
                  dot[i] = fma(e, u, dot[i]);
                  if (cache) {
                    ebuf[jl * ES + p0 + i] = e;
                  }
                }
              }
            }
          }
        } else if (row_active) {
          const acc_t s = row_s[row];
          const scalar_t* line = tile + row * LS;
          const scalar_t* line2 = tile2 + row * LS;
          acc_t* eline = ebuf + row * ES;
          const int nfull = classes / V;
          if (!CALIBRATE && cache) {
            // zhat from the max pass (full vectors only, as here): in registers or in the e cache.
            auto exp_pass = [&](auto with_dot) {
              auto exp_vector = [&](int off, const acc_t (&x)[V], acc_t* ep) {
                acc_t e[V];
#pragma unroll
                for (int i = 0; i < V; ++i) {
                  e[i] = exp_from_max(x[i], mrow[0]);
                  sum[0] += e[i];
                }
                if constexpr (decltype(with_dot)::value) {
                  acc_t z[V], a[V], b[V];
                  load_n<V>(line + off, z);
                  load_n<V>(sa + off, a);
                  load_n<V>(sb + off, b);
#pragma unroll
                  for (int i = 0; i < V; ++i) {
                    dot[0] = fma(e[i], affine_u(z[i], a[i], b[i]), dot[0]);  // SASS_TAG(dot)
                  }
                }
                store_n<V>(ep, e);
              };
              if (REG_ACC && in_regs && G == kBlock) {
                if constexpr (REG_ACC) {
#pragma unroll
                  for (int k = 0; k < kRegVectors; ++k) {      // SASS_TAG(reg-exp)
                    const int v = threadIdx.x + k * kBlock;  // SASS_TAG(reg-exp)
                    if (v < nfull) {                         // SASS_TAG(reg-exp)
                      exp_vector(v * V, reg_x[k], eline + v * V);  // SASS_TAG(reg-exp)
                    }
                  }
                }
              } else {
                acc_t* ep = eline + member * V;
                for (int k = member; k < nfull; k += G, ep += G * V) {  // SASS_LOOP(ce-classes-exp, V)
                  acc_t x[V];
                  load_n<V>(ep, x);
                  exp_vector(k * V, x, ep);
                }
              }
            };
            if (dot_in_sweep) {
              exp_pass(Flag<false>{});
            } else {
              exp_pass(Flag<true>{});
            }
          } else {
            for (int k = member; k < nfull; k += G) {  // SASS_LOOP(ce-classes-exp-uncached, V)
              acc_t z[V], a[V], b[V];
              load_n<V>(line + k * V, z);
              load_n<V>(sa + k * V, a);
              load_n<V>(sb + k * V, b);
              if (CALIBRATE) {
                acc_t d[V];
                load_n<V>(line2 + k * V, d);
#pragma unroll
                for (int i = 0; i < V; ++i) {
                  dot[0] = fma(d[i], affine_u(z[i], a[i], b[i]), dot[0]);
                }
              } else {  // exponentials not cached (chunked plans)
#pragma unroll
                for (int i = 0; i < V; ++i) {
                  const acc_t e = exp_from_max(calibrated(z[i], s, a[i], b[i]), mrow[0]);
                  sum[0] += e;
                  dot[0] = fma(e, affine_u(z[i], a[i], b[i]), dot[0]);
                }
              }
            }
          }
          for (int jl = nfull * V + member; jl < classes; jl += G) {
            const acc_t z = to_acc<acc_t>(line[jl]);
            const acc_t a = sa[jl];
            const acc_t b = sb[jl];
            const acc_t u = affine_u(z, a, b);
            if (CALIBRATE) {
              dot[0] = fma(to_acc<acc_t>(line2[jl]), u, dot[0]);
            } else {
              const acc_t e = exp_from_max(calibrated(z, s, a, b), mrow[0]);
              sum[0] += e;
              dot[0] = fma(e, u, dot[0]);
              if (cache) {
                eline[jl] = e;
              }
            }
          }
        }
      });
      if (PIXELS) {
#pragma unroll
        for (int i = 0; i < V; ++i) {
          part0[member * pixel_slots + p0 + i] = sum[i];
          part1[member * pixel_slots + p0 + i] = dot[i];
        }
      } else {
        if (!CALIBRATE) {
          write_row_partial(part0, sum[0], row, member, G, SumOp{});
        }
        write_row_partial(part1, dot[0], row, member, G, SumOp{});
      }
      __syncthreads();
    }

    // Per-row results, by thread r for row r.
    if (threadIdx.x < valid) {
      const int r = threadIdx.x;
      const int64_t rowg = first_row + r;
      auto fold = [&](const acc_t* partials) {
        return PIXELS ? fold_pixel_partials(partials, r, pixel_slots, G, SumOp{})
                      : read_row_partials(partials, r, G, SumOp{});
      };
      const acc_t dot = want_ds && !dot_in_sweep ? fold(part1) : acc_t(0);
      if (CALIBRATE) {
        if (want_ds) {
          p.grad_confidence[rowg] = dot;
        }
      } else {
        const acc_t sum_exp = fold(part0);
        const acc_t inv_sum = reciprocal(sum_exp);
        const acc_t lse = row_max[r] + log(sum_exp);
        const bool counted = target_value != p.ignore_index;
        const bool in_range = target_value >= 0 && target_value < C;
        acc_t loss = 0;
        acc_t grad_weight = 0;  // upstream gradient * w[y]; 0 for ignored rows
        acc_t ds = 0;
        int y = -1;
        if (counted && !in_range) {
          // Never used as an index: the row's loss and every gradient it touches are NaN
          // (DECISIONS: poisoned, not skipped; DISALIGN_CHECK_TARGETS=1 raises before the launch).
          loss = grad_weight = ds = quiet_nan<acc_t>();
        } else if (counted) {
          y = static_cast<int>(target_value);
          const acc_t s = row_s[r];
          const acc_t w = p.weight != nullptr ? p.weight[y] : acc_t(1);
          const acc_t z = to_acc<acc_t>(p.logits[row_base[r] + y * p.logits_strides.cls]);
          const acc_t a = p.alpha[y];
          const acc_t b = p.beta[y];
          const acc_t u = affine_u(z, a, b);
          loss = w * (lse - calibrated(z, s, a, b));
          grad_weight = row_grad * w;
          ds = grad_weight * fma(dot, inv_sum, -u);
        }
        const acc_t gwp = grad_weight * inv_sum;
        row_gwp[r] = gwp;
        row_gw[r] = grad_weight;
        row_gwps[r] = gwp * row_s[r];
        row_y[r] = y;
        if (p.e_cached && y >= 0) {
          // The one-hot term goes into the cached exponential: the sweep's dzhat = e * gwp is then
          // gw * (e_y - sum) / sum at the target (no compare per element; and no cancellation of
          // p_y * gw - gw). A single chunk holds every class when e_cached (plan.cpp).
          ebuf[PIXELS ? y * ES + r : r * ES + y] -= sum_exp;
        }
        if (p.loss_rows != nullptr) {
          p.loss_rows[rowg] = loss;
        }
        loss_slot += loss;
        if (want_ds && !dot_in_sweep) {
          p.grad_confidence[rowg] = ds;
        }
      }
    }

    // 3. The sweep: dzhat, grad_logits, alpha / beta gradients.
    if (want_sweep) {
      __syncthreads();
      // Cached or recomputed exponentials as a template choice, so each hot loop has one body.
      // with_dot: the sweep also takes dconfidence's dot (dot_in_sweep; cached exponentials only).
      // shared_acc: the accumulators are in shared memory (acc_in_shared), addressed from the shared
      // array itself so that the compiler emits shared-memory accesses, both present (no test of
      // want_alpha / want_beta per access).
      auto sweep = [&](auto cached, auto with_dot, auto shared_acc) {
        constexpr bool cache = decltype(cached)::value && !CALIBRATE;
        constexpr bool dot = decltype(with_dot)::value && cache;
        constexpr bool sh_acc = decltype(shared_acc)::value;
        acc_t* const acc_a_base = sh_acc ? reinterpret_cast<acc_t*>(shared_bytes + p.offset_acc) : acc_alpha;
        acc_t* const acc_b_base = sh_acc ? acc_a_base + p.slices * AS : acc_beta;
        acc_t px_dot[PIXELS ? V : 1];  // pixels: sum_j e'_j * u_j of the thread's pixels
#pragma unroll
        for (int i = 0; i < (PIXELS ? V : 1); ++i) {
          px_dot[i] = 0;
        }
        for_each_chunk([&](int first_class, int classes) {
          if (PIXELS) {
            if (n_pix > 0) {
              acc_t gwp[V], gw[V], gwps[V], mx[V];
              int y[V];
#pragma unroll
              for (int i = 0; i < V; ++i) {
                const bool ok = !CALIBRATE && i < n_pix;
                gwp[i] = ok ? row_gwp[p0 + i] : acc_t(0);
                gw[i] = ok ? row_gw[p0 + i] : acc_t(0);
                gwps[i] = ok ? row_gwps[p0 + i] : acc_t(0);
                mx[i] = ok ? scaled_max(row_max[p0 + i]) : acc_t(0);
                y[i] = ok ? row_y[p0 + i] - first_class : -1;
              }
              // dzhat of the thread's pixels for class jl of the chunk (N of them from pixel p0 + i0).
              auto sweep_class = [&](auto full, int jl, int i0) {
                constexpr int N = decltype(full)::value ? V : 1;
                const acc_t a = sa[jl];
                const int at = jl * LS + p0 + i0;
                acc_t z[N], dz[N];
                load_n<N>(tile + at, z);
                acc_t da = 0;
                acc_t db = 0;
                acc_t g[N];
                if constexpr (cache) {
                  // Cached exponentials carry the one-hot term: t = dzhat * s = e * (gwp * s), and
                  // dzhat * (1 + s*a) = dzhat + t*a.
                  acc_t e[N];
                  load_n<N>(ebuf + jl * ES + p0 + i0, e);
#pragma unroll
                  for (int i = 0; i < N; ++i) {
                    const acc_t t = e[i] * gwps[i0 + i];
                    g[i] = fma(t, a, e[i] * gwp[i0 + i]);
                    da = fma(t, z[i], da);
                    db += t;
                  }
                  if constexpr (dot) {
                    const acc_t b = sb[jl];
#pragma unroll
                    for (int i = 0; i < N; ++i) {
                      px_dot[i0 + i] = fma(e[i], affine_u(z[i], a, b), px_dot[i0 + i]);  // SASS_TAG(dot)
                    }
                  }
                } else {
                  if (CALIBRATE) {
                    load_n<N>(tile2 + at, dz);
                  } else {
                    acc_t e[N];
#pragma unroll
                    for (int i = 0; i < N; ++i) {
                      e[i] = exp_from_max(calibrated(z[i], px_s[i0 + i], a, sb[jl]), mx[i0 + i]);
                    }
#pragma unroll
                    for (int i = 0; i < N; ++i) {
                      dz[i] = e[i] * gwp[i0 + i];
                      if (y[i0 + i] == jl) {
                        dz[i] -= gw[i0 + i];
                      }
                    }
                  }
#pragma unroll
                  for (int i = 0; i < N; ++i) {
                    const acc_t s = px_s[i0 + i];
                    const acc_t t = dz[i] * s;
                    g[i] = dz[i] * fma(s, a, acc_t(1));
                    da = fma(t, z[i], da);
                    db += t;
                  }
                }
                if (GRAD) {
                  store_n<N>(tile + at, g);
                }
                const int slot = pv * AS + first_class + jl;
                if constexpr (sh_acc) {
                  acc_a_base[slot] += da;
                  acc_b_base[slot] += db;
                } else {
                  if (want_alpha) {
                    acc_alpha[slot] += da;
                  }
                  if (want_beta) {
                    acc_beta[slot] += db;
                  }
                }
              };
              if (n_pix == V) {
                for (int jl = member; jl < classes; jl += G) {  // SASS_LOOP(sweep-pixels, V)
                  sweep_class(Flag<true>{}, jl, 0);
                }
              } else {
                for (int jl = member; jl < classes; jl += G) {
#pragma unroll
                  for (int i = 0; i < V; ++i) {
                    if (i < n_pix) {
                      sweep_class(Flag<false>{}, jl, i);
                    }
                  }
                }
              }
            }
          } else {
            // Column walk: item (slice q, class vector) walks rows q, q + slices, ... of the tile.
            // regs: Flag<false> (accumulators in shared memory or the workspace), or the thread's
            // register accumulators of this class vector (REG_ACC: da then db, full vectors).
            auto sweep_columns = [&](auto full, int q, int jl0, auto regs) {
              constexpr int N = decltype(full)::value ? V : 1;
              constexpr bool to_regs = !std::is_same_v<decltype(regs), Flag<false>>;
              acc_t a[N], b[N], da[N], db[N];
              acc_t* acc_a = acc_a_base + q * AS + first_class + jl0;
              acc_t* acc_b = acc_b_base + q * AS + first_class + jl0;
              if constexpr (to_regs) {
#pragma unroll
                for (int i = 0; i < N; ++i) {
                  da[i] = regs[i];
                  db[i] = regs[V + i];
                  a[i] = regs[2 * V + i];
                  b[i] = regs[3 * V + i];
                }
              } else if constexpr (sh_acc) {  // accumulate onto the block's sums in place
                load_n<N>(sa + jl0, a);
                load_n<N>(sb + jl0, b);
                load_n<N>(acc_a, da);
                load_n<N>(acc_b, db);
              } else {
                load_n<N>(sa + jl0, a);
                load_n<N>(sb + jl0, b);
#pragma unroll
                for (int i = 0; i < N; ++i) {
                  da[i] = 0;
                  db[i] = 0;
                }
              }
              // Pointers stepped per row (not recomputed from r: 2 address instructions per row fewer).
              scalar_t* zp = tile + q * LS + jl0;
              acc_t* ep = ebuf + q * ES + jl0;
              const acc_t* gwps_r = row_gwps + q;
              const int zstep = p.slices * LS;
              const int estep = p.slices * ES;
              for (int r = q; r < valid;  // SASS_LOOP(sweep-classes, V)
                   r += p.slices, zp += zstep, ep += estep, gwps_r += p.slices) {
                acc_t z[N], dz[N];
                load_n<N>(zp, z);
                acc_t g[N];
                if constexpr (cache) {
                  // As in the pixels sweep: the one-hot term is in the cached e, t = e * (gwp * s).
                  const acc_t gwps = *gwps_r;
                  acc_t e[N];
                  load_n<N>(ep, e);
#pragma unroll
                  for (int i = 0; i < N; ++i) {
                    const acc_t t = e[i] * gwps;
                    if (GRAD) {
                      g[i] = fma(t, a[i], e[i] * row_gwp[r]);
                    }
                    da[i] = fma(t, z[i], da[i]);
                    db[i] += t;
                  }
                  if constexpr (dot) {
                    // This vector's part of the row's dot, left in its first exponential's slot
                    // (read above; the vector is this thread's alone) for the row fold below.
                    acc_t d = 0;
#pragma unroll
                    for (int i = 0; i < N; ++i) {
                      d = fma(e[i], affine_u(z[i], a[i], b[i]), d);  // SASS_TAG(dot)
                    }
                    *ep = d;
                  }
                } else {
                  const acc_t s = row_s[r];
                  if (CALIBRATE) {
                    load_n<N>(tile2 + (zp - tile), dz);
                  } else {
                    const acc_t gwp = row_gwp[r];
                    const acc_t gw = row_gw[r];
                    const int y = row_y[r] - first_class - jl0;
                    acc_t e[N];
                    const acc_t m = scaled_max(row_max[r]);
#pragma unroll
                    for (int i = 0; i < N; ++i) {
                      e[i] = exp_from_max(calibrated(z[i], s, a[i], b[i]), m);
                    }
#pragma unroll
                    for (int i = 0; i < N; ++i) {
                      dz[i] = e[i] * gwp;
                      if (y == i) {
                        dz[i] -= gw;
                      }
                    }
                  }
#pragma unroll
                  for (int i = 0; i < N; ++i) {
                    const acc_t t = dz[i] * s;
                    g[i] = dz[i] * fma(s, a[i], acc_t(1));
                    da[i] = fma(t, z[i], da[i]);
                    db[i] += t;
                  }
                }
                if (GRAD) {
                  store_n<N>(zp, g);
                }
              }
              if constexpr (to_regs) {
#pragma unroll
                for (int i = 0; i < N; ++i) {
                  regs[i] = da[i];
                  regs[V + i] = db[i];
                }
                return;
              }
              if constexpr (sh_acc) {
                store_n<N>(acc_a, da);
                store_n<N>(acc_b, db);
                return;
              }
              if (want_alpha) {
                acc_t cur[N];
                load_n<N>(acc_a, cur);
#pragma unroll
                for (int i = 0; i < N; ++i) {
                  cur[i] += da[i];
                }
                store_n<N>(acc_a, cur);
              }
              if (want_beta) {
                acc_t cur[N];
                load_n<N>(acc_b, cur);
#pragma unroll
                for (int i = 0; i < N; ++i) {
                  cur[i] += db[i];
                }
                store_n<N>(acc_b, cur);
              }
            };
            // Items (slice q, class vector v) = threadIdx.x + k * kBlock, stepped without a division
            // per item (p.by_vectors divides by a full chunk's vectors).
            const int nfull = classes / V;
            if (REG_ACC && sh_acc && in_regs) {  // the thread's vectors, accumulated in registers
              if constexpr (REG_ACC && sh_acc) {
#pragma unroll
                for (int k = 0; k < kRegVectors; ++k) {
                  const int jl0 = (threadIdx.x + k * kBlock) * V;
                  if (jl0 < nfull * V) {
                    sweep_columns(Flag<true>{}, 0, jl0, reg_cls[k]);  // SASS_TAG(reg-acc)
                  }
                }
              }
            } else if (p.slices == 1) {  // an item per class vector (q = 0): its pointers step by kBlock vectors
              for (int jl0 = threadIdx.x * V; jl0 < nfull * V; jl0 += kBlock * V) {  // SASS_TAG(one-slice)
                sweep_columns(Flag<true>{}, 0, jl0, Flag<false>{});
              }
            } else if (nfull > 0) {
              const bool full_chunk = classes == p.chunk_classes;
              auto vectors_in = [&](int x) {
                return full_chunk ? static_cast<int>(p.by_vectors.quotient(x)) : x / nfull;
              };
              int q = vectors_in(threadIdx.x);
              int v = threadIdx.x - q * nfull;
              const int dq = vectors_in(kBlock);
              const int dv = kBlock - dq * nfull;
              for (int item = threadIdx.x; item < p.slices * nfull; item += kBlock) {
                sweep_columns(Flag<true>{}, q, v * V, Flag<false>{});
                q += dq;
                v += dv;
                if (v >= nfull) {
                  v -= nfull;
                  ++q;
                }
              }
            }
            const int rem = classes - nfull * V;
            for (int item = threadIdx.x; item < p.slices * rem; item += kBlock) {
              const int q = item / rem;
              sweep_columns(Flag<false>{}, q, nfull * V + item - q * rem, Flag<false>{});
            }
          }
          if (GRAD) {
            __syncthreads();
            copy_tile<PIXELS, false>(
                tile, LS, p.grad_logits, p.grad_strides, TileSpan{row_base_out, valid, first_class, classes},
                p.grad_unit);
          }
        });
        if constexpr (dot) {
          // dconfidence = gwp * sum_j e'_j * u_j: the cached e' carries the one-hot term, so this is
          // w_y * upstream * (sum_j p_j u_j - u_y). Ignored rows get 0, poisoned rows NaN (row_gw).
          __syncthreads();
          if (PIXELS) {
#pragma unroll
            for (int i = 0; i < V; ++i) {
              part1[member * pixel_slots + p0 + i] = px_dot[i];
            }
          } else {
            acc_t d = 0;
            if (row_active) {
              const acc_t* eline = ebuf + row * ES;
              const int nfull = static_cast<int>(C / V);  // one chunk holds every class when e_cached
              for (int k = member; k < nfull; k += G) {
                d += eline[k * V];
              }
              for (int jl = nfull * V + member; jl < C; jl += G) {
                d += eline[jl];
              }
            }
            write_row_partial(part1, d, row, member, G, SumOp{});
          }
          __syncthreads();
          if (threadIdx.x < valid) {
            const int r = threadIdx.x;
            const acc_t sum_eu = PIXELS ? fold_pixel_partials(part1, r, pixel_slots, G, SumOp{})
                                        : read_row_partials(part1, r, G, SumOp{});
            p.grad_confidence[first_row + r] = row_y[r] >= 0 ? row_gwp[r] * sum_eu : row_gw[r];
          }
        }
      };
      if (!CALIBRATE && p.e_cached) {
        auto cached_sweep = [&](auto with_dot) {
          if (p.acc_in_shared && (want_alpha || want_beta)) {  // no accumulators without class gradients
            sweep(Flag<true>{}, with_dot, Flag<true>{});
          } else {
            sweep(Flag<true>{}, with_dot, Flag<false>{});
          }
        };
        if (dot_in_sweep) {
          cached_sweep(Flag<true>{});
        } else {
          cached_sweep(Flag<false>{});
        }
      } else {
        sweep(Flag<false>{}, Flag<false>{}, Flag<false>{});
      }
    }
    __syncthreads();  // the next tile overwrites the tile and the row metadata
  }
  if (REG_ACC && in_regs) {
    // The register accumulators into the shared ones (zero there: the sweep left these vectors to
    // the registers), for the block results below.
    acc_t* acc_a = reinterpret_cast<acc_t*>(shared_bytes + p.offset_acc);
    acc_t* acc_b = acc_a + AS;
#pragma unroll
    for (int k = 0; k < kRegVectors; ++k) {
      const int64_t jl0 = static_cast<int64_t>(threadIdx.x + k * kBlock) * V;
      if (jl0 < C / V * V) {
#pragma unroll
        for (int i = 0; i < V; ++i) {
          acc_a[jl0 + i] = reg_cls[k][i];
          acc_b[jl0 + i] = reg_cls[k][V + i];
        }
      }
    }
    __syncthreads();
  }

  // Block results: per-class partials (slices folded in order) and the loss partial.
  if ((want_alpha || want_beta) && p.cluster > 1) {
    // Cluster plans (shared accumulators, plan.h): once every block of the cluster is done, block
    // `rank` sums its share of the classes over the cluster's blocks in rank order (each block's
    // slices folded in order, as below) and writes them to the cluster's partial row; the second
    // barrier keeps every block's shared memory alive until the others have read it.
    cluster_barrier();
    const unsigned K = static_cast<unsigned>(p.cluster);
    const unsigned rank = cluster_rank();
    const int64_t share = (C + K - 1) / K;
    const int64_t first = rank * share;
    const int64_t last = min(C, first + share);
    const int64_t out_row = static_cast<int64_t>(blockIdx.x / K) * AS;
    for (int64_t j = first + threadIdx.x; j < last; j += kBlock) {
      acc_t da = 0;
      acc_t db = 0;
      for (unsigned k = 0; k < K; ++k) {
        const acc_t* peer_alpha = cluster_peer(acc_alpha, k);
        const acc_t* peer_beta = cluster_peer(acc_beta, k);
        acc_t ka = 0;
        acc_t kb = 0;
        for (int q = 0; q < p.slices; ++q) {
          ka += peer_alpha[q * AS + j];
          kb += peer_beta[q * AS + j];
        }
        da += ka;
        db += kb;
      }
      if (want_alpha) {
        p.alpha_partials[out_row + j] = da;
      }
      if (want_beta) {
        p.beta_partials[out_row + j] = db;
      }
    }
    cluster_barrier();
  } else if (want_alpha || want_beta) {
    acc_t* out_alpha = want_alpha ? p.alpha_partials + block_row : nullptr;
    acc_t* out_beta = want_beta ? p.beta_partials + block_row : nullptr;
    for (int64_t j = threadIdx.x; j < C; j += kBlock) {
      acc_t da = 0;
      acc_t db = 0;
      for (int q = 0; q < p.slices; ++q) {
        if (want_alpha) {
          da += acc_alpha[q * AS + j];
        }
        if (want_beta) {
          db += acc_beta[q * AS + j];
        }
      }
      if (want_alpha) {
        out_alpha[j] = da;
      }
      if (want_beta) {
        out_beta[j] = db;
      }
    }
  }
  if (p.loss_partials != nullptr) {
    part0[threadIdx.x] = loss_slot;
    __syncthreads();
    if (threadIdx.x == 0) {
      acc_t total = 0;
      for (int r = 0; r < T; ++r) {
        total += part0[r];
      }
      p.loss_partials[blockIdx.x] = total;
    }
  }
}

}  // namespace disalign::cuda
