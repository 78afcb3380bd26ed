// CUDA implementations of the disalign ops: argument checks, layout canonicalisation, allocation and
// dtype preparation around the torch-free launchers of disalign_kernels.cu (disalign_cuda.h).
// Compiled only in a CUDA build of the extension (setup.py, DISALIGN_CUDA).
//
// Out-of-range targets: the kernels never index with them and give their rows a NaN loss and NaN
// gradients, so a bad batch is never silent, without a device sync. Reporting the offending value
// as an IndexError needs the host to read a device flag, i.e. a sync that stalls the stream and is
// illegal during CUDA graph capture; it is done only when DISALIGN_CUDA_CHECK_TARGETS=1 (debugging).
// A device-side assert was rejected: it poisons the CUDA context for the rest of the process.
#include "cuda/disalign_cuda.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <vector>

namespace disalign::cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// Argument checks (the rules of disalign_ops/_validation.py, which the Python front end applies
// first); they keep direct torch.ops calls memory safe.

std::vector<int64_t> row_shape(const at::Tensor& logits) {
  std::vector<int64_t> shape{logits.size(0)};
  for (int64_t d = 2; d < logits.dim(); ++d) {
    shape.push_back(logits.size(d));
  }
  return shape;
}

void check_on_device(const at::Tensor& logits, const at::Tensor& t, const char* name) {
  TORCH_CHECK(
      t.device() == logits.device(), name, " is on ", t.device(), " but logits is on ", logits.device(),
      "; all tensors must be on one device");
}

void check_float_operand(const at::Tensor& logits, const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.is_floating_point(), name, " must be a floating-point tensor, got ", t.scalar_type());
  check_on_device(logits, t, name);
}

void check_per_class(const at::Tensor& logits, const at::Tensor& t, const char* name) {
  check_float_operand(logits, t, name);
  TORCH_CHECK_VALUE(
      t.dim() == 1 && t.size(0) == logits.size(1), name, " must have shape (C,) = (", logits.size(1),
      ",) to match logits, got shape ", t.sizes());
}

void check_per_row(const at::Tensor& logits, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(
      t.sizes() == at::IntArrayRef(row_shape(logits)), name, " must have shape ", at::IntArrayRef(row_shape(logits)),
      " (logits ", logits.sizes(), " without the class dim), got shape ", t.sizes());
}

void check_calibrate_inputs(
    const at::Tensor& logits,
    const at::Tensor& alpha,
    const at::Tensor& beta,
    const std::optional<at::Tensor>& confidence) {
  const auto dtype = logits.scalar_type();
  TORCH_CHECK_TYPE(
      dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
      "logits must have dtype float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK_VALUE(
      logits.dim() >= 2, "logits must have shape (N, C) or (N, C, d1, ...), got shape ", logits.sizes());
  TORCH_CHECK_VALUE(logits.size(1) >= 1, "logits must have at least one class (dim 1), got shape ", logits.sizes());
  TORCH_CHECK_VALUE(
      logits.size(1) <= std::numeric_limits<int32_t>::max(), "logits must have fewer than 2^31 classes, got ",
      logits.size(1));
  check_per_class(logits, alpha, "alpha");
  check_per_class(logits, beta, "beta");
  if (confidence) {
    check_float_operand(logits, *confidence, "confidence");
    check_per_row(logits, *confidence, "confidence");
  }
}

void check_loss_inputs(
    const at::Tensor& logits,
    const at::Tensor& target,
    const at::Tensor& alpha,
    const at::Tensor& beta,
    const std::optional<at::Tensor>& confidence,
    const std::optional<at::Tensor>& weight) {
  check_calibrate_inputs(logits, alpha, beta, confidence);
  TORCH_CHECK_TYPE(
      target.scalar_type() == at::kLong || target.scalar_type() == at::kInt,
      "target must have dtype int64 or int32, got ", target.scalar_type());
  check_on_device(logits, target, "target");
  check_per_row(logits, target, "target");
  if (weight) {
    check_per_class(logits, *weight, "weight");
  }
}

Reduction parse_reduction(c10::string_view reduction) {
  if (reduction == "none") {
    return Reduction::kNone;
  }
  if (reduction == "mean") {
    return Reduction::kMean;
  }
  TORCH_CHECK_VALUE(
      reduction == "sum", "reduction must be one of ('none', 'mean', 'sum'), got '", std::string(reduction), "'");
  return Reduction::kSum;
}

// ---------------------------------------------------------------------------------------------
// Layout: every operand of the logits' shape is seen as (B, C, S) with its own strides, as in
// csrc/cpu/dispatch.cpp.

ScalarType kernel_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf:
      return ScalarType::kHalf;
    case at::kBFloat16:
      return ScalarType::kBFloat16;
    case at::kFloat:
      return ScalarType::kFloat;
    default:
      return ScalarType::kDouble;
  }
}

at::ScalarType accumulation_type(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

Geometry geometry_of(const at::Tensor& logits) {
  int64_t spatial = 1;
  for (int64_t d = 2; d < logits.dim(); ++d) {
    spatial *= logits.size(d);
  }
  return {logits.size(0), logits.size(1), spatial};
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

struct LayoutPlan {
  Geometry geometry;
  Layout layout;
  std::vector<at::Tensor> inputs;  // possibly contiguous copies of the inputs
  std::vector<Strides> input_strides;
  at::Tensor out;  // the tensor the kernel writes (the output itself, or a contiguous stand-in)
  Strides out_strides;
};

std::optional<LayoutPlan> try_layout(
    const Geometry& logical,
    const std::vector<at::Tensor>& inputs,
    const at::Tensor& out) {
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
  Geometry geometry = logical;
  // Without spatial dims and with classes not contiguous (a transposed (N, C)), the rows are the
  // pixels of a single image: row r = b stays row r.
  if (geometry.spatial == 1 && strides.front().cls != 1) {
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

// Reads the inputs in place when their strides allow one of the two kernel layouts (NCHW, NHWC,
// transposed, sliced along the batch, ...); otherwise works on contiguous copies.
LayoutPlan plan_layout(const Geometry& logical, const std::vector<at::Tensor>& inputs, const at::Tensor& out) {
  if (auto plan = try_layout(logical, inputs, out)) {
    return *plan;
  }
  std::vector<at::Tensor> contiguous_inputs;
  for (const auto& t : inputs) {
    contiguous_inputs.push_back(t.contiguous());
  }
  at::Tensor contiguous_out = out.defined() && !out.is_contiguous() ? at::empty(out.sizes(), out.options()) : out;
  auto plan = try_layout(logical, contiguous_inputs, contiguous_out);
  TORCH_INTERNAL_ASSERT(plan, "contiguous operands must have a kernel layout");
  return *plan;
}

void copy_back(const LayoutPlan& plan, const at::Tensor& out) {
  if (plan.out.defined() && !plan.out.is_same(out)) {
    out.copy_(plan.out);
  }
}

// Small per-class / per-row tensors in the accumulation type, contiguous and flat (no copy when
// they already are).
at::Tensor flat_acc(const at::Tensor& t, at::ScalarType acc) {
  return t.to(acc).contiguous().view({-1});
}

std::optional<at::Tensor> flat_acc(const std::optional<at::Tensor>& t, at::ScalarType acc) {
  return t ? std::optional<at::Tensor>(flat_acc(*t, acc)) : std::nullopt;
}

const void* data_or_null(const std::optional<at::Tensor>& t) {
  return t ? t->const_data_ptr() : nullptr;
}

// A gradient output shaped like `like` (empty_like: its dtype and strides, as the fake kernel
// says) and the contiguous accumulation-type buffer the kernel writes (the output itself when
// possible).
struct AccOutput {
  at::Tensor result;
  at::Tensor buffer;
  AccOutput(const at::Tensor& like, at::ScalarType acc) : result(at::empty_like(like)) {
    buffer = result.scalar_type() == acc && result.is_contiguous() ? result
                                                                    : at::empty({like.numel()}, result.options().dtype(acc));
  }
  at::Tensor finish() const {
    if (!buffer.is_same(result)) {
      result.copy_(buffer.view(result.sizes()));
    }
    return result;
  }
};

std::optional<AccOutput> acc_output_if(bool wanted, const std::optional<at::Tensor>& like, at::ScalarType acc) {
  return wanted && like ? std::optional<AccOutput>(AccOutput(*like, acc)) : std::nullopt;
}

void* buffer_or_null(const std::optional<AccOutput>& out) {
  return out ? out->buffer.data_ptr() : nullptr;
}

at::Tensor finish_or_empty(const std::optional<AccOutput>& out, const at::Tensor& like) {
  return out ? out->finish() : like.new_empty({0});
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "disalign ", op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

bool synchronous_target_check() {
  const char* flag = std::getenv("DISALIGN_CUDA_CHECK_TARGETS");
  return flag != nullptr && std::strcmp(flag, "1") == 0;
}

// ---------------------------------------------------------------------------------------------
// Cross entropy.

struct LossGrads {
  at::Tensor logits, alpha, beta, confidence;
};

// Runs the fused kernel. grad_loss (per row) is given for the "none" backward; otherwise the rows'
// upstream gradient is 1 ("sum") or 1 / sum of valid weights ("mean") and the loss is returned too.
std::pair<at::Tensor, LossGrads> run_loss(
    const at::Tensor& logits,
    const at::Tensor& target,
    const at::Tensor& alpha,
    const at::Tensor& beta,
    const std::optional<at::Tensor>& confidence,
    const std::optional<at::Tensor>& weight,
    int64_t ignore_index,
    Reduction reduction,
    const std::optional<at::Tensor>& grad_loss,
    std::array<bool, 4> grad_mask) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::ScalarType acc = accumulation_type(logits.scalar_type());
  const at::Tensor grad_logits = grad_mask[0] ? at::empty_like(logits) : at::Tensor();
  const LayoutPlan plan = plan_layout(geometry_of(logits), {logits}, grad_logits);
  const at::Tensor target_flat = target.contiguous().view({-1});
  const at::Tensor alpha_acc = flat_acc(alpha, acc);
  const at::Tensor beta_acc = flat_acc(beta, acc);
  const auto weight_acc = flat_acc(weight, acc);
  const auto confidence_acc = flat_acc(confidence, acc);
  const auto grad_loss_acc = flat_acc(grad_loss, acc);
  at::Tensor loss;
  if (!grad_loss) {
    loss = reduction == Reduction::kNone ? at::empty(target.sizes(), logits.options().dtype(acc))
                                         : at::empty({}, logits.options().dtype(acc));
  }
  const at::Tensor grad_alpha = grad_mask[1] ? at::empty({alpha.size(0)}, alpha_acc.options()) : at::Tensor();
  const at::Tensor grad_beta = grad_mask[2] ? at::empty({beta.size(0)}, beta_acc.options()) : at::Tensor();
  const auto grad_confidence = acc_output_if(grad_mask[3], confidence, acc);
  const at::Tensor bad_target =
      synchronous_target_check() ? at::full({}, ignore_index, target.options().dtype(at::kLong)) : at::Tensor();

  LossArgs args{};
  args.geometry = plan.geometry;
  args.layout = plan.layout;
  args.dtype = kernel_dtype(logits.scalar_type());
  args.logits = View{plan.inputs[0].const_data_ptr(), plan.input_strides[0]};
  args.target = target_flat.const_data_ptr();
  args.target_is_int64 = target_flat.scalar_type() == at::kLong;
  args.alpha = alpha_acc.const_data_ptr();
  args.beta = beta_acc.const_data_ptr();
  args.weight = data_or_null(weight_acc);
  args.confidence = data_or_null(confidence_acc);
  args.ignore_index = ignore_index;
  args.reduction = reduction;
  args.grad_loss = data_or_null(grad_loss_acc);
  args.loss = loss.defined() ? loss.data_ptr() : nullptr;
  args.grad_logits = MutableView{grad_logits.defined() ? plan.out.data_ptr() : nullptr, plan.out_strides};
  args.grad_alpha = grad_alpha.defined() ? grad_alpha.data_ptr() : nullptr;
  args.grad_beta = grad_beta.defined() ? grad_beta.data_ptr() : nullptr;
  args.grad_confidence = buffer_or_null(grad_confidence);
  args.bad_target = bad_target.defined() ? bad_target.data_ptr<int64_t>() : nullptr;

  const size_t workspace_bytes = cross_entropy_workspace_bytes(args);
  const at::Tensor workspace =
      at::empty({static_cast<int64_t>(workspace_bytes)}, logits.options().dtype(at::kByte));
  check_launch(
      cross_entropy(args, workspace_bytes ? workspace.data_ptr() : nullptr, at::cuda::getCurrentCUDAStream().stream()),
      "cross_entropy");
  if (bad_target.defined()) {
    const int64_t value = bad_target.item<int64_t>();  // synchronises: debugging only
    TORCH_CHECK_INDEX(
        value == ignore_index, "target contains ", value, ", which is outside [0, C) = [0, ", logits.size(1),
        ") and is not ignore_index=", ignore_index);
  }

  LossGrads grads;
  if (grad_mask[0]) {
    copy_back(plan, grad_logits);
  }
  grads.logits = grad_mask[0] ? grad_logits : logits.new_empty({0});
  grads.alpha = grad_mask[1] ? grad_alpha.to(alpha.scalar_type()) : alpha.new_empty({0});
  grads.beta = grad_mask[2] ? grad_beta.to(beta.scalar_type()) : beta.new_empty({0});
  grads.confidence = finish_or_empty(grad_confidence, confidence ? *confidence : logits);
  return {loss, grads};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_entropy_cuda(
    const at::Tensor& logits,
    const at::Tensor& target,
    const at::Tensor& alpha,
    const at::Tensor& beta,
    const std::optional<at::Tensor>& confidence,
    const std::optional<at::Tensor>& weight,
    int64_t ignore_index,
    c10::string_view reduction,
    std::array<bool, 4> grad_mask) {
  check_loss_inputs(logits, target, alpha, beta, confidence, weight);
  const Reduction r = parse_reduction(reduction);
  TORCH_CHECK_VALUE(
      r != Reduction::kNone || !(grad_mask[0] || grad_mask[1] || grad_mask[2] || grad_mask[3]),
      "cross_entropy: grad_mask must be all false for reduction='none' (use cross_entropy_backward)");
  auto [loss, grads] =
      run_loss(logits, target, alpha, beta, confidence, weight, ignore_index, r, std::nullopt, grad_mask);
  return {loss, grads.logits, grads.alpha, grads.beta, grads.confidence};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_entropy_backward_cuda(
    const at::Tensor& grad_loss,
    const at::Tensor& logits,
    const at::Tensor& target,
    const at::Tensor& alpha,
    const at::Tensor& beta,
    const std::optional<at::Tensor>& confidence,
    const std::optional<at::Tensor>& weight,
    int64_t ignore_index,
    std::array<bool, 4> grad_mask) {
  check_loss_inputs(logits, target, alpha, beta, confidence, weight);
  check_float_operand(logits, grad_loss, "grad_loss");
  check_per_row(logits, grad_loss, "grad_loss");
  auto [unused_loss, grads] =
      run_loss(logits, target, alpha, beta, confidence, weight, ignore_index, Reduction::kNone, grad_loss, grad_mask);
  return {grads.logits, grads.alpha, grads.beta, grads.confidence};
}

// ---------------------------------------------------------------------------------------------
// Calibration.

at::Tensor calibrate_cuda(
    const at::Tensor& logits,
    const at::Tensor& alpha,
    const at::Tensor& beta,
    const std::optional<at::Tensor>& confidence) {
  check_calibrate_inputs(logits, alpha, beta, confidence);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::ScalarType acc = accumulation_type(logits.scalar_type());
  const at::Tensor out = at::empty_like(logits);
  const LayoutPlan plan = plan_layout(geometry_of(logits), {logits}, out);
  const at::Tensor alpha_acc = flat_acc(alpha, acc);
  const at::Tensor beta_acc = flat_acc(beta, acc);
  const auto confidence_acc = flat_acc(confidence, acc);
  CalibrateArgs args{};
  args.geometry = plan.geometry;
  args.layout = plan.layout;
  args.dtype = kernel_dtype(logits.scalar_type());
  args.logits = View{plan.inputs[0].const_data_ptr(), plan.input_strides[0]};
  args.out = MutableView{plan.out.data_ptr(), plan.out_strides};
  args.alpha = alpha_acc.const_data_ptr();
  args.beta = beta_acc.const_data_ptr();
  args.confidence = data_or_null(confidence_acc);
  check_launch(calibrate(args, at::cuda::getCurrentCUDAStream().stream()), "calibrate");
  copy_back(plan, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> calibrate_backward_cuda(
    const at::Tensor& grad,
    const at::Tensor& logits,
    const at::Tensor& alpha,
    const at::Tensor& beta,
    const std::optional<at::Tensor>& confidence,
    std::array<bool, 4> grad_mask) {
  check_calibrate_inputs(logits, alpha, beta, confidence);
  check_on_device(logits, grad, "grad");
  TORCH_CHECK_VALUE(
      grad.sizes() == logits.sizes(), "grad must have the shape of logits ", logits.sizes(), ", got ", grad.sizes());
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::ScalarType acc = accumulation_type(logits.scalar_type());
  const at::Tensor grad_in = grad.to(logits.scalar_type());
  const at::Tensor grad_logits = grad_mask[0] ? at::empty_like(logits) : at::Tensor();
  const LayoutPlan plan = plan_layout(geometry_of(logits), {logits, grad_in}, grad_logits);
  const at::Tensor alpha_acc = flat_acc(alpha, acc);
  const at::Tensor beta_acc = flat_acc(beta, acc);
  const auto confidence_acc = flat_acc(confidence, acc);
  const at::Tensor grad_alpha = grad_mask[1] ? at::empty({alpha.size(0)}, alpha_acc.options()) : at::Tensor();
  const at::Tensor grad_beta = grad_mask[2] ? at::empty({beta.size(0)}, beta_acc.options()) : at::Tensor();
  const auto grad_confidence = acc_output_if(grad_mask[3], confidence, acc);

  CalibrateBackwardArgs args{};
  args.geometry = plan.geometry;
  args.layout = plan.layout;
  args.dtype = kernel_dtype(logits.scalar_type());
  args.logits = View{plan.inputs[0].const_data_ptr(), plan.input_strides[0]};
  args.grad = View{plan.inputs[1].const_data_ptr(), plan.input_strides[1]};
  args.alpha = alpha_acc.const_data_ptr();
  args.beta = beta_acc.const_data_ptr();
  args.confidence = data_or_null(confidence_acc);
  args.grad_logits = MutableView{grad_logits.defined() ? plan.out.data_ptr() : nullptr, plan.out_strides};
  args.grad_alpha = grad_alpha.defined() ? grad_alpha.data_ptr() : nullptr;
  args.grad_beta = grad_beta.defined() ? grad_beta.data_ptr() : nullptr;
  args.grad_confidence = buffer_or_null(grad_confidence);
  const size_t workspace_bytes = calibrate_backward_workspace_bytes(args);
  const at::Tensor workspace =
      at::empty({static_cast<int64_t>(workspace_bytes)}, logits.options().dtype(at::kByte));
  check_launch(
      calibrate_backward(
          args, workspace_bytes ? workspace.data_ptr() : nullptr, at::cuda::getCurrentCUDAStream().stream()),
      "calibrate_backward");
  if (grad_mask[0]) {
    copy_back(plan, grad_logits);
  }
  return {
      grad_mask[0] ? grad_logits : logits.new_empty({0}),
      grad_mask[1] ? grad_alpha.to(alpha.scalar_type()) : alpha.new_empty({0}),
      grad_mask[2] ? grad_beta.to(beta.scalar_type()) : beta.new_empty({0}),
      finish_or_empty(grad_confidence, confidence ? *confidence : logits)};
}

}  // namespace
}  // namespace disalign::cuda

TORCH_LIBRARY_IMPL(disalign, CUDA, m) {
  m.impl("cross_entropy", TORCH_FN(disalign::cuda::cross_entropy_cuda));
  m.impl("cross_entropy_backward", TORCH_FN(disalign::cuda::cross_entropy_backward_cuda));
  m.impl("calibrate", TORCH_FN(disalign::cuda::calibrate_cuda));
  m.impl("calibrate_backward", TORCH_FN(disalign::cuda::calibrate_backward_cuda));
}
