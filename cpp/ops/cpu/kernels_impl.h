// The CPU kernels, written once against a vector policy (vec.h) and instantiated per
// instruction set by kernels_scalar.cpp and kernels_avx2.cpp. Each `*_impl` runs the vector
// body over the largest multiple of V::kWidth and finishes the tail with VecScalar, so results
// do not depend on where a range starts.
//
// Included only by those two files, after they define (or not) GRADFUSE_VEC_AVX2.
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels.h"
#include "vec.h"

namespace gradfuse::cpu {
namespace {

// ---- conversion (pack / unpack) ------------------------------------------------------------

// Sums of squares are taken in blocks of kNormBlock elements: fp32 lanes within a block, fp64
// across blocks, the tail (past the last whole vector) one element at a time in fp64. Every
// kernel that accumulates a norm (sum_squares, convert with a norm, lars_update) walks a range
// this same way, so the same values give the same bits whichever kernel saw them last.
constexpr int64_t kNormBlock = 4096;

// dst[i] = round(scale * src[i] (+ dst[i])) over [begin, end), a multiple of V::kWidth long;
// with kNorm, *sq += the sum of squares of the written values (by blocks, as above).
template <class V, DType S, DType D, bool kNorm>
bool convert_range(const void* src, void* dst, int64_t begin, int64_t end, float scale,
                   bool accumulate, double* sq) {
  using F = typename V::F;
  const F s = V::set1(scale);
  F bad = V::zero();
  for (int64_t b = begin; b < end; b += kNormBlock) {
    const int64_t e = b + kNormBlock < end ? b + kNormBlock : end;
    F acc = V::zero();
    for (int64_t i = b; i < e; i += V::kWidth) {
      F x = V::mul(V::template load<S>(src, i), s);
      if (accumulate) x = V::add(V::template load<D>(dst, i), x);
      x = V::template round<D>(x);
      bad = V::track_nonfinite(bad, x);
      V::template store<D>(dst, i, x);
      if constexpr (kNorm) acc = V::fmadd(x, x, acc);
    }
    if constexpr (kNorm) *sq += V::hsum(acc);
  }
  return V::any_nonfinite(bad);
}

template <class V, DType S, DType D>
bool convert_impl(const void* src, void* dst, int64_t n, float scale, bool accumulate,
                  double* sq) {
  const int64_t n_vec = n - n % V::kWidth;
  if (sq == nullptr) {
    return convert_range<V, S, D, false>(src, dst, 0, n_vec, scale, accumulate, nullptr) |
           convert_range<VecScalar, S, D, false>(src, dst, n_vec, n, scale, accumulate, nullptr);
  }
  double total = 0.0;
  bool bad = convert_range<V, S, D, true>(src, dst, 0, n_vec, scale, accumulate, &total);
  bad |= convert_range<VecScalar, S, D, false>(src, dst, n_vec, n, scale, accumulate, nullptr);
  for (int64_t i = n_vec; i < n; ++i) {
    const double v = VecScalar::load<D>(dst, i);
    total += v * v;
  }
  *sq = total;
  return bad;
}

// float64 on either side: fp64 arithmetic with the double scale, scalar.
template <class S, class D>
bool convert_f64_typed(const S* src, D* dst, int64_t n, double scale, bool accumulate) {
  bool bad = false;
  for (int64_t i = 0; i < n; ++i) {
    double x = scale * static_cast<double>(src[i]);
    if (accumulate) x += static_cast<double>(dst[i]);
    dst[i] = static_cast<D>(x);
    bad |= !std::isfinite(static_cast<double>(dst[i]));
  }
  return bad;
}

// bfloat16 has no native C++ type: go through float for its side (one rounding either way,
// since a bfloat16 value is exact in float and float -> bfloat16 is the only rounding).
inline bool convert_with_f64(const void* src, DType st, void* dst, DType dt, int64_t n,
                             double scale, bool accumulate) {
  bool bad = false;
  if (st == DType::kFloat64 && dt == DType::kFloat64) {
    return convert_f64_typed(static_cast<const double*>(src), static_cast<double*>(dst), n, scale,
                             accumulate);
  }
  for (int64_t i = 0; i < n; ++i) {
    double x;
    switch (st) {
      case DType::kFloat64: x = static_cast<const double*>(src)[i]; break;
      case DType::kFloat32: x = static_cast<const float*>(src)[i]; break;
      case DType::kFloat16: x = static_cast<float>(static_cast<const _Float16*>(src)[i]); break;
      default: x = float_from_bf16(static_cast<const uint16_t*>(src)[i]); break;
    }
    x *= scale;
    switch (dt) {
      case DType::kFloat64: {
        double* d = static_cast<double*>(dst);
        d[i] = accumulate ? d[i] + x : x;
        bad |= !std::isfinite(d[i]);
        break;
      }
      case DType::kFloat32: {
        float* d = static_cast<float*>(dst);
        d[i] = static_cast<float>(accumulate ? d[i] + x : x);
        bad |= !std::isfinite(d[i]);
        break;
      }
      case DType::kFloat16: {
        _Float16* d = static_cast<_Float16*>(dst);
        d[i] = static_cast<_Float16>(accumulate ? static_cast<double>(d[i]) + x : x);
        bad |= !std::isfinite(static_cast<float>(d[i]));
        break;
      }
      default: {
        // double -> float -> bfloat16 could round twice; values that matter for gradient
        // exchange are far from the few double-rounding cases, and this path is a fallback.
        uint16_t* d = static_cast<uint16_t*>(dst);
        const double v = accumulate ? float_from_bf16(d[i]) + x : x;
        d[i] = bf16_from_float(static_cast<float>(v));
        bad |= !std::isfinite(float_from_bf16(d[i]));
        break;
      }
    }
  }
  return bad;
}

template <class V>
double sum_squares_dispatch(const void* x, DType t, int64_t n);

template <class V>
bool convert_dispatch(const void* src, DType st, void* dst, DType dt, int64_t n, double scale,
                      bool accumulate, double* sq) {
  if (st == DType::kFloat64 || dt == DType::kFloat64) {
    const bool bad = convert_with_f64(src, st, dst, dt, n, scale, accumulate);
    // The fallback path: the norm from a second read of the range, still in cache.
    if (sq != nullptr) *sq = sum_squares_dispatch<V>(dst, dt, n);
    return bad;
  }
  // fp32/fp16/bf16 on both sides: fp32 lanes, so the scale as the nearest float.
  const float scale_f = static_cast<float>(scale);
#define GRADFUSE_CONVERT_CASE(S, D) \
  if (st == S && dt == D) return convert_impl<V, S, D>(src, dst, n, scale_f, accumulate, sq);
  GRADFUSE_CONVERT_CASE(DType::kFloat32, DType::kFloat32)
  GRADFUSE_CONVERT_CASE(DType::kFloat32, DType::kFloat16)
  GRADFUSE_CONVERT_CASE(DType::kFloat32, DType::kBFloat16)
  GRADFUSE_CONVERT_CASE(DType::kFloat16, DType::kFloat32)
  GRADFUSE_CONVERT_CASE(DType::kFloat16, DType::kFloat16)
  GRADFUSE_CONVERT_CASE(DType::kFloat16, DType::kBFloat16)
  GRADFUSE_CONVERT_CASE(DType::kBFloat16, DType::kFloat32)
  GRADFUSE_CONVERT_CASE(DType::kBFloat16, DType::kFloat16)
  GRADFUSE_CONVERT_CASE(DType::kBFloat16, DType::kBFloat16)
#undef GRADFUSE_CONVERT_CASE
  return false;  // unreachable: cpp/ops validated the dtypes
}

// ---- sum of squares (LARS norms) -------------------------------------------------------------

template <class V, DType T>
double sum_squares_impl(const void* x, int64_t n) {
  using F = typename V::F;
  const int64_t n_vec = n - n % V::kWidth;
  double total = 0.0;
  for (int64_t b = 0; b < n_vec; b += kNormBlock) {
    const int64_t e = b + kNormBlock < n_vec ? b + kNormBlock : n_vec;
    F acc = V::zero();
    for (int64_t i = b; i < e; i += V::kWidth) {
      const F v = V::template load<T>(x, i);
      acc = V::fmadd(v, v, acc);
    }
    total += V::hsum(acc);
  }
  for (int64_t i = n_vec; i < n; ++i) {
    const float v = VecScalar::load<T>(x, i);
    total += static_cast<double>(v) * v;
  }
  return total;
}

template <class V>
double sum_squares_dispatch(const void* x, DType t, int64_t n) {
  switch (t) {
    case DType::kFloat32: return sum_squares_impl<V, DType::kFloat32>(x, n);
    case DType::kFloat16: return sum_squares_impl<V, DType::kFloat16>(x, n);
    case DType::kBFloat16: return sum_squares_impl<V, DType::kBFloat16>(x, n);
    default: {
      const double* d = static_cast<const double*>(x);
      double total = 0.0;
      for (int64_t i = 0; i < n; ++i) total += d[i] * d[i];
      return total;
    }
  }
}

// ---- LARS update ---------------------------------------------------------------------------

// One LARS step over [begin, end) (a multiple of V::kWidth long); returns the sum of squares of
// the new parameter values (by blocks, as sum_squares), the next step's ||w||^2.
template <class V, DType P, DType G, bool kHasCopy, DType C>
double lars_range(void* param, const void* grad, void* mom, void* copy, int64_t begin,
                  int64_t end, const LarsStep& s) {
  using F = typename V::F;
  const F grad_scale = V::set1(s.grad_scale), wd = V::set1(s.weight_decay);
  const F m = V::set1(s.momentum), step_in = V::set1(s.step_in);
  const F neg_step_out = V::set1(-s.step_out);
  double total = 0.0;
  for (int64_t b = begin; b < end; b += kNormBlock) {
    const int64_t e = b + kNormBlock < end ? b + kNormBlock : end;
    F acc = V::zero();
    for (int64_t i = b; i < e; i += V::kWidth) {
      const F w = V::template load<P>(param, i);
      const F d = V::fmadd(wd, w, V::mul(V::template load<G>(grad, i), grad_scale));
      const F v =
          V::template round<P>(V::fmadd(m, V::template load<P>(mom, i), V::mul(step_in, d)));
      const F update = s.nesterov ? V::fmadd(m, v, V::mul(step_in, d)) : v;
      const F w_new = V::template round<P>(V::fmadd(neg_step_out, update, w));
      V::template store<P>(mom, i, v);
      V::template store<P>(param, i, w_new);
      if constexpr (kHasCopy) V::template store<C>(copy, i, V::template round<C>(w_new));
      acc = V::fmadd(w_new, w_new, acc);
    }
    total += V::hsum(acc);
  }
  return total;
}

template <class V, DType P, DType G, bool kHasCopy, DType C>
double lars_impl(void* param, const void* grad, void* mom, void* copy, int64_t n,
                 const LarsStep& s) {
  const int64_t n_vec = n - n % V::kWidth;
  double total = lars_range<V, P, G, kHasCopy, C>(param, grad, mom, copy, 0, n_vec, s);
  lars_range<VecScalar, P, G, kHasCopy, C>(param, grad, mom, copy, n_vec, n, s);
  for (int64_t i = n_vec; i < n; ++i) {  // the tail in fp64, as sum_squares_impl
    const double w = VecScalar::load<P>(param, i);
    total += w * w;
  }
  return total;
}

template <class V, DType P, DType G>
double lars_dispatch_copy(void* param, const void* grad, void* mom, void* copy, DType ct, int64_t n,
                        const LarsStep& s) {
  if (copy == nullptr) return lars_impl<V, P, G, false, P>(param, grad, mom, copy, n, s);
  switch (ct) {
    case DType::kFloat16: return lars_impl<V, P, G, true, DType::kFloat16>(param, grad, mom, copy, n, s);
    case DType::kBFloat16: return lars_impl<V, P, G, true, DType::kBFloat16>(param, grad, mom, copy, n, s);
    default: return lars_impl<V, P, G, true, DType::kFloat32>(param, grad, mom, copy, n, s);
  }
}

template <class V, DType P>
double lars_dispatch_grad(void* param, const void* grad, DType gt, void* mom, void* copy, DType ct,
                        int64_t n, const LarsStep& s) {
  switch (gt) {
    case DType::kFloat16: return lars_dispatch_copy<V, P, DType::kFloat16>(param, grad, mom, copy, ct, n, s);
    case DType::kBFloat16: return lars_dispatch_copy<V, P, DType::kBFloat16>(param, grad, mom, copy, ct, n, s);
    default: return lars_dispatch_copy<V, P, DType::kFloat32>(param, grad, mom, copy, ct, n, s);
  }
}

template <class V>
double lars_dispatch(void* param, DType pt, const void* grad, DType gt, void* mom, void* copy,
                   DType ct, int64_t n, const LarsStep& s) {
  switch (pt) {
    case DType::kFloat16: return lars_dispatch_grad<V, DType::kFloat16>(param, grad, gt, mom, copy, ct, n, s);
    case DType::kBFloat16: return lars_dispatch_grad<V, DType::kBFloat16>(param, grad, gt, mom, copy, ct, n, s);
    default: return lars_dispatch_grad<V, DType::kFloat32>(param, grad, gt, mom, copy, ct, n, s);
  }
}

// ---- top-k candidate selection -------------------------------------------------------------

template <class V, bool kAccumulate, DType G>
int64_t select_range(float* residual, const void* grad, int64_t begin, int64_t end, float thr,
                     int64_t base, int64_t* out, int64_t cap, int64_t count) {
  using F = typename V::F;
  const F t = V::set1(thr);
  for (int64_t i = begin; i < end; i += V::kWidth) {
    F r = V::template load<DType::kFloat32>(residual, i);
    if constexpr (kAccumulate) {
      r = V::add(r, V::template load<G>(grad, i));
      V::template store<DType::kFloat32>(residual, i, r);
    }
    uint32_t mask = V::abs_ge_mask(r, t);
    while (mask != 0) {
      const int lane = __builtin_ctz(mask);
      mask &= mask - 1;
      if (count < cap) out[count] = base + i + lane;
      ++count;
    }
  }
  return count;
}

template <class V, bool kAccumulate, DType G>
int64_t select_impl(float* residual, const void* grad, int64_t n, float thr, int64_t base,
                    int64_t* out, int64_t cap) {
  const int64_t n_vec = n - n % V::kWidth;
  int64_t count = select_range<V, kAccumulate, G>(residual, grad, 0, n_vec, thr, base, out, cap, 0);
  return select_range<VecScalar, kAccumulate, G>(residual, grad, n_vec, n, thr, base, out, cap,
                                                 count);
}

template <class V>
int64_t accumulate_select_dispatch(float* residual, const void* grad, DType gt, int64_t n,
                                   float thr, int64_t base, int64_t* out, int64_t cap) {
  switch (gt) {
    case DType::kFloat16: return select_impl<V, true, DType::kFloat16>(residual, grad, n, thr, base, out, cap);
    case DType::kBFloat16: return select_impl<V, true, DType::kBFloat16>(residual, grad, n, thr, base, out, cap);
    default: return select_impl<V, true, DType::kFloat32>(residual, grad, n, thr, base, out, cap);
  }
}

}  // namespace
}  // namespace gradfuse::cpu
