// Launchers of the CUDA kernels of the disalign ops (csrc/cuda/disalign_kernels.cu).
//
// This header is shared by the torch-free kernel file and the torch binding (disalign_cuda.cpp), so it
// includes CUDA's own runtime header only. The binding canonicalises the layout, allocates the
// outputs and the workspace, converts the small operands and passes raw pointers here.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace disalign::cuda {

enum class ScalarType { kHalf, kBFloat16, kFloat, kDouble };

enum class Reduction { kNone, kMean, kSum };

// Logits (N, C, d1, ..., dk) seen as (B, C, S), as in csrc/cpu: element (row r = b*S + s, class j)
// of an operand is at b*batch + j*cls + s*spatial (element strides of that operand). Rows follow the
// row-major order of target, so row r is target.flatten()[r].
struct Strides {
  int64_t batch;
  int64_t cls;
  int64_t spatial;
};

struct Geometry {
  int64_t batch;
  int64_t classes;
  int64_t spatial;
};

// Which axis of the logits is contiguous: the kernels stage tiles of rows (kClassesContiguous:
// (N, C), NHWC) or of pixels (kPixelsContiguous: NCHW, transposed (N, C)) through shared memory.
enum class Layout { kClassesContiguous, kPixelsContiguous };

// An operand in the logits' dtype with its (B, C, S) strides.
struct View {
  const void* data;
  Strides strides;
};

struct MutableView {
  void* data;  // nullptr when not wanted
  Strides strides;
};

// Arrays named "per class" have C entries and "per row" B*S entries; they are contiguous and in the
// accumulation type (double for double logits, float otherwise), as are all outputs but
// grad_logits. Optional pointers are nullptr when absent / not wanted.
struct LossArgs {
  Geometry geometry;
  Layout layout;
  ScalarType dtype;  // logits and grad_logits
  View logits;
  const void* target;  // per row, int64 or int32
  bool target_is_int64;
  const void* alpha;       // per class
  const void* beta;        // per class
  const void* weight;      // per class, optional (all ones)
  const void* confidence;  // per row, optional (all ones)
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
  // get a NaN loss and NaN gradients, so a reduced loss is NaN. When bad_target is given (an int64
  // on the device holding ignore_index) the first such value seen is also stored there.
  int64_t* bad_target;
};

// calibrate_backward: gradients of zhat = (1 + s*alpha) * z + s*beta for the upstream gradient grad.
struct CalibrateBackwardArgs {
  Geometry geometry;
  Layout layout;
  ScalarType dtype;  // logits, grad and grad_logits
  View logits;
  View grad;
  const void* alpha;       // per class
  const void* beta;        // per class
  const void* confidence;  // per row, optional
  MutableView grad_logits;
  void* grad_alpha;       // per class, optional
  void* grad_beta;        // per class, optional
  void* grad_confidence;  // per row, optional
};

// calibrate: out = (1 + s*alpha) * z + s*beta in the logits' dtype.
struct CalibrateArgs {
  Geometry geometry;
  Layout layout;     // of the logits: the kernel walks their contiguous axis
  ScalarType dtype;  // logits and out
  View logits;
  MutableView out;
  const void* alpha;       // per class
  const void* beta;        // per class
  const void* confidence;  // per row, optional
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
