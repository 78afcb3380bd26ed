// CPU driver of the CUDA tile planner (csrc/cuda/plan.cpp): one plan per input line, as JSON, so the
// planner is tested (tests/test_cuda_plan.py) and reported (benches/sass_budget.py) without a GPU.
// Input line: batch classes spatial pixels elem acc calibrate want_alpha want_beta want_loss mean
//             multiprocessors max_shared_per_block shared_per_sm registers_per_thread gpc_sms
//             [data_address stride_batch stride_classes stride_spatial]
// (gpc_sms > 0: a device with thread-block clusters of up to 16 blocks, as an H200 allows them, and
// occupancy.h's cluster model; 0: none.)
// (with the optional operand, the plan also carries copy_unit's choice for it: "copy_unit").
// Occupancy: cuda_plan/occupancy.h's model (as in the kernel emulation, tests/cuda_emu).
//
// Input line `copy ADDR N ELEM` instead: the planner's copy unit for such a line is not asked; the
// line copies of csrc/cuda/line_copy.h (the kernel's kCopyRealign path, the same code) run on host
// memory for a line of N elements of ELEM bytes at an address = ADDR mod 16, in both directions, item
// by item as the tile walk issues them; prints the split and what the emulation found (data
// copied, accesses outside the line or its shared line, bytes beyond the line touched).
#include "cuda/line_copy.h"
#include "cuda/plan.h"
#include "occupancy.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

using namespace disalign::cuda;

namespace {

// Host memory for line_copy.h: every access checked against the global line and the shared line.
struct CheckedMem {
  const unsigned char *g_lo, *g_hi, *s_lo, *s_hi;
  long long outside = 0;  // accesses (of any size) not inside [g_lo, g_hi) or [s_lo, s_hi)
  long long misaligned16 = 0;
  long long vector_accesses = 0, element_accesses = 0;
  int elem = 2;
  void check(const unsigned char* p, int bytes) {
    const bool in_g = p >= g_lo && p + bytes <= g_hi;
    const bool in_s = p >= s_lo && p + bytes <= s_hi;
    outside += !(in_g || in_s);
  }
  Vec16 load16(const unsigned char* p) {
    check(p, 16);
    misaligned16 += reinterpret_cast<uintptr_t>(p) % 16 != 0;
    ++vector_accesses;
    Vec16 v;
    std::memcpy(&v, p, 16);
    return v;
  }
  void store16(unsigned char* p, const Vec16& v) {
    check(p, 16);
    misaligned16 += reinterpret_cast<uintptr_t>(p) % 16 != 0;
    std::memcpy(p, &v, 16);
  }
  void copy(unsigned char* dst, const unsigned char* src) {
    check(dst, elem);
    check(src, elem);
    ++element_accesses;
    std::memcpy(dst, src, elem);
  }
};

int copy_case(uintptr_t addr, int n, int elem) {
  const int vec = 16 / elem;
  const int padded = (n + vec - 1) / vec * vec;  // the shared line (the planner's line_stride >= this)
  alignas(16) static unsigned char global[1 << 16], shared[1 << 16], expect[1 << 16];
  if (64 + n * elem + 64 > static_cast<int>(sizeof(global)) || elem < 2 || 16 % elem) {
    std::fprintf(stderr, "bad copy case\n");
    return 2;
  }
  unsigned char* g = global + 64 + (addr % 16);
  unsigned char* s = shared;
  const LineSplit sp = line_split(reinterpret_cast<uintptr_t>(g), n, elem);
  const int items = line_items(n, elem);
  CheckedMem mem{g, g + n * elem, s, s + padded * elem};
  mem.elem = elem;
  long long mismatch_to_shared = 0, mismatch_to_global = 0, clobbered = 0;
  // Global -> shared: global holds a pattern, shared garbage; items in the walk's order.
  for (size_t i = 0; i < sizeof(global); ++i) {
    global[i] = static_cast<unsigned char>(i * 7 + 3);
  }
  std::memset(shared, 0xAB, sizeof(shared));
  for (int k = 0; k < items; ++k) {
    copy_line_item<true>(s, g, n, elem, k, mem);
  }
  for (int b = 0; b < n * elem; ++b) {
    mismatch_to_shared += s[b] != g[b];
  }
  const long long vectors_to_shared = mem.vector_accesses, elements_to_shared = mem.element_accesses;
  // Shared -> global: shared holds a pattern (beyond n too, as after the sweep), global a sentinel.
  mem.vector_accesses = mem.element_accesses = 0;
  for (int b = 0; b < padded * elem; ++b) {
    shared[b] = static_cast<unsigned char>(b * 13 + 5);
  }
  std::memset(global, 0x5A, sizeof(global));
  std::memcpy(expect, global, sizeof(global));
  std::memcpy(expect + (g - global), s, n * elem);
  for (int k = 0; k < items; ++k) {
    copy_line_item<false>(s, g, n, elem, k, mem);
  }
  for (size_t i = 0; i < sizeof(global); ++i) {
    const bool in_line = global + i >= g && global + i < g + n * elem;
    (in_line ? mismatch_to_global : clobbered) += global[i] != expect[i];
  }
  std::printf(
      "{\"head\": %d, \"blocks\": %d, \"tail\": %d, \"items\": %d, \"start_mod16\": %d, "
      "\"vector_loads_to_shared\": %lld, \"elements_to_shared\": %lld, \"vector_loads_to_global\": %lld, "
      "\"elements_to_global\": %lld, \"mismatch_to_shared\": %lld, \"mismatch_to_global\": %lld, "
      "\"clobbered\": %lld, \"outside\": %lld, \"misaligned16\": %lld}\n",
      sp.head, sp.blocks, sp.tail, items, static_cast<int>(reinterpret_cast<uintptr_t>(g) % 16), vectors_to_shared,
      elements_to_shared, mem.vector_accesses, mem.element_accesses, mismatch_to_shared, mismatch_to_global,
      clobbered, mem.outside, mem.misaligned16);
  return 0;
}

}  // namespace

int main() {
  std::string line;
  while (std::getline(std::cin, line)) {
    if (line.empty() || line[0] == '#') {
      continue;
    }
    std::istringstream in(line);
    if (line.rfind("copy ", 0) == 0) {
      std::string word;
      unsigned long long addr;
      int n, elem;
      if (!(in >> word >> addr >> n >> elem) || copy_case(addr, n, elem) != 0) {
        std::fprintf(stderr, "bad line: %s\n", line.c_str());
        return 2;
      }
      continue;
    }
    int64_t batch, classes, spatial;
    int pixels, elem, acc, calibrate, want_alpha, want_beta, want_loss, mean, sms, max_shared, shared_per_sm, regs,
        gpc_sms;
    if (!(in >> batch >> classes >> spatial >> pixels >> elem >> acc >> calibrate >> want_alpha >> want_beta >>
          want_loss >> mean >> sms >> max_shared >> shared_per_sm >> regs >> gpc_sms)) {
      std::fprintf(stderr, "bad line: %s\n", line.c_str());
      return 2;
    }
    TileRequest q{{batch, classes, spatial}, pixels != 0, elem, acc, calibrate != 0, want_alpha != 0,
                  want_beta != 0, want_loss != 0, mean != 0};
    DeviceLimits dev;
    dev.multiprocessors = sms;
    dev.max_shared_per_block = max_shared;
    dev.max_cluster = gpc_sms > 0 ? 16 : 1;
    auto occupancy = [&](int shared_bytes) {
      return modelled_blocks_per_sm(kTileThreads, regs, shared_per_sm, shared_bytes);
    };
    auto clusters = [&](int shared_bytes, int cluster) {
      return modelled_active_clusters(sms, gpc_sms, occupancy(shared_bytes), cluster);
    };
    const TilePlan p = plan_tiles(q, dev, occupancy, clusters);
    unsigned long long data;
    disalign::Strides st;
    int unit = -1;
    if (in >> data >> st.batch >> st.cls >> st.spatial) {
      unit = copy_unit(static_cast<uintptr_t>(data), st, q, p);
    }
    auto ws = [](size_t v) { return v == SIZE_MAX ? -1LL : static_cast<long long>(v); };
    std::printf(
        "{\"vec\": %d, \"tile_rows\": %d, \"pixel_vectors\": %d, \"group\": %d, \"chunk_classes\": %d, "
        "\"num_chunks\": %d, \"slices\": %d, \"line_stride\": %d, \"e_stride\": %d, \"ab_stride\": %d, "
        "\"acc_stride\": %d, \"e_cached\": %s, \"acc_in_shared\": %s, \"num_tiles\": %lld, \"tiles_per_image\": %lld, "
        "\"offset_tile2\": %d, \"offset_e\": %d, \"offset_ab\": %d, \"offset_acc\": %d, \"offset_partials\": %d, "
        "\"offset_rows\": %d, \"shared_bytes\": %d, \"blocks_per_sm\": %d, \"blocks\": %d, \"weight_blocks\": %d, "
        "\"ws_slices\": %d, \"ws_alpha\": %lld, \"ws_beta\": %lld, \"ws_loss\": %lld, \"ws_weight\": %lld, "
        "\"workspace_bytes\": %zu, \"row_partial_entries\": %zu, \"row_meta_bytes\": %zu, \"copy_unit\": %d, "
        "\"pipelined\": %s, \"offset_tile_next\": %d, \"offset_rows_next\": %d, \"cluster\": %d, "
        "\"partial_rows\": %d, \"reg_acc\": %s}\n",
        p.vec, p.tile_rows, p.pixel_vectors, p.group, p.chunk_classes, p.num_chunks, p.slices, p.line_stride,
        p.e_stride, p.ab_stride, p.acc_stride, p.e_cached ? "true" : "false", p.acc_in_shared ? "true" : "false",
        static_cast<long long>(p.num_tiles), static_cast<long long>(p.tiles_per_image), p.offset_tile2, p.offset_e,
        p.offset_ab, p.offset_acc, p.offset_partials, p.offset_rows, p.shared_bytes, p.blocks_per_sm, p.blocks,
        p.weight_blocks, p.ws_slices, ws(p.ws_alpha), ws(p.ws_beta), ws(p.ws_loss), ws(p.ws_weight),
        p.workspace_bytes, row_partial_entries(q, p), row_meta_bytes(q, p.tile_rows), unit,
        p.pipelined ? "true" : "false", p.offset_tile_next, p.offset_rows_next, p.cluster, p.partial_rows,
        p.reg_acc ? "true" : "false");
  }
  return 0;
}
