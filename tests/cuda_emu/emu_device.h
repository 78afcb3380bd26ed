// What the kernels of csrc/cuda use of CUDA C++ on the device, for the CPU emulation (emu.h).
// Included before the kernel files (emu_kernels.cpp); CUDA's own headers (cuda_runtime.h,
// cuda_fp16.h, cuda_bf16.h) compile for the host as they are; include/ holds the few that are
// replaced (cuda_pipeline.h, and the binding's ATen/c10 CUDA headers).
#pragma once

#define DISALIGN_CUDA_EMULATION 1

#include "emu.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <math.h>  // the float overloads of fma, fmax, exp, log in the global namespace

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>

// Qualifiers: CUDA's host_defines.h makes __device__, __global__ and __shared__ empty for a host
// compiler; __shared__ variables are shared by the threads of a block, i.e. static here (the blocks of
// a launch run one after another; kernels launched in clusters use dynamic shared memory only).
#undef __shared__
#define __shared__ static
#define __launch_bounds__(...)
#define DISALIGN_DYNAMIC_SHARED(name) unsigned char* const name = ::emu::dynamic_shared()
#define DISALIGN_LAUNCH(kernel, grid, block, shared_bytes, stream) ::emu::kernel_call(kernel, grid, block, shared_bytes, stream)
#define DISALIGN_LAUNCH_CLUSTER(kernel, grid, block, shared_bytes, stream, cluster) \
  ::emu::kernel_call(kernel, grid, block, shared_bytes, stream, cluster)

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::block_index())
#define gridDim (::emu::grid_dim)
#define blockDim (::emu::block_dim)
#define __syncthreads() ::emu::sync_block(__LINE__)

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= 8, "one warp slot holds 8 bytes");
  if (mask != 0xffffffffu) {
    ::emu::fail("__shfl_xor_sync with a partial mask is not emulated");
  }
  const unsigned lane = ::emu::lane();
  std::memcpy(::emu::warp_slot(lane), &v, sizeof(T));
  ::emu::sync_warp();
  const unsigned group = lane / width * width;
  const unsigned src = group + ((lane - group) ^ static_cast<unsigned>(lane_mask)) % width;
  T out;
  std::memcpy(&out, ::emu::warp_slot(src), sizeof(T));
  ::emu::sync_warp();  // the slots are written again by the next exchange
  return out;
}

// Integer and float intrinsics.
inline float __int_as_float(int v) {
  float f;
  std::memcpy(&f, &v, 4);
  return f;
}
inline float __uint_as_float(unsigned v) {
  float f;
  std::memcpy(&f, &v, 4);
  return f;
}
inline double __longlong_as_double(long long v) {
  double d;
  std::memcpy(&d, &v, 8);
  return d;
}
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<uint64_t>(a) * b) >> 32);
}
inline float __frcp_rn(float x) {
  return 1.0f / x;
}
inline double __drcp_rn(double x) {
  return 1.0 / x;
}

// CUDA's min / max overloads (integer, mixed 32/64-bit and float), which device code calls unqualified.
inline int min(int a, int b) {
  return a < b ? a : b;
}
inline int max(int a, int b) {
  return a > b ? a : b;
}
inline long long min(long long a, long long b) {
  return a < b ? a : b;
}
inline long long max(long long a, long long b) {
  return a > b ? a : b;
}
inline long min(long a, long b) {
  return a < b ? a : b;
}
inline long max(long a, long b) {
  return a > b ? a : b;
}
inline long min(int a, long b) {
  return min(static_cast<long>(a), b);
}
inline long min(long a, int b) {
  return min(a, static_cast<long>(b));
}
inline long max(int a, long b) {
  return max(static_cast<long>(a), b);
}
inline long max(long a, int b) {
  return max(a, static_cast<long>(b));
}
