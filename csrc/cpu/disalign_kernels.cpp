// Fused DisAlign kernels for the CPU, compiled once per instruction set (see setup.py): calibration
// (paper eq. 6), row softmax statistics, class-weighted cross entropy and its gradients, never
// materialising the calibrated logits or any N x C temporary.
//
// One implementation per kernel, templated on the logits dtype, with a block shape per layout
// (csrc/cpu/kernel_common.h):
//  - classes contiguous (class stride 1: (N, C), channels-last): a block is up to 4 rows, vectors
//    run along the classes; row statistics are horizontal reductions at the end of each sweep;
//  - pixels contiguous (pixel stride 1: NCHW, transposed (N, C)): a block is 4 vectors of
//    consecutive pixels of one image, the sweeps run over the classes and each lane holds one row's
//    running statistics.
// The loss (csrc/cpu/loss_blocks.h) sweeps a block three times in a per-thread scratch, so the logits
// are read from memory once; the calibration kernels (csrc/cpu/calibrate_blocks.h) sweep it once.
// Rows are split into fixed chunks (Chunking), each with its own partial sums, reduced in chunk
// order by the caller: results do not depend on the number of threads.
#include "cpu/calibrate_blocks.h"
#include "cpu/disalign_kernels.h"
#include "cpu/kernel_common.h"
#include "cpu/loss_blocks.h"

#include <ATen/Dispatch.h>

namespace disalign::cpu::CPU_CAPABILITY {
namespace {

template <typename Block, typename Args>
void run_blocks(const Args& args, double* sum_partials, void* scratch, int64_t slots, int64_t per_thread) {
  const Block block(args);
  for_each_chunk<typename Block::acc_t>(
      args.geometry, args.chunking, args.grad_alpha_partials, args.grad_beta_partials, sum_partials,
      static_cast<typename Block::acc_t*>(scratch), slots, per_thread, block);
}

}  // namespace

void cross_entropy_kernel(const LossArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.dtype, "disalign_cpu_cross_entropy", [&] {
    run_blocks<LossBlocks<scalar_t>>(args, args.loss_partials, args.scratch, args.scratch_slots,
                                     args.scratch_per_thread);
  });
}

void calibrate_kernel(const CalibrateArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.dtype, "disalign_cpu_calibrate", [&] {
    run_blocks<CalibrateBlocks<scalar_t>>(args, nullptr, nullptr, 0, 0);
  });
}

int64_t loss_scratch_per_thread(Layout layout, c10::ScalarType dtype, int64_t classes) {
  int64_t elements = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "disalign_cpu_scratch", [&] {
    elements = LossBlocks<scalar_t>::scratch_elements(layout, classes);
  });
  return elements;
}

}  // namespace disalign::cpu::CPU_CAPABILITY
