// topk_compress / topk_decompress: top-k gradient sparsification with error feedback.
//
// topk_compress(grad, residual, ratio, sampled):
//   residual += grad; select; values = residual[selected]; residual[selected] = 0.
//   k = clamp(ceil(ratio * numel), 1, numel) (0 for an empty tensor). Indices come back in
//   ascending order.
//   exact   (sampled=False): exactly k elements: torch.topk(|residual|, k)'s set with ties
//                            broken towards the lower index (NaN above every number).
//   sampled (sampled=True):  DGC: every element at or above a threshold estimated from a random
//                            sample when that is between k and 2k elements, else the exact set.
// The sample only sets the threshold of the one streaming pass (fused with the residual update)
// that collects the candidates; the exact set is then found among them, or over every element
// when the sample misjudged the data (sparse gradients: the threshold is 0) -- O(numel) time and
// O(k) extra memory either way (topk_select_cpu.cpp, cuda/topk_select.h).
//
// topk_decompress(values, indices, numel): dense[indices[j]] += values[j], summed in the order
// of j on every device (deterministic: duplicate indices from several ranks add up to the same
// bits on every rank).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <functional>

#include "checks.h"
#include "dtypes.h"
#include "op_args.h"
#include "topk_select_cpu.h"
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

// |residual + grad| at the plan's positions (the residual is updated only in the streaming pass
// that follows), and the entry of rank `rank` among them, largest first (NaN as +inf), or 0 past
// the end.
float sampled_threshold(const float* residual, const void* grad, cpu::DType grad_dtype,
                        const SamplePlan& plan, int64_t rank) {
  if (rank > plan.size) return 0.0f;
  std::vector<float> sample(plan.size);
  const auto* grad_f32 = grad_dtype == cpu::DType::kFloat32 ? static_cast<const float*>(grad)
                                                             : nullptr;
  float one_grad;
  for (int64_t j = 0; j < plan.size; ++j) {
    const int64_t pos = plan.position(j);
    if (grad_f32 != nullptr) {  // the common case, without a conversion call per element
      one_grad = grad_f32[pos];
    } else {
      cpu::convert(static_cast<const char*>(grad) + pos * cpu_dtype_size(grad_dtype), grad_dtype,
                   &one_grad, cpu::DType::kFloat32, 1, 1.0f, false);
    }
    const float s = std::fabs(residual[pos] + one_grad);
    sample[j] = std::isnan(s) ? INFINITY : s;
  }
  std::nth_element(sample.begin(), sample.begin() + (rank - 1), sample.end(),
                   std::greater<float>());
  return sample[rank - 1];
}

template <class I>
void gather_and_clear(float* residual, const std::vector<int64_t>& selected, float* values,
                      I* indices) {
  for (size_t j = 0; j < selected.size(); ++j) {
    values[j] = residual[selected[j]];
    residual[selected[j]] = 0.0f;
    indices[j] = static_cast<I>(selected[j]);
  }
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
    const int64_t rank = SampledThreshold::rank(plan.size, n, k);
    const TopkRequest req{n, k, sampled_threshold(r, g, grad_dtype, plan, rank),
                          SampledThreshold::expected_count(rank, plan.size, n), sampled};
    selected = accumulate_and_select_topk(r, g, grad_dtype, req);
  }

  const auto m = static_cast<int64_t>(selected.size());
  at::Tensor values = at::empty({m}, residual.options());
  at::Tensor indices = at::empty({m}, residual.options().dtype(idx_type));
  if (idx_type == at::kLong) {
    gather_and_clear(r, selected, values.data_ptr<float>(), indices.data_ptr<int64_t>());
  } else {
    gather_and_clear(r, selected, values.data_ptr<float>(), indices.data_ptr<int32_t>());
  }
  return {values, indices};
}

// dense = zeros(numel); dense[indices[j]] += values[j] for j = 0, 1, ... in that order, each sum
// rounded to the values' dtype: the order DistributedOptimizer gathers (rank by rank), so every
// rank sums duplicate indices identically. The CUDA kernel sums in the same order.
template <class T, class I>
void scatter_add_in_order(const T* values, const I* indices, int64_t count, int64_t numel,
                          T* dense, const at::Tensor& index_tensor) {
  for (int64_t j = 0; j < count; ++j) {
    const auto i = static_cast<int64_t>(indices[j]);
    if (i < 0 || i >= numel) fail_decompress_index_range(index_tensor, numel);
    dense[i] = static_cast<T>(dense[i] + values[j]);
  }
}

at::Tensor topk_decompress_cpu(const at::Tensor& values, const at::Tensor& indices, int64_t numel) {
  check_decompress_args(values, indices, numel);
  at::Tensor dense = at::zeros({numel}, values.options());
  const at::Tensor v = values.contiguous(), idx = indices.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), kDecompress, [&] {
    if (idx.scalar_type() == at::kLong) {
      scatter_add_in_order(v.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(), v.numel(),
                           numel, dense.data_ptr<scalar_t>(), idx);
    } else {
      scatter_add_in_order(v.const_data_ptr<scalar_t>(), idx.const_data_ptr<int32_t>(), v.numel(),
                           numel, dense.data_ptr<scalar_t>(), idx);
    }
  });
  return dense;
}

}  // namespace

void check_decompress_args(const at::Tensor& values, const at::Tensor& indices, int64_t numel) {
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
}

void fail_decompress_index_range(const at::Tensor& indices, int64_t numel) {
  const auto [lo, hi] = at::aminmax(indices);
  TORCH_CHECK_VALUE(false, kDecompress, ": indices must be in [0, ", numel, "), got values from ",
                    lo.item<int64_t>(), " to ", hi.item<int64_t>());
  std::abort();  // unreachable: TORCH_CHECK_VALUE(false, ...) throws
}

TORCH_LIBRARY_IMPL(gradfuse, CPU, m) {
  m.impl("topk_compress", &topk_compress_cpu);
  m.impl("topk_decompress", &topk_decompress_cpu);
}

}  // namespace gradfuse::ops
