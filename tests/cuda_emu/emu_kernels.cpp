// csrc/cuda's kernel files, compiled for the CPU emulation (emu_device.h) as one translation unit.
#include "emu_device.h"

#include "cuda/calibrate_backward.cu"
#include "cuda/calibrate_kernel.cu"
#include "cuda/loss_kernels.cu"
#include "cuda/reduce_kernels.cu"
