// tests/cuda_emu: the current stream of the emulated device (there is one, the null stream).
#pragma once

#include <cuda_runtime_api.h>

namespace at::cuda {
struct EmulatedStream {
  cudaStream_t stream() const {
    return nullptr;
  }
};
inline EmulatedStream getCurrentCUDAStream() {
  return {};
}
}  // namespace at::cuda
