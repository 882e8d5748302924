// topk_compress on CUDA: the same validation (check_topk_args) and the same algorithm as the
// CPU (cpp/ops/topk.cpp), with the same sample positions and thresholds, so both devices select
// the same elements for the same seed.
//
// Host syncs: the number of elements passing the threshold decides the output size, so it is
// copied to the host once per scan (count.item(), which waits for this stream). A normal call
// scans once; a second scan happens only when fewer than k passed (threshold lowered, rare by
// design: the first threshold aims at 1.25 k + 3 sigma) or when more passed than the candidate
// buffer held (re-collected into an exact-size buffer, no second accumulation).
// topk_decompress is a composite ATen op (topk.cpp) and needs nothing here.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "cuda/kernels.h"
#include "ops/cuda/cuda_check.h"
#include "ops/dtypes.h"
#include "ops/op_args.h"
#include "ops/topk_threshold.h"

namespace gradfuse::ops {
namespace {

constexpr const char* kOp = "topk_compress";

at::Tensor byte_scratch(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(std::max<size_t>(bytes, 1))},
                   like.options().dtype(at::kByte));
}

std::tuple<at::Tensor, at::Tensor> topk_compress_cuda(const at::Tensor& grad, at::Tensor& residual,
                                                      double ratio, bool sampled,
                                                      std::optional<at::ScalarType> index_dtype,
                                                      int64_t seed) {
  const int64_t k = check_topk_args(grad, residual, ratio, index_dtype);
  const at::ScalarType idx_type = index_dtype.value_or(at::kLong);
  const int64_t n = grad.numel();
  const at::TensorOptions f32 = residual.options();
  const at::TensorOptions i64 = residual.options().dtype(at::kLong);
  if (n == 0) return {at::empty({0}, f32), at::empty({0}, residual.options().dtype(idx_type))};

  const c10::cuda::CUDAGuard device_guard(grad.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  float* r = residual.data_ptr<float>();
  const void* g = grad.const_data_ptr();
  const cuda::DType grad_dtype = cuda_dtype(grad.scalar_type());

  // 1-2. Sample |residual + grad| (before the residual is updated) and sort it descending.
  const SamplePlan plan = SamplePlan::make(n, k, seed);
  const at::Tensor sample = at::empty({plan.size}, f32);
  const at::Tensor sorted = at::empty({plan.size}, f32);
  check_cuda(cuda::topk_sample(r, g, grad_dtype, plan, sample.data_ptr<float>(), stream), kOp,
             "sampling");
  {
    const size_t bytes = cuda::topk_sort_sample_scratch_bytes(plan.size);
    const at::Tensor scratch = byte_scratch(bytes, residual);
    check_cuda(cuda::topk_sort_sample(sample.const_data_ptr<float>(), sorted.data_ptr<float>(),
                                      plan.size, scratch.data_ptr(), bytes, stream),
               kOp, "sorting the sample");
  }

  // 3. Scan: the first accumulates grad into the residual; later ones (lower thresholds, or a
  // bigger buffer) only select. A threshold is a device scalar inside the sorted sample, or 0.
  const at::Tensor zero = at::zeros({1}, f32);
  const at::Tensor count = at::empty({1}, i64);
  auto* count_ptr = reinterpret_cast<unsigned long long*>(count.data_ptr<int64_t>());
  int64_t rank = ThresholdLadder::first_rank(plan.size, n, k);
  bool accumulate = true;
  at::Tensor candidates;
  int64_t found = 0;
  while (true) {
    const float* threshold = rank <= plan.size ? sorted.const_data_ptr<float>() + (rank - 1)
                                               : zero.const_data_ptr<float>();
    const int64_t expected = ThresholdLadder::expected_count(rank, plan.size, n);
    int64_t capacity = std::min(n, 2 * expected + 1024);
    for (int attempt = 0; attempt < 2; ++attempt) {
      candidates = at::empty({capacity}, i64);
      check_cuda(cudaMemsetAsync(count_ptr, 0, sizeof(unsigned long long), stream), kOp,
                 "zeroing the candidate count");
      check_cuda(cuda::topk_select(r, accumulate ? g : nullptr, grad_dtype, n, threshold,
                                   candidates.data_ptr<int64_t>(), capacity, count_ptr, stream),
                 kOp, "selecting candidates");
      accumulate = false;             // the residual now holds residual + grad
      found = count.item<int64_t>();  // the one device -> host copy of a normal call
      if (found <= capacity) break;
      capacity = found;  // every candidate counted: collect them again into a buffer that fits
    }
    TORCH_CHECK(found <= capacity, kOp, ": candidate count changed between two scans (", found,
                " > ", capacity, "); was the residual modified concurrently?");
    if (found >= k) break;
    rank = ThresholdLadder::next_rank(rank);  // too few passed: lower the threshold, rescan
  }

  // 4. Exact mode keeps k, sampled mode up to 2k; either way indices come back ascending.
  const int64_t limit = sampled ? 2 * k : k;
  const int64_t m = found > limit ? k : found;
  const at::Tensor selected = at::empty({m}, i64);
  {
    const size_t bytes = cuda::topk_order_scratch_bytes(found, m, n);
    const at::Tensor scratch = byte_scratch(bytes, residual);
    check_cuda(cuda::topk_order(r, n, candidates.const_data_ptr<int64_t>(), found, m,
                                selected.data_ptr<int64_t>(), scratch.data_ptr(), bytes, stream),
               kOp, "ordering the candidates");
  }

  // 5. values = residual[selected]; residual[selected] = 0.
  at::Tensor values = at::empty({m}, f32);
  at::Tensor indices = at::empty({m}, residual.options().dtype(idx_type));
  check_cuda(cuda::topk_gather_and_clear(r, selected.const_data_ptr<int64_t>(), m,
                                         values.data_ptr<float>(), indices.data_ptr(),
                                         idx_type == at::kInt, stream),
             kOp, "gathering the values");
  return {values, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(gradfuse, CUDA, m) { m.impl("topk_compress", &topk_compress_cuda); }

}  // namespace gradfuse::ops
