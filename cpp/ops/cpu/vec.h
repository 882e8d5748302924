// Vector policies for the CPU kernels: each gives loads/stores of the storage types as fp32
// lanes, rounding to a storage type, and non-finite tracking. kernels_impl.h is written once
// against this interface and instantiated with VecScalar (any x86-64 / other CPUs) and, in
// kernels_avx2.cpp only, VecAvx2 (8 lanes; AVX2 + F16C + FMA).
//
// Everything here has internal linkage (an unnamed namespace): the AVX2 translation unit is
// compiled with -mavx2, and no AVX2 code may be shared with the baseline build by the linker.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels.h"

#if defined(GRADFUSE_VEC_AVX2)
#include <immintrin.h>
#endif

namespace gradfuse::cpu {
namespace {

inline uint32_t float_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  return u;
}
inline float bits_float(uint32_t u) {
  float v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}

// float -> bfloat16 bits, round to nearest even; NaN stays a (quiet) NaN.
inline uint16_t bf16_from_float(float v) {
  uint32_t u = float_bits(v);
  if (std::isnan(v)) return static_cast<uint16_t>((u | 0x00400000u) >> 16);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float float_from_bf16(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

// One lane. _Float16 gives IEEE round-to-nearest-even conversions on any x86-64 GCC/Clang.
struct VecScalar {
  using F = float;
  static constexpr int64_t kWidth = 1;

  template <DType T>
  static F load(const void* p, int64_t i) {
    if constexpr (T == DType::kFloat32) {
      return static_cast<const float*>(p)[i];
    } else if constexpr (T == DType::kFloat16) {
      return static_cast<float>(static_cast<const _Float16*>(p)[i]);
    } else {
      return float_from_bf16(static_cast<const uint16_t*>(p)[i]);
    }
  }
  // v rounded to T's precision, still as fp32 (exactly representable in T).
  template <DType T>
  static F round(F v) {
    if constexpr (T == DType::kFloat32) {
      return v;
    } else if constexpr (T == DType::kFloat16) {
      return static_cast<float>(static_cast<_Float16>(v));
    } else {
      return float_from_bf16(bf16_from_float(v));
    }
  }
  // Stores a value already rounded to T (so the conversion here is exact).
  template <DType T>
  static void store(void* p, int64_t i, F v) {
    if constexpr (T == DType::kFloat32) {
      static_cast<float*>(p)[i] = v;
    } else if constexpr (T == DType::kFloat16) {
      static_cast<_Float16*>(p)[i] = static_cast<_Float16>(v);
    } else {
      static_cast<uint16_t*>(p)[i] = bf16_from_float(v);
    }
  }
  static F set1(float v) { return v; }
  static F zero() { return 0.0f; }
  static F add(F a, F b) { return a + b; }
  static F sub(F a, F b) { return a - b; }
  static F mul(F a, F b) { return a * b; }
  static F fmadd(F a, F b, F c) { return std::fma(a, b, c); }  // a*b + c, rounded once
  static float hsum(F v) { return v; }
  // Non-finite tracking: `acc` collects v - v, which is +0 for finite v and NaN otherwise.
  static F track_nonfinite(F acc, F v) { return acc + (v - v); }
  static bool any_nonfinite(F acc) { return std::isnan(acc); }
  // Bit i of the result is set when |v| lane i >= t or is NaN (NaN ranks above every number).
  static uint32_t abs_ge_mask(F v, F t) { return !(std::fabs(v) < t) ? 1u : 0u; }
};

#if defined(GRADFUSE_VEC_AVX2)
struct VecAvx2 {
  using F = __m256;
  static constexpr int64_t kWidth = 8;

  static __m128i load_u16x8(const void* p, int64_t i) {
    return _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
  }
  // bfloat16 bit patterns of v (RNE, NaN kept quiet) in the low 16 bits of each 32-bit lane.
  static __m256i bf16_bits(F v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x00400000)), nan);
    return _mm256_srli_epi32(r, 16);
  }

  template <DType T>
  static F load(const void* p, int64_t i) {
    if constexpr (T == DType::kFloat32) {
      return _mm256_loadu_ps(static_cast<const float*>(p) + i);
    } else if constexpr (T == DType::kFloat16) {
      return _mm256_cvtph_ps(load_u16x8(p, i));
    } else {
      const __m256i w = _mm256_cvtepu16_epi32(load_u16x8(p, i));
      return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
    }
  }
  template <DType T>
  static F round(F v) {
    if constexpr (T == DType::kFloat32) {
      return v;
    } else if constexpr (T == DType::kFloat16) {
      return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {
      return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits(v), 16));
    }
  }
  template <DType T>
  static void store(void* p, int64_t i, F v) {
    if constexpr (T == DType::kFloat32) {
      _mm256_storeu_ps(static_cast<float*>(p) + i, v);
    } else {
      __m128i h;
      if constexpr (T == DType::kFloat16) {
        h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      } else {
        const __m256i b = bf16_bits(v);  // < 0x10000 per lane: packus never saturates
        h = _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
      }
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p) + i), h);
    }
  }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F zero() { return _mm256_setzero_ps(); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static float hsum(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // OR of the bit patterns of v - v: all zero while every lane seen was finite.
  static F track_nonfinite(F acc, F v) { return _mm256_or_ps(acc, _mm256_sub_ps(v, v)); }
  static bool any_nonfinite(F acc) {
    return !_mm256_testz_si256(_mm256_castps_si256(acc), _mm256_castps_si256(acc));
  }
  static uint32_t abs_ge_mask(F v, F t) {
    const F abs = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v);
    return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(abs, t, _CMP_NLT_UQ)));
  }
};
#endif

}  // namespace
}  // namespace gradfuse::cpu
