// The torch-free vocabulary shared by the kernels and the torch bindings of every device: how an
// operand of the logits' shape is addressed, the operands every kernel reads, and the loss
// reduction. Included by the CPU kernel
// header and by the CUDA kernel header, whose .cu files must not see any torch header, so this file
// includes standard headers only.
#pragma once

#include <cstdint>

namespace disalign {

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

// Which axis every operand has contiguous, i.e. what the kernels vectorise along (CPU) or stage
// tiles of through shared memory (CUDA): the classes ((N, C), channels-last) or the pixels (NCHW,
// transposed (N, C)).
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

// The operands every kernel of every device reads, the base of each kernel's argument struct: the
// logits in their layout, and the calibration parameters per class (C entries) and per row (B*S
// entries), contiguous and in the accumulation type (double for double logits, float otherwise).
struct CalibrationOperands {
  Geometry geometry;
  Layout layout;
  View logits;
  const void* alpha;       // per class
  const void* beta;        // per class
  const void* confidence;  // per row, optional (nullptr: all ones)
};

enum class Reduction { kNone, kMean, kSum };

}  // namespace disalign
