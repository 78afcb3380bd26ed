// Device math shared by the CUDA kernels: element types (storage scalar_t, accumulation acc_t: float,
// or double for double logits), 16-byte vector access, exponentials, the calibration formula and
// fixed-order reductions. Torch-free (CUDA headers only).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace disalign::cuda {

// The kernel's dynamic shared memory, `name`, 16-byte aligned. A macro (as DISALIGN_LAUNCH in
// launch_common.cuh) so that tests/cuda_emu, which runs these kernels on the CPU, can provide its own.
#ifndef DISALIGN_DYNAMIC_SHARED
#define DISALIGN_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

constexpr int kBlock = 256;
constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Elements of scalar_t in one 16-byte vector (8 for half / bf16, 4 for float, 2 for double).
template <typename scalar_t>
constexpr int kVec = 16 / static_cast<int>(sizeof(scalar_t));

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<__half>(__half v) {
  return __half2float(v);  // SASS_TAG(convert)
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);  // SASS_TAG(convert)
}
template <>
__device__ __forceinline__ float to_float<float>(float v) {
  return v;
}

template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t to_acc(scalar_t v) {
  return static_cast<acc_t>(to_float(v));
}
template <>
__device__ __forceinline__ double to_acc<double, double>(double v) {
  return v;
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ scalar_t from_acc(acc_t v);
template <>
__device__ __forceinline__ __half from_acc<__half, float>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ float from_acc<float, float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ double from_acc<double, double>(double v) {
  return v;
}

// The two bf16 halves of a 32-bit word as floats: bf16 is the top half of a float, so each is one
// shift or mask (nvcc's conversion spends PRMT + shift on the high half). The SASS_TAG(convert) lines
// are what benches/sass_budget.py counts as conversion arithmetic (sass_utils.arithmetic_count).
__device__ __forceinline__ void unpack_bf16x2(uint32_t w, float& lo, float& hi) {
  lo = __uint_as_float(w << 16);          // SASS_TAG(convert)
  hi = __uint_as_float(w & 0xffff0000u);  // SASS_TAG(convert)
}

// N consecutive elements at p (16-byte aligned when N elements are 16 bytes) into registers.
template <int N, typename acc_t, typename scalar_t>
__device__ __forceinline__ void load_n(const scalar_t* p, acc_t (&out)[N]) {
  if constexpr (std::is_same_v<scalar_t, __nv_bfloat16> && std::is_same_v<acc_t, float> && N % 8 == 0) {
#pragma unroll
    for (int v = 0; v < N / 8; ++v) {
      const uint4 raw = reinterpret_cast<const uint4*>(p)[v];
      unpack_bf16x2(raw.x, out[8 * v + 0], out[8 * v + 1]);
      unpack_bf16x2(raw.y, out[8 * v + 2], out[8 * v + 3]);
      unpack_bf16x2(raw.z, out[8 * v + 4], out[8 * v + 5]);
      unpack_bf16x2(raw.w, out[8 * v + 6], out[8 * v + 7]);
    }
  } else if constexpr (N * sizeof(scalar_t) % 16 == 0) {
#pragma unroll
    for (int v = 0; v < N * static_cast<int>(sizeof(scalar_t)) / 16; ++v) {
      const uint4 raw = reinterpret_cast<const uint4*>(p)[v];
      const scalar_t* e = reinterpret_cast<const scalar_t*>(&raw);
#pragma unroll
      for (int i = 0; i < 16 / static_cast<int>(sizeof(scalar_t)); ++i) {
        out[v * (16 / sizeof(scalar_t)) + i] = to_acc<acc_t>(e[i]);
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      out[i] = to_acc<acc_t>(p[i]);
    }
  }
}

template <int N, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_n(scalar_t* p, const acc_t (&in)[N]) {
  if constexpr (N * sizeof(scalar_t) % 16 == 0) {
#pragma unroll
    for (int v = 0; v < N * static_cast<int>(sizeof(scalar_t)) / 16; ++v) {
      uint4 raw;
      scalar_t* e = reinterpret_cast<scalar_t*>(&raw);
#pragma unroll
      for (int i = 0; i < 16 / static_cast<int>(sizeof(scalar_t)); ++i) {
        e[i] = from_acc<scalar_t>(in[v * (16 / sizeof(scalar_t)) + i]);
      }
      reinterpret_cast<uint4*>(p)[v] = raw;
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      p[i] = from_acc<scalar_t>(in[i]);
    }
  }
}

// exp(x - m) for x <= m (m: the row max of zhat) from scaled_max(m) = m * log2(e): one FFMA and one
// MUFU.EX2. The product x * log2(e) is exact inside the FMA; the rounding of m * log2(e) shifts the
// exponent by at most |m| * 2^-24 (relative error of e below 1e-5 for |m| < 100). The flush of
// results below 2^-126 to zero changes probabilities by < 1e-38.
constexpr float kLog2e = 1.4426950408889634f;
__device__ __forceinline__ float scaled_max(float m) {
  return m * kLog2e;
}
__device__ __forceinline__ float exp_from_max(float x, float m_scaled) {
  const float v = fma(x, kLog2e, -m_scaled);
#if defined(DISALIGN_CUDA_EMULATION)  // tests/cuda_emu: the CPU's exp2, flushed to zero below 2^-126 as MUFU.EX2
  return v < -126.0f ? 0.0f : exp2f(v);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(v));
  return y;
#endif
}
__device__ __forceinline__ double scaled_max(double m) {
  return m;
}
__device__ __forceinline__ double exp_from_max(double x, double m) {
  return exp(x - m);
}

// Correctly rounded reciprocal. Kernels multiply by it instead of dividing: IEEE division calls a
// slow-path subroutine whose register saves show up as spills.
__device__ __forceinline__ float reciprocal(float x) {
  return __frcp_rn(x);
}
__device__ __forceinline__ double reciprocal(double x) {
  return __drcp_rn(x);
}

template <typename acc_t>
__device__ __forceinline__ acc_t quiet_nan();
template <>
__device__ __forceinline__ float quiet_nan<float>() {
  return __int_as_float(0x7fc00000);
}
template <>
__device__ __forceinline__ double quiet_nan<double>() {
  return __longlong_as_double(0x7ff8000000000000LL);
}

// u = a*z + b, the factor of s in the confidence gradient (ds = sum dzhat * u).
template <typename acc_t>
__device__ __forceinline__ acc_t affine_u(acc_t z, acc_t a, acc_t b) {
  return fma(a, z, b);
}
// Paper eq. 6, zhat = (1 + s*a) * z + s*b, in this multiplier form, the CPU and Triton kernels' rounding
// sequence. Not as z + s*u (one FMA less given u): for z = -inf that gives s*(a*z + b) + z = inf - inf
// = NaN when a < 0, and NaN for a = 0 (0 * inf), the heads' initial alpha, where the reference's zhat
// is -inf (a masked class: p = 0, a finite loss).
template <typename acc_t>
__device__ __forceinline__ acc_t calibrated(acc_t z, acc_t s, acc_t a, acc_t b) {
  return fma(fma(s, a, acc_t(1)), z, s * b);
}

__device__ __forceinline__ int64_t load_target(const void* target, bool is_int64, int64_t row) {
  return is_int64 ? static_cast<const int64_t*>(target)[row] : static_cast<const int32_t*>(target)[row];
}

struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return fmax(a, b);
  }
};
struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
};

// Butterfly over aligned groups of `width` lanes: every lane of a group ends with the same bits
// (each step adds the same two operands, in either order, and + and max are commutative).
template <typename T, typename Op>
__device__ __forceinline__ T group_reduce(T v, int width, Op op) {
  for (int offset = width / 2; offset > 0; offset /= 2) {
    v = op(v, __shfl_xor_sync(kFullMask, v, offset));
  }
  return v;
}

// Sum of values[0..n) by one warp in a fixed order; every lane returns the same bits.
template <typename acc_t>
__device__ acc_t warp_fixed_sum(const acc_t* values, int64_t n, int64_t stride = 1) {
  const int lane = threadIdx.x % kWarp;
  acc_t sum = 0;
  for (int64_t i = lane; i < n; i += kWarp) {
    sum += values[i * stride];
  }
  return group_reduce(sum, kWarp, SumOp{});
}

// Sum over the block in a fixed order, valid in thread 0. `scratch` holds kBlock / kWarp values.
template <typename acc_t>
__device__ acc_t block_fixed_sum(acc_t v, acc_t* scratch) {
  v = group_reduce(v, kWarp, SumOp{});
  if (threadIdx.x % kWarp == 0) {
    scratch[threadIdx.x / kWarp] = v;
  }
  __syncthreads();
  acc_t sum = 0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kBlock / kWarp; ++w) {
      sum += scratch[w];
    }
  }
  return sum;
}

// Unsigned 32-bit division by a divisor fixed at launch (multiply-high and shift, round-up method of
// Granlund and Montgomery): one IMAD.HI + shift instead of the division subroutine.
struct FastDivider32 {
  uint32_t divisor;
  uint32_t magic;
  uint32_t shift;
  __device__ __forceinline__ uint32_t quotient(uint32_t n) const {
    return (__umulhi(n, magic) + n) >> shift;
  }
};

}  // namespace disalign::cuda
