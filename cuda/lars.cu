// Fused multi-tensor LARS with momentum (see cpp/ops/lars.cpp for the formulas and the CPU
// implementation this one matches step for step).
//
// Two passes, each one launch per multi_tensor_apply table:
//   1. norm pass: every block sums w^2 and g^2 over its chunk in fp32, reduces across the block
//      and atomically adds the two sums (as double) into the tensor's scratch slots.
//   2. update pass: every block derives its tensor's trust ratio from the finished sums (in
//      double, as the CPU does) and updates w, v (and the model copy) elementwise in fp32.
// Stream order makes the norm pass complete before any update block reads the sums. found_inf
// is read on the device by both passes, so an overflowed step costs two near-empty launches and
// no host sync.
#include <cmath>

#include "dtype.cuh"
#include "kernels.h"
#include "multi_tensor.cuh"

namespace gradfuse::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int64_t kChunk = 65536;  // elements per block: 32 four-wide steps per thread
constexpr int kVec = 4;

struct LarsExtra {
  int32_t index;  // the tensor's position in the caller's list: its scratch slots
  bool use_lars;
  bool use_weight_decay;
};

// Norm pass: param and grad. Update pass: param, grad, momentum, model copy.
using NormMeta = TensorListMeta<2, 64, LarsExtra>;
using UpdateMeta = TensorListMeta<4, 36, LarsExtra>;

struct UpdateArgs {
  double lr;
  double weight_decay;
  double trust_coefficient;
  double eps;
  float momentum;
  bool nesterov;
  bool lr_in_momentum;
  const double* norms;  // [2 * i] = sum w^2, [2 * i + 1] = sum g^2 (unscaled grad)
  const float* grad_scale;
  const float* found_inf;
};
static_assert(sizeof(UpdateMeta) + sizeof(UpdateArgs) <= 4096, "kernel parameters too large");

__device__ __forceinline__ bool skip_step(const float* found_inf) {
  return found_inf != nullptr && *found_inf != 0.0f;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sum of v over the block, valid in thread 0. `shared` holds one float per warp. Every thread
// of the block must call it.
__device__ __forceinline__ float block_sum(float v, float* shared) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  v = warp_sum(v);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = threadIdx.x < blockDim.x / 32 ? shared[lane] : 0.0f;
  if (warp == 0) v = warp_sum(v);
  return v;
}

template <class P, class G>
__global__ void __launch_bounds__(kThreads)
    lars_norm_kernel(NormMeta meta, double* norms, const float* found_inf) {
  // Uniform over the grid, and before any barrier, so an early return cannot deadlock.
  if (skip_step(found_inf)) return;
  const BlockRange r = block_range(meta, kChunk);
  const P* w = static_cast<const P*>(meta.ptr[0][r.slot]) + r.begin;
  const G* g = static_cast<const G*>(meta.ptr[1][r.slot]) + r.begin;

  // fp32 per thread (at most kChunk / kThreads = 128 terms each), fp32 across the block, fp64
  // across blocks: the same depth of fp32 accumulation as the CPU's 4096-element blocks.
  float w2 = 0.0f, g2 = 0.0f;
  auto accumulate = [&](auto width, int64_t i) {
    constexpr int N = decltype(width)::value;
    float wv[N], gv[N];
    load_f32<N>(w, i, wv);
    load_f32<N>(g, i, gv);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      w2 = fmaf(wv[k], wv[k], w2);
      g2 = fmaf(gv[k], gv[k], g2);
    }
  };
  for_each_in_block<kVec>(r.len, is_aligned<kVec>(w) && is_aligned<kVec>(g), accumulate);

  __shared__ float shared_w[kThreads / 32];
  __shared__ float shared_g[kThreads / 32];
  w2 = block_sum(w2, shared_w);
  g2 = block_sum(g2, shared_g);
  if (threadIdx.x == 0) {
    const int64_t t = meta.extra[r.slot].index;
    atomicAdd(&norms[2 * t], static_cast<double>(w2));
    atomicAdd(&norms[2 * t + 1], static_cast<double>(g2));
  }
}

// C is the model copy's type; kHasCopy false ignores it (the pointer is null).
template <class P, class G, bool kHasCopy, class C>
__global__ void __launch_bounds__(kThreads) lars_update_kernel(UpdateMeta meta, UpdateArgs a) {
  if (skip_step(a.found_inf)) return;
  const BlockRange r = block_range(meta, kChunk);
  const LarsExtra e = meta.extra[r.slot];

  // The per-tensor scalars, exactly as cpp/ops/lars.cpp derives them on the host: ratio in
  // double, 1 when LARS is off or a norm is zero (a NaN norm is not zero: it poisons the step
  // rather than silently falling back to ratio 1), products rounded to float once.
  const float inv_scale = a.grad_scale != nullptr ? 1.0f / *a.grad_scale : 1.0f;
  const double wd = e.use_weight_decay ? a.weight_decay : 0.0;
  double trust = 1.0;
  if (e.use_lars) {
    const double wn = sqrt(a.norms[2 * e.index]);
    const double gn = sqrt(a.norms[2 * e.index + 1]) * inv_scale;
    // __dadd_rn / __dmul_rn: no contraction into a fused multiply-add, as on the host.
    const double denom = __dadd_rn(__dadd_rn(gn, __dmul_rn(wd, wn)), a.eps);
    if (wn != 0.0 && gn != 0.0) trust = a.trust_coefficient * wn / denom;
  }
  const float step_in = static_cast<float>(a.lr_in_momentum ? a.lr * trust : trust);
  const float step_out = static_cast<float>(a.lr_in_momentum ? 1.0 : a.lr);
  const float wd_f = static_cast<float>(wd);
  const float m = a.momentum;

  P* w = static_cast<P*>(meta.ptr[0][r.slot]) + r.begin;
  const G* g = static_cast<const G*>(meta.ptr[1][r.slot]) + r.begin;
  P* v = static_cast<P*>(meta.ptr[2][r.slot]) + r.begin;
  C* copy = kHasCopy ? static_cast<C*>(meta.ptr[3][r.slot]) + r.begin : nullptr;
  const bool aligned = is_aligned<kVec>(w) && is_aligned<kVec>(g) && is_aligned<kVec>(v) &&
                       (!kHasCopy || is_aligned<kVec>(copy));

  auto update = [&](auto width, int64_t i) {
    constexpr int N = decltype(width)::value;
    float wv[N], gv[N], vv[N];
    load_f32<N>(w, i, wv);
    load_f32<N>(g, i, gv);
    load_f32<N>(v, i, vv);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      // The CPU kernel's operation order and fused multiply-adds (kernels_impl.h lars_range);
      // every other product is rounded on its own (__fmul_rn is never contracted).
      const float d = fmaf(wd_f, wv[k], __fmul_rn(gv[k], inv_scale));
      const float step = __fmul_rn(step_in, d);
      const float v_new = round_to<P>(fmaf(m, vv[k], step));
      const float update = a.nesterov ? fmaf(m, v_new, step) : v_new;
      wv[k] = round_to<P>(fmaf(-step_out, update, wv[k]));
      vv[k] = v_new;
    }
    store_f32<N>(v, i, vv);
    store_f32<N>(w, i, wv);
    if constexpr (kHasCopy) store_f32<N>(copy, i, wv);  // one rounding, fp32 -> C
  };
  for_each_in_block<kVec>(r.len, aligned, update);
}

template <class P, class G>
cudaError_t launch_norms(const LarsTensor* tensors, int64_t n, double* norms,
                         const float* found_inf, cudaStream_t stream) {
  return multi_tensor_apply<NormMeta>(
      n, kChunk,
      [&](int64_t i, void*(&ptrs)[2], int64_t& numel, LarsExtra& extra) {
        const LarsTensor& t = tensors[i];
        if (!t.use_lars) return false;  // trust ratio 1: its norms are never read
        ptrs[0] = t.param;
        ptrs[1] = const_cast<void*>(t.grad);
        numel = t.numel;
        extra = {static_cast<int32_t>(i), t.use_lars, t.use_weight_decay};
        return true;
      },
      [&](const NormMeta& meta, int blocks) {
        lars_norm_kernel<P, G><<<blocks, kThreads, 0, stream>>>(meta, norms, found_inf);
        return cudaGetLastError();
      });
}

template <class P, class G, bool kHasCopy, class C>
cudaError_t launch_updates(const LarsTensor* tensors, int64_t n, const UpdateArgs& args,
                           cudaStream_t stream) {
  return multi_tensor_apply<UpdateMeta>(
      n, kChunk,
      [&](int64_t i, void*(&ptrs)[4], int64_t& numel, LarsExtra& extra) {
        const LarsTensor& t = tensors[i];
        ptrs[0] = t.param;
        ptrs[1] = const_cast<void*>(t.grad);
        ptrs[2] = t.momentum;
        ptrs[3] = t.model_copy;
        numel = t.numel;
        extra = {static_cast<int32_t>(i), t.use_lars, t.use_weight_decay};
        return true;
      },
      [&](const UpdateMeta& meta, int blocks) {
        lars_update_kernel<P, G, kHasCopy, C><<<blocks, kThreads, 0, stream>>>(meta, args);
        return cudaGetLastError();
      });
}

}  // namespace

size_t lars_scratch_bytes(int64_t num_tensors) {
  return static_cast<size_t>(num_tensors > 0 ? num_tensors : 1) * 2 * sizeof(double);
}

cudaError_t lars_update(const LarsTensor* tensors, int64_t num_tensors, const LarsOptions& o,
                        void* scratch, cudaStream_t stream) {
  if (num_tensors <= 0) return cudaSuccess;
  double* norms = static_cast<double*>(scratch);
  // An empty tensor may have a null data pointer, so look at all of them, not just the first.
  bool any_lars = false, has_copy = false;
  for (int64_t i = 0; i < num_tensors; ++i) {
    any_lars |= tensors[i].use_lars && tensors[i].numel > 0;
    has_copy |= tensors[i].model_copy != nullptr;
  }

  return dispatch_low_or_float(o.param_dtype, [&](auto p_tag) {
    using P = typename decltype(p_tag)::type;
    return dispatch_low_or_float(o.grad_dtype, [&](auto g_tag) {
      using G = typename decltype(g_tag)::type;
      if (any_lars) {
        cudaError_t err = cudaMemsetAsync(norms, 0, lars_scratch_bytes(num_tensors), stream);
        if (err != cudaSuccess) return err;
        err = launch_norms<P, G>(tensors, num_tensors, norms, o.found_inf, stream);
        if (err != cudaSuccess) return err;
      }
      UpdateArgs args{};
      args.lr = o.lr;
      args.weight_decay = o.weight_decay;
      args.trust_coefficient = o.trust_coefficient;
      args.eps = o.eps;
      args.momentum = o.momentum;
      args.nesterov = o.nesterov;
      args.lr_in_momentum = o.lr_in_momentum;
      args.norms = norms;
      args.grad_scale = o.grad_scale;
      args.found_inf = o.found_inf;
      if (!has_copy) return launch_updates<P, G, false, P>(tensors, num_tensors, args, stream);
      return dispatch_low_or_float(o.copy_dtype, [&](auto c_tag) {
        using C = typename decltype(c_tag)::type;
        return launch_updates<P, G, true, C>(tensors, num_tensors, args, stream);
      });
    });
  });
}

}  // namespace gradfuse::cuda
