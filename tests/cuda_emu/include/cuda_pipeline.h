// tests/cuda_emu: cp.async as a deferred copy. The source is read when the copy is issued; the
// destination is written when the thread's __pipeline_wait_prior lets its group complete (so a kernel
// that reads the destination before waiting, or lets the next copy land in a buffer still in use,
// computes with the wrong bytes), and becomes visible to other threads after a barrier, as on the GPU.
#pragma once

#include <cstddef>

namespace emu {
void pipeline_copy(void* dst, const void* src, size_t bytes);
void pipeline_commit();
void pipeline_wait_prior(size_t groups);
}  // namespace emu

inline void __pipeline_memcpy_async(void* dst, const void* src, size_t bytes) {
  emu::pipeline_copy(dst, src, bytes);
}
inline void __pipeline_commit() {
  emu::pipeline_commit();
}
inline void __pipeline_wait_prior(size_t groups) {
  emu::pipeline_wait_prior(groups);
}
