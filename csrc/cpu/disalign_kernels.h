// Per-ISA CPU kernels of the disalign ops.
//
// disalign_kernels.cpp is compiled once per instruction set (setup.py: DEFAULT, AVX2, AVX512), each
// copy in namespace disalign::cpu::<CAPABILITY>; dispatch.cpp prepares the arguments below (layout,
// dtype conversions, target checks) once and calls the copy chosen for the running CPU.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace disalign::cpu {

// Logits (N, C, d1, ..., dk) seen as (B, C, S): element (row r = b*S + s, class j) of an operand is
// at b*batch + j*cls + s*spatial (element strides of that operand). Rows follow the row-major order
// of target, so row r is target.flatten()[r].
struct Strides {
  int64_t batch;
  int64_t cls;
  int64_t spatial;
};

struct Geometry {
  int64_t batch;
  int64_t classes;
  int64_t spatial;
  int64_t rows() const {
    return batch * spatial;
  }
};

// How the kernels vectorise: along classes (every operand has cls == 1) or along pixels (every
// operand has spatial == 1, NCHW-like layouts).
enum class Layout { kClassesContiguous, kPixelsContiguous };

// Fixed split of the rows into chunks that depends only on the shape: each chunk owns its partial
// sums of the per-class gradients and of the loss, reduced in chunk order afterwards, so results are
// identical run to run and for any number of threads.
struct Chunking {
  int64_t count;
  int64_t rows_per_chunk;
};

// A tensor operand of the kernels, in the logits' dtype, with its strides in the (B, C, S) view.
struct View {
  const void* data;
  Strides strides;
};

struct MutableView {
  void* data;
  Strides strides;
};

// Arrays named "per class" have C entries, "per row" B*S entries; they are contiguous and in the
// accumulation type acc_t (double for double logits, float otherwise), as are all outputs but
// grad_logits. Optional pointers are nullptr when absent / not wanted.
struct LossArgs {
  Geometry geometry;
  Layout layout;
  Chunking chunking;
  c10::ScalarType dtype;  // logits and grad_logits
  View logits;
  const void* alpha;       // per class
  const void* beta;        // per class
  const void* weight;      // per class, optional (all ones)
  const int64_t* target;   // per row, validated: ignore_index or in [0, C)
  const void* confidence;  // per row, optional (all ones)
  int64_t ignore_index;
  // Upstream gradient of each row's loss: grad_loss[r] (per row, optional) or else grad_scale
  // (1 for "sum", 1 / sum of valid weights for "mean").
  const void* grad_loss;
  double grad_scale;
  // Outputs.
  void* loss;                  // per row, optional (reduction "none")
  double* loss_partials;       // per chunk sum of the row losses, optional
  MutableView grad_logits;     // optional (data nullptr)
  void* grad_alpha_partials;   // (chunks, C), optional
  void* grad_beta_partials;    // (chunks, C), optional
  void* grad_confidence;       // per row, optional
};

// calibrate (grad.data == nullptr): out = calibrated logits.
// calibrate_backward: out = grad_logits (optional) and the partials / grad_confidence from grad.
struct CalibrateArgs {
  Geometry geometry;
  Layout layout;
  Chunking chunking;
  c10::ScalarType dtype;  // logits, grad and out
  View logits;
  View grad;
  const void* alpha;       // per class
  const void* beta;        // per class
  const void* confidence;  // per row, optional
  MutableView out;
  void* grad_alpha_partials;  // (chunks, C), optional
  void* grad_beta_partials;   // (chunks, C), optional
  void* grad_confidence;      // per row, optional
};

#define DISALIGN_DECLARE_CPU_KERNELS(capability)    \
  namespace capability {                            \
  void cross_entropy_kernel(const LossArgs& args);  \
  void calibrate_kernel(const CalibrateArgs& args); \
  }

DISALIGN_DECLARE_CPU_KERNELS(DEFAULT)
DISALIGN_DECLARE_CPU_KERNELS(AVX2)
DISALIGN_DECLARE_CPU_KERNELS(AVX512)

#undef DISALIGN_DECLARE_CPU_KERNELS

}  // namespace disalign::cpu
