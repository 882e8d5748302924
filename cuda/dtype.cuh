// Device-side helpers shared by the kernels: the storage types behind kernels.h's DType, their
// conversions to and from the fp32 (or fp64) arithmetic type with round-to-nearest-even, aligned
// vector loads/stores, and a host-side switch from DType to a C++ type.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "kernels.h"

namespace gradfuse::cuda {

// ---- DType -> C++ storage type (host) -------------------------------------------------------

template <class T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) for the storage type of `t` and returns its result.
template <class F>
auto dispatch_float(DType t, F&& f) {
  switch (t) {
    case DType::kFloat16:
      return f(TypeTag<__half>{});
    case DType::kBFloat16:
      return f(TypeTag<__nv_bfloat16>{});
    case DType::kFloat64:
      return f(TypeTag<double>{});
    default:
      return f(TypeTag<float>{});
  }
}

// The same for the three types LARS and top-k accept (kFloat64 cannot reach them).
template <class F>
auto dispatch_low_or_float(DType t, F&& f) {
  switch (t) {
    case DType::kFloat16:
      return f(TypeTag<__half>{});
    case DType::kBFloat16:
      return f(TypeTag<__nv_bfloat16>{});
    default:
      return f(TypeTag<float>{});
  }
}

// ---- conversions (device) -------------------------------------------------------------------

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ double to_double(double x) { return x; }
__device__ __forceinline__ double to_double(float x) { return x; }
__device__ __forceinline__ double to_double(__half x) { return __half2float(x); }
__device__ __forceinline__ double to_double(__nv_bfloat16 x) { return __bfloat162float(x); }

// fp32 -> storage, round to nearest even (overflow to fp16 gives inf, NaN stays NaN).
template <class T>
__device__ __forceinline__ T from_float(float x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(x);
  } else {
    static_assert(std::is_same_v<T, __nv_bfloat16>);
    return __float2bfloat16_rn(x);
  }
}

// fp64 -> storage, one rounding to nearest even.
template <class T>
__device__ __forceinline__ T from_double(double x) {
  if constexpr (std::is_same_v<T, double>) {
    return x;
  } else if constexpr (std::is_same_v<T, float>) {
    return __double2float_rn(x);
  } else if constexpr (std::is_same_v<T, __half>) {
    return __double2half(x);
  } else {
    static_assert(std::is_same_v<T, __nv_bfloat16>);
    return __double2bfloat16(x);
  }
}

// x rounded to T's precision, kept as fp32 (exact in T, so storing it later rounds nothing).
template <class T>
__device__ __forceinline__ float round_to(float x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    return to_float(from_float<T>(x));
  }
}

// ---- aligned vectors ------------------------------------------------------------------------

// N elements loaded or stored as one access (16 bytes for 4 floats, 8 for 4 halves).
template <class T, int N>
struct alignas(sizeof(T) * N) AlignedVec {
  T v[N];
};

template <int N, class T>
__device__ __forceinline__ bool is_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * N) == 0;
}

// out[k] = fp32 value of p[i + k]; i must be a multiple of N and p aligned (is_aligned<N>).
template <int N, class T>
__device__ __forceinline__ void load_f32(const T* p, int64_t i, float (&out)[N]) {
  if constexpr (N == 1) {
    out[0] = to_float(p[i]);
  } else {
    const AlignedVec<T, N> x = *reinterpret_cast<const AlignedVec<T, N>*>(p + i);
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = to_float(x.v[k]);
  }
}

// p[i + k] = in[k] rounded to T (to nearest even; exact when in[] was already rounded to T).
template <int N, class T>
__device__ __forceinline__ void store_f32(T* p, int64_t i, const float (&in)[N]) {
  if constexpr (N == 1) {
    p[i] = from_float<T>(in[0]);
  } else {
    AlignedVec<T, N> x;
#pragma unroll
    for (int k = 0; k < N; ++k) x.v[k] = from_float<T>(in[k]);
    *reinterpret_cast<AlignedVec<T, N>*>(p + i) = x;
  }
}

// Raw element copies for the fp64 conversion path.
template <int N, class T>
__device__ __forceinline__ void load_raw(const T* p, int64_t i, T (&out)[N]) {
  if constexpr (N == 1) {
    out[0] = p[i];
  } else {
    const AlignedVec<T, N> x = *reinterpret_cast<const AlignedVec<T, N>*>(p + i);
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = x.v[k];
  }
}

template <int N, class T>
__device__ __forceinline__ void store_raw(T* p, int64_t i, const T (&in)[N]) {
  if constexpr (N == 1) {
    p[i] = in[0];
  } else {
    AlignedVec<T, N> x;
#pragma unroll
    for (int k = 0; k < N; ++k) x.v[k] = in[k];
    *reinterpret_cast<AlignedVec<T, N>*>(p + i) = x;
  }
}

// Runs body over [0, len) of one block's range, cut into N-element groups: thread t takes
// groups t, t + blockDim.x, ... and each group whole, as one aligned N-vector
// (body(std::integral_constant<int, N>{}, i)) where `aligned` and the group is complete, else
// element by element (body(std::integral_constant<int, 1>{}, i), i ascending). So the vector
// path covers every complete group even when len is not a multiple of N, and which thread sees
// which element, in which order, does not depend on the alignment: a per-thread sum (a norm)
// comes out with the same bits either way. Consecutive threads take consecutive groups, so both
// paths are coalesced.
template <int N, class Body>
__device__ __forceinline__ void for_each_in_block(int64_t len, bool aligned, Body&& body) {
  const int64_t whole = len / N;
  for (int64_t v = threadIdx.x; v * N < len; v += blockDim.x) {
    if (aligned && v < whole) {
      body(std::integral_constant<int, N>{}, v * N);
    } else {
      for (int64_t i = v * N; i < v * N + N && i < len; ++i) {
        body(std::integral_constant<int, 1>{}, i);
      }
    }
  }
}

}  // namespace gradfuse::cuda
