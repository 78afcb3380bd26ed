// The device-independent part of the torch bindings (see op_common.h). Compiled once, into both
// the CPU-only and the CUDA build.
#include "common/op_common.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <string>

namespace disalign {
namespace {

// A shape as Python prints it, "(4, 5)" or "(5,)", so messages match the Python front end's.
std::string shape_str(at::IntArrayRef shape) {
  std::string text = "(";
  for (size_t d = 0; d < shape.size(); ++d) {
    text += (d ? ", " : "") + std::to_string(shape[d]);
  }
  return text + (shape.size() == 1 ? ",)" : ")");
}

std::vector<int64_t> row_shape(const at::Tensor& logits) {
  std::vector<int64_t> shape{logits.size(0)};
  for (int64_t d = 2; d < logits.dim(); ++d) {
    shape.push_back(logits.size(d));
  }
  return shape;
}

void check_same_device(const at::Tensor& logits, const at::Tensor& t, const char* name) {
  TORCH_CHECK(
      t.device() == logits.device(), name, " is on ", t.device(), " but logits is on ", logits.device(),
      "; all tensors must be on one device");
}

void check_float_operand(const at::Tensor& logits, const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.is_floating_point(), name, " must be a floating-point tensor, got ", t.scalar_type());
  check_same_device(logits, t, name);
}

void check_per_class(const at::Tensor& logits, const at::Tensor& t, const char* name) {
  check_float_operand(logits, t, name);
  const int64_t classes = logits.size(1);
  TORCH_CHECK_VALUE(
      t.dim() == 1 && t.size(0) == classes, name, " must have shape (C,) = (", classes,
      ",) to match logits, got shape ", shape_str(t.sizes()));
}

// Strides of t in the (B, C, S) view, or nullopt when its spatial dims do not collapse into one.
// Strides of size-1 dims do not matter and are normalised (class and pixel strides to 1).
std::optional<Strides> view_strides(const at::Tensor& t) {
  std::optional<int64_t> spatial_stride;
  int64_t expected = 0;
  for (int64_t d = t.dim() - 1; d >= 2; --d) {
    if (t.size(d) == 1) {
      continue;
    }
    if (spatial_stride && t.stride(d) != expected) {
      return std::nullopt;
    }
    if (!spatial_stride) {
      spatial_stride = t.stride(d);
    }
    expected = t.stride(d) * t.size(d);
  }
  return Strides{t.size(0) == 1 ? 0 : t.stride(0), t.size(1) == 1 ? 1 : t.stride(1), spatial_stride.value_or(1)};
}

std::optional<LayoutPlan> try_layout(
    const std::vector<at::Tensor>& inputs,
    const at::Tensor& out,
    RowsWithoutSpatialDims rows_without_spatial_dims) {
  std::vector<Strides> strides;
  for (const auto& t : inputs) {
    auto s = view_strides(t);
    if (!s) {
      return std::nullopt;
    }
    strides.push_back(*s);
  }
  if (out.defined()) {
    auto s = view_strides(out);
    if (!s) {
      return std::nullopt;
    }
    strides.push_back(*s);
  }
  const Geometry logical = geometry_of(inputs.front());
  Geometry geometry = logical;
  // Rows as the pixels of a single image: row r = b stays row r.
  const bool transposed = strides.front().cls != 1;
  if (geometry.spatial == 1 &&
      (rows_without_spatial_dims == RowsWithoutSpatialDims::kOneImage || transposed)) {
    geometry = {1, logical.classes, logical.batch};
    for (auto& s : strides) {
      s = {0, s.cls, logical.batch == 1 ? 1 : s.batch};
    }
  }
  const auto all = [&](auto pred) { return std::all_of(strides.begin(), strides.end(), pred); };
  const bool classes_contiguous = all([](const Strides& s) { return s.cls == 1; });
  const bool pixels_contiguous = all([](const Strides& s) { return s.spatial == 1; });
  Layout layout;
  if (pixels_contiguous && (!classes_contiguous || geometry.spatial > 1)) {
    layout = Layout::kPixelsContiguous;
  } else if (classes_contiguous) {
    layout = Layout::kClassesContiguous;
  } else {
    return std::nullopt;
  }
  LayoutPlan plan{geometry, layout, inputs, {}, out, {}};
  plan.input_strides.assign(strides.begin(), strides.begin() + inputs.size());
  if (out.defined()) {
    plan.out_strides = strides.back();
  }
  return plan;
}

at::ScalarType accumulation_type(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// Small per-class / per-row tensors in the accumulation type and contiguous, which the kernels read
// as flat arrays.
at::Tensor flat_acc(const at::Tensor& t, at::ScalarType acc) {
  return contiguous_as(t, acc);
}

std::optional<at::Tensor> flat_acc(const std::optional<at::Tensor>& t, at::ScalarType acc) {
  return t ? std::optional<at::Tensor>(flat_acc(*t, acc)) : std::nullopt;
}

at::Tensor empty_if(bool wanted, at::IntArrayRef shape, const at::TensorOptions& options) {
  return wanted ? at::empty(shape, options) : at::Tensor();
}

// The parts of a call every op has: the plan over `inputs` (logits first) writing `output`, and
// the per-class / per-row operands of the calibration and their gradients.
KernelCall prepare(
    const CalibrateInputs& in,
    const std::vector<at::Tensor>& inputs,
    const at::Tensor& output,
    GradMask grad_mask,
    at::IntArrayRef class_grad_shape,
    RowsWithoutSpatialDims rows_without_spatial_dims) {
  KernelCall call;
  call.acc = accumulation_type(in.logits.scalar_type());
  call.plan = plan_layout(inputs, output, rows_without_spatial_dims);
  call.output = output;
  call.alpha = flat_acc(in.alpha, call.acc);
  call.beta = flat_acc(in.beta, call.acc);
  call.confidence = flat_acc(in.confidence, call.acc);
  const auto acc_options = in.logits.options().dtype(call.acc);
  call.grad_alpha = empty_if(grad_mask[1], class_grad_shape, acc_options);
  call.grad_beta = empty_if(grad_mask[2], class_grad_shape, acc_options);
  if (grad_mask[3] && in.confidence) {
    call.grad_confidence.emplace(*in.confidence, call.acc);
  }
  return call;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Argument checks.

void check_calibrate_inputs(const CalibrateInputs& in) {
  const at::Tensor& logits = in.logits;
  const auto dtype = logits.scalar_type();
  TORCH_CHECK_TYPE(
      dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
      "logits must have dtype float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK_VALUE(
      logits.dim() >= 2, "logits must have shape (N, C) or (N, C, d1, ...), got shape ", shape_str(logits.sizes()));
  TORCH_CHECK_VALUE(
      logits.size(1) >= 1, "logits must have at least one class (dim 1), got shape ", shape_str(logits.sizes()));
  check_per_class(logits, in.alpha, "alpha");
  check_per_class(logits, in.beta, "beta");
  if (in.confidence) {
    check_float_operand(logits, *in.confidence, "confidence");
    TORCH_CHECK_VALUE(
        in.confidence->sizes() == at::IntArrayRef(row_shape(logits)), "confidence must have shape ",
        shape_str(row_shape(logits)), " (logits without the class dim), got shape ", shape_str(in.confidence->sizes()));
  }
}

void check_calibrate_backward_inputs(const at::Tensor& grad, const CalibrateInputs& in) {
  check_calibrate_inputs(in);
  check_float_operand(in.logits, grad, "grad");
  TORCH_CHECK_VALUE(
      grad.sizes() == in.logits.sizes(), "grad must have the shape of logits ", shape_str(in.logits.sizes()),
      ", got shape ", shape_str(grad.sizes()));
}

void check_loss_inputs(const LossInputs& in) {
  check_calibrate_inputs(in.calibrate_inputs());
  const at::Tensor& target = in.target;
  TORCH_CHECK_TYPE(
      target.scalar_type() == at::kLong || target.scalar_type() == at::kInt,
      "target must have dtype int64 or int32, got ", target.scalar_type());
  check_same_device(in.logits, target, "target");
  TORCH_CHECK_VALUE(
      target.sizes() == at::IntArrayRef(row_shape(in.logits)), "target must have shape ",
      shape_str(row_shape(in.logits)), " (logits ", shape_str(in.logits.sizes()), " without the class dim), got shape ",
      shape_str(target.sizes()));
  if (in.weight) {
    check_per_class(in.logits, *in.weight, "weight");
  }
}

void check_loss_backward_inputs(const at::Tensor& grad_loss, const LossInputs& in) {
  check_loss_inputs(in);
  check_float_operand(in.logits, grad_loss, "grad_loss");
  TORCH_CHECK_VALUE(
      grad_loss.sizes() == in.target.sizes(), "grad_loss must have the shape of target ",
      shape_str(in.target.sizes()), ", got shape ", shape_str(grad_loss.sizes()));
}

GradMask parse_grad_mask(const c10::List<bool>& grad_mask) {
  TORCH_CHECK_VALUE(
      grad_mask.size() == 4, "grad_mask must have 4 entries [logits, alpha, beta, confidence], got ",
      grad_mask.size());
  return {grad_mask[0], grad_mask[1], grad_mask[2], grad_mask[3]};
}

Reduction parse_reduction(c10::string_view reduction, GradMask grad_mask) {
  Reduction mode = Reduction::kSum;
  if (reduction == "none") {
    mode = Reduction::kNone;
  } else if (reduction == "mean") {
    mode = Reduction::kMean;
  } else {
    TORCH_CHECK_VALUE(
        reduction == "sum", "reduction must be one of ('none', 'mean', 'sum'), got '", std::string(reduction), "'");
  }
  TORCH_CHECK_VALUE(
      mode != Reduction::kNone || (!grad_mask[0] && !grad_mask[1] && !grad_mask[2] && !grad_mask[3]),
      "cross_entropy with reduction='none' computes no gradients (grad_mask must be all false, got [",
      grad_mask[0], ", ", grad_mask[1], ", ", grad_mask[2], ", ", grad_mask[3], "]); use cross_entropy_backward");
  return mode;
}

// ---------------------------------------------------------------------------------------------
// Layout.

Geometry geometry_of(const at::Tensor& logits) {
  int64_t spatial = 1;
  for (int64_t d = 2; d < logits.dim(); ++d) {
    spatial *= logits.size(d);
  }
  return {logits.size(0), logits.size(1), spatial};
}

LayoutPlan plan_layout(
    const std::vector<at::Tensor>& inputs,
    const at::Tensor& out,
    RowsWithoutSpatialDims rows_without_spatial_dims) {
  if (auto plan = try_layout(inputs, out, rows_without_spatial_dims)) {
    return *plan;
  }
  // An empty tensor counts as contiguous whatever its strides (contiguous() returns it as is), so
  // give empty operands fresh default strides: nothing is read or written anyway.
  const auto dense = [](const at::Tensor& t) {
    return t.numel() == 0 ? at::empty(t.sizes(), t.options()) : t.contiguous();
  };
  std::vector<at::Tensor> contiguous_inputs;
  for (const auto& t : inputs) {
    contiguous_inputs.push_back(dense(t));
  }
  at::Tensor contiguous_out =
      out.defined() && (!out.is_contiguous() || out.numel() == 0) ? at::empty(out.sizes(), out.options()) : out;
  auto plan = try_layout(contiguous_inputs, contiguous_out, rows_without_spatial_dims);
  TORCH_INTERNAL_ASSERT(plan, "contiguous operands must have a kernel layout");
  return *plan;
}

// ---------------------------------------------------------------------------------------------
// Operands and outputs.

AccOutput::AccOutput(const at::Tensor& like, at::ScalarType acc) : result(at::empty_like(like)) {
  const bool writable = result.scalar_type() == acc && result.is_contiguous();
  buffer = writable ? result : at::empty({like.numel()}, result.options().dtype(acc));
}

at::Tensor AccOutput::finish() const {
  if (!buffer.is_same(result)) {
    result.copy_(buffer.view(result.sizes()));
  }
  return result;
}

at::Tensor KernelCall::finish_output() const {
  if (plan.out.defined() && !plan.out.is_same(output)) {
    output.copy_(plan.out);
  }
  return output;
}

Gradients KernelCall::finish_gradients(const CalibrateInputs& in, FinishPerClass finish_per_class) const {
  return {
      output.defined() ? finish_output() : in.logits.new_empty({0}),
      grad_alpha.defined() ? finish_per_class(grad_alpha, in.alpha) : in.alpha.new_empty({0}),
      grad_beta.defined() ? finish_per_class(grad_beta, in.beta) : in.beta.new_empty({0}),
      grad_confidence ? grad_confidence->finish() : (in.confidence ? *in.confidence : in.logits).new_empty({0})};
}

KernelCall prepare_calibrate(
    const CalibrateInputs& in,
    RowsWithoutSpatialDims rows_without_spatial_dims,
    EmptyLike empty_output) {
  return prepare(in, {in.logits}, empty_output(in.logits), {}, {}, rows_without_spatial_dims);
}

KernelCall prepare_calibrate_backward(
    const at::Tensor& grad,
    const CalibrateInputs& in,
    GradMask grad_mask,
    at::IntArrayRef class_grad_shape,
    RowsWithoutSpatialDims rows_without_spatial_dims,
    EmptyLike empty_output) {
  return prepare(
      in, {in.logits, grad.to(in.logits.scalar_type())}, grad_mask[0] ? empty_output(in.logits) : at::Tensor(),
      grad_mask, class_grad_shape, rows_without_spatial_dims);
}

KernelCall prepare_loss(
    const LossInputs& in,
    Reduction reduction,
    const std::optional<at::Tensor>& grad_loss,
    GradMask grad_mask,
    at::IntArrayRef class_grad_shape,
    RowsWithoutSpatialDims rows_without_spatial_dims,
    EmptyLike empty_output) {
  KernelCall call = prepare(
      in.calibrate_inputs(), {in.logits}, grad_mask[0] ? empty_output(in.logits) : at::Tensor(), grad_mask,
      class_grad_shape, rows_without_spatial_dims);
  call.weight = flat_acc(in.weight, call.acc);
  call.grad_loss = flat_acc(grad_loss, call.acc);
  if (!grad_loss) {
    const auto acc_options = in.logits.options().dtype(call.acc);
    call.loss = reduction == Reduction::kNone ? at::empty(in.target.sizes(), acc_options) : at::empty({}, acc_options);
  }
  return call;
}

}  // namespace disalign
