// lars_update_ and lars_update_from_norms_ on CUDA: the same validation as the CPU
// (check_lars_args, check_lars_norm_args: cpp/ops/lars.cpp), then cuda::lars_update /
// cuda::lars_update_from_norms on the current stream. No host sync: found_inf and grad_scale are
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

std::vector<cuda::LarsTensor> lars_tensors(at::TensorList params, at::TensorList grads,
                                           at::TensorList momentum_bufs,
                                           at::TensorList model_copies,
                                           const c10::List<bool>& use_lars,
                                           const c10::List<bool>& use_weight_decay) {
  const bool has_copy = !model_copies.empty();
  std::vector<cuda::LarsTensor> tensors(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    cuda::LarsTensor& t = tensors[i];
    t.param = params[i].data_ptr();
    t.grad = grads[i].const_data_ptr();
    t.momentum = momentum_bufs[i].data_ptr();
    t.model_copy = has_copy ? model_copies[i].data_ptr() : nullptr;
    t.numel = params[i].numel();
    t.use_lars = use_lars.get(i);
    t.use_weight_decay = use_weight_decay.get(i);
  }
  return tensors;
}

cuda::LarsOptions lars_options(at::TensorList params, at::TensorList grads,
                               at::TensorList model_copies, double lr, double momentum,
                               double weight_decay, double trust_coefficient, double eps,
                               bool nesterov, bool lr_in_momentum,
                               const std::optional<at::Tensor>& grad_scale,
                               const std::optional<at::Tensor>& found_inf) {
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
  opts.copy_dtype =
      model_copies.empty() ? opts.param_dtype : cuda_dtype(model_copies[0].scalar_type());
  opts.grad_scale = grad_scale.has_value() ? grad_scale->const_data_ptr<float>() : nullptr;
  opts.found_inf = found_inf.has_value() ? found_inf->const_data_ptr<float>() : nullptr;
  return opts;
}

// Scratch for the norm sums, from torch's caching allocator: freed at return, but the
// allocator keeps the block reserved for this stream until the kernels queued here have used it.
at::Tensor lars_scratch(at::TensorList params) {
  int64_t total = 0;
  for (const auto& p : params) total += p.numel();
  const auto bytes = cuda::lars_scratch_bytes(static_cast<int64_t>(params.size()), total);
  return at::empty({static_cast<int64_t>(bytes)}, params[0].options().dtype(at::kByte));
}

// What both ops do once their arguments are checked: on the parameters' device, the kernel
// tables, options and scratch, then `launch(tables, n, options, scratch, stream)` (a cudaError_t).
template <typename Launch>
void run_lars(at::TensorList params, at::TensorList grads, at::TensorList momentum_bufs,
              at::TensorList model_copies, const c10::List<bool>& use_lars,
              const c10::List<bool>& use_weight_decay, double lr, double momentum,
              double weight_decay, double trust_coefficient, double eps, bool nesterov,
              bool lr_in_momentum, const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& found_inf, const char* op, const char* what,
              const Launch& launch) {
  const auto n = static_cast<int64_t>(params.size());
  if (n == 0) return;
  const c10::cuda::CUDAGuard device_guard(params[0].device());
  const auto tensors =
      lars_tensors(params, grads, momentum_bufs, model_copies, use_lars, use_weight_decay);
  const auto opts =
      lars_options(params, grads, model_copies, lr, momentum, weight_decay, trust_coefficient, eps,
                   nesterov, lr_in_momentum, grad_scale, found_inf);
  const at::Tensor scratch = lars_scratch(params);
  check_cuda(launch(tensors.data(), n, opts, scratch.data_ptr(),
                    c10::cuda::getCurrentCUDAStream().stream()),
             op, what);
}

void lars_update_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_bufs,
                      at::TensorList model_copies, const c10::List<bool>& use_lars,
                      const c10::List<bool>& use_weight_decay, double lr, double momentum,
                      double weight_decay, double trust_coefficient, double eps, bool nesterov,
                      bool lr_in_momentum, const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& found_inf) {
  check_lars_args(params, grads, momentum_bufs, model_copies, use_lars, use_weight_decay, lr,
                  momentum, weight_decay, trust_coefficient, eps, grad_scale, found_inf);
  run_lars(params, grads, momentum_bufs, model_copies, use_lars, use_weight_decay, lr, momentum,
           weight_decay, trust_coefficient, eps, nesterov, lr_in_momentum, grad_scale, found_inf,
           kOp, "the LARS kernels", [](auto tables, int64_t n, auto opts, void* scratch, auto s) {
             return cuda::lars_update(tables, n, opts, scratch, s);
           });
}

void lars_update_from_norms_cuda(at::TensorList params, at::TensorList grads,
                                 at::TensorList momentum_bufs, at::TensorList model_copies,
                                 const c10::List<bool>& use_lars,
                                 const c10::List<bool>& use_weight_decay,
                                 const at::Tensor& grad_sq_norms, const at::Tensor& param_sq_norms,
                                 double lr, double momentum, double weight_decay,
                                 double trust_coefficient, double eps, bool nesterov,
                                 bool lr_in_momentum, const std::optional<at::Tensor>& grad_scale,
                                 const std::optional<at::Tensor>& found_inf) {
  check_lars_args(params, grads, momentum_bufs, model_copies, use_lars, use_weight_decay, lr,
                  momentum, weight_decay, trust_coefficient, eps, grad_scale, found_inf);
  check_lars_norm_args(params, grad_sq_norms, param_sq_norms);
  run_lars(params, grads, momentum_bufs, model_copies, use_lars, use_weight_decay, lr, momentum,
           weight_decay, trust_coefficient, eps, nesterov, lr_in_momentum, grad_scale, found_inf,
           "lars_update_from_norms_", "the LARS kernel",
           [&](auto tables, int64_t n, auto opts, void* scratch, auto s) {
             return cuda::lars_update_from_norms(tables, n, opts,
                                                 grad_sq_norms.const_data_ptr<double>(),
                                                 param_sq_norms.data_ptr<double>(), scratch, s);
           });
}

}  // namespace

TORCH_LIBRARY_IMPL(gradfuse, CUDA, m) {
  m.impl("lars_update_", &lars_update_cuda);
  m.impl("lars_update_from_norms_", &lars_update_from_norms_cuda);
}

}  // namespace gradfuse::ops
