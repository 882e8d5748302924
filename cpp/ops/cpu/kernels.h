// Torch-free CPU kernels: plain pointers and element counts, one contiguous range per call.
// cpp/ops splits tensors into chunks and runs these in parallel (at::parallel_for); the
// functions here pick the vector path at run time (dispatch.cpp) and never allocate.
#pragma once

#include <cstdint>

namespace gradfuse::cpu {

// Storage types. Arithmetic is fp32 (fp64 when either side of a conversion is kFloat64).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// dst[i] = round(scale * src[i])              (accumulate == false)
// dst[i] = round(dst[i] + scale * src[i])     (accumulate == true)
// Rounds once, to nearest even. Returns true when any written value is inf or NaN. When
// `dst_sum_squares` is not null it receives the sum of squares of the written values, the same
// bits sum_squares(dst, dst_dtype, n) would give (a gradient's norm taken while it is unpacked).
// The scale comes as a double so that float64 data is scaled by it exactly (as in double
// arithmetic, e.g. an Average's 1/3); the fp32 arithmetic of the other dtypes uses it rounded
// to float.
bool convert(const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t n,
             double scale, bool accumulate, double* dst_sum_squares = nullptr);

// Sum of x[i]^2: fp32 lanes within blocks of 4096 elements, blocks and the tail in fp64, so
// the result depends only on the values and n (not on threads or the caller's chunking).
double sum_squares(const void* x, DType dtype, int64_t n);

// The per-tensor scalars of one LARS step, already resolved by the caller:
//   d = grad * grad_scale + weight_decay * w
//   v = momentum * v + step_in * d
//   w = w - step_out * (nesterov ? momentum * v + step_in * d : v)
// With the lr inside the momentum, step_in = lr * trust and step_out = 1; outside, step_in =
// trust and step_out = lr.
struct LarsStep {
  float grad_scale;
  float weight_decay;
  float momentum;
  float step_in;
  float step_out;
  bool nesterov;
};

// param/momentum have param_dtype; model_copy (nullptr when absent) has copy_dtype. Returns
// the sum of squares of the new param values (as sum_squares would give it): the next step's
// ||w||^2, taken while the update writes w.
double lars_update(void* param, DType param_dtype, const void* grad, DType grad_dtype,
                 void* momentum, void* model_copy, DType copy_dtype, int64_t n,
                 const LarsStep& step);

// residual[i] += grad[i]; then appends every i with |residual[i]| >= threshold to `candidates`
// (as base + i) while fewer than `capacity` were written. Returns how many passed in all.
int64_t accumulate_and_select(float* residual, const void* grad, DType grad_dtype, int64_t n,
                              float threshold, int64_t base, int64_t* candidates,
                              int64_t capacity);

// The same selection without the accumulation.
int64_t select_at_least(const float* residual, int64_t n, float threshold, int64_t base,
                        int64_t* candidates, int64_t capacity);

}  // namespace gradfuse::cpu
