// CPU driver of the CUDA tile planner (csrc/cuda/plan.cpp): one plan per input line, as JSON, so the
// planner is tested (tests/test_cuda_plan.py) and reported (benches/sass_budget.py) without a GPU.
// Input line: batch classes spatial pixels elem acc calibrate want_alpha want_beta want_loss mean
//             multiprocessors max_shared_per_block shared_per_sm registers_per_thread
// The occupancy model stands in for cudaOccupancyMaxActiveBlocksPerMultiprocessor: threads, registers
// (256-register warp granules) and shared memory (1 KiB reserved per block), at most 32 blocks.
#include "cuda/plan.h"

#include <algorithm>
#include <cstdio>
#include <iostream>
#include <sstream>
#include <string>

using namespace disalign::cuda;

int main() {
  std::string line;
  while (std::getline(std::cin, line)) {
    if (line.empty() || line[0] == '#') {
      continue;
    }
    std::istringstream in(line);
    int64_t batch, classes, spatial;
    int pixels, elem, acc, calibrate, want_alpha, want_beta, want_loss, mean, sms, max_shared, shared_per_sm, regs;
    if (!(in >> batch >> classes >> spatial >> pixels >> elem >> acc >> calibrate >> want_alpha >> want_beta >>
          want_loss >> mean >> sms >> max_shared >> shared_per_sm >> regs)) {
      std::fprintf(stderr, "bad line: %s\n", line.c_str());
      return 2;
    }
    TileRequest q{{batch, classes, spatial}, pixels != 0, elem, acc, calibrate != 0, want_alpha != 0,
                  want_beta != 0, want_loss != 0, mean != 0};
    DeviceLimits dev;
    dev.multiprocessors = sms;
    dev.max_shared_per_block = max_shared;
    auto occupancy = [&](int shared_bytes) {
      const int warps = kTileThreads / 32;
      const int by_threads = 2048 / kTileThreads;
      const int regs_per_warp = (regs * 32 + 255) / 256 * 256;
      const int by_regs = (65536 / regs_per_warp) / warps;
      const int by_smem = shared_per_sm / (shared_bytes + 1024);
      return std::max(0, std::min({by_threads, by_regs, by_smem, 32}));
    };
    const TilePlan p = plan_tiles(q, dev, occupancy);
    auto ws = [](size_t v) { return v == SIZE_MAX ? -1LL : static_cast<long long>(v); };
    std::printf(
        "{\"vec\": %d, \"tile_rows\": %d, \"pixel_vectors\": %d, \"group\": %d, \"chunk_classes\": %d, "
        "\"num_chunks\": %d, \"slices\": %d, \"line_stride\": %d, \"e_stride\": %d, \"ab_stride\": %d, "
        "\"acc_stride\": %d, \"e_cached\": %s, \"acc_in_shared\": %s, \"num_tiles\": %lld, \"tiles_per_image\": %lld, "
        "\"offset_tile2\": %d, \"offset_e\": %d, \"offset_ab\": %d, \"offset_acc\": %d, \"offset_partials\": %d, "
        "\"offset_rows\": %d, \"shared_bytes\": %d, \"blocks_per_sm\": %d, \"blocks\": %d, \"weight_blocks\": %d, "
        "\"ws_slices\": %d, \"ws_alpha\": %lld, \"ws_beta\": %lld, \"ws_loss\": %lld, \"ws_weight\": %lld, "
        "\"workspace_bytes\": %zu, \"row_partial_entries\": %zu, \"row_meta_bytes\": %zu}\n",
        p.vec, p.tile_rows, p.pixel_vectors, p.group, p.chunk_classes, p.num_chunks, p.slices, p.line_stride,
        p.e_stride, p.ab_stride, p.acc_stride, p.e_cached ? "true" : "false", p.acc_in_shared ? "true" : "false",
        static_cast<long long>(p.num_tiles), static_cast<long long>(p.tiles_per_image), p.offset_tile2, p.offset_e,
        p.offset_ab, p.offset_acc, p.offset_partials, p.offset_rows, p.shared_bytes, p.blocks_per_sm, p.blocks,
        p.weight_blocks, p.ws_slices, ws(p.ws_alpha), ws(p.ws_beta), ws(p.ws_loss), ws(p.ws_weight),
        p.workspace_bytes, row_partial_entries(q, p), row_meta_bytes(q, p.tile_rows));
  }
  return 0;
}
