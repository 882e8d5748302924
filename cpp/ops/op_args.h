// Argument validation of each op, shared by its CPU implementation (cpp/ops/*.cpp) and its CUDA
// implementation (cpp/ops/cuda/*.cpp), so both devices reject bad input with the same message.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "cpu/kernels.h"

namespace gradfuse::ops {

// Returns each tensor's offset in `out` (size tensors.size() + 1; the last is the total).
// pack_ writes `flat` (named "out"), unpack_ writes `tensors`.
std::vector<int64_t> check_pack_args(const char* op, at::TensorList tensors, const at::Tensor& flat,
                                     const char* flat_name, const std::optional<at::Tensor>& nonfinite,
                                     double scale, bool flat_written);

// unpack_'s optional sq_norms: float64, 1-D, one element per tensor, on flat's device, sharing
// no memory with the other arguments.
void check_sq_norms_arg(const char* op, const std::optional<at::Tensor>& sq_norms,
                        at::TensorList tensors, const at::Tensor& flat);

void check_lars_args(at::TensorList params, at::TensorList grads, at::TensorList momentum_bufs,
                     at::TensorList model_copies, const c10::List<bool>& use_lars,
                     const c10::List<bool>& use_weight_decay, double lr, double momentum,
                     double weight_decay, double trust_coefficient, double eps,
                     const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf);

// lars_update_from_norms_'s extra arguments: float64 1-D tensors of one element per param.
void check_lars_norm_args(at::TensorList params, const at::Tensor& grad_sq_norms,
                          const at::Tensor& param_sq_norms);

// The step scalars of lars_update_ and lars_update_from_norms_ (CPU and CUDA hosts alike).
struct LarsHyper {
  double lr, momentum, weight_decay, trust_coefficient, eps;
  bool nesterov, lr_in_momentum;
  float inv_scale;  // 1 / grad_scale
};

// One tensor's step from its squared norms (the gradient's unscaled): the trust ratio in double,
// 1 when LARS is off or a norm is 0 (NaN propagates), products rounded to float once.
cpu::LarsStep lars_step_for(double w_sq, double g_sq, bool use_lars, bool use_wd,
                            const LarsHyper& h);

// Returns k, the number of elements exact mode selects.
int64_t check_topk_args(const at::Tensor& grad, const at::Tensor& residual, double ratio,
                        const std::optional<at::ScalarType>& index_dtype);

// Everything about topk_decompress's arguments except the index range (which the CPU checks
// while it scatters and the CUDA kernel checks on the device, without a host sync).
void check_decompress_args(const at::Tensor& values, const at::Tensor& indices, int64_t numel);

// The error for indices outside [0, numel) (reads them: a host sync on a GPU).
[[noreturn]] void fail_decompress_index_range(const at::Tensor& indices, int64_t numel);

}  // namespace gradfuse::ops
