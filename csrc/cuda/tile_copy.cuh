// Copies of kernel tiles between global and shared memory: global -> shared with cp.async (16-, 8-
// or 4-byte units where the planner found the contiguous axis aligned, csrc/cuda/plan.cpp copy_unit),
// shared -> global with vector stores; lines of a 2-byte type whose contiguous axis has stride 1 but
// not the alignment (odd C, odd H*W, odd strides, slices) with 16-byte global accesses realigned in
// registers (kCopyRealign, line_copy.h). Torch-free.
#pragma once

#include "cuda/device_math.cuh"
#include "cuda/line_copy.h"
#include "cuda/plan.h"
#include "common/layout.h"

#include <cuda_pipeline.h>

namespace disalign::cuda {

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

// line_copy.h's memory accesses on the device: 16-byte vectors, single elements of `Elem`.
template <typename Elem>
struct DeviceLineMem {
  __device__ __forceinline__ Vec16 load16(const unsigned char* p) const {
    return *reinterpret_cast<const Vec16*>(p);
  }
  __device__ __forceinline__ void store16(unsigned char* p, const Vec16& v) const {
    *reinterpret_cast<Vec16*>(p) = v;
  }
  __device__ __forceinline__ void copy(unsigned char* dst, const unsigned char* src) const {
    *reinterpret_cast<Elem*>(dst) = *reinterpret_cast<const Elem*>(src);
  }
};

// One operand's part of a tile: which rows (their base offsets in row_base), which classes.
struct TileSpan {
  const int64_t* row_base;  // per tile row: b*strides.batch + s*strides.spatial
  int rows;
  int first_class;
  int classes;
};

// Copies the tile's lines between global and shared memory in units of `unit` bytes along the
// contiguous axis (unit > sizeof(scalar_t) only where the planner found that axis of stride 1 and
// aligned, and then the unit divides the line's element count), or with line_copy.h's items
// (unit == kCopyRealign). Lines are rows (classes contiguous) or classes (pixels contiguous).
// Global -> shared copies in units are asynchronous; the caller waits (wait_tile), whose barrier
// also publishes the realigned items' plain stores.
template <bool PIXELS, bool TO_SHARED, typename scalar_t>
__device__ void copy_tile(
    scalar_t* shared,
    int line_stride,
    scalar_t* global,
    const Strides& strides,
    const TileSpan& span,
    int unit) {
  constexpr int kElem = static_cast<int>(sizeof(scalar_t));
  const bool realign = unit == kCopyRealign;
  const int per_unit = realign ? kVec<scalar_t> : unit / kElem;
  const int lines = PIXELS ? span.classes : span.rows;
  const int n = PIXELS ? span.rows : span.classes;  // elements per line
  const int units_per_line = realign ? line_items(n, kElem) : n / per_unit;
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
    if (realign) {  // along == 1 (the planner's condition)
      DeviceLineMem<scalar_t> mem;
      copy_line_item<TO_SHARED>(
          reinterpret_cast<unsigned char*>(shared + line * line_stride), reinterpret_cast<unsigned char*>(global + line_base),
          n, kElem, k, mem);
    } else {
      scalar_t* g = global + line_base + static_cast<int64_t>(k) * per_unit * along;
      scalar_t* s = shared + line * line_stride + k * per_unit;
      if (TO_SHARED) {
        copy_unit_to_shared(s, g, unit);
      } else {
        copy_unit_to_global(g, s, unit);
      }
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

}  // namespace disalign::cuda
