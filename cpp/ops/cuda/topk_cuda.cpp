// topk_compress and topk_decompress on CUDA: the same validation as the CPU (op_args.h) and the
// same selection rule and decisions (cuda/topk_select.h), with the same sample positions, so
// both devices select the same elements and decompress to the same bits.
//
// Host syncs: none in exact mode or in topk_decompress -- every data-dependent decision is taken
// on the device, buffers are sized from host-known bounds, and an out-of-range index fails a
// device-side assertion. Sampled mode returns between k and 2k elements, so its output size is
// read back once (count.item()); DistributedOptimizer's allgather of a variable-size tensor
// needs that size on the host anyway.
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

  const SamplePlan plan = SamplePlan::make(n, k, seed);
  const int64_t rank = SampledThreshold::rank(plan.size, n, k);
  const int64_t expected = SampledThreshold::expected_count(rank, plan.size, n);
  const cuda::TopkSelectArgs args{
      n, k, plan.size, rank, SampledThreshold::candidate_capacity(n, k, expected), sampled};

  const at::Tensor sample = at::empty({plan.size}, f32);
  check_cuda(cuda::topk_sample(r, g, grad_dtype, plan, sample.data_ptr<float>(), stream), kOp,
             "sampling");
  const at::Tensor selected = at::empty({std::min(n, sampled ? 2 * k : k)}, i64);
  const at::Tensor count = at::empty({1}, i64);
  {
    const size_t bytes = cuda::topk_select_scratch_bytes(n, args.capacity, plan.size);
    const at::Tensor scratch = byte_scratch(bytes, residual);
    check_cuda(cuda::topk_select(r, g, grad_dtype, args, sample.const_data_ptr<float>(),
                                 selected.data_ptr<int64_t>(), count.data_ptr<int64_t>(),
                                 scratch.data_ptr(), bytes, stream),
               kOp, "selecting");
  }
  const int64_t m = sampled ? count.item<int64_t>() : k;  // sampled mode's one host sync

  at::Tensor values = at::empty({m}, f32);
  at::Tensor indices = at::empty({m}, residual.options().dtype(idx_type));
  check_cuda(cuda::topk_gather_and_clear(r, selected.const_data_ptr<int64_t>(), m,
                                         values.data_ptr<float>(), indices.data_ptr(),
                                         idx_type == at::kInt, stream),
             kOp, "gathering the values");
  return {values, indices};
}

at::Tensor topk_decompress_cuda(const at::Tensor& values, const at::Tensor& indices,
                                int64_t numel) {
  check_decompress_args(values, indices, numel);
  const c10::cuda::CUDAGuard device_guard(values.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  at::Tensor dense = at::zeros({numel}, values.options());
  const at::Tensor v = values.contiguous(), idx = indices.contiguous();
  const int64_t count = v.numel();
  const size_t bytes = cuda::topk_decompress_scratch_bytes(count, numel);
  const at::Tensor scratch = byte_scratch(bytes, dense);
  check_cuda(cuda::topk_decompress(v.const_data_ptr(), cuda_dtype(v.scalar_type()),
                                   idx.const_data_ptr(), idx.scalar_type() == at::kInt, count,
                                   numel, dense.data_ptr(), scratch.data_ptr(), bytes, stream),
             "topk_decompress", "scattering");
  return dense;
}

}  // namespace

TORCH_LIBRARY_IMPL(gradfuse, CUDA, m) {
  m.impl("topk_compress", &topk_compress_cuda);
  m.impl("topk_decompress", &topk_decompress_cuda);
}

}  // namespace gradfuse::ops
