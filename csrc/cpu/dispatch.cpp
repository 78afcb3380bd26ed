// CPU implementations of the disalign ops: argument checks, layout and dtype preparation, the target
// pre-pass and the final reductions, around the per-ISA kernels of disalign_kernels.cpp. The kernel
// copy (DEFAULT / AVX2 / AVX512) is picked once from the running CPU, as ATen does, and
// ATEN_CPU_CAPABILITY=default|avx2|avx512 caps it (tests force each copy this way).
#include "cpu/disalign_kernels.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

namespace disalign::cpu {
namespace {

// ---------------------------------------------------------------------------------------------
// Kernel copy selection.

enum class Capability { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

Capability best_supported_capability() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return Capability::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return Capability::kAvx2;
  }
#endif
  return Capability::kDefault;
}

Capability chosen_capability() {
  static const Capability chosen = [] {
    const Capability best = best_supported_capability();
    const char* requested = std::getenv("ATEN_CPU_CAPABILITY");
    if (requested == nullptr || *requested == '\0') {
      return best;
    }
    const std::string name(requested);
    Capability cap;
    if (name == "default") {
      cap = Capability::kDefault;
    } else if (name == "avx2") {
      cap = Capability::kAvx2;
    } else if (name == "avx512") {
      cap = Capability::kAvx512;
    } else {
      TORCH_WARN("disalign: ignoring ATEN_CPU_CAPABILITY=", name, " (expected default, avx2 or avx512)");
      return best;
    }
    // As in ATen, the variable can only lower the capability to one the CPU supports.
    return std::min(cap, best);
  }();
  return chosen;
}

std::string cpu_capability_name() {
  switch (chosen_capability()) {
    case Capability::kAvx512:
      return "avx512";
    case Capability::kAvx2:
      return "avx2";
    case Capability::kDefault:
      break;
  }
  return "default";
}

void launch(const LossArgs& args) {
  switch (chosen_capability()) {
    case Capability::kAvx512:
      return AVX512::cross_entropy_kernel(args);
    case Capability::kAvx2:
      return AVX2::cross_entropy_kernel(args);
    case Capability::kDefault:
      break;
  }
  DEFAULT::cross_entropy_kernel(args);
}

void launch(const CalibrateArgs& args) {
  switch (chosen_capability()) {
    case Capability::kAvx512:
      return AVX512::calibrate_kernel(args);
    case Capability::kAvx2:
      return AVX2::calibrate_kernel(args);
    case Capability::kDefault:
      break;
  }
  DEFAULT::calibrate_kernel(args);
}

// ---------------------------------------------------------------------------------------------
// Argument checks. The Python front end validates the same rules first (disalign_ops/_validation.py);
// these keep direct torch.ops calls memory safe.

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

void check_float_operand(const at::Tensor& logits, const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.is_floating_point(), name, " must be a floating-point tensor, got ", t.scalar_type());
  TORCH_CHECK(
      t.device() == logits.device(), name, " is on ", t.device(), " but logits is on ", logits.device(),
      "; all tensors must be on one device");
}

int64_t check_calibrate_inputs(
    const at::Tensor& logits,
    const at::Tensor& alpha,
    const at::Tensor& beta,
    const std::optional<at::Tensor>& confidence) {
  const auto dtype = logits.scalar_type();
  TORCH_CHECK_TYPE(
      dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
      "logits must have dtype float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK_VALUE(
      logits.dim() >= 2, "logits must have shape (N, C) or (N, C, d1, ...), got shape ", shape_str(logits.sizes()));
  const int64_t classes = logits.size(1);
  TORCH_CHECK_VALUE(classes >= 1, "logits must have at least one class (dim 1), got shape ", shape_str(logits.sizes()));
  for (const auto& [t, name] : {std::pair{&alpha, "alpha"}, std::pair{&beta, "beta"}}) {
    check_float_operand(logits, *t, name);
    TORCH_CHECK_VALUE(
        t->dim() == 1 && t->size(0) == classes, name, " must have shape (C,) = (", classes,
        ",) to match logits, got shape ", shape_str(t->sizes()));
  }
  if (confidence) {
    check_float_operand(logits, *confidence, "confidence");
    TORCH_CHECK_VALUE(
        confidence->sizes() == at::IntArrayRef(row_shape(logits)), "confidence must have shape ",
        shape_str(row_shape(logits)), " (logits without the class dim), got shape ", shape_str(confidence->sizes()));
  }
  return classes;
}

void check_loss_inputs(
    const at::Tensor& logits,
    const at::Tensor& target,
    const at::Tensor& alpha,
    const at::Tensor& beta,
    const std::optional<at::Tensor>& confidence,
    const std::optional<at::Tensor>& weight) {
  const int64_t classes = check_calibrate_inputs(logits, alpha, beta, confidence);
  TORCH_CHECK_TYPE(
      target.scalar_type() == at::kLong || target.scalar_type() == at::kInt,
      "target must have dtype int64 or int32, got ", target.scalar_type());
  TORCH_CHECK(
      target.device() == logits.device(), "target is on ", target.device(), " but logits is on ",
      logits.device(), "; all tensors must be on one device");
  TORCH_CHECK_VALUE(
      target.sizes() == at::IntArrayRef(row_shape(logits)), "target must have shape ",
      shape_str(row_shape(logits)), " (logits ", shape_str(logits.sizes()), " without the class dim), got shape ",
      shape_str(target.sizes()));
  // The kernels compare class indices in the accumulation type, exact below 2^24 in float.
  TORCH_CHECK_VALUE(
      logits.scalar_type() == at::kDouble || classes <= (int64_t{1} << 24), "logits has C = ", classes,
      " classes; the CPU kernels support at most 2^24 classes for ", logits.scalar_type(), " logits");
  if (weight) {
    check_float_operand(logits, *weight, "weight");
    TORCH_CHECK_VALUE(
        weight->dim() == 1 && weight->size(0) == classes, "weight must have shape (C,) = (", classes,
        ",) to match logits, got shape ", shape_str(weight->sizes()));
  }
}

// ---------------------------------------------------------------------------------------------
// Layout: every operand of the logits' shape is seen as (B, C, S) with its own strides.

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
  return Strides{
      t.size(0) == 1 ? 0 : t.stride(0), t.size(1) == 1 ? 1 : t.stride(1), spatial_stride.value_or(1)};
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
  std::optional<Strides> out_strides;
  if (out.defined()) {
    out_strides = view_strides(out);
    if (!out_strides) {
      return std::nullopt;
    }
    strides.push_back(*out_strides);
  }
  Geometry geometry = logical;
  // Without spatial extent the rows are the pixels of a single image (row r = b stays row r), so a
  // transposed (N, C) is read along its contiguous rows and an (N, C) in blocks of rows.
  if (geometry.spatial == 1) {
    geometry = {1, logical.classes, logical.batch};
    for (auto& s : strides) {
      s = {0, s.cls, logical.batch == 1 ? 1 : s.batch};
    }
  }
  const bool classes_contiguous = std::all_of(strides.begin(), strides.end(), [](const Strides& s) { return s.cls == 1; });
  const bool pixels_contiguous =
      std::all_of(strides.begin(), strides.end(), [](const Strides& s) { return s.spatial == 1; });
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

Chunking chunking_for(int64_t rows) {
  // Up to 64 chunks of a multiple of 64 rows (whole pixel blocks), a function of the row count only.
  constexpr int64_t kMaxChunks = 64;
  constexpr int64_t kRowAlignment = 64;
  if (rows == 0) {
    return {0, kRowAlignment};
  }
  const int64_t per_chunk = (rows + kMaxChunks - 1) / kMaxChunks;
  const int64_t rows_per_chunk = std::max(kRowAlignment, (per_chunk + kRowAlignment - 1) / kRowAlignment * kRowAlignment);
  return {(rows + rows_per_chunk - 1) / rows_per_chunk, rows_per_chunk};
}

// Small per-class / per-row tensors in the accumulation type, contiguous and flat (no copy when
// they already are).
at::Tensor flat_acc(const at::Tensor& t, at::ScalarType acc) {
  return t.to(acc).contiguous().view({-1});
}

const void* optional_data(const std::optional<at::Tensor>& t) {
  return t ? t->const_data_ptr() : nullptr;
}

// Sum of the per-chunk partials (chunks, C) in chunk order, as a tensor shaped and typed like `like`.
at::Tensor reduce_partials(const at::Tensor& partials, const at::Tensor& like) {
  const int64_t chunks = partials.size(0);
  const int64_t classes = partials.size(1);
  at::Tensor total = at::zeros({classes}, partials.options());
  AT_DISPATCH_FLOATING_TYPES(partials.scalar_type(), "disalign_reduce_partials", [&] {
    const scalar_t* part = partials.const_data_ptr<scalar_t>();
    scalar_t* sum = total.mutable_data_ptr<scalar_t>();
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      for (int64_t j = 0; j < classes; ++j) {
        sum[j] += part[chunk * classes + j];
      }
    }
  });
  return at::empty_like(like).copy_(total);
}

// A per-row gradient output: empty_like(like) (its dtype and strides, as the fake kernel says) and
// the contiguous accumulation-type buffer the kernel writes (the output itself when possible).
struct RowOutput {
  at::Tensor result;
  at::Tensor buffer;
  RowOutput(const at::Tensor& like, at::ScalarType acc) : result(at::empty_like(like)) {
    buffer = result.scalar_type() == acc && result.is_contiguous() ? result : at::empty({like.numel()}, result.options().dtype(acc));
  }
  at::Tensor finish() const {
    if (!buffer.is_same(result)) {
      result.copy_(buffer.view(result.sizes()));
    }
    return result;
  }
};

// ---------------------------------------------------------------------------------------------
// Cross entropy.

enum class Reduction { kNone, kMean, kSum };

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

// Rejects targets outside [0, C) that are not ignore_index (before any kernel reads with them) and
// returns the sum of weight[target] over the valid rows, in row order.
double check_targets_and_sum_weights(
    const at::Tensor& target,
    int64_t classes,
    int64_t ignore_index,
    const std::optional<at::Tensor>& weight) {
  const int64_t* t = target.const_data_ptr<int64_t>();
  const int64_t rows = target.numel();
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES(weight ? weight->scalar_type() : at::kDouble, "disalign_check_targets", [&] {
    const scalar_t* w = weight ? weight->const_data_ptr<scalar_t>() : nullptr;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t v = t[r];
      if (v == ignore_index) {
        continue;
      }
      TORCH_CHECK_INDEX(
          v >= 0 && v < classes, "target contains ", v, ", which is outside [0, C) = [0, ", classes,
          ") and is not ignore_index=", ignore_index);
      total += w ? static_cast<double>(w[v]) : 1.0;
    }
  });
  return total;
}

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
  const at::ScalarType acc = accumulation_type(logits.scalar_type());
  const Geometry logical = geometry_of(logits);
  const int64_t rows = logical.rows();
  const at::Tensor target_flat = target.to(at::kLong).contiguous().view({-1});
  const at::Tensor alpha_acc = flat_acc(alpha, acc);
  const at::Tensor beta_acc = flat_acc(beta, acc);
  std::optional<at::Tensor> weight_acc;
  if (weight) {
    weight_acc = flat_acc(*weight, acc);
  }
  std::optional<at::Tensor> confidence_acc;
  if (confidence) {
    confidence_acc = flat_acc(*confidence, acc);
  }
  std::optional<at::Tensor> grad_loss_acc;
  if (grad_loss) {
    grad_loss_acc = flat_acc(*grad_loss, acc);
  }
  const double total_weight = check_targets_and_sum_weights(target_flat, logical.classes, ignore_index, weight_acc);

  const Chunking chunking = chunking_for(rows);
  const auto acc_options = logits.options().dtype(acc);
  LossGrads grads;
  grads.logits = grad_mask[0] ? at::empty_like(logits) : logits.new_empty({0});
  at::Tensor alpha_partials = grad_mask[1] ? at::empty({chunking.count, logical.classes}, acc_options) : at::Tensor();
  at::Tensor beta_partials = grad_mask[2] ? at::empty({chunking.count, logical.classes}, acc_options) : at::Tensor();
  std::optional<RowOutput> grad_confidence;
  if (grad_mask[3] && confidence) {
    grad_confidence.emplace(*confidence, acc);
  }
  at::Tensor loss;
  at::Tensor loss_partials;
  if (!grad_loss) {
    loss = reduction == Reduction::kNone ? at::empty(target.sizes(), acc_options) : at::empty({}, acc_options);
    loss_partials = at::zeros({chunking.count}, logits.options().dtype(at::kDouble));
  }

  const LayoutPlan plan = plan_layout(logical, {logits}, grad_mask[0] ? grads.logits : at::Tensor());
  LossArgs args{};
  args.geometry = plan.geometry;
  args.layout = plan.layout;
  args.chunking = chunking;
  args.dtype = logits.scalar_type();
  args.logits = {plan.inputs[0].const_data_ptr(), plan.input_strides[0]};
  args.alpha = alpha_acc.const_data_ptr();
  args.beta = beta_acc.const_data_ptr();
  args.weight = optional_data(weight_acc);
  args.target = target_flat.const_data_ptr<int64_t>();
  args.confidence = optional_data(confidence_acc);
  args.ignore_index = ignore_index;
  args.grad_loss = optional_data(grad_loss_acc);
  args.grad_scale = reduction == Reduction::kMean ? 1.0 / total_weight : 1.0;
  args.loss = reduction == Reduction::kNone && loss.defined() ? loss.mutable_data_ptr() : nullptr;
  args.loss_partials = loss_partials.defined() ? loss_partials.mutable_data_ptr<double>() : nullptr;
  args.grad_logits = {plan.out.defined() ? plan.out.mutable_data_ptr() : nullptr, plan.out_strides};
  args.grad_alpha_partials = alpha_partials.defined() ? alpha_partials.mutable_data_ptr() : nullptr;
  args.grad_beta_partials = beta_partials.defined() ? beta_partials.mutable_data_ptr() : nullptr;
  args.grad_confidence = grad_confidence ? grad_confidence->buffer.mutable_data_ptr() : nullptr;
  if (rows > 0) {
    launch(args);
  }
  copy_back(plan, grads.logits);

  if (loss.defined() && reduction != Reduction::kNone) {
    const double* partial = loss_partials.const_data_ptr<double>();
    double sum = 0;
    for (int64_t chunk = 0; chunk < chunking.count; ++chunk) {
      sum += partial[chunk];
    }
    loss.fill_(reduction == Reduction::kMean ? sum / total_weight : sum);
  }
  grads.alpha = grad_mask[1] ? reduce_partials(alpha_partials, alpha) : alpha.new_empty({0});
  grads.beta = grad_mask[2] ? reduce_partials(beta_partials, beta) : beta.new_empty({0});
  grads.confidence = grad_confidence ? grad_confidence->finish()
                                     : (confidence ? confidence->new_empty({0}) : logits.new_empty({0}));
  return {loss, grads};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_entropy_cpu(
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
  const Reduction mode = parse_reduction(reduction);
  TORCH_CHECK_VALUE(
      mode != Reduction::kNone || (!grad_mask[0] && !grad_mask[1] && !grad_mask[2] && !grad_mask[3]),
      "cross_entropy with reduction='none' computes no gradients (grad_mask must be all false, got [",
      grad_mask[0], ", ", grad_mask[1], ", ", grad_mask[2], ", ", grad_mask[3],
      "]); use cross_entropy_backward");
  auto [loss, grads] =
      run_loss(logits, target, alpha, beta, confidence, weight, ignore_index, mode, std::nullopt, grad_mask);
  return {loss, grads.logits, grads.alpha, grads.beta, grads.confidence};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_entropy_backward_cpu(
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
  TORCH_CHECK_VALUE(
      grad_loss.sizes() == target.sizes(), "grad_loss must have the shape of target ", shape_str(target.sizes()),
      ", got shape ", shape_str(grad_loss.sizes()));
  auto grads = run_loss(
                   logits, target, alpha, beta, confidence, weight, ignore_index, Reduction::kNone, grad_loss,
                   grad_mask)
                   .second;
  return {grads.logits, grads.alpha, grads.beta, grads.confidence};
}

// ---------------------------------------------------------------------------------------------
// Calibration.

at::Tensor calibrate_cpu(
    const at::Tensor& logits,
    const at::Tensor& alpha,
    const at::Tensor& beta,
    const std::optional<at::Tensor>& confidence) {
  check_calibrate_inputs(logits, alpha, beta, confidence);
  const at::ScalarType acc = accumulation_type(logits.scalar_type());
  const Geometry logical = geometry_of(logits);
  const at::Tensor alpha_acc = flat_acc(alpha, acc);
  const at::Tensor beta_acc = flat_acc(beta, acc);
  std::optional<at::Tensor> confidence_acc;
  if (confidence) {
    confidence_acc = flat_acc(*confidence, acc);
  }
  at::Tensor out = at::empty_like(logits);
  const LayoutPlan plan = plan_layout(logical, {logits}, out);
  CalibrateArgs args{};
  args.geometry = plan.geometry;
  args.layout = plan.layout;
  args.chunking = chunking_for(logical.rows());
  args.dtype = logits.scalar_type();
  args.logits = {plan.inputs[0].const_data_ptr(), plan.input_strides[0]};
  args.grad = {nullptr, {}};
  args.alpha = alpha_acc.const_data_ptr();
  args.beta = beta_acc.const_data_ptr();
  args.confidence = optional_data(confidence_acc);
  args.out = {plan.out.mutable_data_ptr(), plan.out_strides};
  if (logical.rows() > 0) {
    launch(args);
  }
  copy_back(plan, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> calibrate_backward_cpu(
    const at::Tensor& grad,
    const at::Tensor& logits,
    const at::Tensor& alpha,
    const at::Tensor& beta,
    const std::optional<at::Tensor>& confidence,
    std::array<bool, 4> grad_mask) {
  check_calibrate_inputs(logits, alpha, beta, confidence);
  check_float_operand(logits, grad, "grad");
  TORCH_CHECK_VALUE(
      grad.sizes() == logits.sizes(), "grad must have the shape of logits ", shape_str(logits.sizes()),
      ", got shape ", shape_str(grad.sizes()));
  const at::ScalarType acc = accumulation_type(logits.scalar_type());
  const Geometry logical = geometry_of(logits);
  const Chunking chunking = chunking_for(logical.rows());
  const auto acc_options = logits.options().dtype(acc);
  const at::Tensor alpha_acc = flat_acc(alpha, acc);
  const at::Tensor beta_acc = flat_acc(beta, acc);
  std::optional<at::Tensor> confidence_acc;
  if (confidence) {
    confidence_acc = flat_acc(*confidence, acc);
  }
  at::Tensor grad_logits = grad_mask[0] ? at::empty_like(logits) : logits.new_empty({0});
  at::Tensor alpha_partials = grad_mask[1] ? at::empty({chunking.count, logical.classes}, acc_options) : at::Tensor();
  at::Tensor beta_partials = grad_mask[2] ? at::empty({chunking.count, logical.classes}, acc_options) : at::Tensor();
  std::optional<RowOutput> grad_confidence;
  if (grad_mask[3] && confidence) {
    grad_confidence.emplace(*confidence, acc);
  }
  const bool any_grad = grad_mask[0] || grad_mask[1] || grad_mask[2] || grad_confidence.has_value();
  if (any_grad && logical.rows() > 0) {
    const LayoutPlan plan =
        plan_layout(logical, {logits, grad.to(logits.scalar_type())}, grad_mask[0] ? grad_logits : at::Tensor());
    CalibrateArgs args{};
    args.geometry = plan.geometry;
    args.layout = plan.layout;
    args.chunking = chunking;
    args.dtype = logits.scalar_type();
    args.logits = {plan.inputs[0].const_data_ptr(), plan.input_strides[0]};
    args.grad = {plan.inputs[1].const_data_ptr(), plan.input_strides[1]};
    args.alpha = alpha_acc.const_data_ptr();
    args.beta = beta_acc.const_data_ptr();
    args.confidence = optional_data(confidence_acc);
    args.out = {plan.out.defined() ? plan.out.mutable_data_ptr() : nullptr, plan.out_strides};
    args.grad_alpha_partials = alpha_partials.defined() ? alpha_partials.mutable_data_ptr() : nullptr;
    args.grad_beta_partials = beta_partials.defined() ? beta_partials.mutable_data_ptr() : nullptr;
    args.grad_confidence = grad_confidence ? grad_confidence->buffer.mutable_data_ptr() : nullptr;
    launch(args);
    copy_back(plan, grad_mask[0] ? grad_logits : at::Tensor());
  } else if (grad_confidence) {
    grad_confidence->buffer.zero_();
  }
  return {
      grad_logits,
      grad_mask[1] ? reduce_partials(alpha_partials, alpha) : alpha.new_empty({0}),
      grad_mask[2] ? reduce_partials(beta_partials, beta) : beta.new_empty({0}),
      grad_confidence ? grad_confidence->finish() : (confidence ? confidence->new_empty({0}) : logits.new_empty({0}))};
}

}  // namespace
}  // namespace disalign::cpu

TORCH_LIBRARY_FRAGMENT(disalign, m) {
  // Which per-ISA copy of the CPU kernels runs: "default", "avx2" or "avx512".
  m.def("cpu_capability() -> str", &disalign::cpu::cpu_capability_name);
}

TORCH_LIBRARY_IMPL(disalign, CPU, m) {
  m.impl("cross_entropy", TORCH_FN(disalign::cpu::cross_entropy_cpu));
  m.impl("cross_entropy_backward", TORCH_FN(disalign::cpu::cross_entropy_backward_cpu));
  m.impl("calibrate", TORCH_FN(disalign::cpu::calibrate_cpu));
  m.impl("calibrate_backward", TORCH_FN(disalign::cpu::calibrate_backward_cpu));
}
