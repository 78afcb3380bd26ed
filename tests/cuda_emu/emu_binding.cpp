// The CUDA binding (csrc/cuda/disalign_cuda.cpp) over the emulated kernels, as the CPU operators of
// torch.ops.disalign_emu (schemas inferred from the functions; the same as torch.ops.disalign's), plus
// disalign_emu::configure(multiprocessors, max_shared_per_block, shared_per_sm, registers, gpc_sms, seed) and
// disalign_emu::selftest(name, grid, shared_bytes) (emu_selftest.cpp) and disalign_emu::launches().
// The tensors are CPU tensors, which the emulated kernels read and write in place.
#include <torch/library.h>

// The binding's own registration under the CUDA key is not wanted here (the real extension may have
// registered the real one): its TORCH_LIBRARY_IMPL block becomes an unused function.
#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, key, m) [[maybe_unused]] static void emulated_cuda_registration(torch::Library& m)
#include "cuda/disalign_cuda.cpp"
#undef TORCH_LIBRARY_IMPL

#include "emu.h"

namespace {

using EmulatedOps = disalign::Ops<disalign::cuda::CudaKernels>;

void configure(int64_t multiprocessors, int64_t max_shared_per_block, int64_t shared_per_sm, int64_t registers,
               int64_t gpc_sms, int64_t schedule_seed) {
  emu::DeviceConfig c;
  c.multiprocessors = static_cast<int>(multiprocessors);
  c.max_shared_per_block = static_cast<int>(max_shared_per_block);
  c.shared_per_sm = static_cast<int>(shared_per_sm);
  c.registers_per_thread = static_cast<int>(registers);
  c.gpc_sms = static_cast<int>(gpc_sms);
  emu::configure(c, static_cast<uint64_t>(schedule_seed));
}

at::Tensor selftest(c10::string_view name, int64_t grid, int64_t shared_bytes) {
  std::vector<int> out;
  try {
    out = emu::selftest(std::string(name), static_cast<int>(grid), static_cast<size_t>(shared_bytes));
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, e.what());
  }
  return at::tensor(std::vector<int64_t>(out.begin(), out.end()));
}

// The launches since configure(), one row (grid, block threads, cluster size) each.
at::Tensor launches() {
  std::vector<int64_t> flat;
  for (const emu::LaunchRecord& r : emu::launches()) {
    flat.insert(flat.end(), {r.grid, r.block, r.cluster});
  }
  return at::tensor(flat).view({-1, 3});
}

}  // namespace

TORCH_LIBRARY(disalign_emu, m) {
  m.def("cross_entropy", TORCH_FN(EmulatedOps::cross_entropy));
  m.def("cross_entropy_backward", TORCH_FN(EmulatedOps::cross_entropy_backward));
  m.def("calibrate", TORCH_FN(EmulatedOps::calibrate));
  m.def("calibrate_backward", TORCH_FN(EmulatedOps::calibrate_backward));
  m.def("configure", configure);
  m.def("selftest", selftest);
  m.def("launches", launches);
}
