// Host-side arithmetic of the sampled threshold used by topk_compress on every device: where to
// sample (SamplePlan, cuda/sample_plan.h), which entry of the sorted sample is the threshold, and
// how big the candidate buffer is. The threshold only decides how fast the selection runs, never
// what it selects (cuda/topk_select.h), except in sampled mode, where it is the DGC threshold.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cuda/sample_plan.h"  // shared with the CUDA kernel, which draws the same sample

namespace gradfuse::ops {

struct SampledThreshold {
  // 1-based rank, in the sample sorted descending (NaN as +inf), of the threshold: about
  // 1.25 k + 3 sigma elements are expected at or above it, so the candidates rarely fall short
  // of k. A rank past the end of the sample means threshold 0.
  static int64_t rank(int64_t sample_size, int64_t numel, int64_t k) {
    const double expected =
        static_cast<double>(k) * static_cast<double>(sample_size) / static_cast<double>(numel);
    return static_cast<int64_t>(std::ceil(1.25 * expected + 3.0 * std::sqrt(expected) + 1.0));
  }
  // How many elements the threshold of `rank` is expected to let through.
  static int64_t expected_count(int64_t rank, int64_t sample_size, int64_t numel) {
    return rank >= sample_size ? numel : rank * (numel / sample_size);
  }
  // Room for the candidates (>= min(numel, 2k), so sampled mode's up to 2k always fit): more
  // than this pass only when the sample misjudged the data, and the selection then reads every
  // element instead of growing the buffer, so extra memory stays O(k).
  static int64_t candidate_capacity(int64_t numel, int64_t k, int64_t expected) {
    return std::min(numel, std::max(2 * k, 2 * expected) + 1024);
  }
};

}  // namespace gradfuse::ops
