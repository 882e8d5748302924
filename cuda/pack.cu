// pack / unpack: many tensors <-> one flat (fusion) buffer, with dtype conversion, a scale and
// one rounding (see cpp/ops/pack.cpp for the CPU implementation these match).
//
// One multi_tensor_apply per tensor dtype present (a fusion buffer usually holds one dtype, so
// usually one launch table): block b converts one 64K-element chunk of one tensor to or from
// its segment of the flat buffer. Arithmetic is fp32 (scale rounded to float), or fp64 with the
// double scale when either side is fp64; the result is rounded once, to nearest even, straight
// to the destination type. A block that wrote any inf/NaN sets *nonfinite = 1 (a plain store of
// the same value from any number of blocks: no atomics, no reset, no host sync).
#include <cfloat>

#include "dtype.cuh"
#include "kernels.h"
#include "multi_tensor.cuh"

namespace gradfuse::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int64_t kChunk = 65536;
constexpr int kVec = 4;

struct PackExtra {
  int64_t offset;  // the segment's first element in the flat buffer
};
using PackMeta = TensorListMeta<1, 80, PackExtra>;

__device__ __forceinline__ bool is_finite(float x) { return fabsf(x) <= FLT_MAX; }
__device__ __forceinline__ bool is_finite(double x) { return fabs(x) <= DBL_MAX; }

// Conversions with float64 on either side compute in fp64 ("wide"); all others in fp32.
template <class S, class D>
constexpr bool kWide = std::is_same_v<S, double> || std::is_same_v<D, double>;

// The scale at the kernel's precision: the double as given for wide conversions (so float64
// data is scaled as by double arithmetic), else rounded to float on the host.
template <class S, class D>
using ScaleT = std::conditional_t<kWide<S, D>, double, float>;

// S -> D, where the tensor is S and the flat buffer D when kToFlat (pack), and the reverse for
// unpack. `flat` is written only when kToFlat.
template <class S, class D, bool kToFlat>
__global__ void __launch_bounds__(kThreads)
    convert_kernel(PackMeta meta, void* flat, ScaleT<S, D> scale, bool accumulate,
                   float* nonfinite) {
  const BlockRange r = block_range(meta, kChunk);
  void* tensor = meta.ptr[0][r.slot];
  const int64_t flat_begin = meta.extra[r.slot].offset + r.begin;
  const S* src = static_cast<const S*>(kToFlat ? tensor : flat) + (kToFlat ? r.begin : flat_begin);
  D* dst = static_cast<D*>(kToFlat ? flat : tensor) + (kToFlat ? flat_begin : r.begin);

  // The _rn intrinsics keep nvcc from contracting scale * x + d into one fused multiply-add:
  // the product is rounded, then the sum, exactly as the CPU kernels and torch do it.
  bool bad = false;
  auto convert = [&](auto width, int64_t i) {
    constexpr int N = decltype(width)::value;
    if constexpr (kWide<S, D>) {
      S s[N];
      D d[N];
      load_raw<N>(src, i, s);
      if (accumulate) load_raw<N>(dst, i, d);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        double x = __dmul_rn(scale, to_double(s[k]));
        if (accumulate) x = __dadd_rn(to_double(d[k]), x);
        d[k] = from_double<D>(x);
        bad |= !is_finite(to_double(d[k]));
      }
      store_raw<N>(dst, i, d);
    } else {
      float x[N], d[N];
      load_f32<N>(src, i, x);
      if (accumulate) load_f32<N>(dst, i, d);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        float y = __fmul_rn(x[k], scale);
        if (accumulate) y = __fadd_rn(d[k], y);
        x[k] = round_to<D>(y);
        bad |= !is_finite(x[k]);
      }
      store_f32<N>(dst, i, x);
    }
  };
  for_each_in_block<kVec>(r.len, is_aligned<kVec>(src) && is_aligned<kVec>(dst), convert);

  // `nonfinite` is a kernel argument, so every thread of the block takes the same branch and
  // reaches the barrier.
  if (nonfinite != nullptr) {
    if (__syncthreads_or(bad) && threadIdx.x == 0) *nonfinite = 1.0f;
  }
}

template <class S, class D, bool kToFlat>
cudaError_t launch_convert(const PackSegment* segments, int64_t n, DType tensor_dtype, void* flat,
                           double scale, bool accumulate, float* nonfinite, cudaStream_t stream) {
  const ScaleT<S, D> kernel_scale = static_cast<ScaleT<S, D>>(scale);
  return multi_tensor_apply<PackMeta>(
      n, kChunk,
      [&](int64_t i, void*(&ptrs)[1], int64_t& numel, PackExtra& extra) {
        const PackSegment& s = segments[i];
        if (s.tensor_dtype != tensor_dtype) return false;
        ptrs[0] = s.tensor;
        numel = s.numel;
        extra.offset = s.offset;
        return true;
      },
      [&](const PackMeta& meta, int blocks) {
        convert_kernel<S, D, kToFlat>
            <<<blocks, kThreads, 0, stream>>>(meta, flat, kernel_scale, accumulate, nonfinite);
        return cudaGetLastError();
      });
}

cudaError_t convert_all(const PackSegment* segments, int64_t n, void* flat, DType flat_dtype,
                        double scale, bool accumulate, float* nonfinite, bool to_flat,
                        cudaStream_t stream) {
  for (DType td : {DType::kFloat32, DType::kFloat16, DType::kBFloat16, DType::kFloat64}) {
    bool present = false;
    for (int64_t i = 0; i < n && !present; ++i) {
      present = segments[i].tensor_dtype == td && segments[i].numel > 0;
    }
    if (!present) continue;
    const cudaError_t err = dispatch_float(td, [&](auto t_tag) {
      using T = typename decltype(t_tag)::type;
      return dispatch_float(flat_dtype, [&](auto f_tag) {
        using F = typename decltype(f_tag)::type;
        return to_flat ? launch_convert<T, F, true>(segments, n, td, flat, scale, false, nonfinite,
                                                    stream)
                       : launch_convert<F, T, false>(segments, n, td, flat, scale, accumulate,
                                                     nonfinite, stream);
      });
    });
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t pack(const PackSegment* segments, int64_t num_segments, void* flat, DType flat_dtype,
                 double scale, float* nonfinite, cudaStream_t stream) {
  return convert_all(segments, num_segments, flat, flat_dtype, scale, false, nonfinite,
                     /*to_flat=*/true, stream);
}

cudaError_t unpack(const PackSegment* segments, int64_t num_segments, const void* flat,
                   DType flat_dtype, double scale, bool accumulate, float* nonfinite,
                   cudaStream_t stream) {
  // The kernel only reads `flat` in this direction.
  return convert_all(segments, num_segments, const_cast<void*>(flat), flat_dtype, scale, accumulate,
                     nonfinite, /*to_flat=*/false, stream);
}

}  // namespace gradfuse::cuda
