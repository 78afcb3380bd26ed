// CPU implementations of the disalign ops: the target pre-pass, the chunking and the final
// reductions around the per-ISA kernels of disalign_kernels.cpp; checks, layout and dtype
// preparation are shared with the CUDA binding (csrc/common/op_common.h). The kernel copy
// (DEFAULT / AVX2 / AVX512) is picked once from the running CPU, as ATen does, and
// ATEN_CPU_CAPABILITY=default|avx2|avx512 caps it (tests force each copy this way).
#include "common/op_common.h"
#include "cpu/disalign_kernels.h"
#include "cpu/output_cache.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <utility>
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

// The entry points of one per-ISA copy of the kernels.
struct IsaKernels {
  void (*cross_entropy)(const LossArgs&);
  void (*calibrate)(const CalibrateArgs&);
  int64_t (*loss_scratch_per_thread)(Layout, c10::ScalarType, int64_t);
};

IsaKernels chosen_kernels() {
  switch (chosen_capability()) {
    case Capability::kAvx512:
      return {AVX512::cross_entropy_kernel, AVX512::calibrate_kernel, AVX512::loss_scratch_per_thread};
    case Capability::kAvx2:
      return {AVX2::cross_entropy_kernel, AVX2::calibrate_kernel, AVX2::loss_scratch_per_thread};
    case Capability::kDefault:
      break;
  }
  return {DEFAULT::cross_entropy_kernel, DEFAULT::calibrate_kernel, DEFAULT::loss_scratch_per_thread};
}

// ---------------------------------------------------------------------------------------------
// Chunking and reductions.

Chunking chunking_for(int64_t rows) {
  // Up to 64 chunks of a multiple of 128 rows (whole pixel blocks of every instruction set:
  // kernel_common.h), a function of the row count only.
  constexpr int64_t kMaxChunks = 64;
  constexpr int64_t kRowAlignment = 128;
  if (rows == 0) {
    return {0, kRowAlignment};
  }
  const int64_t per_chunk = (rows + kMaxChunks - 1) / kMaxChunks;
  const int64_t rows_per_chunk = std::max(kRowAlignment, (per_chunk + kRowAlignment - 1) / kRowAlignment * kRowAlignment);
  return {(rows + rows_per_chunk - 1) / rows_per_chunk, rows_per_chunk};
}

// Sum of the per-chunk partials (chunks, C) in chunk order, as a tensor shaped and typed like `like`:
// each class summed by one thread (blocks of classes in parallel), so the result does not depend
// on the thread count.
at::Tensor reduce_partials(const at::Tensor& partials, const at::Tensor& like) {
  const int64_t chunks = partials.size(0);
  const int64_t classes = partials.size(1);
  at::Tensor total = at::empty({classes}, partials.options());
  AT_DISPATCH_FLOATING_TYPES(partials.scalar_type(), "disalign_reduce_partials", [&] {
    const scalar_t* part = partials.const_data_ptr<scalar_t>();
    scalar_t* sum = total.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, classes, 4096, [&](int64_t begin, int64_t end) {
      std::fill(sum + begin, sum + end, scalar_t(0));
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        const scalar_t* row = part + chunk * classes;
        for (int64_t j = begin; j < end; ++j) {
          sum[j] += row[j];
        }
      }
    });
  });
  return total.scalar_type() == like.scalar_type() ? total : at::empty_like(like).copy_(total);
}

// Rejects targets outside [0, C) that are not ignore_index (before any kernel reads with them) and
// returns the sum of weight[target] over the valid rows. Branch-free (a share of ignored pixels
// makes the branch a coin toss: 4 ns a row on seg-ade), with four partial sums (row r in sum
// r % 4) added in a fixed order, so the result depends on the targets alone; a bad target is
// looked up again for the error.
double check_targets_and_sum_weights(
    const at::Tensor& target,
    int64_t classes,
    int64_t ignore_index,
    const std::optional<at::Tensor>& weight) {
  const int64_t* t = target.const_data_ptr<int64_t>();
  const int64_t rows = target.numel();
  constexpr int kSums = 4;
  double sums[kSums] = {0, 0, 0, 0};
  int64_t bad = 0;
  AT_DISPATCH_FLOATING_TYPES(weight ? weight->scalar_type() : at::kDouble, "disalign_check_targets", [&] {
    const scalar_t* w = weight ? weight->const_data_ptr<scalar_t>() : nullptr;
    const auto contribution = [&](int64_t v) {
      const bool in_range = static_cast<uint64_t>(v) < static_cast<uint64_t>(classes);
      bad += !in_range && v != ignore_index;
      const double value = w ? static_cast<double>(w[in_range ? v : 0]) : 1.0;
      return (in_range && v != ignore_index) ? value : 0.0;  // ignore_index in [0, C) is ignored too
    };
    int64_t r = 0;
    for (; r + kSums <= rows; r += kSums) {
      for (int k = 0; k < kSums; ++k) {
        sums[k] += contribution(t[r + k]);
      }
    }
    for (int k = 0; r < rows; ++r, ++k) {
      sums[k] += contribution(t[r]);
    }
  });
  if (bad != 0) {
    for (int64_t r = 0; r < rows; ++r) {
      check_target(t[r], classes, ignore_index);
    }
  }
  return (sums[0] + sums[1]) + (sums[2] + sums[3]);
}

// The CPU kernels take an (N, C) as one image of N pixels, so that it runs in blocks of rows.
constexpr auto kRowsWithoutSpatialDims = RowsWithoutSpatialDims::kOneImage;

// The device-specific part of the ops (see csrc/common/op_common.h).
struct CpuKernels {
  static std::pair<at::Tensor, Gradients> loss(
      const LossInputs& in,
      Reduction reduction,
      const std::optional<at::Tensor>& grad_loss,
      GradMask grad_mask) {
    const Geometry logical = geometry_of(in.logits);
    // The kernels compare class indices in the accumulation type, exact below 2^24 in float.
    TORCH_CHECK_VALUE(
        in.logits.scalar_type() == at::kDouble || logical.classes <= (int64_t{1} << 24), "logits has C = ",
        logical.classes, " classes; the CPU kernels support at most 2^24 classes for ", in.logits.scalar_type(),
        " logits");
    const Chunking chunking = chunking_for(logical.rows());
    const KernelCall call = prepare_loss(
        in, reduction, grad_loss, grad_mask, {chunking.count, logical.classes}, kRowsWithoutSpatialDims,
        empty_like_reused);
    const at::Tensor target_flat = contiguous_as(in.target, at::kLong);
    const double total_weight =
        check_targets_and_sum_weights(target_flat, logical.classes, in.ignore_index, call.weight);
    std::vector<double> loss_partials(call.loss.defined() ? chunking.count : 0);

    auto args = call.kernel_args<LossArgs>();
    args.chunking = chunking;
    args.dtype = in.logits.scalar_type();
    args.weight = data_or_null(call.weight);
    args.target = target_flat.const_data_ptr<int64_t>();
    args.ignore_index = in.ignore_index;
    args.grad_loss = data_or_null(call.grad_loss);
    args.grad_scale = reduction == Reduction::kMean ? 1.0 / total_weight : 1.0;
    args.loss = reduction == Reduction::kNone ? data_or_null(call.loss) : nullptr;
    args.loss_partials = call.loss.defined() ? loss_partials.data() : nullptr;
    args.grad_logits = call.plan.output();
    args.grad_alpha_partials = data_or_null(call.grad_alpha);
    args.grad_beta_partials = data_or_null(call.grad_beta);
    args.grad_confidence = call.grad_confidence_data();
    // One scratch slot per thread that can run a chunk (a block's calibrated logits and exponentials).
    const IsaKernels kernels = chosen_kernels();
    args.scratch_slots = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), chunking.count));
    args.scratch_per_thread = kernels.loss_scratch_per_thread(call.plan.layout, args.dtype, logical.classes);
    // Internal buffers straight from the CPU allocator, without a tensor (fewer dispatcher calls).
    const c10::DataPtr scratch =
        c10::GetCPUAllocator()->allocate(args.scratch_slots * args.scratch_per_thread * c10::elementSize(call.acc));
    args.scratch = scratch.get();
    if (logical.rows() > 0) {
      kernels.cross_entropy(args);
    }

    if (call.loss.defined() && reduction != Reduction::kNone) {
      double sum = 0;
      for (const double partial : loss_partials) {
        sum += partial;
      }
      const double value = reduction == Reduction::kMean ? sum / total_weight : sum;
      AT_DISPATCH_FLOATING_TYPES(call.loss.scalar_type(), "disalign_loss_value", [&] {
        *call.loss.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(value);  // a 0-d CPU tensor
      });
    }
    return {call.loss, call.finish_gradients(in.calibrate_inputs(), reduce_partials)};
  }

  static at::Tensor calibrate(const CalibrateInputs& in) {
    const KernelCall call = prepare_calibrate(in, kRowsWithoutSpatialDims, empty_like_reused);
    auto args = call.kernel_args<CalibrateArgs>();
    args.chunking = chunking_for(call.plan.geometry.rows());
    args.dtype = in.logits.scalar_type();
    args.grad = {nullptr, {}};
    args.out = call.plan.output();
    if (call.plan.geometry.rows() > 0) {
      chosen_kernels().calibrate(args);
    }
    return call.finish_output();
  }

  static Gradients calibrate_backward(const at::Tensor& grad, const CalibrateInputs& in, GradMask grad_mask) {
    const Geometry logical = geometry_of(in.logits);
    const Chunking chunking = chunking_for(logical.rows());
    const KernelCall call = prepare_calibrate_backward(
        grad, in, grad_mask, {chunking.count, logical.classes}, kRowsWithoutSpatialDims, empty_like_reused);
    auto args = call.kernel_args<CalibrateArgs>();
    args.chunking = chunking;
    args.dtype = in.logits.scalar_type();
    args.grad = call.plan.input(1);
    args.out = call.plan.output();
    args.grad_alpha_partials = data_or_null(call.grad_alpha);
    args.grad_beta_partials = data_or_null(call.grad_beta);
    args.grad_confidence = call.grad_confidence_data();
    const bool any_grad = args.out.data || args.grad_alpha_partials || args.grad_beta_partials || args.grad_confidence;
    if (any_grad && logical.rows() > 0) {
      chosen_kernels().calibrate(args);
    }
    return call.finish_gradients(in, reduce_partials);
  }
};

}  // namespace
}  // namespace disalign::cpu

TORCH_LIBRARY_FRAGMENT(disalign, m) {
  // Which per-ISA copy of the CPU kernels runs: "default", "avx2" or "avx512".
  m.def("cpu_capability() -> str", &disalign::cpu::cpu_capability_name);
  // Frees the idle blocks the CPU ops keep for their logits-sized outputs (csrc/cpu/output_cache.h);
  // returns their bytes.
  m.def("empty_cpu_output_cache() -> int", &disalign::cpu::release_idle_output_blocks);
}

TORCH_LIBRARY_IMPL(disalign, CPU, m) {
  disalign::register_ops<disalign::cpu::CpuKernels>(m);
}
