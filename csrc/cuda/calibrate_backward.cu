// calibrate_backward on CUDA: the tile kernels of tile_kernel.cuh with dzhat as the second input
// tile (launched by tile_launch.cuh). Torch-free.
#include "cuda/tile_launch.cuh"

namespace disalign::cuda {

size_t calibrate_backward_workspace_bytes(const CalibrateBackwardArgs& args) {
  return tile_workspace_bytes(args);
}

cudaError_t calibrate_backward(const CalibrateBackwardArgs& args, void* workspace, cudaStream_t stream) {
  return launch_tiles(args, workspace, stream);
}

}  // namespace disalign::cuda
