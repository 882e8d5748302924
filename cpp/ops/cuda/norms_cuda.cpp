// sum_squares on CUDA: the same validation as the CPU (cpp/ops/norms.cpp), then
// cuda::sum_squares on the current stream, into a fresh float64 tensor (no host sync).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "cuda/kernels.h"
#include "ops/checks.h"
#include "ops/cuda/cuda_check.h"
#include "ops/dtypes.h"

namespace gradfuse::ops {
namespace {

at::Tensor sum_squares_cuda(at::TensorList tensors) {
  const char* op = "sum_squares";
  const auto n = static_cast<int64_t>(tensors.size());
  std::vector<cuda::NormTensor> norm_tensors(n);
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    const std::string name = arg_name("tensors", i);
    check_defined(op, name, tensors[i]);
    check_float(op, name, tensors[i]);
    check_contiguous(op, name, tensors[i]);
    check_device(op, name, tensors[i], tensors[0].device(), "tensors[0]");
    norm_tensors[i] = {tensors[i].const_data_ptr(), tensors[i].numel(),
                       cuda_dtype(tensors[i].scalar_type())};
    total += tensors[i].numel();
  }
  if (n == 0) return at::empty({0}, at::TensorOptions().dtype(at::kDouble));
  const c10::cuda::CUDAGuard device_guard(tensors[0].device());
  const auto options = tensors[0].options();
  at::Tensor out = at::empty({n}, options.dtype(at::kDouble));
  const at::Tensor scratch = at::empty(
      {static_cast<int64_t>(cuda::sum_squares_scratch_bytes(n, total))}, options.dtype(at::kByte));
  check_cuda(cuda::sum_squares(norm_tensors.data(), n, out.data_ptr<double>(), scratch.data_ptr(),
                               c10::cuda::getCurrentCUDAStream().stream()),
             op, "the sum-of-squares kernel");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gradfuse, CUDA, m) { m.impl("sum_squares", &sum_squares_cuda); }

}  // namespace gradfuse::ops
