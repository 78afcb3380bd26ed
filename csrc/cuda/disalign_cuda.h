// Launchers of the CUDA kernels of the disalign ops (loss_kernels.cu, calibrate_backward.cu,
// calibrate_kernel.cu; tile planning in plan.h).
//
// This header is shared by the torch-free kernel file and the torch binding (disalign_cuda.cpp), so it
// includes CUDA's own runtime header and the torch-free common/layout.h only. The binding (with
// csrc/common/op_common.h) canonicalises the layout, allocates the outputs and the workspace,
// converts the small operands and passes raw pointers here.
#pragma once

#include "common/layout.h"

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace disalign::cuda {

enum class ScalarType { kHalf, kBFloat16, kFloat, kDouble };

// The launchers' arguments besides the CalibrationOperands (common/layout.h). Arrays named "per
// class" have C entries and "per row" B*S entries; they are contiguous and in the accumulation type
// (double for double logits, float otherwise), as are all outputs but grad_logits. Optional
// pointers are nullptr when absent / not wanted.
struct LossArgs : CalibrationOperands {
  ScalarType dtype;    // logits and grad_logits
  const void* target;  // per row, int64 or int32
  bool target_is_int64;
  const void* weight;  // per class, optional (all ones)
  int64_t ignore_index;
  Reduction reduction;
  // Upstream gradient of each row's loss for the "none" backward (per row); otherwise nullptr and
  // the rows' upstream gradient is 1 ("sum") or 1 / sum of the valid weights ("mean").
  const void* grad_loss;
  // Outputs.
  void* loss;  // per row ("none" forward) or a scalar ("mean" / "sum"), optional
  MutableView grad_logits;
  void* grad_alpha;       // per class, optional
  void* grad_beta;        // per class, optional
  void* grad_confidence;  // per row, optional
  // Out-of-range targets (neither ignore_index nor in [0, C)) are never used as an index: their rows
  // get a NaN loss and NaN gradients (dlogits row, their dalpha / dbeta / dconfidence terms), so a
  // reduced loss is NaN. The Python front-end checks the values first when DISALIGN_CHECK_TARGETS=1.
};

// calibrate_backward: gradients of zhat = (1 + s*alpha) * z + s*beta for the upstream gradient grad.
struct CalibrateBackwardArgs : CalibrationOperands {
  ScalarType dtype;  // logits, grad and grad_logits
  View grad;
  MutableView grad_logits;
  void* grad_alpha;       // per class, optional
  void* grad_beta;        // per class, optional
  void* grad_confidence;  // per row, optional
};

// calibrate: out = (1 + s*alpha) * z + s*beta in the logits' dtype (the kernel walks the logits'
// contiguous axis).
struct CalibrateArgs : CalibrationOperands {
  ScalarType dtype;  // logits and out
  MutableView out;
};

// Bytes of device workspace the call needs (for the current device); pass a buffer of at least that
// size, 16-byte aligned. The results depend only on the shapes, strides and device, never on timing:
// every reduction runs in a fixed order (no floating-point atomics).
size_t cross_entropy_workspace_bytes(const LossArgs& args);
cudaError_t cross_entropy(const LossArgs& args, void* workspace, cudaStream_t stream);

size_t calibrate_backward_workspace_bytes(const CalibrateBackwardArgs& args);
cudaError_t calibrate_backward(const CalibrateBackwardArgs& args, void* workspace, cudaStream_t stream);

cudaError_t calibrate(const CalibrateArgs& args, cudaStream_t stream);

}  // namespace disalign::cuda
