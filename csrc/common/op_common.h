// The device-independent part of the torch bindings of the disalign ops, shared by the CPU
// (csrc/cpu/dispatch.cpp) and CUDA (csrc/cuda/disalign_cuda.cpp) registrations: argument checks,
// layout planning, the small operands in the accumulation type and the gradient outputs.
//
// A binding supplies only what is device-specific (per-class gradient buffers, target handling,
// workspaces, stream, kernel launch) as a class with the static members below, which run after the
// shared checks, and registers it for its dispatch key with register_ops.
//   std::pair<at::Tensor, Gradients> loss(
//       const LossInputs&, Reduction, const std::optional<at::Tensor>& grad_loss, GradMask);
//     The fused cross entropy: the loss and the gradients asked for. grad_loss (per row) is given
//     for the "none" backward (no loss); otherwise the rows' upstream gradient is 1 ("sum") or
//     1 / sum of the valid weights ("mean").
//   at::Tensor calibrate(const CalibrateInputs&);
//   Gradients calibrate_backward(const at::Tensor& grad, const CalibrateInputs&, GradMask);
#pragma once

#include "common/layout.h"

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace disalign {

using GradMask = std::array<bool, 4>;  // [logits, alpha, beta, confidence]

// The operands of the ops as their schemas (csrc/disalign.cpp) pass them.
struct CalibrateInputs {
  const at::Tensor& logits;
  const at::Tensor& alpha;
  const at::Tensor& beta;
  const std::optional<at::Tensor>& confidence;
};

struct LossInputs {
  const at::Tensor& logits;
  const at::Tensor& target;
  const at::Tensor& alpha;
  const at::Tensor& beta;
  const std::optional<at::Tensor>& confidence;
  const std::optional<at::Tensor>& weight;
  int64_t ignore_index;
  CalibrateInputs calibrate_inputs() const {
    return {logits, alpha, beta, confidence};
  }
};

// In grad_mask order; a gradient that is not asked for is an empty (0-element) tensor.
struct Gradients {
  at::Tensor logits, alpha, beta, confidence;
};

// Data pointers for the kernels' argument structs: nullptr for an absent (undefined) tensor.
inline const void* data_or_null(const std::optional<at::Tensor>& t) {
  return t ? t->const_data_ptr() : nullptr;
}

inline void* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr() : nullptr;
}

// t in `dtype` and contiguous: t itself when it already is (without a dispatcher call: each costs
// microseconds when a training step's glue runs with cold caches), else a contiguous copy in dtype.
// Not t.to(dtype, ..., MemoryFormat::Contiguous): that returns t itself, not contiguous, whenever
// the dtype matches and t's suggested format is the contiguous one (a slice, or an expanded
// gradient such as the stride-0 one of loss.sum().backward()).
inline at::Tensor contiguous_as(const at::Tensor& t, at::ScalarType dtype) {
  if (t.scalar_type() == dtype && t.is_contiguous()) {
    return t;
  }
  return t.to(dtype).contiguous();
}

// ---------------------------------------------------------------------------------------------
// Argument checks: the rules of disalign_ops/_validation.py, which the Python front end applies
// first, with the same messages; they keep direct torch.ops calls memory safe.

void check_calibrate_inputs(const CalibrateInputs& in);
void check_calibrate_backward_inputs(const at::Tensor& grad, const CalibrateInputs& in);
void check_loss_inputs(const LossInputs& in);
void check_loss_backward_inputs(const at::Tensor& grad_loss, const LossInputs& in);

// grad_mask as the schemas pass it (bool[]), checked to have its four entries.
GradMask parse_grad_mask(const c10::List<bool>& grad_mask);

// The reduction of a cross_entropy call; with "none" it computes no gradients, so grad_mask must
// be all false (cross_entropy_backward computes them).
Reduction parse_reduction(c10::string_view reduction, GradMask grad_mask);

// Rejects a target value that is neither ignore_index nor a class in [0, C).
inline void check_target(int64_t value, int64_t classes, int64_t ignore_index) {
  TORCH_CHECK_INDEX(
      value == ignore_index || (value >= 0 && value < classes), "target contains ", value,
      ", which is outside [0, C) = [0, ", classes, ") and is not ignore_index=", ignore_index);
}

// ---------------------------------------------------------------------------------------------
// Layout: every operand of the logits' shape is seen as (B, C, S) with its own strides.

Geometry geometry_of(const at::Tensor& logits);

// How logits without spatial dims ((N, C), possibly transposed) are planned. As one image of N
// pixels, (B, C, S) = (1, C, N), a transposed (N, C) is read along its contiguous rows: the CPU
// kernels take every (N, C) this way (an (N, C) then runs in blocks of rows), the CUDA kernels
// only transposed ones (an (N, C) stays N images of one pixel).
enum class RowsWithoutSpatialDims { kOneImage, kOneImageIfTransposed };

struct LayoutPlan {
  Geometry geometry;
  Layout layout;
  std::vector<at::Tensor> inputs;  // possibly contiguous copies of the inputs
  std::vector<Strides> input_strides;
  at::Tensor out;  // the tensor the kernel writes (the output itself, or a contiguous stand-in)
  Strides out_strides;

  View input(size_t i) const {
    return {inputs[i].const_data_ptr(), input_strides[i]};
  }
  MutableView output() const {
    return {data_or_null(out), out_strides};
  }
};

// Reads the inputs (and writes out, if defined) in place when their strides allow one of the two
// kernel layouts (NCHW, NHWC, transposed, sliced along the batch, ...); otherwise plans contiguous
// copies. All have the logits' shape.
LayoutPlan plan_layout(
    const std::vector<at::Tensor>& inputs,
    const at::Tensor& out,
    RowsWithoutSpatialDims rows_without_spatial_dims);

// ---------------------------------------------------------------------------------------------
// Operands and outputs of a kernel call.

// A per-row gradient output shaped like `like` (empty_like: its dtype and strides, as the fake
// kernel says) and the contiguous accumulation-type buffer the kernel writes (the output itself
// when possible).
struct AccOutput {
  at::Tensor result;
  at::Tensor buffer;
  AccOutput(const at::Tensor& like, at::ScalarType acc);
  at::Tensor finish() const;
};

// Turns a device's per-class gradient buffer into the gradient of `like` (its dtype and shape).
using FinishPerClass = at::Tensor (*)(const at::Tensor& buffer, const at::Tensor& like);

// What every device prepares alike for a kernel call.
struct KernelCall {
  at::ScalarType acc;  // accumulation type: double for double logits, float otherwise
  LayoutPlan plan;     // inputs: logits (and grad for calibrate_backward); out: for `output`
  at::Tensor output;   // calibrated logits or grad_logits (undefined when not asked for)
  // Per class / per row operands, flat, contiguous and in acc.
  at::Tensor alpha, beta;
  std::optional<at::Tensor> confidence, weight, grad_loss;
  // Outputs in acc: the loss (cross_entropy forward: per row for "none", else a scalar), the
  // device's per-class gradient buffers (undefined when not asked for) and grad_confidence.
  at::Tensor loss;
  at::Tensor grad_alpha, grad_beta;
  std::optional<AccOutput> grad_confidence;

  // A kernel's argument struct (a CalibrationOperands) with those operands set, the rest zero.
  template <typename Args>
  Args kernel_args() const {
    Args args{};
    static_cast<CalibrationOperands&>(args) = {
        plan.geometry, plan.layout, plan.input(0), alpha.const_data_ptr(), beta.const_data_ptr(),
        data_or_null(confidence)};
    return args;
  }
  void* grad_confidence_data() const {
    return grad_confidence ? grad_confidence->buffer.mutable_data_ptr() : nullptr;
  }
  // After the kernels ran: `output` (copied back from a contiguous stand-in).
  at::Tensor finish_output() const;
  // After the kernels ran: the op's gradients, per class through finish_per_class.
  Gradients finish_gradients(const CalibrateInputs& in, FinishPerClass finish_per_class) const;
};

// How a device allocates a call's logits-sized output (calibrated logits, grad_logits): as
// empty_like(logits) does, from the memory the device keeps for it.
using EmptyLike = at::Tensor (*)(const at::Tensor& like);

// The calls of the three kernels; calibrate's `output` is the calibrated logits, allocated by
// empty_output. class_grad_shape is the shape of the device's per-class gradient buffers,
// allocated for the entries of grad_mask that ask for them.
KernelCall prepare_calibrate(
    const CalibrateInputs& in,
    RowsWithoutSpatialDims rows_without_spatial_dims,
    EmptyLike empty_output);
KernelCall prepare_calibrate_backward(
    const at::Tensor& grad,
    const CalibrateInputs& in,
    GradMask grad_mask,
    at::IntArrayRef class_grad_shape,
    RowsWithoutSpatialDims rows_without_spatial_dims,
    EmptyLike empty_output);
KernelCall prepare_loss(
    const LossInputs& in,
    Reduction reduction,
    const std::optional<at::Tensor>& grad_loss,
    GradMask grad_mask,
    at::IntArrayRef class_grad_shape,
    RowsWithoutSpatialDims rows_without_spatial_dims,
    EmptyLike empty_output);

// ---------------------------------------------------------------------------------------------
// The ops: shared checks, then the device's Kernels.

template <typename Kernels>
struct Ops {
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_entropy(
      const at::Tensor& logits,
      const at::Tensor& target,
      const at::Tensor& alpha,
      const at::Tensor& beta,
      const std::optional<at::Tensor>& confidence,
      const std::optional<at::Tensor>& weight,
      int64_t ignore_index,
      c10::string_view reduction,
      const c10::List<bool>& grad_mask_list) {
    const GradMask grad_mask = parse_grad_mask(grad_mask_list);
    const LossInputs in{logits, target, alpha, beta, confidence, weight, ignore_index};
    check_loss_inputs(in);
    const Reduction mode = parse_reduction(reduction, grad_mask);
    auto [loss, grads] = Kernels::loss(in, mode, std::nullopt, grad_mask);
    return {loss, grads.logits, grads.alpha, grads.beta, grads.confidence};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_entropy_backward(
      const at::Tensor& grad_loss,
      const at::Tensor& logits,
      const at::Tensor& target,
      const at::Tensor& alpha,
      const at::Tensor& beta,
      const std::optional<at::Tensor>& confidence,
      const std::optional<at::Tensor>& weight,
      int64_t ignore_index,
      const c10::List<bool>& grad_mask_list) {
    const GradMask grad_mask = parse_grad_mask(grad_mask_list);
    const LossInputs in{logits, target, alpha, beta, confidence, weight, ignore_index};
    check_loss_backward_inputs(grad_loss, in);
    return as_tuple(Kernels::loss(in, Reduction::kNone, grad_loss, grad_mask).second);
  }

  static at::Tensor calibrate(
      const at::Tensor& logits,
      const at::Tensor& alpha,
      const at::Tensor& beta,
      const std::optional<at::Tensor>& confidence) {
    const CalibrateInputs in{logits, alpha, beta, confidence};
    check_calibrate_inputs(in);
    return Kernels::calibrate(in);
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> calibrate_backward(
      const at::Tensor& grad,
      const at::Tensor& logits,
      const at::Tensor& alpha,
      const at::Tensor& beta,
      const std::optional<at::Tensor>& confidence,
      const c10::List<bool>& grad_mask_list) {
    const GradMask grad_mask = parse_grad_mask(grad_mask_list);
    const CalibrateInputs in{logits, alpha, beta, confidence};
    check_calibrate_backward_inputs(grad, in);
    return as_tuple(Kernels::calibrate_backward(grad, in, grad_mask));
  }

 private:
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> as_tuple(const Gradients& grads) {
    return {grads.logits, grads.alpha, grads.beta, grads.confidence};
  }
};

template <typename Kernels>
void register_ops(torch::Library& m) {
  m.impl("cross_entropy", TORCH_FN(Ops<Kernels>::cross_entropy));
  m.impl("cross_entropy_backward", TORCH_FN(Ops<Kernels>::cross_entropy_backward));
  m.impl("calibrate", TORCH_FN(Ops<Kernels>::calibrate));
  m.impl("calibrate_backward", TORCH_FN(Ops<Kernels>::calibrate_backward));
}

}  // namespace disalign
