// CUDA implementations of the disalign ops: workspaces and stream around the torch-free launchers
// of csrc/cuda (disalign_cuda.h); checks, layout and dtype
// preparation are shared with the CPU binding (csrc/common/op_common.h). Compiled only in a CUDA
// build of the extension (setup.py, DISALIGN_CUDA).
//
// Out-of-range targets: the kernels never index with them and give their rows a NaN loss and NaN
// gradients, so a bad batch is never silent, without a device sync or a device assert (which would
// poison the CUDA context). Raising IndexError needs the values on the host: the Python front-end
// does that when DISALIGN_CHECK_TARGETS=1 (disalign_ops/api.py), for every backend alike.
#include "common/op_common.h"
#include "cuda/disalign_cuda.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <utility>

namespace disalign::cuda {
namespace {

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

// The kernels index classes with 32-bit ints.
void check_class_count(const at::Tensor& logits) {
  TORCH_CHECK_VALUE(
      logits.size(1) <= std::numeric_limits<int32_t>::max(), "logits must have fewer than 2^31 classes, got ",
      logits.size(1));
}

// The CUDA kernels keep an (N, C) as N images of one pixel; only a transposed one is one image.
constexpr auto kRowsWithoutSpatialDims = RowsWithoutSpatialDims::kOneImageIfTransposed;

// Logits-sized outputs come from PyTorch's caching allocator, which keeps freed blocks for reuse.
at::Tensor empty_output(const at::Tensor& like) {
  return at::empty_like(like);
}

// The kernels reduce the per-class gradients to C values in the accumulation type.
at::Tensor to_dtype_of(const at::Tensor& per_class, const at::Tensor& like) {
  return per_class.to(like.scalar_type());
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "disalign ", op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// A launcher's workspace on the logits' device; undefined (no pointer) when it needs none.
at::Tensor workspace_for(size_t bytes, const at::Tensor& logits) {
  return bytes ? at::empty({static_cast<int64_t>(bytes)}, logits.options().dtype(at::kByte)) : at::Tensor();
}

// The device-specific part of the ops (see csrc/common/op_common.h). The launchers are called as
// cuda::<op>: the members of the same names hide them.
struct CudaKernels {
  static std::pair<at::Tensor, Gradients> loss(
      const LossInputs& in,
      Reduction reduction,
      const std::optional<at::Tensor>& grad_loss,
      GradMask grad_mask) {
    check_class_count(in.logits);
    const c10::cuda::CUDAGuard guard(in.logits.device());
    const KernelCall call =
        prepare_loss(in, reduction, grad_loss, grad_mask, {in.logits.size(1)}, kRowsWithoutSpatialDims, empty_output);
    const at::Tensor target_flat = in.target.contiguous().view({-1});

    auto args = call.kernel_args<LossArgs>();
    args.dtype = kernel_dtype(in.logits.scalar_type());
    args.target = target_flat.const_data_ptr();
    args.target_is_int64 = target_flat.scalar_type() == at::kLong;
    args.weight = data_or_null(call.weight);
    args.ignore_index = in.ignore_index;
    args.reduction = reduction;
    args.grad_loss = data_or_null(call.grad_loss);
    args.loss = data_or_null(call.loss);
    args.grad_logits = call.plan.output();
    args.grad_alpha = data_or_null(call.grad_alpha);
    args.grad_beta = data_or_null(call.grad_beta);
    args.grad_confidence = call.grad_confidence_data();

    const at::Tensor workspace = workspace_for(cross_entropy_workspace_bytes(args), in.logits);
    check_launch(
        cuda::cross_entropy(args, data_or_null(workspace), at::cuda::getCurrentCUDAStream().stream()), "cross_entropy");
    return {call.loss, call.finish_gradients(in.calibrate_inputs(), to_dtype_of)};
  }

  static at::Tensor calibrate(const CalibrateInputs& in) {
    check_class_count(in.logits);
    const c10::cuda::CUDAGuard guard(in.logits.device());
    const KernelCall call = prepare_calibrate(in, kRowsWithoutSpatialDims, empty_output);
    auto args = call.kernel_args<CalibrateArgs>();
    args.dtype = kernel_dtype(in.logits.scalar_type());
    args.out = call.plan.output();
    check_launch(cuda::calibrate(args, at::cuda::getCurrentCUDAStream().stream()), "calibrate");
    return call.finish_output();
  }

  static Gradients calibrate_backward(const at::Tensor& grad, const CalibrateInputs& in, GradMask grad_mask) {
    check_class_count(in.logits);
    const c10::cuda::CUDAGuard guard(in.logits.device());
    const KernelCall call =
        prepare_calibrate_backward(grad, in, grad_mask, {in.logits.size(1)}, kRowsWithoutSpatialDims, empty_output);
    auto args = call.kernel_args<CalibrateBackwardArgs>();
    args.dtype = kernel_dtype(in.logits.scalar_type());
    args.grad = call.plan.input(1);
    args.grad_logits = call.plan.output();
    args.grad_alpha = data_or_null(call.grad_alpha);
    args.grad_beta = data_or_null(call.grad_beta);
    args.grad_confidence = call.grad_confidence_data();
    const at::Tensor workspace = workspace_for(calibrate_backward_workspace_bytes(args), in.logits);
    check_launch(
        cuda::calibrate_backward(args, data_or_null(workspace), at::cuda::getCurrentCUDAStream().stream()),
        "calibrate_backward");
    return call.finish_gradients(in, to_dtype_of);
  }
};

}  // namespace
}  // namespace disalign::cuda

TORCH_LIBRARY_IMPL(disalign, CUDA, m) {
  disalign::register_ops<disalign::cuda::CudaKernels>(m);
}
