// Host-side logic of the sampled threshold used by topk_compress on every device: where to
// sample, and which threshold to try first and next. Pure arithmetic on a small host vector.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

namespace gradfuse::ops {

// A stratified random sample: `size` strata of `stratum` consecutive elements, one position
// drawn in each (so no stride can alias with the layout of a convolution's weights).
struct SamplePlan {
  int64_t numel = 0;
  int64_t size = 0;
  int64_t stratum = 1;
  uint64_t seed = 0;

  // Big enough that about 64 sampled elements are expected above the k-th largest.
  static SamplePlan make(int64_t numel, int64_t k, int64_t seed) {
    SamplePlan p;
    p.numel = numel;
    const double wanted = 64.0 * static_cast<double>(numel) / static_cast<double>(k);
    p.size = std::min<int64_t>(numel, std::clamp<int64_t>(static_cast<int64_t>(wanted), 4096, 1 << 17));
    p.stratum = numel / p.size;
    p.seed = static_cast<uint64_t>(seed);
    return p;
  }

  int64_t position(int64_t j) const {
    // splitmix64 of (seed, j): cheap, well mixed, the same on every platform.
    uint64_t z = seed + 0x9e3779b97f4a7c15ull * static_cast<uint64_t>(j + 1);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return j * stratum + static_cast<int64_t>(z % static_cast<uint64_t>(stratum));
  }
};

// Thresholds to try, from the sample: first one expected to let about 1.25 k + 3 sigma
// elements through (so exact mode rarely rescans), then 4x lower in rank each time, and
// finally 0, which every element passes. NaN counts as larger than any number (as in
// torch.topk), so a NaN gradient is always sent rather than hidden in the residual.
class ThresholdLadder {
 public:
  ThresholdLadder(std::vector<float> sample, const SamplePlan& plan, int64_t k)
      : sample_(std::move(sample)), numel_(plan.numel) {
    for (float& s : sample_) {
      if (std::isnan(s)) s = INFINITY;
    }
    std::sort(sample_.begin(), sample_.end(), std::greater<float>());
    const double expected = static_cast<double>(k) * sample_.size() / numel_;
    rank_ = static_cast<int64_t>(std::ceil(1.25 * expected + 3.0 * std::sqrt(expected) + 1.0));
  }

  float threshold() const {
    return rank_ <= static_cast<int64_t>(sample_.size()) ? sample_[rank_ - 1] : 0.0f;
  }
  // How many elements this threshold is expected to let through (sizes scan buffers).
  int64_t expected_count() const {
    const auto s = static_cast<int64_t>(sample_.size());
    return rank_ >= s ? numel_ : rank_ * (numel_ / s);
  }
  void lower() { rank_ *= 4; }

 private:
  std::vector<float> sample_;
  int64_t numel_;
  int64_t rank_;
};

}  // namespace gradfuse::ops
