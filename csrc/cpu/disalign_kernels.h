// Per-ISA CPU kernels of the disalign ops.
//
// disalign_kernels.cpp is compiled once per instruction set (setup.py: DEFAULT, AVX2, AVX512), each
// copy in namespace disalign::cpu::<CAPABILITY>; dispatch.cpp (with csrc/common/op_common.h)
// prepares the arguments below (layout, dtype conversions, target checks) once and calls the copy
// chosen for the running CPU. The operand addressing (Strides, Geometry, Layout, View) is
// csrc/common/layout.h, shared with the CUDA kernels.
#pragma once

#include "common/layout.h"

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace disalign::cpu {

// Fixed split of the rows into chunks that depends only on the shape: each chunk owns its partial
// sums of the per-class gradients and of the loss, reduced in chunk order afterwards, so results are
// identical run to run and for any number of threads.
struct Chunking {
  int64_t count;
  int64_t rows_per_chunk;
};

// The kernels' arguments besides the CalibrationOperands (common/layout.h). Arrays named "per
// class" have C entries, "per row" B*S entries; they are contiguous and in the accumulation type
// acc_t (double for double logits, float otherwise), as are all outputs but grad_logits. Optional
// pointers are nullptr when absent / not wanted.
struct LossArgs : CalibrationOperands {
  Chunking chunking;
  c10::ScalarType dtype;  // logits and grad_logits
  const void* weight;     // per class, optional (all ones)
  const int64_t* target;  // per row, validated: ignore_index or in [0, C)
  int64_t ignore_index;
  // Upstream gradient of each row's loss: grad_loss[r] (per row, optional) or else grad_scale
  // (1 for "sum", 1 / sum of valid weights for "mean").
  const void* grad_loss;
  double grad_scale;
  // Outputs.
  void* loss;                 // per row, optional (reduction "none")
  double* loss_partials;      // per chunk sum of the row losses, optional
  MutableView grad_logits;    // optional (data nullptr)
  void* grad_alpha_partials;  // (chunks, C), optional
  void* grad_beta_partials;   // (chunks, C), optional
  void* grad_confidence;      // per row, optional
  // Scratch in acc_t: scratch_slots = min(threads, chunks) slots of scratch_per_thread =
  // loss_scratch_per_thread(...) elements, one per thread of the kernel's parallel_for; a block
  // keeps its calibrated logits, then their exponentials there between its sweeps.
  void* scratch;
  int64_t scratch_slots;
  int64_t scratch_per_thread;
};

// calibrate (grad.data == nullptr): out = calibrated logits.
// calibrate_backward: out = grad_logits (optional) and the partials / grad_confidence from grad.
struct CalibrateArgs : CalibrationOperands {
  Chunking chunking;
  c10::ScalarType dtype;  // logits, grad and out
  View grad;
  MutableView out;
  void* grad_alpha_partials;  // (chunks, C), optional
  void* grad_beta_partials;   // (chunks, C), optional
  void* grad_confidence;      // per row, optional
};

#define DISALIGN_DECLARE_CPU_KERNELS(capability)                        \
  namespace capability {                                                \
  void cross_entropy_kernel(const LossArgs& args);                      \
  void calibrate_kernel(const CalibrateArgs& args);                     \
  int64_t loss_scratch_per_thread(Layout layout, c10::ScalarType dtype, int64_t classes); \
  }

DISALIGN_DECLARE_CPU_KERNELS(DEFAULT)
DISALIGN_DECLARE_CPU_KERNELS(AVX2)
DISALIGN_DECLARE_CPU_KERNELS(AVX512)

#undef DISALIGN_DECLARE_CPU_KERNELS

}  // namespace disalign::cpu
