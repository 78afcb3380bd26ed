// The tile planner (plan.h). Pure C++: compiled into the extension (CUDA builds) and into the CPU
// test binary of tests/cuda_plan/.
#include "cuda/plan.h"

#include <algorithm>

namespace disalign::cuda {
namespace {

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

int64_t round_up(int64_t v, int64_t a) {
  return (v + a - 1) / a * a;
}

}  // namespace

size_t row_partial_entries(const TileRequest& q, const TilePlan& plan) {
  // Classes contiguous: one partial per thread (one row each); pixels: one per thread and pixel.
  return q.pixels ? static_cast<size_t>(kTileThreads) * plan.vec : kTileThreads;
}

size_t row_meta_bytes(const TileRequest& q, int tile_rows) {
  // row_base x 3 (int64), s, max, gw / sum, gw, gw * s / sum (acc), y (int).
  return static_cast<size_t>(tile_rows) * (3 * sizeof(int64_t) + 5 * q.acc + sizeof(int));
}

int64_t partial_rows(int64_t logits_bytes, int64_t row_bytes, int multiprocessors, int64_t wanted_blocks) {
  if (row_bytes <= 0) {
    return std::max<int64_t>(1, wanted_blocks);
  }
  const auto budget = static_cast<int64_t>(static_cast<double>(logits_bytes) * DISALIGN_PARTIALS_BUDGET_FRACTION) /
      row_bytes;
  const int64_t floor = std::min<int64_t>(wanted_blocks, int64_t{DISALIGN_MIN_BLOCKS_PER_SM} * multiprocessors);
  return std::max<int64_t>({1, floor, std::min(wanted_blocks, budget)});
}

TilePlan plan_tiles(const TileRequest& q, const DeviceLimits& dev, const BlocksPerSM& blocks_per_sm,
                    const ActiveClusters& active_clusters) {
  TilePlan plan;
  const Geometry& g = q.geometry;
  const int64_t rows = g.batch * g.spatial;
  const int64_t C = std::max<int64_t>(g.classes, 1);
  const int V = std::max(1, 16 / q.elem);
  const int tiles_in = q.calibrate ? 2 : 1;
  const bool class_grads = q.want_alpha || q.want_beta;
  const int grads = static_cast<int>(q.want_alpha) + static_cast<int>(q.want_beta);
  const size_t max_shared = static_cast<size_t>(dev.max_shared_per_block);
  plan.vec = V;

  // Pixels: at least 32 pixels per tile (coalescing along the pixels), at most the image's.
  const int64_t t_max = pow2_ceil(std::max<int64_t>(1, q.pixels ? g.spatial : rows));
  const int64_t t_min = std::min<int64_t>(q.pixels ? 32 : 1, t_max);
  const int acc_vec = std::max(V, 16 / q.acc);  // acc values per 16 bytes, at least one vector

  // Shared layout for (T, chunk, e_cached, acc_in_shared, pipelined); returns total bytes.
  auto layout = [&](int64_t T, int64_t chunk, bool e_cached, bool acc_shared, TilePlan* p,
                    bool pipelined = false) -> size_t {
    p->tile_rows = static_cast<int>(T);
    p->pixel_vectors = static_cast<int>(q.pixels ? std::max<int64_t>(1, T / V) : 1);
    p->group = q.pixels ? kTileThreads / p->pixel_vectors : static_cast<int>(kTileThreads / T);
    p->chunk_classes = static_cast<int>(chunk);
    p->num_chunks = static_cast<int>((C + chunk - 1) / chunk);
    p->e_cached = e_cached;
    p->acc_in_shared = acc_shared;
    const int64_t padded_rows = round_up(T, V);
    // Pixel lines: an odd number of 16-byte units apart, so 16-byte accesses of 8 consecutive
    // lanes to 8 consecutive lines hit distinct banks (the per-class sweep).
    p->line_stride = static_cast<int>(q.pixels ? padded_rows + V : round_up(chunk, V));
    p->e_stride = e_cached ? static_cast<int>(q.pixels ? padded_rows + 16 / q.acc : round_up(chunk, acc_vec)) : 0;
    p->ab_stride = static_cast<int>(round_up(chunk, acc_vec));
    p->acc_stride = static_cast<int>(round_up(C, acc_vec));
    const int64_t lines = q.pixels ? chunk : T;
    if (q.pixels) {
      p->slices = p->pixel_vectors;
    } else if (acc_shared) {
      // Enough (slice, class vector) items for the block; each walks T / slices rows.
      const int64_t items = (chunk + V - 1) / V;
      p->slices = static_cast<int>(std::min<int64_t>(T, pow2_floor(std::max<int64_t>(1, kTileThreads / items))));
    } else {
      p->slices = 1;
    }
    size_t at = align_up(static_cast<size_t>(lines * p->line_stride * q.elem), 16);
    p->offset_tile2 = static_cast<int>(at);
    if (q.calibrate) {
      at += align_up(static_cast<size_t>(lines * p->line_stride * q.elem), 16);
    }
    p->offset_e = static_cast<int>(at);
    at += align_up(static_cast<size_t>(lines * p->e_stride * q.acc), 16);
    p->offset_ab = static_cast<int>(at);
    at += align_up(static_cast<size_t>(2 * p->ab_stride * q.acc), 16);
    p->offset_acc = static_cast<int>(at);
    if (acc_shared && class_grads) {
      at += align_up(static_cast<size_t>(2) * p->slices * p->acc_stride * q.acc, 16);
    }
    p->offset_partials = static_cast<int>(at);
    at += align_up(2 * row_partial_entries(q, *p) * q.acc, 16);
    p->offset_rows = static_cast<int>(at);
    at += align_up(row_meta_bytes(q, static_cast<int>(T)), 16);
    p->pipelined = pipelined;
    if (pipelined) {
      p->offset_tile_next = static_cast<int>(at);
      at += align_up(static_cast<size_t>(lines * p->line_stride * q.elem), 16);
      p->offset_rows_next = static_cast<int>(at);
      at += align_up(static_cast<size_t>(T) * sizeof(int64_t), 16);
    }
    p->shared_bytes = static_cast<int>(at);
    return at;
  };

  bool done = false;
  for (int pass = 0; pass < 2 && !done; ++pass) {
    const bool e_cached = pass == 0 && !q.calibrate;
    if (pass == 0 && q.calibrate) {
      continue;
    }
    const int64_t row_bytes = C * (q.elem * tiles_in + (e_cached ? q.acc : 0));
    int64_t T = pow2_floor(std::max<int64_t>(1, std::min<int64_t>(kTileThreads, kTileTargetBytes / row_bytes)));
    T = std::min(std::max(T, t_min), t_max);
    for (; T >= t_min && !done; T /= 2) {
      TilePlan p = plan;
      const size_t acc_bytes = class_grads ? 2 * static_cast<size_t>(q.pixels ? std::max<int64_t>(1, T / V) : 1) *
              round_up(C, acc_vec) * q.acc : 0;
      const bool acc_shared = acc_bytes <= max_shared / 2;
      if (layout(T, C, e_cached, acc_shared, &p) <= max_shared) {
        // The pipelined layout where it fits and keeps two blocks resident, or as many as without it
        // (cross entropy; calibrate_backward's two operands are not pipelined): the copy of the next
        // tile overlaps this tile's passes in every block, which two or three plain blocks per SM
        // only do by chance (and the partial-row budget often leaves one block per SM anyway).
        TilePlan piped = p;
        if (!q.calibrate && layout(T, C, e_cached, acc_shared, &piped, true) <= max_shared &&
            blocks_per_sm(piped.shared_bytes) >= std::min(2, blocks_per_sm(p.shared_bytes))) {
          p = piped;
        }
        plan = p;
        done = true;
      }
      if (T == 1) {
        break;
      }
    }
  }
  if (!done) {
    // Very large C: passes over chunks of classes (a multiple of 32 and of the vector), exponentials
    // recomputed, class-gradient accumulators in the workspace.
    int64_t chunk = std::max<int64_t>(32, round_up(V, 32));
    int64_t best = chunk;
    for (int64_t c = chunk; c < C; c += 32) {
      TilePlan p = plan;
      if (layout(t_min, c, false, !class_grads, &p) > max_shared) {
        break;
      }
      best = c;
    }
    layout(t_min, best, false, !class_grads, &plan);
  }

  const int64_t T = plan.tile_rows;
  plan.tiles_per_image = q.pixels ? (g.spatial + T - 1) / T : 0;
  plan.num_tiles = q.pixels ? g.batch * plan.tiles_per_image : (rows + T - 1) / T;
  plan.blocks_per_sm = std::max(1, blocks_per_sm(plan.shared_bytes));
  int64_t blocks = std::min<int64_t>(plan.num_tiles, static_cast<int64_t>(plan.blocks_per_sm) * dev.multiprocessors);
  plan.ws_slices = plan.acc_in_shared ? 1 : plan.slices;
  int64_t rows_out = blocks;
  if (class_grads) {
    const int64_t logits_bytes = rows * g.classes * q.elem;
    const int64_t per_block = static_cast<int64_t>(grads) * plan.ws_slices * plan.acc_stride * q.acc;
    const int64_t wanted = blocks;
    blocks = partial_rows(logits_bytes, per_block, dev.multiprocessors, wanted);
    rows_out = blocks;
    // The budget in rows, as partial_rows counts it.
    const int64_t budget_rows =
        static_cast<int64_t>(static_cast<double>(logits_bytes) * DISALIGN_PARTIALS_BUDGET_FRACTION) / per_block;
    const auto within_budget = [&](int64_t partial_rows_) { return partial_rows_ <= budget_rows; };
    if (!within_budget(rows_out) && plan.acc_in_shared && dev.max_cluster > 1 && active_clusters) {
      // Thread-block clusters: the blocks of a cluster reduce their accumulators through distributed
      // shared memory, one partial row per cluster. Grids of b blocks per SM in whole resident
      // clusters, for the cluster sizes that keep enough of them resident: the most blocks per SM
      // (as without clusters, where the budget allows more than the floor) and then the smallest
      // cluster size within the budget; where none is, the floor's grid with the fewest rows.
      const int64_t least = std::max(1, DISALIGN_MIN_BLOCKS_PER_SM);
      bool found = false;
      for (int64_t b = std::max<int64_t>(plan.blocks_per_sm, least); b >= least && !found; --b) {
        const int64_t target = std::min<int64_t>(wanted, b * dev.multiprocessors);
        for (int K = 2; K <= dev.max_cluster && !found; K *= 2) {
          const int64_t resident =
              std::min<int64_t>(target, static_cast<int64_t>(active_clusters(plan.shared_bytes, K)) * K) / K * K;
          if (resident < K ||
              static_cast<double>(resident) < kClusterMinResidentFraction * static_cast<double>(target)) {
            continue;
          }
          found = within_budget(resident / K);
          if (found || (b == least && resident / K < rows_out)) {
            blocks = resident;
            rows_out = resident / K;
            plan.cluster = K;
          }
        }
      }
    }
  }
  plan.blocks = static_cast<int>(std::max<int64_t>(blocks, 1));
  plan.partial_rows = static_cast<int>(std::max<int64_t>(rows_out, 1));
  // Accumulators in registers (plan.h): a thread's class vectors are tid + k * kTileThreads, k below
  // kRegAccClasses / V, fixed over the tiles where the sweep has one slice and one chunk.
  const int64_t vectors = plan.chunk_classes / V;
  plan.reg_acc = !q.pixels && !q.calibrate && q.acc == 4 && class_grads && plan.e_cached && plan.acc_in_shared &&
                 plan.slices == 1 &&
                 plan.num_chunks == 1 && plan.blocks_per_sm == 1 &&
                 (vectors + kTileThreads - 1) / kTileThreads * V <= kRegAccClasses;

  size_t ws = 0;
  auto reserve = [&](size_t bytes) {
    const size_t at = ws;
    ws = align_up(ws + bytes, 256);
    return at;
  };
  const size_t class_rows = static_cast<size_t>(plan.partial_rows) * plan.ws_slices * plan.acc_stride * q.acc;
  if (q.want_alpha) {
    plan.ws_alpha = reserve(class_rows);
  }
  if (q.want_beta) {
    plan.ws_beta = reserve(class_rows);
  }
  if (q.want_loss_partials) {
    plan.ws_loss = reserve(static_cast<size_t>(plan.blocks) * q.acc);
  }
  if (q.mean) {
    plan.weight_blocks = static_cast<int>(std::min<int64_t>(
        kMaxWeightBlocks, std::max<int64_t>(1, (rows + 4 * kTileThreads - 1) / (4 * kTileThreads))));
    plan.ws_weight = reserve(static_cast<size_t>(plan.weight_blocks) * q.acc);
  }
  plan.workspace_bytes = ws;
  return plan;
}

int copy_unit(uintptr_t data, const Strides& st, const TileRequest& q, const TilePlan& plan) {
  const int elem = q.elem;
  const Geometry& g = q.geometry;
  if ((q.pixels ? st.spatial : st.cls) != 1) {
    return elem;
  }
  for (int unit = 16; unit > elem; unit /= 2) {
    const int64_t per = unit / elem;
    bool ok = data % unit == 0 && plan.line_stride % per == 0;
    ok = ok && (g.batch == 1 || st.batch % per == 0);
    if (q.pixels) {
      ok = ok && g.spatial % per == 0 && plan.tile_rows % per == 0 && (g.classes == 1 || st.cls % per == 0);
    } else {
      ok = ok && g.classes % per == 0 && plan.chunk_classes % per == 0 && (g.spatial == 1 || st.spatial % per == 0);
    }
    // 2-byte elements in 4-byte units too (cls-inat's 8142 classes): asynchronous, so a pipelined
    // plan's next tile is in flight during this one's passes, where line_copy.h's 16-byte loads are
    // synchronous (each thread waits for its loads before the store; no overlap with the passes).
    if (ok) {
      return unit;
    }
  }
  // 2-byte elements at a 2-byte phase (odd C, odd H*W, odd strides, slices): one element per
  // request; line_copy.h moves 16 bytes per request instead.
  return elem == 2 ? kCopyRealign : elem;
}

}  // namespace disalign::cuda
