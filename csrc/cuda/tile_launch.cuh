// Planning and launch of the tile kernel (tile_kernel.cuh) for an op: cross_entropy (LossArgs,
// loss_kernels.cu) or calibrate_backward (CalibrateBackwardArgs, calibrate_backward.cu), then the
// fixed-order reduction of its per-block partials. Torch-free.
#pragma once

#include "cuda/launch_common.cuh"
#include "cuda/tile_kernel.cuh"

#include <type_traits>

namespace disalign::cuda {

inline TileRequest tile_request(const LossArgs& a, int elem, int acc) {
  const bool reduced = a.reduction != Reduction::kNone && a.grad_loss == nullptr;
  return TileRequest{
      a.geometry, a.layout == Layout::kPixelsContiguous, elem, acc, false, a.grad_alpha != nullptr,
      a.grad_beta != nullptr, reduced && a.loss != nullptr, reduced && a.reduction == Reduction::kMean};
}

inline TileRequest tile_request(const CalibrateBackwardArgs& a, int elem, int acc) {
  return TileRequest{
      a.geometry, a.layout == Layout::kPixelsContiguous, elem, acc, true, a.grad_alpha != nullptr,
      a.grad_beta != nullptr, false, false};
}

// The tile kernel of an op for a layout, for whether grad_logits is written and for the plan's register
// accumulators (cross entropy, (N, C) rows, float accumulation; plan.h kRegAccClasses).
template <typename scalar_t, typename acc_t, typename Args>
auto tile_kernel_for(bool pixels, bool grad, bool reg_acc = false) {
  constexpr bool kCal = std::is_same_v<Args, CalibrateBackwardArgs>;
  if (pixels) {
    return grad ? tile_kernel<scalar_t, acc_t, true, kCal, true> : tile_kernel<scalar_t, acc_t, true, kCal, false>;
  }
  if constexpr (!kCal && std::is_same_v<acc_t, float>) {
    if (reg_acc) {
      return grad ? tile_kernel<scalar_t, acc_t, false, false, true, true>
                  : tile_kernel<scalar_t, acc_t, false, false, false, true>;
    }
  }
  return grad ? tile_kernel<scalar_t, acc_t, false, kCal, true> : tile_kernel<scalar_t, acc_t, false, kCal, false>;
}

// Plans a call: device limits and occupancy come from the per-device caches.
template <typename scalar_t, typename acc_t, typename Args>
cudaError_t plan_for(const Args& args, TileRequest* q, TilePlan* plan) {
  *q = tile_request(args, sizeof(scalar_t), sizeof(acc_t));
  const bool grad = args.grad_logits.data != nullptr;
  const auto kernel = tile_kernel_for<scalar_t, acc_t, Args>(q->pixels, grad);
  int device = 0;
  DeviceLimits dev;
  cudaError_t err = current_device_limits(&device, &dev);
  if (err != cudaSuccess) {
    return err;
  }
  cudaError_t occ_err = cudaSuccess;
  const void* k = reinterpret_cast<const void*>(kernel);
  dev.max_cluster = cached_max_cluster(device, k, dev.max_cluster);
  *plan = plan_tiles(
      *q, dev,
      [&](int shared_bytes) {
        return cached_blocks_per_sm(device, k, shared_bytes, dev.max_shared_per_block, &occ_err);
      },
      [&](int shared_bytes, int cluster) {
        return cached_active_clusters(device, k, shared_bytes, cluster, dev.max_shared_per_block, &occ_err);
      });
  if (plan->reg_acc && occ_err == cudaSuccess) {
    // The register-accumulator kernel only where it is as resident as the kernel planned with; a failed
    // query only keeps the planned kernel (and its error is cleared, not left for the launch check).
    const void* k2 = reinterpret_cast<const void*>(tile_kernel_for<scalar_t, acc_t, Args>(q->pixels, grad, true));
    cudaError_t reg_err = cudaSuccess;
    const int max_shared = dev.max_shared_per_block;
    bool same = k2 != k && cached_blocks_per_sm(device, k2, plan->shared_bytes, max_shared, &reg_err) >=
                               plan->blocks_per_sm;
    if (same && plan->cluster > 1) {
      same = cached_max_cluster(device, k2, dev.max_cluster) >= plan->cluster &&
             cached_active_clusters(device, k2, plan->shared_bytes, plan->cluster, max_shared, &reg_err) >=
                 cached_active_clusters(device, k, plan->shared_bytes, plan->cluster, max_shared, &reg_err);
    }
    if (reg_err != cudaSuccess) {
      cudaGetLastError();
    }
    plan->reg_acc = same && reg_err == cudaSuccess;
  }
  return occ_err;
}

template <typename Args>
size_t tile_workspace_bytes(const Args& args) {
  return dispatch_dtype(args.dtype, [&](auto scalar, auto acc) -> size_t {
    TileRequest q;
    TilePlan plan;
    if (plan_for<decltype(scalar), decltype(acc)>(args, &q, &plan) != cudaSuccess) {
      return 0;  // the launch reports the error
    }
    return plan.workspace_bytes;
  });
}

template <typename scalar_t, typename acc_t>
void fill_plan(TileParams<scalar_t, acc_t>& p, const TilePlan& plan, const Geometry& g) {
  p.classes = g.classes;
  p.spatial = g.spatial;
  p.rows = g.batch * g.spatial;
  p.tile_rows = plan.tile_rows;
  p.pixel_vectors = plan.pixel_vectors;
  p.group = plan.group;
  p.chunk_classes = plan.chunk_classes;
  p.num_chunks = plan.num_chunks;
  p.slices = plan.slices;
  p.line_stride = plan.line_stride;
  p.e_stride = plan.e_stride;
  p.ab_stride = plan.ab_stride;
  p.acc_stride = plan.acc_stride;
  p.ws_slices = plan.ws_slices;
  p.e_cached = plan.e_cached;
  p.acc_in_shared = plan.acc_in_shared;
  p.cluster = plan.cluster;
  p.num_tiles = plan.num_tiles;
  p.tiles_per_image = plan.tiles_per_image;
  p.by_tiles_per_image = FastDivider(std::max<int64_t>(plan.tiles_per_image, 1));
  p.by_spatial = FastDivider(std::max<int64_t>(g.spatial, 1));
  p.by_vectors = FastDivider(std::max(plan.chunk_classes / plan.vec, 1));
  p.offset_tile2 = plan.offset_tile2;
  p.offset_e = plan.offset_e;
  p.offset_ab = plan.offset_ab;
  p.offset_acc = plan.offset_acc;
  p.offset_partials = plan.offset_partials;
  p.offset_rows = plan.offset_rows;
  p.pipelined = plan.pipelined;
  p.offset_tile_next = plan.offset_tile_next;
  p.offset_rows_next = plan.offset_rows_next;
}

template <typename scalar_t>
int tile_copy_unit(const void* data, const Strides& strides, const TileRequest& q, const TilePlan& plan) {
  return copy_unit(reinterpret_cast<uintptr_t>(data), strides, q, plan);
}

// Plans and launches the tile kernel of an op (in thread-block clusters where the plan says so), then
// the reduction of its partial rows (one per block, or per cluster) and per-block loss partials.
template <typename Args>
cudaError_t launch_tiles(const Args& args, void* workspace, cudaStream_t stream) {
  return dispatch_dtype(args.dtype, [&](auto scalar, auto acc) -> cudaError_t {
    using scalar_t = decltype(scalar);
    using acc_t = decltype(acc);
    TileRequest q;
    TilePlan plan;
    cudaError_t err = plan_for<scalar_t, acc_t>(args, &q, &plan);
    if (err != cudaSuccess) {
      return err;
    }
    const bool grad = args.grad_logits.data != nullptr;
    const auto kernel = tile_kernel_for<scalar_t, acc_t, Args>(q.pixels, grad, plan.reg_acc);
    TileParams<scalar_t, acc_t> p{};
    fill_plan(p, plan, args.geometry);
    p.logits = static_cast<const scalar_t*>(args.logits.data);
    p.logits_strides = args.logits.strides;
    p.logits_unit = tile_copy_unit<scalar_t>(args.logits.data, args.logits.strides, q, plan);
    p.grad_logits = static_cast<scalar_t*>(args.grad_logits.data);
    p.grad_strides = args.grad_logits.strides;
    p.grad_unit = grad ? tile_copy_unit<scalar_t>(args.grad_logits.data, args.grad_logits.strides, q, plan)
                       : static_cast<int>(sizeof(scalar_t));
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
        err = launch_total_weight<acc_t>(
            args.target, args.target_is_int64, static_cast<const acc_t*>(args.weight), args.ignore_index, g.classes,
            g.batch * g.spatial, plan.weight_blocks, at_offset<acc_t>(workspace, plan.ws_weight), stream);
        if (err != cudaSuccess) {
          return err;
        }
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
      if (q.want_loss_partials) {
        loss = args.loss;
      }
    }
    if (plan.cluster > 1) {
      DISALIGN_LAUNCH_CLUSTER(kernel, plan.blocks, kBlock, plan.shared_bytes, stream, plan.cluster)(p);
    } else {
      DISALIGN_LAUNCH(kernel, plan.blocks, kBlock, plan.shared_bytes, stream)(p);
    }
    err = cudaGetLastError();
    if (err != cudaSuccess) {
      return err;
    }
    return launch_finalize<acc_t>(
        args.geometry.classes, plan.partial_rows, static_cast<int64_t>(plan.ws_slices) * plan.acc_stride,
        p.alpha_partials, p.beta_partials, static_cast<acc_t*>(args.grad_alpha), static_cast<acc_t*>(args.grad_beta),
        plan.blocks, p.loss_partials, p.weight_partials, plan.weight_blocks, static_cast<acc_t*>(loss), stream);
  });
}

}  // namespace disalign::cuda
