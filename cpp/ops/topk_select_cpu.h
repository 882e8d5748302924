// The CPU selection of topk_compress (the twin of the CUDA steps in cuda/topk.cu, with the same
// rule and decisions from cuda/topk_select.h): one streaming pass accumulates grad into the
// residual and collects the candidates at or above the sampled threshold, then the exact set is
// found among them, or, when the sample misjudged the data, over every element, in O(numel)
// time and O(k) extra memory either way.
#pragma once

#include <cstdint>
#include <vector>

#include "cpu/kernels.h"

namespace gradfuse::ops {

struct TopkRequest {
  int64_t numel;
  int64_t k;
  float threshold;   // from the sample (>= 0; NaN sampled as +inf)
  int64_t expected;  // how many elements the threshold is expected to let through
  bool sampled;
};

// residual += grad, then the selected indices in ascending order (k of them, or in sampled mode
// between k and 2k).
std::vector<int64_t> accumulate_and_select_topk(float* residual, const void* grad,
                                                cpu::DType grad_dtype, const TopkRequest& req);

}  // namespace gradfuse::ops
