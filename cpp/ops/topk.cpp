// topk_compress / topk_decompress: top-k gradient sparsification with error feedback.
//
// topk_compress(grad, residual, ratio, sampled):
//   residual += grad; select; values = residual[selected]; residual[selected] = 0.
//   k = clamp(ceil(ratio * numel), 1, numel) (0 for an empty tensor). Indices come back in
//   ascending order.
//   exact   (sampled=False): exactly k elements, the same set as torch.topk(|residual|, k)
//                            (ties aside).
//   sampled (sampled=True):  m elements with k <= m <= 2k, all of them at least as large in
//                            magnitude as every element left out (DGC: a threshold estimated
//                            from a random sample; rescanned lower when fewer than k pass,
//                            trimmed exactly to k when more than 2k pass).
// Both modes find candidates with a threshold estimated from a random sample, so the expensive
// part is one streaming pass fused with the residual update; exact mode then selects among the
// few candidates.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <random>

#include "checks.h"
#include "dtypes.h"
#include "op_args.h"
#include "topk_threshold.h"

namespace gradfuse::ops {

namespace {
constexpr const char* kCompress = "topk_compress";
constexpr const char* kDecompress = "topk_decompress";
}  // namespace

int64_t check_topk_args(const at::Tensor& grad, const at::Tensor& residual, double ratio,
                        const std::optional<at::ScalarType>& index_dtype) {
  check_defined(kCompress, "grad", grad);
  check_defined(kCompress, "residual", residual);
  TORCH_CHECK_TYPE(grad.scalar_type() == at::kFloat || grad.scalar_type() == at::kHalf ||
                       grad.scalar_type() == at::kBFloat16,
                   kCompress, ": grad must be float32, float16 or bfloat16, got ",
                   grad.scalar_type());
  check_dtype(kCompress, "residual", residual, at::kFloat,
              "error feedback accumulates in float32");
  check_contiguous(kCompress, "grad", grad);
  check_contiguous(kCompress, "residual", residual);
  check_device(kCompress, "residual", residual, grad.device(), "grad");
  TORCH_CHECK_VALUE(grad.sizes() == residual.sizes(), kCompress,
                    ": residual must have the shape of grad ", grad.sizes(), ", got ",
                    residual.sizes());
  check_no_overlap(kCompress, {{"grad", &grad, false}, {"residual", &residual, true}});
  TORCH_CHECK_VALUE(std::isfinite(ratio) && ratio > 0.0 && ratio <= 1.0, kCompress,
                    ": ratio must be in (0, 1], got ", ratio);
  if (index_dtype.has_value()) {
    TORCH_CHECK_TYPE(*index_dtype == at::kInt || *index_dtype == at::kLong, kCompress,
                     ": index_dtype must be torch.int32 or torch.int64, got ", *index_dtype);
    TORCH_CHECK_VALUE(*index_dtype == at::kLong || grad.numel() <= INT32_MAX, kCompress,
                      ": index_dtype int32 cannot index ", grad.numel(), " elements");
  }
  const int64_t n = grad.numel();
  if (n == 0) return 0;
  const auto k = static_cast<int64_t>(std::ceil(ratio * static_cast<double>(n)));
  return std::clamp<int64_t>(k, 1, n);
}

namespace {

constexpr int64_t kChunkElems = 1 << 18;

// |x| at positions chosen by the sample plan, read as residual + grad (the residual is updated
// only in the streaming pass that follows).
std::vector<float> take_sample(const float* residual, const void* grad, cpu::DType grad_dtype,
                               const SamplePlan& plan) {
  std::vector<float> sample(plan.size);
  float one_grad;
  for (int64_t j = 0; j < plan.size; ++j) {
    const int64_t pos = plan.position(j);
    cpu::convert(static_cast<const char*>(grad) + pos * cpu_dtype_size(grad_dtype), grad_dtype,
                 &one_grad, cpu::DType::kFloat32, 1, 1.0f, false);
    sample[j] = std::fabs(residual[pos] + one_grad);
  }
  return sample;
}

// One parallel pass over all chunks: (residual += grad when `grad` is set) and collect the
// positions with |residual| >= threshold, in ascending order.
std::vector<int64_t> scan(float* residual, const void* grad, cpu::DType grad_dtype, int64_t n,
                          float threshold, int64_t expected) {
  const int64_t num_chunks = (n + kChunkElems - 1) / kChunkElems;
  std::vector<std::vector<int64_t>> found(num_chunks);
  const int64_t per_chunk_guess = expected / num_chunks * 2 + 64;
  at::parallel_for(0, num_chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const int64_t begin = c * kChunkElems;
      const int64_t len = std::min(kChunkElems, n - begin);
      auto& out = found[c];
      out.resize(per_chunk_guess);
      int64_t count =
          grad != nullptr
              ? cpu::accumulate_and_select(
                    residual + begin, static_cast<const char*>(grad) + begin * cpu_dtype_size(grad_dtype),
                    grad_dtype, len, threshold, begin, out.data(), per_chunk_guess)
              : cpu::select_at_least(residual + begin, len, threshold, begin, out.data(),
                                     per_chunk_guess);
      if (count > per_chunk_guess) {  // buffer too small: the residual is updated, select again
        out.resize(count);
        count = cpu::select_at_least(residual + begin, len, threshold, begin, out.data(), count);
      }
      out.resize(count);
    }
  });
  std::vector<int64_t> all;
  size_t total = 0;
  for (const auto& f : found) total += f.size();
  all.reserve(total);
  for (const auto& f : found) all.insert(all.end(), f.begin(), f.end());
  return all;
}

// Keeps the k largest |residual| among `candidates` (ties: lower index first), ascending.
void trim_to_k(const float* residual, std::vector<int64_t>& candidates, int64_t k) {
  // NaN ranks above every number, as in torch.topk.
  auto magnitude = [residual](int64_t i) {
    const float f = std::fabs(residual[i]);
    return std::isnan(f) ? INFINITY : f;
  };
  auto larger = [&](int64_t a, int64_t b) {
    const float fa = magnitude(a), fb = magnitude(b);
    const bool na = std::isnan(residual[a]), nb = std::isnan(residual[b]);
    if (na != nb) return na;
    return fa > fb || (fa == fb && a < b);
  };
  std::nth_element(candidates.begin(), candidates.begin() + (k - 1), candidates.end(), larger);
  candidates.resize(k);
  std::sort(candidates.begin(), candidates.end());
}

std::tuple<at::Tensor, at::Tensor> topk_compress_cpu(const at::Tensor& grad, at::Tensor& residual,
                                                     double ratio, bool sampled,
                                                     std::optional<at::ScalarType> index_dtype,
                                                     int64_t seed) {
  const int64_t k = check_topk_args(grad, residual, ratio, index_dtype);
  const at::ScalarType idx_type = index_dtype.value_or(at::kLong);
  const int64_t n = grad.numel();
  float* r = residual.data_ptr<float>();
  const void* g = grad.const_data_ptr();
  const cpu::DType grad_dtype = cpu_dtype(grad.scalar_type());

  std::vector<int64_t> selected;
  if (n > 0) {
    const SamplePlan plan = SamplePlan::make(n, k, seed);
    std::vector<float> sample = take_sample(r, g, grad_dtype, plan);
    ThresholdLadder ladder(std::move(sample), plan, k);
    selected = scan(r, g, grad_dtype, n, ladder.threshold(), ladder.expected_count());
    // Too few passed: lower the threshold (down to 0, where every element passes) and rescan.
    while (static_cast<int64_t>(selected.size()) < k) {
      ladder.lower();
      selected = scan(r, nullptr, grad_dtype, n, ladder.threshold(), ladder.expected_count());
    }
    const int64_t limit = sampled ? 2 * k : k;
    if (static_cast<int64_t>(selected.size()) > limit) trim_to_k(r, selected, k);
  }

  const auto m = static_cast<int64_t>(selected.size());
  at::Tensor values = at::empty({m}, residual.options());
  at::Tensor indices = at::empty({m}, residual.options().dtype(idx_type));
  float* v = values.data_ptr<float>();
  for (int64_t j = 0; j < m; ++j) {
    v[j] = r[selected[j]];
    r[selected[j]] = 0.0f;
  }
  if (idx_type == at::kLong) {
    std::copy(selected.begin(), selected.end(), indices.data_ptr<int64_t>());
  } else {
    std::transform(selected.begin(), selected.end(), indices.data_ptr<int32_t>(),
                   [](int64_t i) { return static_cast<int32_t>(i); });
  }
  return {values, indices};
}

// dense = zeros(numel); dense[indices[j]] += values[j]. Composite (ATen ops), so one
// implementation serves every device; indices are bounds-checked first so a bad index is a
// clear error rather than a device-side assert.
at::Tensor topk_decompress(const at::Tensor& values, const at::Tensor& indices, int64_t numel) {
  check_defined(kDecompress, "values", values);
  check_defined(kDecompress, "indices", indices);
  check_float(kDecompress, "values", values);
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong,
                   kDecompress, ": indices must be int32 or int64, got ", indices.scalar_type());
  TORCH_CHECK_VALUE(values.dim() == 1 && indices.dim() == 1, kDecompress,
                    ": values and indices must be 1-D, got sizes ", values.sizes(), " and ",
                    indices.sizes());
  check_same_numel(kDecompress, "values", values, "indices", indices);
  check_device(kDecompress, "indices", indices, values.device(), "values");
  TORCH_CHECK_VALUE(numel >= 0, kDecompress, ": numel must be >= 0, got ", numel);
  // Past this the allocation's byte count overflows (torch would say so without naming numel).
  TORCH_CHECK_VALUE(numel <= INT64_MAX / values.element_size(), kDecompress, ": numel ", numel,
                    " is too large for a ", values.scalar_type(), " tensor");
  if (indices.numel() > 0) {
    const auto [lo, hi] = at::aminmax(indices);
    const int64_t min_index = lo.item<int64_t>(), max_index = hi.item<int64_t>();
    TORCH_CHECK_VALUE(min_index >= 0 && max_index < numel, kDecompress,
                      ": indices must be in [0, ", numel, "), got values from ", min_index,
                      " to ", max_index);
  }
  return at::zeros({numel}, values.options()).index_add_(0, indices, values);
}

}  // namespace

TORCH_LIBRARY_IMPL(gradfuse, CPU, m) { m.impl("topk_compress", &topk_compress_cpu); }
TORCH_LIBRARY_IMPL(gradfuse, CompositeExplicitAutograd, m) {
  m.impl("topk_decompress", &topk_decompress);
}

}  // namespace gradfuse::ops
