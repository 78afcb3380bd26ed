// The calibration kernels of one instruction set: calibrate (out = zhat, paper eq. 6) and
// calibrate_backward (out = grad * (1 + s*alpha) and the alpha / beta / confidence gradients), one
// sweep over each block. Included only by disalign_kernels.cpp (compiled once per instruction set).
#pragma once

#include "cpu/kernel_common.h"

#include <cstring>

namespace disalign::cpu::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

template <typename scalar_t>
struct CalibrateBlocks {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  using IO = Io<scalar_t>;
  static constexpr int64_t kWidth = Vec::size();
  static constexpr int64_t kPixels = pixels_per_block<acc_t>();

  const CalibrateArgs& args;
  const scalar_t* logits;
  const scalar_t* grad;
  scalar_t* out;
  const acc_t* alpha;
  const acc_t* beta;
  const acc_t* confidence;
  acc_t* grad_confidence;

  explicit CalibrateBlocks(const CalibrateArgs& a)
      : args(a),
        logits(static_cast<const scalar_t*>(a.logits.data)),
        grad(static_cast<const scalar_t*>(a.grad.data)),
        out(static_cast<scalar_t*>(a.out.data)),
        alpha(static_cast<const acc_t*>(a.alpha)),
        beta(static_cast<const acc_t*>(a.beta)),
        confidence(static_cast<const acc_t*>(a.confidence)),
        grad_confidence(static_cast<acc_t*>(a.grad_confidence)) {}

  int64_t block_rows(const Geometry& geometry, int64_t row, int64_t end) const {
    return cpu::CPU_CAPABILITY::block_rows(args.layout, kPixels, geometry, row, end);
  }
  void begin_chunk(acc_t* /*scratch*/) const {}
  void end_chunk(acc_t* /*scratch*/, acc_t* /*grad_alpha*/, acc_t* /*grad_beta*/) const {}

  double operator()(int64_t first_row, int64_t rows, acc_t* grad_alpha, acc_t* grad_beta, acc_t* /*scratch*/)
      const {
    if (args.layout == Layout::kClassesContiguous) {
      return with_block_rows(rows, [&](auto r) {
        return grad ? class_rows<r.value, true>(first_row, grad_alpha, grad_beta)
                    : class_rows<r.value, false>(first_row, nullptr, nullptr);
      });
    }
    if (rows == kPixels) {
      return grad ? pixel_block<true, true>(first_row, rows, grad_alpha, grad_beta)
                  : pixel_block<true, false>(first_row, rows, nullptr, nullptr);
    }
    return grad ? pixel_block<false, true>(first_row, rows, grad_alpha, grad_beta)
                : pixel_block<false, false>(first_row, rows, nullptr, nullptr);
  }

  // kBackward: from grad, the parameter gradients and (when wanted) out = grad * (1 + s*a);
  // else out = zhat. Per row: the operands' row pointers.
  template <int R, bool kBackward>
  double class_rows(int64_t first_row, acc_t* grad_alpha, acc_t* grad_beta) const {
    const Geometry& geometry = args.geometry;
    const int64_t classes = geometry.classes;
    const int64_t body = classes / kWidth * kWidth;
    const scalar_t* z_row[R];
    const scalar_t* g_row[R];
    scalar_t* out_row[R];
    Vec s[R];
    Vec ds[R];
    for (int k = 0; k < R; ++k) {
      const int64_t row = first_row + k;
      z_row[k] = logits + row_offset(geometry, args.logits.strides, row);
      g_row[k] = kBackward ? grad + row_offset(geometry, args.grad.strides, row) : nullptr;
      out_row[k] = out ? out + row_offset(geometry, args.out.strides, row) : nullptr;
      s[k] = Vec(confidence ? confidence[row] : acc_t(1));
      ds[k] = Vec(0);
    }
    const auto step = [&](int64_t j, int64_t count) {
      const Vec a = Vec::loadu(alpha + j, count);
      const Vec b = Vec::loadu(beta + j, count);
      ParamGrads<acc_t> params;
      for (int k = 0; k < R; ++k) {
        const Vec z = IO::load(z_row[k] + j, count);
        const Vec scale = at::vec::fmadd(s[k], a, Vec(1));
        if constexpr (!kBackward) {
          IO::store(out_row[k] + j, at::vec::fmadd(scale, z, s[k] * b), count);
        } else {
          const Vec g = IO::load(g_row[k] + j, count);
          if (out_row[k]) {
            IO::store(out_row[k] + j, g * scale, count);
          }
          params.add(g, s[k], z, a, b, ds[k]);
        }
      }
      if constexpr (kBackward) {
        params.add_to(grad_alpha, grad_beta, j, count);
      }
    };
    for (int64_t j = 0; j < body; j += kWidth) {
      step(j, kWidth);
    }
    if (body < classes) {
      step(body, classes - body);
    }
    if (kBackward && grad_confidence) {
      const auto add = [](const Vec& x, const Vec& y) { return x + y; };
      for (int k = 0; k < R; ++k) {
        grad_confidence[first_row + k] = at::vec::vec_reduce_all<acc_t>(add, ds[k]);
      }
    }
    return 0;
  }

  // kFull: all kPixels rows of the block present; else the last vectors are partial or empty.
  template <bool kFull, bool kBackward>
  double pixel_block(int64_t first_row, int64_t rows, acc_t* grad_alpha, acc_t* grad_beta) const {
    constexpr int V = pixel_vectors<acc_t>();
    const Geometry& geometry = args.geometry;
    const Strides& in = args.logits.strides;
    const Strides& upstream = args.grad.strides;
    const Strides& result = args.out.strides;
    const scalar_t* z_block = logits + row_offset(geometry, in, first_row);
    const scalar_t* g_block = kBackward ? grad + row_offset(geometry, upstream, first_row) : nullptr;
    scalar_t* out_block = out ? out + row_offset(geometry, result, first_row) : nullptr;
    int64_t count[V];
    alignas(64) acc_t row_confidence[kPixels] = {};
    for (int k = 0; k < V; ++k) {
      count[k] = kFull ? kWidth : std::clamp<int64_t>(rows - k * kWidth, 0, kWidth);
    }
    for (int64_t i = 0; i < rows; ++i) {
      row_confidence[i] = confidence ? confidence[first_row + i] : acc_t(1);
    }
    Vec s[V];
    Vec ds[V];
    for (int k = 0; k < V; ++k) {
      s[k] = Vec::loadu(row_confidence + k * kWidth);
      ds[k] = Vec(0);
    }
    const auto add = [](const Vec& x, const Vec& y) { return x + y; };
    for (int64_t c = 0; c < geometry.classes; ++c) {
      const Vec a(alpha[c]);
      const Vec b(beta[c]);
      ParamGrads<acc_t> params;
      for (int k = 0; k < V; ++k) {
        const Vec z = IO::load(z_block + c * in.cls + k * kWidth, count[k]);
        const Vec scale = at::vec::fmadd(s[k], a, Vec(1));
        scalar_t* out_at = out_block ? out_block + c * result.cls + k * kWidth : nullptr;
        if constexpr (!kBackward) {
          IO::store(out_at, at::vec::fmadd(scale, z, s[k] * b), count[k]);
        } else {
          const Vec g = IO::load(g_block + c * upstream.cls + k * kWidth, count[k]);
          if (out_at) {
            IO::store(out_at, g * scale, count[k]);
          }
          params.add(g, s[k], z, a, b, ds[k]);
        }
      }
      if constexpr (kBackward) {
        if (grad_alpha) {
          grad_alpha[c] += at::vec::vec_reduce_all<acc_t>(add, params.da);
        }
        if (grad_beta) {
          grad_beta[c] += at::vec::vec_reduce_all<acc_t>(add, params.db);
        }
      }
    }
    if (kBackward && grad_confidence) {
      alignas(64) acc_t values[kPixels];
      for (int k = 0; k < V; ++k) {
        ds[k].store(values + k * kWidth);
      }
      std::memcpy(grad_confidence + first_row, values, rows * sizeof(acc_t));
    }
    return 0;
  }
};

}  // namespace
}  // namespace disalign::cpu::CPU_CAPABILITY
