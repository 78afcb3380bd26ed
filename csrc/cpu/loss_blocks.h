// The fused loss kernel of one instruction set: calibration, softmax statistics, class-weighted
// cross entropy and all its gradients in three sweeps over a block held in the scratch. Included
// only by disalign_kernels.cpp (compiled once per instruction set).
#pragma once

#include "cpu/kernel_common.h"

#include <cmath>
#include <cstring>
#include <limits>

namespace disalign::cpu::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// e^x for x = zhat - (row max) <= 0, in ~14 vector instructions (exp_u20 takes ~20, the Sleef exp
// of the exp floor ~30): x = n ln2 + r with n = round(x / ln2), |r| <= ln2 / 2, e^r by the degree-5
// polynomial of exp_u20, 2^n built in the exponent bits. x < -88 (e^x below FLT_MIN: the result is 0,
// with n = -127 giving 2^n = 0) is clamped; NaN propagates (clamp_min keeps a NaN x, and NaN times
// any 2^n is NaN), so a NaN logit makes its row's sum NaN, as F.cross_entropy does. x > 0 occurs
// only when the row max is not finite, and that row is poisoned anyway (LossBlocks::poison).
// Written with at::vec operations so that every per-ISA copy gets it; double uses the Sleef exp.
template <typename acc_t>
inline Vectorized<acc_t> exp_nonpositive(const Vectorized<acc_t>& value) {
  if constexpr (std::is_same_v<acc_t, float>) {
    using Vec = Vectorized<float>;
    using Int = Vectorized<int32_t>;
    const Vec x = at::vec::clamp_min(value, Vec(-88.0f));
    const Vec n = (x * Vec(1.44269504088896341f)).round();
    const Vec r = at::vec::fmadd(n, Vec(-0.693147180559945309f), x);
    Vec p = at::vec::fmadd(r, Vec(0.00828929059f), Vec(0.0418978221f));
    p = at::vec::fmadd(r, p, Vec(0.166676521f));
    p = at::vec::fmadd(r, p, Vec(0.499991506f));
    p = at::vec::fmadd(r, p, Vec(0.999999701f));
    p = at::vec::fmadd(r, p, Vec(1.0f));
    const Int exponent = (at::vec::convert_to_int_of_same_size(n) + Int(127)) << Int(23);
    return p * at::vec::cast<float>(exponent);
  } else {
    return value.exp();
  }
}

// The fused loss. One exponential per element, three sweeps over a block that stays in L1/L2:
//  1. the calibrated logits zhat into the scratch, and their row max m;
//  2. e = exp(zhat - m) in place in the scratch, and the row sums S of e; then the loss;
//  3. the gradients from e: dL/dzhat = c * (e / S - onehot(target)) for the row's coefficient c
//     (upstream gradient times weight[target]; 0 for an ignored row), written to grad_logits and
//     summed into the alpha / beta / confidence gradients in the same sweep.
// The one-hot term is folded into the scratch before sweep 3 (e[target] -= S), so sweep 3 is the
// same multiply for every element. The number of rows (classes layout) or pixel vectors (pixels
// layout) of a block is a template argument, so every per-row vector is a register and every sweep
// one straight loop (a runtime count would keep them in memory: ~4x the instructions).
//
// exp_u20 (an inline polynomial, ~20 ulp in float) serves every row. It maps NaN to a finite value,
// so a row whose max is not finite (a NaN or an inf in its calibrated logits, or all -inf) gets
// S = NaN: its loss and every gradient it feeds are NaN, as in F.cross_entropy, ignored rows
// included (their c = 0 times NaN); a row's result never depends on which rows share its block.
template <typename scalar_t>
struct LossBlocks {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  using IO = Io<scalar_t>;
  static constexpr int64_t kWidth = Vec::size();
  static constexpr int kRows = kBlockRows;
  // Rows of a pixels block: long class runs while the block's scratch stays within
  // kPixelScratchBytes (C <= 256 in float, e.g. seg-ade's 150 classes), else short ones.
  static constexpr int64_t kPixels = pixels_per_block<acc_t, kPixelRunBytes>();
  static constexpr int64_t kShortPixels = pixels_per_block<acc_t, kShortPixelRunBytes>();
  static constexpr int64_t kPixelScratchBytes = 256 * 1024;
  static_assert(kShortPixels >= kRows, "Rows holds the per-row scalars of every block shape");

  const LossArgs& args;
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
  int64_t pixels;  // rows of a pixels block
  // grad_logits is float and large enough for non-temporal stores (kernel_common.h).
  bool stream;

  explicit LossBlocks(const LossArgs& a)
      : args(a),
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
            a.grad_logits.data || a.grad_alpha_partials || a.grad_beta_partials || a.grad_confidence),
        pixels(pixels_per_block(a.geometry.classes)),
        stream(kStreamingStores && std::is_same_v<scalar_t, float> && a.grad_logits.data &&
               a.geometry.rows() * a.geometry.classes * static_cast<int64_t>(sizeof(scalar_t)) >= kStreamingMinBytes) {}

  static int64_t padded(int64_t classes) {
    return (classes + kWidth - 1) / kWidth * kWidth;
  }
  // Scratch of one thread: classes layout, kRows rows of zhat / e (classes padded to whole
  // vectors); pixels layout, zhat / e and a copy of the logits (class c's run at c * pixels: a
  // block's classes lie a whole image plane apart, which with a power-of-two plane maps them all to
  // the same L1/L2 sets, so sweep 3 reads the copy), then the chunk's per-class vector sums of the
  // alpha and beta gradients.
  static int64_t pixels_per_block(int64_t classes) {
    const bool long_runs = 2 * classes * kPixels * static_cast<int64_t>(sizeof(acc_t)) <= kPixelScratchBytes;
    return long_runs ? kPixels : kShortPixels;
  }
  static int64_t scratch_elements(Layout layout, int64_t classes) {
    return layout == Layout::kClassesContiguous ? kRows * padded(classes)
                                                : 2 * classes * (pixels_per_block(classes) + kWidth);
  }
  int64_t block_rows(const Geometry& geometry, int64_t row, int64_t end) const {
    return cpu::CPU_CAPABILITY::block_rows(args.layout, pixels, geometry, row, end);
  }

  // Per-row scalars of a block; rows past `rows` are padding: confidence and coefficient 0.
  struct Rows {
    alignas(64) acc_t confidence[kPixels] = {};
    alignas(64) acc_t coefficient[kPixels] = {};  // dL/dloss * weight[target]; 0 if ignored
    int64_t target[kPixels];
  };
  void load_rows(int64_t first_row, int64_t rows, Rows& r) const {
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t row = first_row + i;
      const int64_t t = args.target[row];
      r.target[i] = t;
      r.confidence[i] = confidence ? confidence[row] : acc_t(1);
      if (t != args.ignore_index) {
        const acc_t upstream = grad_loss ? grad_loss[row] : static_cast<acc_t>(args.grad_scale);
        r.coefficient[i] = upstream * (weight ? weight[t] : acc_t(1));
      }
    }
  }
  // Each row's loss, weight * (m + log S - zhat[target]); zhat[target] from the logit at row i,
  // class t: logit(i, t). Returns the block's loss sum.
  template <typename Logit>
  double row_losses(int64_t first_row, int64_t rows, const Rows& r, const acc_t* row_max, const acc_t* row_sum,
                    const Logit& logit) const {
    double loss_sum = 0;
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t t = r.target[i];
      acc_t row_loss = 0;
      if (t != args.ignore_index) {
        const acc_t s = r.confidence[i];
        const acc_t zhat = (1 + s * alpha[t]) * logit(i, t) + s * beta[t];
        row_loss = (weight ? weight[t] : acc_t(1)) * (row_max[i] + std::log(row_sum[i]) - zhat);
        loss_sum += static_cast<double>(row_loss);
      }
      if (loss) {
        loss[first_row + i] = row_loss;
      }
    }
    return loss_sum;
  }
  static Vec calibrated(const Vec& z, const Vec& s, const Vec& a, const Vec& b) {
    return at::vec::fmadd(at::vec::fmadd(s, a, Vec(1)), z, s * b);
  }
  static Vec exp(const Vec& x) {
    return exp_nonpositive(x);
  }
  // S of a row whose max m is not finite becomes NaN (m - m is 0 for finite m, else NaN).
  static Vec poison(const Vec& sum, const Vec& max) {
    return sum + (max - max);
  }

  // Chunk hooks: the pixels layout sums its per-class gradients as vectors over the chunk (one
  // horizontal sum per class and chunk instead of per block).
  void begin_chunk(acc_t* scratch) const {
    if (args.layout == Layout::kPixelsContiguous && wants_grad) {
      acc_t* sums = class_sums(scratch);
      std::fill(sums, sums + 2 * args.geometry.classes * kWidth, acc_t(0));
    }
  }
  void end_chunk(acc_t* scratch, acc_t* grad_alpha, acc_t* grad_beta) const {
    if (args.layout != Layout::kPixelsContiguous || !wants_grad) {
      return;
    }
    const int64_t classes = args.geometry.classes;
    const acc_t* sums = class_sums(scratch);
    const auto add = [](const Vec& x, const Vec& y) { return x + y; };
    for (int64_t c = 0; c < classes; ++c) {
      if (grad_alpha) {
        grad_alpha[c] = at::vec::vec_reduce_all<acc_t>(add, Vec::loadu(sums + c * kWidth));
      }
      if (grad_beta) {
        grad_beta[c] = at::vec::vec_reduce_all<acc_t>(add, Vec::loadu(sums + (classes + c) * kWidth));
      }
    }
  }
  acc_t* class_sums(acc_t* scratch) const {
    return scratch + 2 * args.geometry.classes * pixels;
  }

  double operator()(int64_t first_row, int64_t rows, acc_t* grad_alpha, acc_t* grad_beta, acc_t* scratch) const {
    const bool out = grad_logits != nullptr;
    if (args.layout == Layout::kClassesContiguous) {
      return with_block_rows(rows, [&](auto r) {
        return out ? class_rows<r.value, true>(first_row, grad_alpha, grad_beta, scratch)
                   : class_rows<r.value, false>(first_row, grad_alpha, grad_beta, scratch);
      });
    }
    return pixels == kPixels ? pixel_blocks<kPixels>(first_row, rows, out, scratch)
                             : pixel_blocks<kShortPixels>(first_row, rows, out, scratch);
  }
  template <int64_t P>
  double pixel_blocks(int64_t first_row, int64_t rows, bool out, acc_t* scratch) const {
    if (rows == P) {
      return out ? pixel_block<P, true, true>(first_row, rows, scratch) : pixel_block<P, true, false>(first_row, rows, scratch);
    }
    return out ? pixel_block<P, false, true>(first_row, rows, scratch) : pixel_block<P, false, false>(first_row, rows, scratch);
  }

  // One vector of grad_logits: non-temporal when `streaming` (a whole, aligned float vector).
  static void store_grad(scalar_t* data, const Vec& value, int64_t count, bool streaming) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (streaming && count == kWidth) {
        stream_store(data, value);
        return;
      }
    }
    IO::store(data, value, count);
  }

  // Classes contiguous: R rows, vectors along the classes.
  template <int R, bool kGradLogits>
  double class_rows(int64_t first_row, acc_t* grad_alpha, acc_t* grad_beta, acc_t* scratch) const {
    const Geometry& geometry = args.geometry;
    const Strides& in = args.logits.strides;
    const Strides& out_strides = args.grad_logits.strides;
    const int64_t classes = geometry.classes;
    const int64_t body = classes / kWidth * kWidth;
    const int64_t tail = classes - body;
    const int64_t stride = padded(classes);
    const scalar_t* z_row[R];
    scalar_t* out_row[R];
    acc_t* e_row[R];
    const int64_t in_base = row_offset(geometry, in, first_row);
    const int64_t out_base = kGradLogits ? row_offset(geometry, out_strides, first_row) : 0;
    Rows r;
    load_rows(first_row, R, r);
    Vec s[R];
    Vec m[R];
    for (int k = 0; k < R; ++k) {
      z_row[k] = logits + in_base + k * in.spatial;
      out_row[k] = kGradLogits ? grad_logits + out_base + k * out_strides.spatial : nullptr;
      e_row[k] = scratch + k * stride;
      s[k] = Vec(r.confidence[k]);
      m[k] = Vec(-std::numeric_limits<acc_t>::infinity());
    }

    // Sweep 1: zhat into the scratch (padding lanes -inf), running max.
    for (int64_t j = 0; j < body; j += kWidth) {
      const Vec a = Vec::loadu(alpha + j);
      const Vec b = Vec::loadu(beta + j);
      for (int k = 0; k < R; ++k) {
        const Vec zhat = calibrated(IO::load(z_row[k] + j, kWidth), s[k], a, b);
        m[k] = at::vec::clamp_min(m[k], zhat);
        zhat.store(e_row[k] + j);
      }
    }
    if (tail) {
      const Vec a = Vec::loadu(alpha + body, tail);
      const Vec b = Vec::loadu(beta + body, tail);
      const Vec padding(-std::numeric_limits<acc_t>::infinity());
      for (int k = 0; k < R; ++k) {
        const Vec zhat = Vec::set(padding, calibrated(IO::load(z_row[k] + body, tail), s[k], a, b), tail);
        m[k] = at::vec::clamp_min(m[k], zhat);
        zhat.store(e_row[k] + body);
      }
    }
    const auto max_op = [](const Vec& x, const Vec& y) { return at::vec::maximum(x, y); };
    const auto add_op = [](const Vec& x, const Vec& y) { return x + y; };
    alignas(64) acc_t row_max[R];
    Vec sum[R];
    for (int k = 0; k < R; ++k) {
      row_max[k] = at::vec::vec_reduce_all<acc_t>(max_op, m[k]);
      m[k] = Vec(row_max[k]);
      sum[k] = Vec(0);
    }

    // Sweep 2: exponentials in place, row sums.
    for (int64_t j = 0; j < stride; j += kWidth) {
      for (int k = 0; k < R; ++k) {
        const Vec e = exp(Vec::loadu(e_row[k] + j) - m[k]);
        sum[k] += e;
        e.store(e_row[k] + j);
      }
    }
    alignas(64) acc_t row_sum[R];
    for (int k = 0; k < R; ++k) {
      row_sum[k] = at::vec::vec_reduce_all<acc_t>(add_op, poison(sum[k], m[k]));
    }
    const double loss_sum = row_losses(first_row, R, r, row_max, row_sum, [&](int64_t i, int64_t t) {
      return static_cast<acc_t>(z_row[i][t]);
    });
    if (!wants_grad) {
      return loss_sum;
    }

    // dL/dzhat = (c / S) * e' with e' = e - S at the target: c * (softmax - onehot).
    Vec factor[R];
    Vec ds[R];
    for (int k = 0; k < R; ++k) {
      factor[k] = Vec(r.coefficient[k] / row_sum[k]);
      ds[k] = Vec(0);
      if (r.target[k] != args.ignore_index) {
        e_row[k][r.target[k]] -= row_sum[k];
      }
    }

    // Non-temporal rows (`stream`), whole cache lines only: a row that starts on a line is
    // written from sweep 3 (its last, partial line with plain stores); any other row is staged in
    // its scratch row (each e is read at its own j before its gradient overwrites it) and copied
    // out after the sweep (stream_copy).
    const int64_t line_body = classes / kLineElements * kLineElements;
    bool stream_row[R];
    bool staged_row[R];
    for (int k = 0; k < R; ++k) {
      stream_row[k] = kGradLogits && stream && line_aligned(out_row[k]);
      staged_row[k] = kGradLogits && stream && !stream_row[k];
    }
    // Sweep 3: the gradients.
    const auto step = [&](int64_t j, int64_t count) {
      const Vec a = Vec::loadu(alpha + j, count);
      const Vec b = Vec::loadu(beta + j, count);
      ParamGrads<acc_t> params;
      for (int k = 0; k < R; ++k) {
        const Vec dzhat = Vec::loadu(e_row[k] + j) * factor[k];
        if constexpr (kGradLogits) {
          const Vec grad = dzhat * at::vec::fmadd(s[k], a, Vec(1));
          if (staged_row[k]) {
            grad.store(e_row[k] + j);  // rows of the scratch are padded to whole vectors
          } else {
            store_grad(out_row[k] + j, grad, count, stream_row[k] && j < line_body);
          }
        }
        params.add(dzhat, s[k], IO::load(z_row[k] + j, count), a, b, ds[k]);
      }
      params.add_to(grad_alpha, grad_beta, j, count);
    };
    for (int64_t j = 0; j < body; j += kWidth) {
      step(j, kWidth);
    }
    if (tail) {
      step(body, tail);
    }
    if constexpr (kGradLogits && std::is_same_v<scalar_t, float>) {
      if (stream) {
        for (int k = 0; k < R; ++k) {
          if (staged_row[k]) {
            stream_copy(out_row[k], e_row[k], classes);
          }
        }
        stream_fence();
      }
    }
    if (grad_confidence) {
      for (int k = 0; k < R; ++k) {
        grad_confidence[first_row + k] = at::vec::vec_reduce_all<acc_t>(add_op, ds[k]);
      }
    }
    return loss_sum;
  }

  // Pixels contiguous: P consecutive pixels (lanes are rows), the sweeps run over the classes.
  // kFull: all P rows present; else the last vectors are partial or empty.
  template <int64_t P, bool kFull, bool kGradLogits>
  double pixel_block(int64_t first_row, int64_t rows, acc_t* scratch) const {
    constexpr int V = static_cast<int>(P / kWidth);
    const Geometry& geometry = args.geometry;
    const Strides& in = args.logits.strides;
    const Strides& out_strides = args.grad_logits.strides;
    const int64_t classes = geometry.classes;
    const scalar_t* z_block = logits + row_offset(geometry, in, first_row);
    scalar_t* out_block = kGradLogits ? grad_logits + row_offset(geometry, out_strides, first_row) : nullptr;
    acc_t* const e_block = scratch;
    acc_t* const z_copy = scratch + classes * P;
    acc_t* const sums = class_sums(scratch);
    int64_t count[V];
    for (int k = 0; k < V; ++k) {
      count[k] = kFull ? kWidth : std::clamp<int64_t>(rows - k * kWidth, 0, kWidth);
    }
    const auto load = [&](const scalar_t* at, int k) {
      return kFull ? IO::load(at, kWidth) : IO::load(at, count[k]);
    };
    Rows r;
    load_rows(first_row, rows, r);
    Vec s[V];
    Vec m[V];
    for (int k = 0; k < V; ++k) {
      s[k] = Vec::loadu(r.confidence + k * kWidth);
      m[k] = Vec(-std::numeric_limits<acc_t>::infinity());
    }

    // Sweep 1: the logits copied, zhat into the scratch, running max per lane.
    for (int64_t c = 0; c < classes; ++c) {
      const Vec a(alpha[c]);
      const Vec b(beta[c]);
      const scalar_t* z_at = z_block + c * in.cls;
      for (int k = 0; k < V; ++k) {
        const Vec z = load(z_at + k * kWidth, k);
        z.store(z_copy + c * P + k * kWidth);
        const Vec zhat = calibrated(z, s[k], a, b);
        m[k] = at::vec::clamp_min(m[k], zhat);
        zhat.store(e_block + c * P + k * kWidth);
      }
    }
    // Sweep 2: exponentials in place, sums per lane.
    Vec sum[V];
    for (int k = 0; k < V; ++k) {
      sum[k] = Vec(0);
    }
    for (int64_t c = 0; c < classes; ++c) {
      acc_t* e_at = e_block + c * P;
      for (int k = 0; k < V; ++k) {
        const Vec e = exp(Vec::loadu(e_at + k * kWidth) - m[k]);
        sum[k] += e;
        e.store(e_at + k * kWidth);
      }
    }
    alignas(64) acc_t row_max[P];
    alignas(64) acc_t row_sum[P];
    for (int k = 0; k < V; ++k) {
      m[k].store(row_max + k * kWidth);
      poison(sum[k], m[k]).store(row_sum + k * kWidth);
    }
    const double loss_sum = row_losses(first_row, rows, r, row_max, row_sum, [&](int64_t i, int64_t t) {
      return z_copy[t * P + i];
    });
    if (!wants_grad) {
      return loss_sum;
    }

    alignas(64) acc_t row_factor[P] = {};
    for (int64_t i = 0; i < rows; ++i) {
      row_factor[i] = r.coefficient[i] / row_sum[i];
      if (r.target[i] != args.ignore_index) {
        e_block[r.target[i] * P + i] -= row_sum[i];
      }
    }
    // Every run of the block starts aligned when the first one does and the class stride keeps it so.
    const bool stream_block = kGradLogits && stream && vector_aligned(out_block) &&
                              out_strides.cls * static_cast<int64_t>(sizeof(scalar_t)) % sizeof(Vec) == 0;
    Vec factor[V];
    Vec ds[V];
    for (int k = 0; k < V; ++k) {
      factor[k] = Vec::loadu(row_factor + k * kWidth);
      ds[k] = Vec(0);
    }
    // Sweep 3: the gradients; the per-class sums stay vectors until the chunk ends.
    for (int64_t c = 0; c < classes; ++c) {
      const Vec a(alpha[c]);
      const Vec b(beta[c]);
      const acc_t* e_at = e_block + c * P;
      const acc_t* z_at = z_copy + c * P;
      ParamGrads<acc_t> params;
      for (int k = 0; k < V; ++k) {
        const Vec dzhat = Vec::loadu(e_at + k * kWidth) * factor[k];
        if constexpr (kGradLogits) {
          store_grad(out_block + c * out_strides.cls + k * kWidth, dzhat * at::vec::fmadd(s[k], a, Vec(1)),
                     count[k], kFull && stream_block);
        }
        params.add(dzhat, s[k], Vec::loadu(z_at + k * kWidth), a, b, ds[k]);
      }
      acc_t* da_at = sums + c * kWidth;
      acc_t* db_at = sums + (classes + c) * kWidth;
      (Vec::loadu(da_at) + params.da).store(da_at);
      (Vec::loadu(db_at) + params.db).store(db_at);
    }
    if (stream_block) {
      stream_fence();
    }
    if (grad_confidence) {
      alignas(64) acc_t values[P];
      for (int k = 0; k < V; ++k) {
        ds[k].store(values + k * kWidth);
      }
      std::memcpy(grad_confidence + first_row, values, rows * sizeof(acc_t));
    }
    return loss_sum;
  }
};

}  // namespace
}  // namespace disalign::cpu::CPU_CAPABILITY
