// What the per-ISA CPU kernels share: vector loads and stores of any logits dtype, block shapes,
// operand addressing and the deterministic chunk loop.
// Included only by disalign_kernels.cpp, which is compiled once per instruction set (setup.py), so
// everything here lands in that copy's namespace.
#pragma once

#include "cpu/disalign_kernels.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace disalign::cpu::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// Loads and stores of logits-dtype elements as vectors of the accumulation type.
template <typename scalar_t>
struct Io {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t kWidth = Vec::size();

  static Vec load(const scalar_t* data, int64_t count) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return count == kWidth ? Vec::loadu(data) : Vec::loadu(data, count);
    } else {
      if (count == kWidth) {
        Vec out;
        at::vec::load_to_float(data, out);
        return out;
      }
      return at::vec::convert<acc_t>(Vectorized<scalar_t>::loadu(data, count));
    }
  }

  static void store(scalar_t* data, const Vec& value, int64_t count) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      value.store(data, count);
    } else {
      at::vec::convert<scalar_t>(value).store(data, count);
    }
  }
};

// Non-temporal stores of whole float vectors, for a large grad_logits: it is written once and read
// much later, so writing around the caches saves the read-for-ownership of every line, and the
// output does not evict from the last-level cache what the rest of the training step runs on (after
// a pass of more than the L3 the autograd engine's backward alone took ~0.45 ms instead of ~0.1,
// from DRAM). On AMD EPYC (AVX2): seg-ade full mode (NCHW, short strided class runs) 1.6-1.9x ->
// 1.25-1.4x the exp floor; (N, C) full mode at 1 thread cls-imagenet 1.55 -> 1.44, cls-inat 1.21 ->
// 1.11, det-lvis 1.49 -> 1.32. The address must be aligned to the vector. In the classes layout a
// cache line is written with non-temporal stores only or with plain stores only (mixing them in
// one line, at the ends of (N, C) rows, flushes partial lines to memory: det-lvis 1.30 -> 1.39 in
// the kernel alone); the pixels layout streams whole 512-byte class runs, which share a line with
// plain stores only where an image ends in a partial block. stream_fence() orders them before the
// kernel returns.
constexpr bool kStreamingStores =
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
    true;
#else
    false;
#endif
// Outputs below this size stay in the caches for whoever reads them next.
constexpr int64_t kStreamingMinBytes = int64_t{8} << 20;

inline void stream_store(float* data, const Vectorized<float>& value) {
#if defined(CPU_CAPABILITY_AVX512)
  _mm512_stream_ps(data, value);
#elif defined(CPU_CAPABILITY_AVX2)
  _mm256_stream_ps(data, value);
#else
  value.store(data);
#endif
}

inline bool vector_aligned(const void* data) {
  return reinterpret_cast<uintptr_t>(data) % sizeof(Vectorized<float>) == 0;
}

constexpr int64_t kCacheLineBytes = 64;
constexpr int64_t kLineElements = kCacheLineBytes / sizeof(float);
inline bool line_aligned(const void* data) {
  return reinterpret_cast<uintptr_t>(data) % kCacheLineBytes == 0;
}

// dst[0, n) = src[0, n) (float, n >= 0): non-temporal stores for the whole cache lines of dst,
// plain stores before the first and after the last of them (src may have any alignment: it is read
// with unaligned loads).
inline void stream_copy(float* dst, const float* src, int64_t n) {
  constexpr int64_t kWidth = Vectorized<float>::size();
  constexpr int64_t kLine = kLineElements;
  int64_t i = 0;
  for (; i < n && !line_aligned(dst + i); ++i) {
    dst[i] = src[i];
  }
  for (; i + kLine <= n; i += kLine) {
    for (int64_t v = 0; v < kLine; v += kWidth) {
      stream_store(dst + i + v, Vectorized<float>::loadu(src + i + v));
    }
  }
  for (; i < n; ++i) {
    dst[i] = src[i];
  }
}

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  _mm_sfence();
#endif
}

// Block shapes, the same for every kernel. Classes layout (class stride 1): a block is kBlockRows
// rows, vectors run along the classes. Pixels layout (pixel stride 1): a block is the consecutive
// pixels of one image whose values of one class fill kPixelRunBytes in the accumulation type (128
// float or 64 double pixels): the sweeps run over the classes, lanes are rows, and each class of
// the block is one contiguous run of the logits. Runs this long are what the hardware prefetcher
// follows; at 128 bytes per class (32 float pixels) the loss took 1.4x as long on seg-ade (AMD
// EPYC, AVX2), with or without software prefetches. A kernel whose per-block scratch would then
// outgrow its budget (the loss, for many classes) uses kShortPixelRunBytes.
constexpr int kBlockRows = 4;
constexpr int64_t kPixelRunBytes = 512;
constexpr int64_t kShortPixelRunBytes = 128;

template <typename acc_t, int64_t kRunBytes = kPixelRunBytes>
constexpr int pixel_vectors() {
  return static_cast<int>(kRunBytes / (Vectorized<acc_t>::size() * sizeof(acc_t)));
}

template <typename acc_t, int64_t kRunBytes = kPixelRunBytes>
constexpr int64_t pixels_per_block() {
  return pixel_vectors<acc_t, kRunBytes>() * Vectorized<acc_t>::size();
}

// Calls body(std::integral_constant<int, R>{}) for R = rows (1 <= rows <= kBlockRows): the row
// count of a classes-layout block as a template argument.
template <typename Body>
inline auto with_block_rows(int64_t rows, const Body& body) {
  static_assert(kBlockRows == 4, "one case per row count");
  switch (rows) {
    case 4:
      return body(std::integral_constant<int, 4>{});
    case 3:
      return body(std::integral_constant<int, 3>{});
    case 2:
      return body(std::integral_constant<int, 2>{});
    default:
      return body(std::integral_constant<int, 1>{});
  }
}

// The parameter gradients of one vector of upstream gradients g of calibrated logits (logits z,
// the rows' confidences s, the classes' alpha a and beta b), as every kernel's gradient sweep sums
// them: da += g*s*z and db += g*s over the rows of a step (per class), ds += g*(a*z + b) per row.
template <typename acc_t>
struct ParamGrads {
  using Vec = Vectorized<acc_t>;
  Vec da = Vec(0);
  Vec db = Vec(0);

  void add(const Vec& g, const Vec& s, const Vec& z, const Vec& a, const Vec& b, Vec& ds) {
    const Vec gs = g * s;
    da = at::vec::fmadd(gs, z, da);
    db += gs;
    ds = at::vec::fmadd(g, at::vec::fmadd(a, z, b), ds);
  }
  // Into the chunk's partial rows of those asked for (nullptr: not asked for), classes
  // [j, j + count) (classes layout).
  void add_to(acc_t* grad_alpha, acc_t* grad_beta, int64_t j, int64_t count) const {
    if (grad_alpha) {
      (Vec::loadu(grad_alpha + j, count) + da).store(grad_alpha + j, count);
    }
    if (grad_beta) {
      (Vec::loadu(grad_beta + j, count) + db).store(grad_beta + j, count);
    }
  }
};

// Blocks never cross an image, so the rows of a block are evenly spaced in memory.
inline int64_t block_rows_within_image(const Geometry& geometry, int64_t max_rows, int64_t row, int64_t end) {
  const int64_t image_end = (row / geometry.spatial + 1) * geometry.spatial;
  return std::min({max_rows, end - row, image_end - row});
}

// Rows of the block from `row`: kBlockRows (classes layout) or `pixels` (pixels layout) at most.
inline int64_t block_rows(Layout layout, int64_t pixels, const Geometry& geometry, int64_t row, int64_t end) {
  return block_rows_within_image(geometry, layout == Layout::kClassesContiguous ? kBlockRows : pixels, row, end);
}

inline int64_t row_offset(const Geometry& geometry, const Strides& strides, int64_t row) {
  const int64_t image = row / geometry.spatial;
  return image * strides.batch + (row - image * geometry.spatial) * strides.spatial;
}


// Runs block(first_row, rows, grad_alpha_partial, grad_beta_partial, scratch) -> double over the
// blocks of every chunk (block.block_rows(geometry, row, end) rows each), chunks in parallel; a
// chunk's block results are summed into sum_partials[chunk]. block.begin_chunk(scratch) and
// block.end_chunk(scratch, grad_alpha_partial, grad_beta_partial) bracket each chunk. scratch: the
// running thread's slot of the scratch (nullptr when none).
template <typename acc_t, typename BlockFn>
void for_each_chunk(
    const Geometry& geometry,
    const Chunking& chunking,
    void* grad_alpha_partials,
    void* grad_beta_partials,
    double* sum_partials,
    acc_t* scratch,
    int64_t scratch_slots,
    int64_t scratch_per_thread,
    const BlockFn& block) {
  const int64_t rows = geometry.rows();
  const int64_t classes = geometry.classes;
  at::parallel_for(0, chunking.count, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    acc_t* slot = nullptr;
    if (scratch) {
      // Run in parallel, thread t < min(threads, chunks) = scratch_slots; run inline (one thread,
      // e.g. nested in another parallel region) any slot will do, as no other thread uses this call's.
      const int64_t thread = std::min<int64_t>(at::get_thread_num(), scratch_slots - 1);
      slot = scratch + thread * scratch_per_thread;
    }
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      acc_t* grad_alpha = grad_alpha_partials ? static_cast<acc_t*>(grad_alpha_partials) + chunk * classes : nullptr;
      acc_t* grad_beta = grad_beta_partials ? static_cast<acc_t*>(grad_beta_partials) + chunk * classes : nullptr;
      for (acc_t* partial : {grad_alpha, grad_beta}) {
        if (partial) {
          std::fill(partial, partial + classes, acc_t(0));
        }
      }
      block.begin_chunk(slot);
      const int64_t end = std::min(rows, (chunk + 1) * chunking.rows_per_chunk);
      double sum = 0;
      for (int64_t row = chunk * chunking.rows_per_chunk; row < end;) {
        const int64_t block_rows = block.block_rows(geometry, row, end);
        sum += block(row, block_rows, grad_alpha, grad_beta, slot);
        row += block_rows;
      }
      block.end_chunk(slot, grad_alpha, grad_beta);
      if (sum_partials) {
        sum_partials[chunk] = sum;
      }
    }
  });
}

}  // namespace
}  // namespace disalign::cpu::CPU_CAPABILITY
