// Reused memory for the CPU ops' logits-sized outputs (grad_logits, calibrated logits).
//
// A training step frees such an output (after the layers below the loss consumed it) and asks for
// one of the same size in the next step. glibc maps an allocation above its mmap threshold (32 MiB
// at most) afresh each time and unmaps it on free, and trims smaller ones off its heap from time to
// time, so the output is faulted in again, 4 KiB at a time: on the 2-core machines of
// benches/cpu_floor.py that costs 2-3x the kernel's own write of it ("exp fresh" against "exp
// floor"). The CUDA caching allocator keeps freed blocks for the next step; this does the same for
// these outputs, and for nothing else:
//   - an output of at least kMinCachedBytes gets a block of a multiple of 2 MiB;
//   - a freed block stays allocated, idle; at most kMaxIdleBlocks stay idle (beyond that the least
//     recently freed one goes back to the system), so at most two outputs' worth of memory is held
//     between steps;
//   - a request takes the smallest idle block that holds it with at most an eighth to spare (the
//     block is reported to the profiler at its own size);
//   - release_idle_output_blocks() (Python: disalign_ops.empty_cache()) frees every idle block;
//     DISALIGN_CPU_OUTPUT_CACHE=0 (read at every allocation) turns the reuse off;
//   - blocks are reported to the profiler (torch.profiler's profile_memory) while they are handed
//     out, as c10's CPU allocator reports its allocations.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace disalign::cpu {

// empty_like(like) (its sizes, dtype and strides) with its memory from the cache above.
at::Tensor empty_like_reused(const at::Tensor& like);

// Frees the idle blocks; returns their bytes.
int64_t release_idle_output_blocks();

}  // namespace disalign::cpu
