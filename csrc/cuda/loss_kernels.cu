// cross_entropy on CUDA: the tile kernels of tile_kernel.cuh instantiated for the loss (launched by
// tile_launch.cuh). Torch-free.
#include "cuda/tile_launch.cuh"

namespace disalign::cuda {

size_t cross_entropy_workspace_bytes(const LossArgs& args) {
  return tile_workspace_bytes(args);
}

cudaError_t cross_entropy(const LossArgs& args, void* workspace, cudaStream_t stream) {
  return launch_tiles(args, workspace, stream);
}

}  // namespace disalign::cuda
