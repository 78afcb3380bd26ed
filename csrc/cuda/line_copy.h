// Copies of one tile line between a misaligned global line and its 16-byte aligned shared line, with
// 16-byte global accesses (the planner's kCopyRealign, plan.h copy_unit). Pure C++ (host and device):
// the tile kernel (tile_copy.cuh) and the CPU emulation of tests/cuda_plan/plan_main.cpp run this
// code, so the split and the byte shuffles the tests check are the kernel's own.
//
// Why not cp.async with a shifted shared line: the hot loops read 16-byte vectors of a line together
// with 16-byte vectors of alpha / beta (classes contiguous) or of the per-pixel metadata (pixels
// contiguous), so element j of every line must sit at the same 16-byte phase, and with an odd C (or
// odd H*W, an odd stride, a slice) each line has its own phase in global memory. cp.async copies
// bytes at the same phase; the realignment is a funnel shift in registers between a 16-byte load
// and a 16-byte store instead.
//
// The split of a line of n elements at global byte address g (elem bytes each, V = 16 / elem):
//   head   elements before the first 16-byte boundary (min(n, (16 - g % 16) % 16 / elem)),
//   blocks whole aligned 16-byte global blocks after the head ((n - head) / V),
//   tail   the rest (< V).
// Only body blocks are read (to shared) or written (to global) 16 bytes at a time, so no access
// leaves [g, g + n * elem); the other elements go one by one (at most 2V - 1 + V of them per line).
// Items: a line has ceil(n / V) items (the same count for every line of a tile, so the tile walk
// stays uniform); item k copies
//   to shared: shared vector k (elements [kV, kV + V)), from body blocks k - 1 and k (head > 0) or
//              block k (head == 0) when those exist, else element by element;
//   to global: body block k (elements [head + kV, head + kV + V)) from shared vectors k and k + 1
//              when k < blocks; item 0 also the head, item `blocks` the tail, element by element.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DISALIGN_LINE_HD __host__ __device__ __forceinline__
#define DISALIGN_LINE_UNROLL _Pragma("unroll")
#else
#define DISALIGN_LINE_HD inline
#define DISALIGN_LINE_UNROLL
#endif

namespace disalign::cuda {

struct alignas(16) Vec16 {
  uint32_t w[4];
};

struct LineSplit {
  int head;
  int blocks;
  int tail;
};

DISALIGN_LINE_HD LineSplit line_split(uintptr_t start, int n, int elem) {
  const int vec = 16 / elem;
  int head = static_cast<int>((16 - (start & 15)) & 15) / elem;
  head = head < n ? head : n;
  const int blocks = (n - head) / vec;
  return LineSplit{head, blocks, n - head - blocks * vec};
}

DISALIGN_LINE_HD int line_items(int n, int elem) {
  const int vec = 16 / elem;
  return (n + vec - 1) / vec;
}

// Bytes [shift, shift + 16) of the 32 bytes lo:hi (little endian, as the GPU); shift even, < 16.
// Selects without a runtime register index (which would put the words in local memory).
DISALIGN_LINE_HD Vec16 funnel16(const Vec16& lo, const Vec16& hi, int shift) {
  const uint32_t w[8] = {lo.w[0], lo.w[1], lo.w[2], lo.w[3], hi.w[0], hi.w[1], hi.w[2], hi.w[3]};
  const int q = shift >> 2;
  uint32_t x[6];
DISALIGN_LINE_UNROLL
  for (int j = 0; j < 6; ++j) {
    x[j] = (q & 2) ? w[j + 2] : w[j];
  }
  uint32_t y[5];
DISALIGN_LINE_UNROLL
  for (int j = 0; j < 5; ++j) {
    y[j] = (q & 1) ? x[j + 1] : x[j];
  }
  const int bits = (shift & 2) * 8;  // 0 or 16
  Vec16 out;
DISALIGN_LINE_UNROLL
  for (int i = 0; i < 4; ++i) {
    out.w[i] = static_cast<uint32_t>(((static_cast<uint64_t>(y[i + 1]) << 32) | y[i]) >> bits);
  }
  return out;
}

// Item k of a line between global `g` and shared `s` (elem bytes per element, n elements). Mem
// provides load16 / store16 (16-byte aligned) and copy(dst, src) of one element.
template <bool TO_SHARED, typename Mem>
DISALIGN_LINE_HD void copy_line_item(
    unsigned char* s, unsigned char* g, int n, int elem, int k, Mem& mem) {
  const int vec = 16 / elem;
  const LineSplit sp = line_split(reinterpret_cast<uintptr_t>(g), n, elem);
  const int hb = sp.head * elem;  // bytes of the head
  if (TO_SHARED) {
    const bool vector = sp.head == 0 ? k < sp.blocks : (k >= 1 && k < sp.blocks);
    if (vector) {
      const Vec16 b = mem.load16(g + hb + k * 16);
      mem.store16(s + k * 16, sp.head == 0 ? b : funnel16(mem.load16(g + hb + (k - 1) * 16), b, 16 - hb));
    } else {
      const int end = (k + 1) * vec < n ? (k + 1) * vec : n;
      for (int e = k * vec; e < end; ++e) {
        mem.copy(s + e * elem, g + e * elem);
      }
    }
  } else {
    if (k < sp.blocks) {
      const Vec16 a = mem.load16(s + k * 16);
      mem.store16(g + hb + k * 16, sp.head == 0 ? a : funnel16(a, mem.load16(s + (k + 1) * 16), hb));
    }
    if (k == 0) {
      for (int e = 0; e < sp.head; ++e) {
        mem.copy(g + e * elem, s + e * elem);
      }
    }
    if (k == sp.blocks) {
      for (int e = sp.head + sp.blocks * vec; e < n; ++e) {
        mem.copy(g + e * elem, s + e * elem);
      }
    }
  }
}

}  // namespace disalign::cuda
