// A CPU allocator that keeps freed large blocks for reuse, within the peak of what is in use
// (kernels.reuse_large_allocations).
//
// A training step allocates and frees the same few hundred tensor sizes for every block, tens of MB at a time. With
// glibc's heap the freed blocks fragment it and stay resident (+0.4 GiB peak RSS on a 1.2B LoRA step); served from
// their own mappings (io.map_large_allocations) each one is faulted in page by page again: 0.7 us a page here, a
// third of the step's time. This allocator maps blocks of >= min_bytes itself and keeps the freed ones, handed back
// by best fit (a kept block at most 1/4 larger than asked), as long as everything it has mapped (in use + kept)
// stays within the most it has ever had in use plus ``slack``: a request no kept block fits unmaps kept blocks,
// largest first, until the new one fits under that line. So the peak it maps is the peak in use plus the slack, and
// reuse comes from the room below the peak. Smaller requests go to the allocator it replaced, and every block keeps
// its own deleter, so tensors made before or after (or by the other allocator) free correctly. Thread-safe: one
// mutex around the lists.
#include <torch/extension.h>
#include <c10/core/CPUAllocator.h>

#include <sys/mman.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace {

constexpr size_t kPage = 4096;

class ReuseAllocator final : public c10::Allocator {
 public:
  ReuseAllocator(c10::Allocator* prev, size_t min_bytes, size_t slack)
      : prev_(prev), min_(min_bytes), slack_(slack) {}

  c10::DataPtr allocate(size_t n) override {
    if (n < min_) return prev_->allocate(n);
    size_t want = (n + kPage - 1) / kPage * kPage;
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> g(mu_);
      auto it = free_.lower_bound(want);
      if (it != free_.end() && it->first <= want + want / 4) {
        p = it->second;
        cached_ -= it->first;
        free_.erase(it);
      }
    }
    if (p == nullptr) {
      evict(want);
      p = mmap(nullptr, want, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) return prev_->allocate(n);   // let the default allocator report the failure
      std::lock_guard<std::mutex> g(mu_);
      size_[p] = want;
      mapped_ += want;
    }
    {
      std::lock_guard<std::mutex> g(mu_);
      peak_live_ = std::max(peak_live_, mapped_ - cached_);
    }
    return {p, p, &ReuseAllocator::Delete, c10::Device(c10::DeviceType::CPU)};
  }

  // raw_allocate/raw_deallocate (some ops use them) free through this; a small block there is the other allocator's
  c10::DeleterFnPtr raw_deleter() const override { return &ReuseAllocator::Delete; }

  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

  void release(void* p) {
    std::unique_lock<std::mutex> g(mu_);
    auto at = size_.find(p);
    if (at == size_.end()) {   // not ours: a small raw allocation of the allocator this one replaced
      g.unlock();
      prev_->raw_deleter()(p);
      return;
    }
    free_.emplace(at->second, p);
    cached_ += at->second;
  }

  // Kept blocks unmapped, largest first, until ``want`` more bytes fit under the peak in use plus the slack.
  void evict(size_t want) {
    std::vector<std::pair<void*, size_t>> out;
    {
      std::lock_guard<std::mutex> g(mu_);
      while (!free_.empty() && mapped_ + want > peak_live_ + slack_) {
        auto last = std::prev(free_.end());
        out.emplace_back(last->second, last->first);
        cached_ -= last->first;
        mapped_ -= last->first;
        size_.erase(last->second);
        free_.erase(last);
      }
    }
    for (auto& [p, sz] : out) munmap(p, sz);
  }

  // Every kept block unmapped, and the peak in use restarted from what is in use now.
  void trim() {
    std::lock_guard<std::mutex> g(mu_);
    for (auto& [sz, p] : free_) {
      munmap(p, sz);
      size_.erase(p);
      mapped_ -= sz;
    }
    free_.clear();
    cached_ = 0;
    peak_live_ = mapped_;
  }

  std::tuple<int64_t, int64_t, int64_t> stats() {
    std::lock_guard<std::mutex> g(mu_);
    return {static_cast<int64_t>(mapped_), static_cast<int64_t>(cached_), static_cast<int64_t>(peak_live_)};
  }

  void set_slack(size_t slack) { std::lock_guard<std::mutex> g(mu_); slack_ = slack; }

  static void Delete(void* p);

 private:
  c10::Allocator* prev_;
  size_t min_, slack_;
  std::mutex mu_;
  std::multimap<size_t, void*> free_;
  std::unordered_map<void*, size_t> size_;
  size_t cached_ = 0, mapped_ = 0, peak_live_ = 0;
};

ReuseAllocator* g_alloc = nullptr;   // never destroyed: tensors it made may outlive everything else

void ReuseAllocator::Delete(void* p) { g_alloc->release(p); }

// Install (once) or change the slack; returns false if another allocator has since replaced it.
bool install(int64_t min_bytes, int64_t slack) {
  if (g_alloc == nullptr) {
    g_alloc = new ReuseAllocator(c10::GetCPUAllocator(), static_cast<size_t>(min_bytes), static_cast<size_t>(slack));
    c10::SetCPUAllocator(g_alloc, /*priority=*/1);
  } else {
    g_alloc->set_slack(static_cast<size_t>(slack));
  }
  return c10::GetCPUAllocator() == g_alloc;
}

void trim() {
  if (g_alloc != nullptr) g_alloc->trim();
}

std::tuple<int64_t, int64_t, int64_t> stats() {
  return g_alloc != nullptr ? g_alloc->stats() : std::make_tuple(0L, 0L, 0L);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("install", &install, "serve CPU allocations of >= min_bytes from mappings kept within peak use + slack");
  m.def("trim", &trim, "unmap every kept free block; the peak in use restarts from now");
  m.def("stats", &stats, "(bytes mapped, of which kept free, peak in use)");
}
