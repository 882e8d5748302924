// Plain launch functions for gradfuse's CUDA kernels.
//
// This header is the whole contract between cpp/ops (torch-facing: validation, allocation,
// streams) and cuda/ (kernels). It uses no torch/ATen types: raw device pointers, element
// counts, a dtype enum and a cudaStream_t. Every function only *enqueues* work on `stream`; none
// synchronizes the device or the host. Scratch memory is allocated by the caller (through
// torch's caching allocator) and passed in, with the size given by the matching *_bytes query.
// Every launch function returns the first error it met: a failed cudaMemsetAsync / CUB call, or
// the cudaGetLastError() after a launch.
//
// Callers validate arguments (cpp/ops/op_args.h); these functions assume valid, contiguous
// inputs on the current device.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "sample_plan.h"

namespace gradfuse::cuda {

// The floating-point storage types the kernels read and write. Arithmetic is always fp32
// (fp64 when either side of a conversion is kFloat64).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// ---- fused LARS (lars.cu) -----------------------------------------------------------------
//
// One tensor of a multi-tensor LARS update. `param` and `momentum` share `param_dtype`;
// `grad` has `grad_dtype`; `model_copy` (nullptr when absent) has `copy_dtype` and receives the
// updated parameter rounded once.
struct LarsTensor {
  void* param;
  const void* grad;
  void* momentum;
  void* model_copy;
  int64_t numel;
  bool use_lars;          // false: trust ratio is 1 (bias / normalization parameters)
  bool use_weight_decay;  // false: no weight decay for this tensor
};

// The step scalars that feed the per-tensor trust ratio stay in double, as on the CPU
// (cpp/ops/lars.cpp computes the ratio in double and rounds the products to float once).
struct LarsOptions {
  double lr;
  float momentum;
  double weight_decay;
  double trust_coefficient;
  double eps;
  bool nesterov;
  // true: lr inside the momentum (You et al.): v = m*v + lr*trust*(g + wd*w); w -= v.
  // false: lr outside (SGD style):             v = m*v + trust*(g + wd*w);    w -= lr*v.
  bool lr_in_momentum;
  DType param_dtype;  // kFloat32, kFloat16 or kBFloat16 (also the momentum's)
  DType grad_dtype;   // kFloat32, kFloat16 or kBFloat16
  DType copy_dtype;   // ignored when no tensor has a model_copy
  // Optional device scalars (nullptr when absent): grads are divided by *grad_scale before use;
  // when *found_inf != 0 the whole update is skipped on the device (no host sync).
  const float* grad_scale;
  const float* found_inf;
};

// Scratch of lars_update and lars_update_from_norms: lars_scratch_bytes(num_tensors,
// total_numel) bytes of device memory, total_numel the params' element count in all (the
// functions initialize what they use on the stream themselves).
size_t lars_scratch_bytes(int64_t num_tensors, int64_t total_numel);

// `tensors` is a host array of `num_tensors` entries (either all or none with a model_copy).
// The standalone two-pass step: a norm pass (sum of squares of every param and grad of the
// use_lars tensors, deterministic: chunk_sums.cuh) and an update pass, each chunked over all
// tensors in as few launches as the kernel-argument space allows (multi_tensor.cuh).
cudaError_t lars_update(const LarsTensor* tensors, int64_t num_tensors, const LarsOptions& opts,
                        void* scratch, cudaStream_t stream);

// The one-pass step from given squared norms (device float64 arrays of num_tensors elements):
// grad_sq_norms[i] of grads[i] before the grad scale, param_sq_norms[i] of params[i]. One read
// and one write of param, grad and momentum (20 B per fp32 parameter). param_sq_norms[i] is
// then overwritten with the new param's sum of squares, taken as it is written (0 for an empty
// tensor); with *found_inf != 0 nothing is written.
cudaError_t lars_update_from_norms(const LarsTensor* tensors, int64_t num_tensors,
                                   const LarsOptions& opts, const double* grad_sq_norms,
                                   double* param_sq_norms, void* scratch, cudaStream_t stream);

// ---- sums of squares (norms.cu) -------------------------------------------------------------
//
// out[i] = the sum of squares of tensors[i] (float64; 0 when empty), deterministic: the same
// bits as the norms lars_update_from_norms and unpack take in passing of the same values.
struct NormTensor {
  const void* data;
  int64_t numel;
  DType dtype;
};

size_t sum_squares_scratch_bytes(int64_t num_tensors, int64_t total_numel);
cudaError_t sum_squares(const NormTensor* tensors, int64_t num_tensors, double* out,
                        void* scratch, cudaStream_t stream);

// ---- pack / unpack (pack.cu) --------------------------------------------------------------
//
// One segment of the flat buffer: `numel` elements of `tensor` stored at `flat + offset`
// (offset in elements of the flat dtype). Segments may have different dtypes.
struct PackSegment {
  void* tensor;
  int64_t offset;
  int64_t numel;
  DType tensor_dtype;
};

// flat[offset + i] = round_to_flat_dtype(scale * tensor[i]) for every segment.
// If `nonfinite` is not null, *nonfinite is set to 1.0f when any written value is inf or NaN
// (fp16 overflow included); it is never cleared.
// `scale` is a double so that float64 data (on either side) is scaled by it exactly, in fp64;
// fp32/fp16/bf16 conversions compute in fp32 with the scale rounded to float.
cudaError_t pack(const PackSegment* segments, int64_t num_segments, void* flat, DType flat_dtype,
                 double scale, float* nonfinite, cudaStream_t stream);

// tensor[i] = round(scale * flat[offset + i])                 (accumulate == false)
// tensor[i] = round(tensor[i] + scale * flat[offset + i])     (accumulate == true)
// With `sq_norms` (a device array of num_segments float64), sq_norms[s] receives the sum of
// squares of what was written to segment s (0 when empty), taken in the same pass, with the
// bits sum_squares would give; it then needs unpack_scratch_bytes(num_segments, total_numel)
// bytes of `scratch` (total_numel: the segments' elements in all); without, scratch may be null.
size_t unpack_scratch_bytes(int64_t num_segments, int64_t total_numel);
cudaError_t unpack(const PackSegment* segments, int64_t num_segments, const void* flat,
                   DType flat_dtype, double scale, bool accumulate, float* nonfinite,
                   double* sq_norms, void* scratch, cudaStream_t stream);

// ---- top-k compression with error feedback (topk.cu) ----------------------------------------
//
// The device half of topk_compress (cpp/ops/cuda/topk_cuda.cpp drives it; the CPU twin in
// cpp/ops/topk_select_cpu.cpp has the same rule and decisions, cuda/topk_select.h):
//   1. topk_sample   sample[j] = |residual[p_j] + grad[p_j]| at the plan's positions
//                    (residual not yet updated), NaN stored as +inf.
//   2. topk_select   residual += grad, and the selected indices in ascending order, with no
//                    host sync: every data-dependent decision is taken on the device.
//   3. topk_gather_and_clear
// NaN ranks above every number throughout (as in torch.topk).
cudaError_t topk_sample(const float* residual, const void* grad, DType grad_dtype,
                        const SamplePlan& plan, float* sample, cudaStream_t stream);

struct TopkSelectArgs {
  int64_t numel;
  int64_t k;
  int64_t sample_size;
  int64_t rank;      // of the threshold in the sample sorted descending (past the end: 0)
  int64_t capacity;  // of the candidate buffer, >= min(numel, 2k)
  bool sampled;
};

// `selected` has room for min(numel, 2k) indices (k in exact mode); *count (device) receives
// how many were written: k in exact mode, k..2k in sampled mode. `sample` is topk_sample's.
size_t topk_select_scratch_bytes(int64_t numel, int64_t capacity, int64_t sample_size);
cudaError_t topk_select(float* residual, const void* grad, DType grad_dtype,
                        const TopkSelectArgs& args, const float* sample, int64_t* selected,
                        int64_t* count, void* scratch, size_t scratch_bytes, cudaStream_t stream);

// values[j] = residual[idx[j]]; residual[idx[j]] = 0; indices written as int32 when
// `indices_int32`, else int64.
cudaError_t topk_gather_and_clear(float* residual, const int64_t* idx, int64_t count, float* values,
                                  void* indices, bool indices_int32, cudaStream_t stream);

// dense[indices[j]] += values[j] (dense: numel zeros of values_dtype, written by the caller),
// duplicates summed in ascending j, each sum rounded to values_dtype: the CPU's order. An index
// outside [0, numel) fails a device-side assertion.
size_t topk_decompress_scratch_bytes(int64_t count, int64_t numel);
cudaError_t topk_decompress(const void* values, DType values_dtype, const void* indices,
                            bool indices_int32, int64_t count, int64_t numel, void* dense,
                            void* scratch, size_t scratch_bytes, cudaStream_t stream);

}  // namespace gradfuse::cuda
