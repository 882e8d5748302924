// Fused multi-tensor LARS with momentum (see cpp/ops/lars.cpp for the formulas and the CPU
// implementation this one matches step for step).
//
// The standalone op (lars_update) takes two passes, each one launch per multi_tensor_apply
// table:
//   1. norm pass: the sums of w^2 and g^2 of every use_lars tensor, deterministic
//      (chunk_sums.cuh: per-chunk partials, then a fixed-order sum; no floating atomics);
//   2. update pass: every block derives its tensor's trust ratio from the finished sums (in
//      double, as the CPU does) and updates w, v (and the model copy) elementwise in fp32.
// The one-pass op (lars_update_from_norms) is the update pass alone, from norms taken earlier
// (the grads' by unpack, the params' by the previous step), and takes the new params' norms as
// it writes them. Stream order makes every pass see the one before. found_inf is read on the
// device, so an overflowed step costs near-empty launches and no host sync.
#include <cmath>

#include "chunk_sums.cuh"
#include "dtype.cuh"
#include "kernels.h"
#include "multi_tensor.cuh"

namespace gradfuse::cuda {
namespace {

constexpr int kVec = 4;

struct LarsExtra {
  int32_t index;       // the tensor's position in the caller's list: its norm slots
  int32_t chunk_base;  // its first chunk in the partials
  bool use_lars;
  bool use_weight_decay;
};

// Norm pass: param and grad. Update pass: param, grad, momentum, model copy.
template <bool kLarge>
using NormMeta = TensorListMeta<2, LarsExtra, kLarge>;
template <bool kLarge>
using UpdateMeta = TensorListMeta<4, LarsExtra, kLarge>;

struct UpdateArgs {
  double lr;
  double weight_decay;
  double trust_coefficient;
  double eps;
  float momentum;
  bool nesterov;
  bool lr_in_momentum;
  // Tensor i's sums of squares: w_sq[i * stride] of the param, g_sq[i * stride] of the
  // (unscaled) grad.
  const double* w_sq;
  const double* g_sq;
  int64_t norm_stride;
  double* w_sq_out;  // null, or receives the new params' sums of squares (one pass)
  ChunkSumScratch sums;
  const float* grad_scale;
  const float* found_inf;
};

__device__ __forceinline__ bool skip_step(const float* found_inf) {
  return found_inf != nullptr && *found_inf != 0.0f;
}

template <class P, class G, class Meta>
__global__ void __launch_bounds__(kSumThreads)
    lars_norm_kernel(Meta meta, ChunkSumScratch sums, double* norms, const float* found_inf) {
  static_assert(sizeof(Meta) + sizeof(ChunkSumScratch) + 2 * sizeof(void*) <=
                kParamBytes<Meta::large>);
  // Uniform over the grid, and before any barrier, so an early return cannot deadlock.
  if (skip_step(found_inf)) return;
  const BlockRange r = block_range(meta, kSumChunk);
  const P* w = static_cast<const P*>(meta.ptr[0][r.slot]) + r.begin;
  const G* g = static_cast<const G*>(meta.ptr[1][r.slot]) + r.begin;
  SquareSum<P> w2;
  SquareSum<G> g2;
  for_each_in_block<kVec>(r.len, is_aligned<kVec>(w) && is_aligned<kVec>(g),
                          [&](auto width, int64_t i) {
                            constexpr int N = decltype(width)::value;
                            w2.template add_loaded<N>(w, i);
                            g2.template add_loaded<N>(g, i);
                          });
  const LarsExtra e = meta.extra[r.slot];
  const double mine[2] = {w2.value(), g2.value()};
  double total[2];
  if (finish_chunk_sums<2>(mine, sums, e.index, e.chunk_base, r.chunk, r.num_chunks, total)) {
    norms[2 * e.index] = total[0];
    norms[2 * e.index + 1] = total[1];
  }
}

// C is the model copy's type; kHasCopy false ignores it (the pointer is null).
template <class P, class G, bool kHasCopy, class C, class Meta>
__global__ void __launch_bounds__(kSumThreads) lars_update_kernel(Meta meta, UpdateArgs a) {
  static_assert(sizeof(Meta) + sizeof(UpdateArgs) <= kParamBytes<Meta::large>);
  if (skip_step(a.found_inf)) return;
  const BlockRange r = block_range(meta, kSumChunk);
  const LarsExtra e = meta.extra[r.slot];

  // The per-tensor scalars, exactly as cpp/ops/lars.cpp derives them on the host: ratio in
  // double, 1 when LARS is off or a norm is zero (a NaN norm is not zero: it poisons the step
  // rather than silently falling back to ratio 1), products rounded to float once. Read before
  // this block counts its arrival, so before the last block overwrites w_sq_out (which may be
  // w_sq itself).
  const float inv_scale = a.grad_scale != nullptr ? 1.0f / *a.grad_scale : 1.0f;
  const double wd = e.use_weight_decay ? a.weight_decay : 0.0;
  double trust = 1.0;
  if (e.use_lars) {
    const double wn = sqrt(a.w_sq[e.index * a.norm_stride]);
    const double gn = sqrt(a.g_sq[e.index * a.norm_stride]) * inv_scale;
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

  SquareSum<P> w2;  // of the new values, as sum_squares would take them
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
      w2.add(wv[k]);
    }
    store_f32<N>(v, i, vv);
    store_f32<N>(w, i, wv);
    if constexpr (kHasCopy) store_f32<N>(copy, i, wv);  // one rounding, fp32 -> C
  };
  for_each_in_block<kVec>(r.len, aligned, update);

  if (a.w_sq_out == nullptr) return;  // uniform over the grid
  const double mine[1] = {w2.value()};
  double total[1];
  if (finish_chunk_sums<1>(mine, a.sums, e.index, e.chunk_base, r.chunk, r.num_chunks, total)) {
    a.w_sq_out[e.index] = total[0];
  }
}

LarsExtra extra_of(const LarsTensor& t, int64_t i, const std::vector<int32_t>& bases) {
  return {static_cast<int32_t>(i), bases[i], t.use_lars, t.use_weight_decay};
}

template <class P, class G, bool kLarge>
cudaError_t launch_norms(const LarsTensor* tensors, int64_t n, const std::vector<int32_t>& bases,
                         ChunkSumScratch sums, double* norms, const float* found_inf,
                         cudaStream_t stream) {
  using Meta = NormMeta<kLarge>;
  return multi_tensor_apply<Meta>(
      n, kSumChunk,
      [&](int64_t i, void*(&ptrs)[2], int64_t& numel, LarsExtra& extra) {
        const LarsTensor& t = tensors[i];
        if (!t.use_lars) return false;  // trust ratio 1: its norms are never read
        ptrs[0] = t.param;
        ptrs[1] = const_cast<void*>(t.grad);
        numel = t.numel;
        extra = extra_of(t, i, bases);
        return true;
      },
      [&](const Meta& meta, int blocks) {
        lars_norm_kernel<P, G, Meta><<<blocks, kSumThreads, 0, stream>>>(meta, sums, norms,
                                                                         found_inf);
        return cudaGetLastError();
      });
}

template <class P, class G, bool kHasCopy, class C, bool kLarge>
cudaError_t launch_updates(const LarsTensor* tensors, int64_t n,
                           const std::vector<int32_t>& bases, const UpdateArgs& args,
                           cudaStream_t stream) {
  using Meta = UpdateMeta<kLarge>;
  return multi_tensor_apply<Meta>(
      n, kSumChunk,
      [&](int64_t i, void*(&ptrs)[4], int64_t& numel, LarsExtra& extra) {
        const LarsTensor& t = tensors[i];
        ptrs[0] = t.param;
        ptrs[1] = const_cast<void*>(t.grad);
        ptrs[2] = t.momentum;
        ptrs[3] = t.model_copy;
        numel = t.numel;
        extra = extra_of(t, i, bases);
        return true;
      },
      [&](const Meta& meta, int blocks) {
        lars_update_kernel<P, G, kHasCopy, C, Meta><<<blocks, kSumThreads, 0, stream>>>(meta, args);
        return cudaGetLastError();
      });
}

UpdateArgs update_args(const LarsOptions& o) {
  UpdateArgs a{};
  a.lr = o.lr;
  a.weight_decay = o.weight_decay;
  a.trust_coefficient = o.trust_coefficient;
  a.eps = o.eps;
  a.momentum = o.momentum;
  a.nesterov = o.nesterov;
  a.lr_in_momentum = o.lr_in_momentum;
  a.grad_scale = o.grad_scale;
  a.found_inf = o.found_inf;
  return a;
}

// The update pass over every tensor (dispatch on the dtypes and the table size).
cudaError_t update_all(const LarsTensor* tensors, int64_t n, const LarsOptions& o,
                       const std::vector<int32_t>& bases, const UpdateArgs& args,
                       cudaStream_t stream) {
  bool has_copy = false;
  for (int64_t i = 0; i < n; ++i) has_copy |= tensors[i].model_copy != nullptr;
  return dispatch_low_or_float(o.param_dtype, [&](auto p_tag) {
    using P = typename decltype(p_tag)::type;
    return dispatch_low_or_float(o.grad_dtype, [&](auto g_tag) {
      using G = typename decltype(g_tag)::type;
      return with_table_size([&](auto large) {
        constexpr bool kLarge = decltype(large)::value;
        if (!has_copy) {
          return launch_updates<P, G, false, P, kLarge>(tensors, n, bases, args, stream);
        }
        return dispatch_low_or_float(o.copy_dtype, [&](auto c_tag) {
          using C = typename decltype(c_tag)::type;
          return launch_updates<P, G, true, C, kLarge>(tensors, n, bases, args, stream);
        });
      });
    });
  });
}

// The scratch: [2 * n norms | chunk sums (2 per chunk) ].
struct LarsScratch {
  double* norms;
  ChunkSumScratch sums;
  std::vector<int32_t> bases;
};

LarsScratch lars_scratch(const LarsTensor* tensors, int64_t n, void* scratch) {
  std::vector<int64_t> numels(n);
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) total += numels[i] = tensors[i].numel;
  double* norms = static_cast<double*>(scratch);
  return {norms, chunk_sum_scratch(norms + 2 * n, n, total, 2), chunk_bases(n, numels.data())};
}

}  // namespace

size_t lars_scratch_bytes(int64_t num_tensors, int64_t total_numel) {
  const int64_t n = num_tensors > 0 ? num_tensors : 1;
  return static_cast<size_t>(2 * n) * sizeof(double) + chunk_sum_scratch_bytes(n, total_numel, 2);
}

cudaError_t lars_update(const LarsTensor* tensors, int64_t num_tensors, const LarsOptions& o,
                        void* scratch, cudaStream_t stream) {
  if (num_tensors <= 0) return cudaSuccess;
  const LarsScratch s = lars_scratch(tensors, num_tensors, scratch);
  // An empty tensor may have a null data pointer, so look at all of them, not just the first.
  bool any_lars = false;
  for (int64_t i = 0; i < num_tensors; ++i) any_lars |= tensors[i].use_lars && tensors[i].numel > 0;
  if (any_lars) {
    cudaError_t err = reset_arrivals(s.sums, num_tensors, stream);
    if (err != cudaSuccess) return err;
    err = dispatch_low_or_float(o.param_dtype, [&](auto p_tag) {
      using P = typename decltype(p_tag)::type;
      return dispatch_low_or_float(o.grad_dtype, [&](auto g_tag) {
        using G = typename decltype(g_tag)::type;
        return with_table_size([&](auto large) {
          return launch_norms<P, G, decltype(large)::value>(tensors, num_tensors, s.bases, s.sums,
                                                            s.norms, o.found_inf, stream);
        });
      });
    });
    if (err != cudaSuccess) return err;
  }
  UpdateArgs args = update_args(o);
  args.w_sq = s.norms;
  args.g_sq = s.norms + 1;
  args.norm_stride = 2;
  return update_all(tensors, num_tensors, o, s.bases, args, stream);
}

cudaError_t lars_update_from_norms(const LarsTensor* tensors, int64_t num_tensors,
                                   const LarsOptions& o, const double* grad_sq_norms,
                                   double* param_sq_norms, void* scratch, cudaStream_t stream) {
  if (num_tensors <= 0) return cudaSuccess;
  const LarsScratch s = lars_scratch(tensors, num_tensors, scratch);
  cudaError_t err = reset_arrivals(s.sums, num_tensors, stream);
  // An empty tensor gets no block: its new norm is the 0 written here (even when found_inf
  // skips the step: the norm of nothing is 0).
  for (int64_t i = 0; i < num_tensors && err == cudaSuccess; ++i) {
    if (tensors[i].numel == 0) {
      err = cudaMemsetAsync(param_sq_norms + i, 0, sizeof(double), stream);
    }
  }
  if (err != cudaSuccess) return err;
  UpdateArgs args = update_args(o);
  args.w_sq = param_sq_norms;
  args.g_sq = grad_sq_norms;
  args.norm_stride = 1;
  args.w_sq_out = param_sq_norms;
  args.sums = s.sums;
  return update_all(tensors, num_tensors, o, s.bases, args, stream);
}

}  // namespace gradfuse::cuda
