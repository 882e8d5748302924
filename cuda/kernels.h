// Plain launch functions for gradfuse's CUDA kernels.
//
// This header is the whole contract between cpp/ops (torch-facing: validation, allocation,
// streams) and cuda/ (kernels). It uses no torch/ATen types: raw device pointers, element
// counts, a dtype enum and a cudaStream_t. Every function only *enqueues* work on `stream`; none
// synchronizes the device or the host. Scratch memory is allocated by the caller (through
// torch's caching allocator) and passed in, with the size given by the matching *_bytes query.
// Every launch function returns the cudaError_t of its last launch (cudaGetLastError()).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

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

struct LarsOptions {
  float lr;
  float momentum;
  float weight_decay;
  float trust_coefficient;
  float eps;
  bool nesterov;
  // true: lr inside the momentum (You et al.): v = m*v + lr*trust*(g + wd*w); w -= v.
  // false: lr outside (SGD style):             v = m*v + trust*(g + wd*w);    w -= lr*v.
  bool lr_in_momentum;
  DType param_dtype;
  DType grad_dtype;
  DType copy_dtype;
  // Optional device scalars (nullptr when absent): grads are divided by *grad_scale before use;
  // when *found_inf != 0 the whole update is skipped on the device (no host sync).
  const float* grad_scale;
  const float* found_inf;
};

// Scratch for the per-tensor norms: lars_scratch_bytes(num_tensors) bytes of device memory.
size_t lars_scratch_bytes(int64_t num_tensors);

// `tensors` is a host array of `num_tensors` entries. Launches a norm pass (sum of squares of
// every param and grad, per tensor) and an update pass, each chunked over all tensors in as
// few launches as the kernel-argument space allows (multi_tensor.cuh).
cudaError_t lars_update(const LarsTensor* tensors, int64_t num_tensors, const LarsOptions& opts,
                        void* scratch, cudaStream_t stream);

// ---- pack / unpack (pack.cu) --------------------------------------------------------------
//
// One segment of the flat buffer: `numel` elements of `tensor` stored at `flat + offset`.
struct PackSegment {
  void* tensor;
  int64_t offset;
  int64_t numel;
  DType tensor_dtype;
};

// flat[offset + i] = round_to_flat_dtype(scale * tensor[i]) for every segment.
// If `nonfinite` is not null, *nonfinite is set to 1.0f when any written value is inf or NaN
// (fp16 overflow included); it is never cleared.
cudaError_t pack(const PackSegment* segments, int64_t num_segments, void* flat, DType flat_dtype,
                 float scale, float* nonfinite, cudaStream_t stream);

// tensor[i] = round(scale * flat[offset + i])                 (accumulate == false)
// tensor[i] = round(tensor[i] + scale * flat[offset + i])     (accumulate == true)
cudaError_t unpack(const PackSegment* segments, int64_t num_segments, const void* flat,
                   DType flat_dtype, float scale, bool accumulate, float* nonfinite,
                   cudaStream_t stream);

// ---- top-k compression with error feedback (topk.cu) ----------------------------------------
//
// Step 1, one streaming pass: residual[i] += grad[i] (residual is fp32), and take a strided
// sample of |residual| into `sample` (sample_size floats, positions start + j*stride).
cudaError_t topk_accumulate_and_sample(float* residual, const void* grad, DType grad_dtype,
                                       int64_t numel, float* sample, int64_t sample_size,
                                       int64_t sample_start, int64_t sample_stride,
                                       cudaStream_t stream);

// Sorts `sample` descending in place (device), so the caller can read a threshold at any rank.
size_t topk_sort_sample_scratch_bytes(int64_t sample_size);
cudaError_t topk_sort_sample(float* sample, int64_t sample_size, void* scratch,
                             size_t scratch_bytes, cudaStream_t stream);

// Step 2: write the positions with |residual[i]| >= *threshold (device scalar) into
// candidates[0 .. capacity) in any order, counting all of them in *count (int64, device; the
// caller zeroes it). Positions beyond `capacity` are counted but not written.
cudaError_t topk_select_candidates(const float* residual, int64_t numel, const float* threshold,
                                   int64_t* candidates, int64_t capacity,
                                   unsigned long long* count, cudaStream_t stream);

// Step 3 (exact trim, optional): order `num_candidates` candidates by |residual| descending
// (ties by ascending index), keeping the first k in `selected`.
size_t topk_trim_scratch_bytes(int64_t num_candidates);
cudaError_t topk_trim(const float* residual, const int64_t* candidates, int64_t num_candidates,
                      int64_t k, int64_t* selected, void* scratch, size_t scratch_bytes,
                      cudaStream_t stream);

// Step 4: values[j] = residual[idx[j]]; residual[idx[j]] = 0; indices written as int32 when
// `indices_int32`, else int64.
cudaError_t topk_gather_and_clear(float* residual, const int64_t* idx, int64_t count,
                                  float* values, void* indices, bool indices_int32,
                                  cudaStream_t stream);

// dense[indices[j]] += values[j] (atomic; duplicates add up). dense and values have `dtype`
// (kFloat32, kFloat16, kBFloat16 or kFloat64).
cudaError_t topk_scatter_add(void* dense, DType dtype, const void* values, const void* indices,
                             bool indices_int32, int64_t count, int64_t numel,
                             cudaStream_t stream);

}  // namespace gradfuse::cuda
