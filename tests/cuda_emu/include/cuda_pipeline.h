// tests/cuda_emu: cp.async as a synchronous copy (visible to other threads after the caller's barrier,
// as on the GPU after __pipeline_wait_prior and __syncthreads).
#pragma once

#include <cstddef>
#include <cstring>

inline void __pipeline_memcpy_async(void* dst, const void* src, size_t bytes) {
  std::memcpy(dst, src, bytes);
}
inline void __pipeline_commit() {}
inline void __pipeline_wait_prior(size_t) {}
