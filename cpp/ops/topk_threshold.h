// Host-side logic of the sampled threshold used by topk_compress on every device: where to
// sample (SamplePlan, cuda/sample_plan.h), and which threshold to try first and next. Pure
// arithmetic; the CPU path keeps the sorted sample on the host (ThresholdLadder), the CUDA path
// keeps it on the device and uses only the rank arithmetic (the static members).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

#include "cuda/sample_plan.h"  // shared with the CUDA kernel, which draws the same sample

namespace gradfuse::ops {

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
    rank_ = first_rank(static_cast<int64_t>(sample_.size()), numel_, k);
  }

  float threshold() const {
    return rank_ <= static_cast<int64_t>(sample_.size()) ? sample_[rank_ - 1] : 0.0f;
  }
  // How many elements this threshold is expected to let through (sizes scan buffers).
  int64_t expected_count() const {
    return expected_count(rank_, static_cast<int64_t>(sample_.size()), numel_);
  }
  void lower() { rank_ = next_rank(rank_); }

  // The rank arithmetic alone, for callers that keep the sorted sample elsewhere (the CUDA
  // path). Ranks are 1-based positions in the sample sorted descending; a rank past the end of
  // the sample means threshold 0.
  static int64_t first_rank(int64_t sample_size, int64_t numel, int64_t k) {
    const double expected =
        static_cast<double>(k) * static_cast<double>(sample_size) / static_cast<double>(numel);
    return static_cast<int64_t>(std::ceil(1.25 * expected + 3.0 * std::sqrt(expected) + 1.0));
  }
  static int64_t expected_count(int64_t rank, int64_t sample_size, int64_t numel) {
    return rank >= sample_size ? numel : rank * (numel / sample_size);
  }
  static int64_t next_rank(int64_t rank) { return rank * 4; }

 private:
  std::vector<float> sample_;
  int64_t numel_;
  int64_t rank_;
};

}  // namespace gradfuse::ops
