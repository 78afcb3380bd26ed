// Fused DisAlign kernels for the CPU, compiled once per instruction set (see setup.py): calibration
// (paper eq. 6), row softmax statistics, class-weighted cross entropy and its gradients in one pass
// over the logits, never materialising the calibrated logits or any N x C temporary.
//
// One implementation, templated on the logits dtype and on the layout:
//  - ClassesContiguous (class stride 1: (N, C), channels-last): a block is one row, vectors run
//    along the classes; row statistics are horizontal reductions at the end of each sweep.
//  - PixelsContiguous (pixel stride 1: NCHW, transposed (N, C)): a block is up to kVectors vectors
//    of consecutive pixels of one image, the sweeps run over the classes and vectors run along the
//    pixels, so each lane holds one row's running statistics; per-class sums are horizontal.
// A block is swept up to three times (max, sum of exponentials, gradients); it stays in L1/L2, so
// the logits are read from memory once.
#include "cpu/disalign_kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

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

// One step of a sweep over a block: class `cls` (pixels layout) or the classes [cls, cls + count)
// (classes layout). Vector k < vectors of an operand starts at
// block_offset + cls * class_stride + k * Layout::vector_stride(strides); it holds full_count
// elements, the last one last_count.
template <typename acc_t>
struct Step {
  using Vec = Vectorized<acc_t>;
  int64_t cls;
  int vectors;
  int64_t full_count;
  int64_t last_count;
  Vec alpha;
  Vec beta;
  Vec class_index;  // the class of each lane, exact in acc_t (C <= 2^24 is checked for float)
  int64_t count(int k) const {
    return k + 1 < vectors ? full_count : last_count;
  }
};

// Blocks never cross an image, so the rows of a block are evenly spaced in memory.
inline int64_t block_rows_within_image(const Geometry& geometry, int64_t max_rows, int64_t row, int64_t end) {
  const int64_t image_end = (row / geometry.spatial + 1) * geometry.spatial;
  return std::min({max_rows, end - row, image_end - row});
}

// Classes contiguous: vector k of a block is row k of it; lanes are classes.
template <typename acc_t>
struct ClassesContiguous {
  using Vec = Vectorized<acc_t>;
  static constexpr int kVectors = 4;  // rows per block: independent work, fewer partial-sum updates
  static constexpr int64_t kMaxRows = kVectors;
  static constexpr int64_t kWidth = Vec::size();
  static constexpr bool kPrefetchNextBlock = false;  // rows are long sequential streams
  // The block's rows are contiguous runs that stay in L1/L2 between the sweeps: sweep 3 rereads them.
  static constexpr bool kCopyLogits = false;

  int64_t classes;
  const acc_t* alpha;
  const acc_t* beta;

  static int64_t block_rows(const Geometry& geometry, int64_t row, int64_t end) {
    return block_rows_within_image(geometry, kMaxRows, row, end);
  }
  static int64_t vector_stride(const Strides& strides) {
    return strides.spatial;
  }
  // A per-row value of the block (array indexed by block row) as seen by vector k.
  static Vec row_vector(const acc_t* values, int k) {
    return Vec(values[k]);
  }
  template <typename Body>
  void sweep(int64_t rows, const Body& body) const {
    for (int64_t cls = 0; cls < classes; cls += kWidth) {
      const int64_t count = std::min(kWidth, classes - cls);
      body(Step<acc_t>{
          cls, static_cast<int>(rows), count, count, Io<acc_t>::load(alpha + cls, count),
          Io<acc_t>::load(beta + cls, count), Vec::arange(static_cast<acc_t>(cls), acc_t(1))});
    }
  }
  // Lanes past the last class are padding: -inf keeps them out of the row max and softmax.
  static Vec mask_padding(const Vec& value, int64_t count) {
    return count == kWidth ? value : Vec::set(Vec(-std::numeric_limits<acc_t>::infinity()), value, count);
  }
  // Row statistics: each vector reduced across its lanes.
  template <typename Op>
  static void reduce_rows(Vec* values, const Op& op) {
    for (int k = 0; k < kVectors; ++k) {
      values[k] = Vec(at::vec::vec_reduce_all<acc_t>(op, values[k]));
    }
  }
  static void store_rows(const Vec* values, acc_t* out) {
    alignas(64) acc_t lanes[kWidth];
    for (int k = 0; k < kVectors; ++k) {
      values[k].store(lanes);
      out[k] = lanes[0];
    }
  }
  // value: the block's contribution (summed over its rows) to the step's classes.
  static void add_to_classes(acc_t* partial, const Step<acc_t>& step, const Vec& value) {
    acc_t* at = partial + step.cls;
    (Io<acc_t>::load(at, step.full_count) + value).store(at, step.full_count);
  }
  // Scratch of a block: row k at k * scratch_stride, classes padded to whole vectors.
  static int64_t scratch_stride(int64_t classes) {
    return (classes + kWidth - 1) / kWidth * kWidth;
  }
  static int64_t scratch_offset(const Step<acc_t>& step, int k, int64_t stride) {
    return k * stride + step.cls;
  }
  static int64_t scratch_index(int64_t row, int64_t cls, int64_t stride) {
    return row * stride + cls;
  }
  static int64_t scratch_elements(int64_t classes) {
    return kMaxRows * scratch_stride(classes);
  }
};

// Pixels contiguous: vector k of a block holds pixels [k * kWidth, (k + 1) * kWidth) of it; lanes
// are rows.
template <typename acc_t>
struct PixelsContiguous {
  using Vec = Vectorized<acc_t>;
  static constexpr int kVectors = 4;  // enough independent work per class to hide latencies
  static constexpr int64_t kWidth = Vec::size();
  static constexpr int64_t kMaxRows = kVectors * kWidth;
  // Every class of a block is its own short stream: fetch the next block while sweeping this one.
  static constexpr bool kPrefetchNextBlock = true;
  // A block's classes lie a whole image plane apart: with a power-of-two plane (128 x 128 pixels)
  // they all map to the same L1 and L2 sets and evict each other, so sweep 1 copies the logits into
  // the (contiguous) scratch for sweep 3 instead of sweep 3 reading them again from memory.
  static constexpr bool kCopyLogits = true;

  int64_t classes;
  const acc_t* alpha;
  const acc_t* beta;

  static int64_t block_rows(const Geometry& geometry, int64_t row, int64_t end) {
    return block_rows_within_image(geometry, kMaxRows, row, end);
  }
  static int64_t vector_stride(const Strides& /*strides*/) {
    return kWidth;
  }
  static Vec row_vector(const acc_t* values, int k) {
    return Vec::loadu(values + k * kWidth);
  }
  template <typename Body>
  void sweep(int64_t rows, const Body& body) const {
    const int vectors = static_cast<int>((rows + kWidth - 1) / kWidth);
    const int64_t last_count = rows - (vectors - 1) * kWidth;
    for (int64_t cls = 0; cls < classes; ++cls) {
      body(Step<acc_t>{
          cls, vectors, kWidth, last_count, Vec(alpha[cls]), Vec(beta[cls]), Vec(static_cast<acc_t>(cls))});
    }
  }
  // Padding lanes are rows past the block: their gradient coefficient is 0, so they add nothing.
  static Vec mask_padding(const Vec& value, int64_t /*count*/) {
    return value;
  }
  template <typename Op>
  static void reduce_rows(Vec* /*values*/, const Op& /*op*/) {}
  static void store_rows(const Vec* values, acc_t* out) {
    for (int k = 0; k < kVectors; ++k) {
      values[k].store(out + k * kWidth);
    }
  }
  static void add_to_classes(acc_t* partial, const Step<acc_t>& step, const Vec& value) {
    partial[step.cls] += at::vec::vec_reduce_all<acc_t>([](const Vec& x, const Vec& y) { return x + y; }, value);
  }
  // Scratch of a block: class c's kMaxRows rows at c * kMaxRows, in row order.
  static int64_t scratch_stride(int64_t /*classes*/) {
    return kMaxRows;
  }
  static int64_t scratch_offset(const Step<acc_t>& step, int k, int64_t stride) {
    return step.cls * stride + k * kWidth;
  }
  static int64_t scratch_index(int64_t row, int64_t cls, int64_t stride) {
    return cls * stride + row;
  }
  static int64_t scratch_elements(int64_t classes) {
    return 2 * classes * kMaxRows;  // the exponentials, then the copy of the logits
  }
};

// Hints the next block of the same image (the kMaxRows rows after this one) into the cache, one
// class at a time, while the current block is swept.
template <typename scalar_t, typename Layout>
inline void prefetch_next_block(
    const scalar_t* data,
    const Geometry& geometry,
    const Strides& strides,
    int64_t block_offset,
    int64_t first_row,
    int64_t rows,
    int64_t cls) {
  if constexpr (Layout::kPrefetchNextBlock) {
    const int64_t next_row = first_row + rows;
    if (next_row + Layout::kMaxRows > (first_row / geometry.spatial + 1) * geometry.spatial) {
      return;  // the next block is in another image (or absent)
    }
    const char* next = reinterpret_cast<const char*>(data + block_offset + cls * strides.cls + rows);
    constexpr int64_t kBytes = Layout::kMaxRows * static_cast<int64_t>(sizeof(scalar_t));
    for (int64_t byte = 0; byte < kBytes; byte += 64) {
      __builtin_prefetch(next + byte);
    }
  }
}

inline int64_t row_offset(const Geometry& geometry, const Strides& strides, int64_t row) {
  const int64_t image = row / geometry.spatial;
  return image * strides.batch + (row - image * geometry.spatial) * strides.spatial;
}

// A step's contributions to the alpha and beta gradients of its classes, summed over the block's
// vectors: g*s*z and g*s for the upstream gradient g of a calibrated logit and its confidence s.
template <typename Layout, typename acc_t>
struct StepClassGrads {
  using Vec = Vectorized<acc_t>;
  Vec alpha = Vec(0);
  Vec beta = Vec(0);

  void add(const Vec& g_s, const Vec& z) {
    alpha = at::vec::fmadd(g_s, z, alpha);
    beta += g_s;
  }
  // Into the chunk's partials of those asked for (nullptr: not asked for).
  void add_to(acc_t* grad_alpha, acc_t* grad_beta, const Step<acc_t>& step) const {
    if (grad_alpha) {
      Layout::add_to_classes(grad_alpha, step, alpha);
    }
    if (grad_beta) {
      Layout::add_to_classes(grad_beta, step, beta);
    }
  }
};

// Stores the block's per-row sums, held as the layout's vectors, to out[0, rows).
template <typename Layout, typename acc_t>
inline void store_row_sums(Vectorized<acc_t>* sums, int64_t rows, acc_t* out) {
  Layout::reduce_rows(sums, [](const Vectorized<acc_t>& x, const Vectorized<acc_t>& y) { return x + y; });
  alignas(64) acc_t values[Layout::kMaxRows];
  Layout::store_rows(sums, values);
  std::memcpy(out, values, rows * sizeof(acc_t));
}

// Runs block(first_row, rows, grad_alpha_partial, grad_beta_partial, scratch) -> double over the
// blocks of every chunk, chunks in parallel; a chunk's block results are summed into
// sum_partials[chunk]. scratch: the running thread's slot of the scratch (nullptr when none).
template <typename acc_t, typename LayoutT, typename BlockFn>
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
      const int64_t end = std::min(rows, (chunk + 1) * chunking.rows_per_chunk);
      double sum = 0;
      for (int64_t row = chunk * chunking.rows_per_chunk; row < end;) {
        const int64_t block_rows = LayoutT::block_rows(geometry, row, end);
        sum += block(row, block_rows, grad_alpha, grad_beta, slot);
        row += block_rows;
      }
      if (sum_partials) {
        sum_partials[chunk] = sum;
      }
    }
  });
}

// One exponential per element, three sweeps over a block that stays in L1/L2:
//  1. the calibrated logits zhat into the scratch, and their row max m;
//  2. e = exp(zhat - m) in place in the scratch, and the row sums S of e; then the loss;
//  3. the gradients from e: dL/dzhat = c * (e / S - onehot(target)) for the row's coefficient c
//     (upstream gradient times weight[target]; 0 for an ignored row), written to grad_logits and
//     summed into the alpha / beta / confidence gradients in the same sweep.
// The one-hot term is folded into the scratch before sweep 3 (e[target] -= S), so sweep 3 is the
// same multiply for every element. Ignored rows run the same arithmetic with c = 0: their gradients
// are 0, or NaN where their logits make the softmax NaN, as in F.cross_entropy; a block's result
// never depends on which rows share it.
template <typename scalar_t, template <typename> class LayoutT>
struct LossBlocks {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  using IO = Io<scalar_t>;
  using Layout = LayoutT<acc_t>;
  static constexpr int kVectors = Layout::kVectors;
  static constexpr int64_t kMaxRows = Layout::kMaxRows;

  const LossArgs& args;
  Layout layout;
  const scalar_t* logits;
  scalar_t* grad_logits;
  const acc_t* alpha;
  const acc_t* beta;
  const acc_t* weight;
  const acc_t* confidence;
  const acc_t* grad_loss;
  acc_t* loss;
  acc_t* grad_confidence;
  bool wants_grad;

  explicit LossBlocks(const LossArgs& a)
      : args(a),
        layout{a.geometry.classes, static_cast<const acc_t*>(a.alpha), static_cast<const acc_t*>(a.beta)},
        logits(static_cast<const scalar_t*>(a.logits.data)),
        grad_logits(static_cast<scalar_t*>(a.grad_logits.data)),
        alpha(static_cast<const acc_t*>(a.alpha)),
        beta(static_cast<const acc_t*>(a.beta)),
        weight(static_cast<const acc_t*>(a.weight)),
        confidence(static_cast<const acc_t*>(a.confidence)),
        grad_loss(static_cast<const acc_t*>(a.grad_loss)),
        loss(static_cast<acc_t*>(a.loss)),
        grad_confidence(static_cast<acc_t*>(a.grad_confidence)),
        wants_grad(
            a.grad_logits.data || a.grad_alpha_partials || a.grad_beta_partials || a.grad_confidence) {}

  // exp_u20 (inline polynomial, ~20 ulp in float) is several times faster than the Sleef exp but
  // maps NaN to a finite value, so it serves only blocks whose row maxima are all finite: NaN and
  // inf logits then propagate exactly as in F.cross_entropy.
  static bool all_finite(const acc_t* values, int64_t rows) {
    return std::all_of(values, values + rows, [](acc_t v) { return std::isfinite(v); });
  }
  template <typename Body>
  static void with_exp(bool fast, const Body& body) {
    if (fast) {
      body([](const Vec& x) { return x.exp_u20(); });
    } else {
      body([](const Vec& x) { return x.exp(); });
    }
  }

  // Loss, and gradients when asked, of `rows` rows from first_row; returns the rows' loss sum.
  double operator()(int64_t first_row, int64_t rows, acc_t* grad_alpha, acc_t* grad_beta, acc_t* scratch) const {
    const Geometry& geometry = args.geometry;
    const Strides& in = args.logits.strides;
    const Strides& out = args.grad_logits.strides;
    const int64_t in_base = row_offset(geometry, in, first_row);
    const int64_t out_base = grad_logits ? row_offset(geometry, out, first_row) : 0;
    const int64_t in_step = Layout::vector_stride(in);
    const int64_t out_step = Layout::vector_stride(out);
    const int64_t scratch_stride = Layout::scratch_stride(geometry.classes);

    // Per-row scalars; padding rows keep confidence 0 and coefficient 0.
    alignas(64) acc_t row_confidence[kMaxRows] = {};
    alignas(64) acc_t row_coefficient[kMaxRows] = {};  // dL/dloss[row] * weight[target]; 0 if ignored
    int64_t row_target[kMaxRows];
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t row = first_row + i;
      const int64_t t = args.target[row];
      row_target[i] = t;
      row_confidence[i] = confidence ? confidence[row] : acc_t(1);
      if (t != args.ignore_index) {
        const acc_t upstream = grad_loss ? grad_loss[row] : static_cast<acc_t>(args.grad_scale);
        row_coefficient[i] = upstream * (weight ? weight[t] : acc_t(1));
      }
    }

    const Vec one(1);
    Vec s[kVectors];
    Vec running[kVectors];
    for (int k = 0; k < kVectors; ++k) {
      s[k] = Layout::row_vector(row_confidence, k);
      running[k] = Vec(-std::numeric_limits<acc_t>::infinity());
    }
    auto load_logits = [&](const Step<acc_t>& step, int k) {
      return IO::load(logits + in_base + step.cls * in.cls + k * in_step, step.count(k));
    };
    auto scratch_at = [&](const Step<acc_t>& step, int k) {
      return scratch + Layout::scratch_offset(step, k, scratch_stride);
    };
    acc_t* const logits_copy = scratch + geometry.classes * kMaxRows;  // used if Layout::kCopyLogits

    // Sweep 1: calibrated logits into the scratch, their row max.
    layout.sweep(rows, [&](const Step<acc_t>& step) {
      prefetch_next_block<scalar_t, Layout>(logits, geometry, in, in_base, first_row, rows, step.cls);
      for (int k = 0; k < step.vectors; ++k) {
        const Vec scale = at::vec::fmadd(s[k], step.alpha, one);
        const Vec z = load_logits(step, k);
        if constexpr (Layout::kCopyLogits) {
          z.store(logits_copy + Layout::scratch_offset(step, k, scratch_stride));
        }
        const Vec zhat = at::vec::fmadd(scale, z, s[k] * step.beta);
        const Vec masked = Layout::mask_padding(zhat, step.count(k));
        running[k] = at::vec::maximum(running[k], masked);
        masked.store(scratch_at(step, k));
      }
    });
    Layout::reduce_rows(running, [](const Vec& x, const Vec& y) { return at::vec::maximum(x, y); });
    Vec row_max[kVectors];
    alignas(64) acc_t row_max_values[kMaxRows];
    for (int k = 0; k < kVectors; ++k) {
      row_max[k] = running[k];
      running[k] = Vec(0);
    }
    Layout::store_rows(row_max, row_max_values);

    // Sweep 2: exponentials in place, their row sums.
    with_exp(all_finite(row_max_values, rows), [&](const auto& exp) {
      layout.sweep(rows, [&](const Step<acc_t>& step) {
        for (int k = 0; k < step.vectors; ++k) {
          acc_t* at = scratch_at(step, k);
          const Vec e = exp(Vec::loadu(at) - row_max[k]);
          running[k] += e;
          e.store(at);
        }
      });
    });
    Layout::reduce_rows(running, [](const Vec& x, const Vec& y) { return x + y; });
    alignas(64) acc_t row_sum[kMaxRows];
    Layout::store_rows(running, row_sum);

    // Loss of each row from its target's calibrated logit: weight * (m + log S - zhat[target]).
    double loss_sum = 0;
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t t = row_target[i];
      acc_t row_loss = 0;
      if (t != args.ignore_index) {
        const acc_t z = static_cast<acc_t>(logits[in_base + i * in.spatial + t * in.cls]);
        const acc_t zhat = (1 + row_confidence[i] * alpha[t]) * z + row_confidence[i] * beta[t];
        row_loss = (weight ? weight[t] : acc_t(1)) * (row_max_values[i] + std::log(row_sum[i]) - zhat);
        loss_sum += static_cast<double>(row_loss);
      }
      if (loss) {
        loss[first_row + i] = row_loss;
      }
    }
    if (!wants_grad) {
      return loss_sum;
    }

    // dL/dzhat = (c / S) * e' with e' = e - S at the target: c * (softmax - onehot).
    alignas(64) acc_t row_factor[kMaxRows] = {};
    for (int64_t i = 0; i < rows; ++i) {
      row_factor[i] = row_coefficient[i] / row_sum[i];
      if (row_target[i] != args.ignore_index) {
        scratch[Layout::scratch_index(i, row_target[i], scratch_stride)] -= row_sum[i];
      }
    }
    Vec factor[kVectors];
    for (int k = 0; k < kVectors; ++k) {
      factor[k] = Layout::row_vector(row_factor, k);
      running[k] = Vec(0);
    }

    // Sweep 3: the gradients.
    const bool wants_class_grads = grad_alpha || grad_beta;
    layout.sweep(rows, [&](const Step<acc_t>& step) {
      StepClassGrads<Layout, acc_t> class_grads;
      for (int k = 0; k < step.vectors; ++k) {
        const int64_t count = step.count(k);
        const Vec dzhat = Vec::loadu(scratch_at(step, k)) * factor[k];
        if (grad_logits) {
          IO::store(grad_logits + out_base + step.cls * out.cls + k * out_step,
                    dzhat * at::vec::fmadd(s[k], step.alpha, one), count);
        }
        if (wants_class_grads || grad_confidence) {
          Vec z;
          if constexpr (Layout::kCopyLogits) {
            z = Vec::loadu(logits_copy + Layout::scratch_offset(step, k, scratch_stride));
          } else {
            z = load_logits(step, k);
          }
          if (wants_class_grads) {
            class_grads.add(dzhat * s[k], z);
          }
          if (grad_confidence) {
            running[k] = at::vec::fmadd(dzhat, at::vec::fmadd(step.alpha, z, step.beta), running[k]);
          }
        }
      }
      class_grads.add_to(grad_alpha, grad_beta, step);
    });
    if (grad_confidence) {
      store_row_sums<Layout>(running, rows, grad_confidence + first_row);
    }
    return loss_sum;
  }
};

template <typename scalar_t, template <typename> class LayoutT>
struct CalibrateBlocks {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  using IO = Io<scalar_t>;
  using Layout = LayoutT<acc_t>;
  static constexpr int kVectors = Layout::kVectors;
  static constexpr int64_t kMaxRows = Layout::kMaxRows;

  const CalibrateArgs& args;
  Layout layout;
  const scalar_t* logits;
  const scalar_t* grad;
  scalar_t* out;
  const acc_t* confidence;
  acc_t* grad_confidence;

  explicit CalibrateBlocks(const CalibrateArgs& a)
      : args(a),
        layout{a.geometry.classes, static_cast<const acc_t*>(a.alpha), static_cast<const acc_t*>(a.beta)},
        logits(static_cast<const scalar_t*>(a.logits.data)),
        grad(static_cast<const scalar_t*>(a.grad.data)),
        out(static_cast<scalar_t*>(a.out.data)),
        confidence(static_cast<const acc_t*>(a.confidence)),
        grad_confidence(static_cast<acc_t*>(a.grad_confidence)) {}

  // calibrate: out = zhat. calibrate_backward: out = grad * (1 + s*alpha) and the parameter gradients.
  double operator()(int64_t first_row, int64_t rows, acc_t* grad_alpha, acc_t* grad_beta, acc_t* /*scratch*/)
      const {
    const Geometry& geometry = args.geometry;
    const Strides& in = args.logits.strides;
    const Strides& upstream = args.grad.strides;
    const Strides& result = args.out.strides;
    const int64_t in_base = row_offset(geometry, in, first_row);
    const int64_t grad_base = grad ? row_offset(geometry, upstream, first_row) : 0;
    const int64_t out_base = out ? row_offset(geometry, result, first_row) : 0;
    const int64_t in_step = Layout::vector_stride(in);
    const int64_t grad_step = Layout::vector_stride(upstream);
    const int64_t out_step = Layout::vector_stride(result);

    alignas(64) acc_t row_confidence[kMaxRows] = {};
    for (int64_t i = 0; i < rows; ++i) {
      row_confidence[i] = confidence ? confidence[first_row + i] : acc_t(1);
    }
    const Vec one(1);
    Vec s[kVectors];
    Vec ds[kVectors];
    for (int k = 0; k < kVectors; ++k) {
      s[k] = Layout::row_vector(row_confidence, k);
      ds[k] = Vec(0);
    }
    layout.sweep(rows, [&](const Step<acc_t>& step) {
      prefetch_next_block<scalar_t, Layout>(logits, geometry, in, in_base, first_row, rows, step.cls);
      if (grad) {
        prefetch_next_block<scalar_t, Layout>(grad, geometry, upstream, grad_base, first_row, rows, step.cls);
      }
      StepClassGrads<Layout, acc_t> class_grads;
      for (int k = 0; k < step.vectors; ++k) {
        const int64_t count = step.count(k);
        const Vec z = IO::load(logits + in_base + step.cls * in.cls + k * in_step, count);
        const Vec scale = at::vec::fmadd(s[k], step.alpha, one);
        scalar_t* out_at = out ? out + out_base + step.cls * result.cls + k * out_step : nullptr;
        if (!grad) {
          IO::store(out_at, at::vec::fmadd(scale, z, s[k] * step.beta), count);
          continue;
        }
        const Vec g = IO::load(grad + grad_base + step.cls * upstream.cls + k * grad_step, count);
        if (out_at) {
          IO::store(out_at, g * scale, count);
        }
        class_grads.add(g * s[k], z);
        ds[k] = at::vec::fmadd(g, at::vec::fmadd(step.alpha, z, step.beta), ds[k]);
      }
      class_grads.add_to(grad_alpha, grad_beta, step);
    });
    if (grad_confidence) {
      store_row_sums<Layout>(ds, rows, grad_confidence + first_row);
    }
    return 0;
  }
};

template <typename T>
struct TypeTag {
  using type = T;
};

template <typename Args>
void* scratch_of(const Args& args) {
  if constexpr (std::is_same_v<Args, LossArgs>) {
    return args.scratch;
  } else {
    return nullptr;
  }
}

template <template <typename, template <typename> class> class Blocks, typename Args>
void run(const Args& args, double* sum_partials) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.dtype, "disalign_cpu_kernel", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    int64_t slots = 0;
    int64_t per_thread = 0;
    if constexpr (std::is_same_v<Args, LossArgs>) {
      slots = args.scratch_slots;
      per_thread = args.scratch_per_thread;
    }
    auto launch = [&](auto layout_tag) {
      using Block = typename decltype(layout_tag)::type;
      const Block block(args);
      for_each_chunk<acc_t, typename Block::Layout>(
          args.geometry, args.chunking, args.grad_alpha_partials, args.grad_beta_partials, sum_partials,
          static_cast<acc_t*>(scratch_of(args)), slots, per_thread, block);
    };
    if (args.layout == Layout::kClassesContiguous) {
      launch(TypeTag<Blocks<scalar_t, ClassesContiguous>>{});
    } else {
      launch(TypeTag<Blocks<scalar_t, PixelsContiguous>>{});
    }
  });
}

}  // namespace

void cross_entropy_kernel(const LossArgs& args) {
  run<LossBlocks>(args, args.loss_partials);
}

void calibrate_kernel(const CalibrateArgs& args) {
  run<CalibrateBlocks>(args, nullptr);
}

int64_t loss_scratch_per_thread(Layout layout, c10::ScalarType dtype, int64_t classes) {
  int64_t elements = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "disalign_cpu_scratch", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto of = [&](auto layout_tag) {
      using L = typename decltype(layout_tag)::type;
      return L::scratch_elements(classes);
    };
    elements = layout == Layout::kClassesContiguous ? of(TypeTag<ClassesContiguous<acc_t>>{})
                                                    : of(TypeTag<PixelsContiguous<acc_t>>{});
  });
  return elements;
}

}  // namespace disalign::cpu::CPU_CAPABILITY
