// calibrate on CUDA: zhat = (1 + s*alpha) * z + s*beta in the logits' dtype. Torch-free.
//
// The kernel walks lines along the logits' contiguous axis (rows of classes, or the pixels of one
// class of one image): a line's (b, class-or-pixel) comes from one multiply-high division per line,
// the elements along it use 32-bit offsets, and where input and output have the same 16-byte phase
// the aligned body moves in 16-byte vectors (head and tail elementwise).
#include "cuda/launch_common.cuh"

#include <algorithm>

namespace disalign::cuda {
namespace {

struct CalibrateLines {
  int64_t lines;       // B*S (classes contiguous) or B*C (pixels contiguous)
  int64_t inner;       // C or S: elements per line
  FastDivider by_mid;  // lines -> (b, m): m < S (classes) or m < C (pixels)
  int lanes_per_line;  // threads sharing a line (a multiple of 32 dividing kBlock)
};

template <typename scalar_t, typename acc_t, bool PIXELS>
__global__ void __launch_bounds__(kBlock) calibrate_kernel(
    Geometry g, CalibrateLines L, const scalar_t* logits, Strides in, scalar_t* out, Strides os, const acc_t* alpha,
    const acc_t* beta, const acc_t* confidence) {
  constexpr int V = kVec<scalar_t>;
  const int lanes = L.lanes_per_line;
  const int lines_per_block = kBlock / lanes;
  const int lane = threadIdx.x % lanes;
  const int64_t in_along = PIXELS ? in.spatial : in.cls;
  const int64_t out_along = PIXELS ? os.spatial : os.cls;
  for (int64_t line = static_cast<int64_t>(blockIdx.x) * lines_per_block + threadIdx.x / lanes; line < L.lines;
       line += static_cast<int64_t>(gridDim.x) * lines_per_block) {
    const int64_t b = L.by_mid.quotient(line);
    const int64_t m = line - b * static_cast<int64_t>(L.by_mid.divisor);
    const scalar_t* src = logits + b * in.batch + m * (PIXELS ? in.cls : in.spatial);
    scalar_t* dst = out + b * os.batch + m * (PIXELS ? os.cls : os.spatial);
    // Per line: classes contiguous, the row's s; pixels contiguous, the class's alpha and beta.
    const acc_t s_line = !PIXELS && confidence != nullptr ? confidence[line] : acc_t(1);
    const acc_t a_line = PIXELS ? alpha[m] : acc_t(0);
    const acc_t b_line = PIXELS ? beta[m] : acc_t(0);
    const acc_t* conf_line = PIXELS && confidence != nullptr ? confidence + b * g.spatial : nullptr;
    auto one = [&](int64_t k, acc_t z) {
      const acc_t s = PIXELS ? (conf_line != nullptr ? conf_line[k] : acc_t(1)) : s_line;
      const acc_t a = PIXELS ? a_line : alpha[k];
      const acc_t bb = PIXELS ? b_line : beta[k];
      return calibrated(z, s, a, bb);
    };
    const int64_t n = L.inner;
    const uintptr_t src_phase = reinterpret_cast<uintptr_t>(src) % 16;
    const bool vector = in_along == 1 && out_along == 1 && n < (int64_t{1} << 31) &&
        src_phase == reinterpret_cast<uintptr_t>(dst) % 16 && src_phase % sizeof(scalar_t) == 0;
    if (vector) {
      const int64_t head_max = ((16 - src_phase) % 16) / sizeof(scalar_t);
      const int head = static_cast<int>(n < head_max ? n : head_max);
      const int body = static_cast<int>((n - head) / V);
      if (lane < head) {
        dst[lane] = from_acc<scalar_t>(one(lane, to_acc<acc_t>(src[lane])));
      }
      for (int v = lane; v < body; v += lanes) {  // SASS_LOOP(calibrate-vector, V)
        const int k0 = head + v * V;
        acc_t z[V];
        load_n<V>(src + k0, z);
#pragma unroll
        for (int i = 0; i < V; ++i) {
          z[i] = one(k0 + i, z[i]);
        }
        store_n<V>(dst + k0, z);
      }
      for (int64_t k = head + static_cast<int64_t>(body) * V + lane; k < n; k += lanes) {
        dst[k] = from_acc<scalar_t>(one(k, to_acc<acc_t>(src[k])));
      }
    } else {
      for (int64_t k = lane; k < n; k += lanes) {
        dst[k * out_along] = from_acc<scalar_t>(one(k, to_acc<acc_t>(src[k * in_along])));
      }
    }
  }
}

}  // namespace

cudaError_t calibrate(const CalibrateArgs& args, cudaStream_t stream) {
  return dispatch_dtype(args.dtype, [&](auto scalar, auto acc) -> cudaError_t {
    using scalar_t = decltype(scalar);
    using acc_t = decltype(acc);
    const Geometry& g = args.geometry;
    if (g.batch * g.classes * g.spatial == 0) {
      return cudaSuccess;
    }
    int device = 0;
    DeviceLimits dev;
    cudaError_t err = current_device_limits(&device, &dev);
    if (err != cudaSuccess) {
      return err;
    }
    const bool pixels = args.layout == Layout::kPixelsContiguous;
    CalibrateLines L;
    L.inner = pixels ? g.spatial : g.classes;
    L.lines = g.batch * (pixels ? g.classes : g.spatial);
    L.by_mid = FastDivider(pixels ? g.classes : std::max<int64_t>(g.spatial, 1));
    // Enough lanes per line for one 16-byte vector each, from one warp up to the whole block.
    const int64_t vectors = (L.inner + kVec<scalar_t> - 1) / kVec<scalar_t>;
    L.lanes_per_line = kWarp;
    while (L.lanes_per_line < kBlock && L.lanes_per_line < vectors) {
      L.lanes_per_line *= 2;
    }
    const int64_t lines_per_block = kBlock / L.lanes_per_line;
    const int grid = static_cast<int>(
        std::min<int64_t>((L.lines + lines_per_block - 1) / lines_per_block, 16LL * dev.multiprocessors));
    const auto kernel = pixels ? calibrate_kernel<scalar_t, acc_t, true> : calibrate_kernel<scalar_t, acc_t, false>;
    DISALIGN_LAUNCH(kernel, grid, kBlock, 0, stream)(
        g, L, static_cast<const scalar_t*>(args.logits.data), args.logits.strides,
        static_cast<scalar_t*>(args.out.data), args.out.strides, static_cast<const acc_t*>(args.alpha),
        static_cast<const acc_t*>(args.beta), static_cast<const acc_t*>(args.confidence));
    return cudaGetLastError();
  });
}

}  // namespace disalign::cuda
