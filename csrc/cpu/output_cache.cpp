// The CPU ops' reused output blocks (see output_cache.h).
#include "cpu/output_cache.h"

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <vector>

namespace disalign::cpu {
namespace {

constexpr size_t kMinCachedBytes = size_t{1} << 20;
constexpr size_t kGranule = size_t{2} << 20;
constexpr size_t kMaxIdleBlocks = 2;

bool reuse_enabled() {
  const char* value = std::getenv("DISALIGN_CPU_OUTPUT_CACHE");
  return value == nullptr || std::strcmp(value, "0") != 0;
}

struct Block {
  void* ptr;
  size_t size;
};

class OutputCache final : public c10::Allocator {
  struct Totals {
    size_t allocated = 0, reserved = 0;
  };

 public:
  c10::DataPtr allocate(size_t n) override {
    if (n < kMinCachedBytes || !reuse_enabled()) {
      return c10::GetDefaultCPUAllocator()->allocate(n);
    }
    const size_t size = (n + kGranule - 1) / kGranule * kGranule;
    Block* block = take_idle(size);
    const bool fresh = block == nullptr;
    if (fresh) {
      block = new Block{c10::alloc_cpu(size), size};
    }
    Totals totals;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      reserved_ += fresh ? block->size : 0;
      allocated_ += block->size;  // an idle block taken may be larger than the request
      totals = {allocated_, reserved_};
    }
    report(block, static_cast<int64_t>(block->size), totals);
    return {block->ptr, block, &give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  int64_t release_idle() {
    std::vector<Block*> freed;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      freed.assign(idle_.begin(), idle_.end());
      idle_.clear();
      for (const Block* b : freed) {
        reserved_ -= b->size;
      }
    }
    int64_t bytes = 0;
    for (Block* b : freed) {
      bytes += static_cast<int64_t>(b->size);
      free_block(b);
    }
    return bytes;
  }

  static OutputCache& instance() {
    static auto* cache = new OutputCache();  // never destroyed: outputs may outlive static destructors
    return *cache;
  }

 private:
  // The smallest idle block of at least `size` bytes with at most an eighth of them to spare.
  Block* take_idle(size_t size) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto best = idle_.end();
    for (auto it = idle_.begin(); it != idle_.end(); ++it) {
      const size_t have = (*it)->size;
      if (have >= size && have - size <= size / 8 && (best == idle_.end() || have < (*best)->size)) {
        best = it;
      }
    }
    if (best == idle_.end()) {
      return nullptr;
    }
    Block* block = *best;
    idle_.erase(best);
    return block;
  }

  static void give_back(void* context) {
    OutputCache& cache = instance();
    auto* block = static_cast<Block*>(context);
    const size_t size = block->size;
    Block* evicted = nullptr;
    Totals totals;
    {
      std::lock_guard<std::mutex> lock(cache.mutex_);
      cache.allocated_ -= size;
      if (!reuse_enabled()) {
        evicted = block;  // reuse turned off: this block goes back to the system at once
      } else {
        cache.idle_.push_back(block);
        if (cache.idle_.size() > kMaxIdleBlocks) {
          evicted = cache.idle_.front();
          cache.idle_.pop_front();
        }
      }
      if (evicted != nullptr) {
        cache.reserved_ -= evicted->size;
      }
      totals = {cache.allocated_, cache.reserved_};
    }
    cache.report(block, -static_cast<int64_t>(size), totals);
    if (evicted != nullptr) {
      free_block(evicted);
    }
  }

  static void free_block(Block* block) {
    c10::free_cpu(block->ptr);
    delete block;
  }

  // For torch.profiler's memory events: a block handed out (+size) or given back (-size), with the
  // totals after the change.
  static void report(const Block* block, int64_t delta, Totals totals) {
    if (c10::memoryProfilingEnabled()) {
      c10::reportMemoryUsageToProfiler(
          block->ptr, delta, totals.allocated, totals.reserved, c10::Device(c10::DeviceType::CPU));
    }
  }

  std::mutex mutex_;
  std::deque<Block*> idle_;  // least recently freed first
  size_t allocated_ = 0;     // bytes of blocks handed out
  size_t reserved_ = 0;      // bytes of all blocks, handed out or idle
};

}  // namespace

at::Tensor empty_like_reused(const at::Tensor& like) {
  if (!like.is_non_overlapping_and_dense()) {
    return at::empty_like(like);  // empty_like gives such a tensor fresh strides of its own
  }
  return at::detail::empty_strided_generic(
      like.sizes(), like.strides(), &OutputCache::instance(), c10::DispatchKeySet(c10::DispatchKey::CPU),
      like.scalar_type());
}

int64_t release_idle_output_blocks() {
  return OutputCache::instance().release_idle();
}

}  // namespace disalign::cpu
