// lars_update_ on CUDA: the same validation as the CPU (check_lars_args, cpp/ops/lars.cpp),
// then cuda::lars_update on the current stream. No host sync: found_inf and grad_scale are
// read by the kernels on the device.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "cuda/kernels.h"
#include "ops/cuda/cuda_check.h"
#include "ops/dtypes.h"
#include "ops/op_args.h"

namespace gradfuse::ops {
namespace {

constexpr const char* kOp = "lars_update_";

void lars_update_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_bufs,
                      at::TensorList model_copies, const c10::List<bool>& use_lars,
                      const c10::List<bool>& use_weight_decay, double lr, double momentum,
                      double weight_decay, double trust_coefficient, double eps, bool nesterov,
                      bool lr_in_momentum, const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& found_inf) {
  check_lars_args(params, grads, momentum_bufs, model_copies, use_lars, use_weight_decay, lr,
                  momentum, weight_decay, trust_coefficient, eps, grad_scale, found_inf);
  const auto n = static_cast<int64_t>(params.size());
  if (n == 0) return;
  const c10::cuda::CUDAGuard device_guard(params[0].device());

  const bool has_copy = !model_copies.empty();
  std::vector<cuda::LarsTensor> tensors(n);
  for (int64_t i = 0; i < n; ++i) {
    cuda::LarsTensor& t = tensors[i];
    t.param = params[i].data_ptr();
    t.grad = grads[i].const_data_ptr();
    t.momentum = momentum_bufs[i].data_ptr();
    t.model_copy = has_copy ? model_copies[i].data_ptr() : nullptr;
    t.numel = params[i].numel();
    t.use_lars = use_lars.get(i);
    t.use_weight_decay = use_weight_decay.get(i);
  }
  cuda::LarsOptions opts{};
  opts.lr = lr;
  opts.momentum = static_cast<float>(momentum);
  opts.weight_decay = weight_decay;
  opts.trust_coefficient = trust_coefficient;
  opts.eps = eps;
  opts.nesterov = nesterov;
  opts.lr_in_momentum = lr_in_momentum;
  opts.param_dtype = cuda_dtype(params[0].scalar_type());
  opts.grad_dtype = cuda_dtype(grads[0].scalar_type());
  opts.copy_dtype = has_copy ? cuda_dtype(model_copies[0].scalar_type()) : opts.param_dtype;
  opts.grad_scale = grad_scale.has_value() ? grad_scale->const_data_ptr<float>() : nullptr;
  opts.found_inf = found_inf.has_value() ? found_inf->const_data_ptr<float>() : nullptr;

  // Per-tensor norm sums, from torch's caching allocator: freed at return, but the allocator
  // keeps the block reserved for this stream until the kernels queued here have used it.
  const at::Tensor scratch = at::empty({static_cast<int64_t>(cuda::lars_scratch_bytes(n))},
                                       params[0].options().dtype(at::kByte));
  check_cuda(cuda::lars_update(tensors.data(), n, opts, scratch.data_ptr(),
                               c10::cuda::getCurrentCUDAStream().stream()),
             kOp, "the LARS kernels");
}

}  // namespace

TORCH_LIBRARY_IMPL(gradfuse, CUDA, m) { m.impl("lars_update_", &lars_update_cuda); }

}  // namespace gradfuse::ops
