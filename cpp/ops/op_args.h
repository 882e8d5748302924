// Argument validation of each op, shared by its CPU implementation (cpp/ops/*.cpp) and its CUDA
// implementation (cpp/ops/cuda/*.cpp), so both devices reject bad input with the same message.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace gradfuse::ops {

// Returns each tensor's offset in `out` (size tensors.size() + 1; the last is the total).
// pack_ writes `flat` (named "out"), unpack_ writes `tensors`.
std::vector<int64_t> check_pack_args(const char* op, at::TensorList tensors, const at::Tensor& flat,
                                     const char* flat_name, const std::optional<at::Tensor>& nonfinite,
                                     double scale, bool flat_written);

void check_lars_args(at::TensorList params, at::TensorList grads, at::TensorList momentum_bufs,
                     at::TensorList model_copies, const c10::List<bool>& use_lars,
                     const c10::List<bool>& use_weight_decay, double lr, double momentum,
                     double weight_decay, double trust_coefficient, double eps,
                     const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf);

// Returns k, the number of elements exact mode selects.
int64_t check_topk_args(const at::Tensor& grad, const at::Tensor& residual, double ratio,
                        const std::optional<at::ScalarType>& index_dtype);

// Everything about topk_decompress's arguments except the index range (which the CPU checks
// while it scatters and the CUDA kernel checks on the device, without a host sync).
void check_decompress_args(const at::Tensor& values, const at::Tensor& indices, int64_t numel);

// The error for indices outside [0, numel) (reads them: a host sync on a GPU).
[[noreturn]] void fail_decompress_index_range(const at::Tensor& indices, int64_t numel);

}  // namespace gradfuse::ops
