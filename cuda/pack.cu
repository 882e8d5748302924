// pack / unpack: many tensors <-> one flat (fusion) buffer, with dtype conversion, a scale and
// one rounding (see cpp/ops/pack.cpp for the CPU implementation these match).
//
// One multi_tensor_apply per tensor dtype present (a fusion buffer usually holds one dtype, so
// usually one launch table): block b converts one 64K-element chunk of one tensor to or from
// its segment of the flat buffer. Each thread moves whole 4-element groups: one load and one
// store per group and side (e.g. 16 B of fp32 in, one 8-byte store of 4 halves out) where both
// sides are aligned to the group, element by element otherwise. unpack with sq_norms takes
// each tensor's sum of squares as it writes it (chunk_sums.cuh: deterministic, no extra read).
// Arithmetic is fp32 (scale rounded to float), or fp64 with the double scale when either side
// is fp64; the result is rounded once, to nearest even, straight to the destination type. A block that wrote any inf/NaN sets *nonfinite = 1 (a plain store of
// the same value from any number of blocks: no atomics, no reset, no host sync).
#include <cfloat>

#include "chunk_sums.cuh"
#include "dtype.cuh"
#include "kernels.h"
#include "multi_tensor.cuh"

namespace gradfuse::cuda {
namespace {

constexpr int kVec = 4;

struct PackExtra {
  int64_t offset;      // the segment's first element in the flat buffer
  int32_t index;       // the segment's position in the list: its sq_norms slot and counter
  int32_t chunk_base;  // its first chunk in the partials (sq_norms only)
};
template <bool kLarge>
using PackMeta = TensorListMeta<1, PackExtra, kLarge>;

// unpack's optional norms: sq_norms[i] for segment i (null: none taken).
struct NormOut {
  double* sq_norms;
  ChunkSumScratch sums;
};

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
// unpack. `flat` is written only when kToFlat; `norms` is used only by unpack.
template <class S, class D, bool kToFlat, class Meta>
__global__ void __launch_bounds__(kSumThreads)
    convert_kernel(Meta meta, void* flat, ScaleT<S, D> scale, bool accumulate, float* nonfinite,
                   NormOut norms) {
  static_assert(sizeof(Meta) + sizeof(void*) + sizeof(double) + sizeof(bool) + sizeof(float*) +
                    sizeof(NormOut) + 16 <=
                kParamBytes<Meta::large>);
  const BlockRange r = block_range(meta, kSumChunk);
  void* tensor = meta.ptr[0][r.slot];
  const int64_t flat_begin = meta.extra[r.slot].offset + r.begin;
  const S* src = static_cast<const S*>(kToFlat ? tensor : flat) + (kToFlat ? r.begin : flat_begin);
  D* dst = static_cast<D*>(kToFlat ? flat : tensor) + (kToFlat ? flat_begin : r.begin);

  // The _rn intrinsics keep nvcc from contracting scale * x + d into one fused multiply-add:
  // the product is rounded, then the sum, exactly as the CPU kernels and torch do it.
  bool bad = false;
  SquareSum<D> sq;  // of the written values (unpack with norms)
  const bool take_norm = !kToFlat && norms.sq_norms != nullptr;
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
        if (take_norm) sq.add(static_cast<typename SquareSum<D>::Acc>(to_double(d[k])));
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
        if (take_norm) sq.add(x[k]);
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
  if constexpr (!kToFlat) {
    if (!take_norm) return;
    const PackExtra e = meta.extra[r.slot];
    const double mine[1] = {sq.value()};
    double total[1];
    if (finish_chunk_sums<1>(mine, norms.sums, e.index, e.chunk_base, r.chunk, r.num_chunks,
                             total)) {
      norms.sq_norms[e.index] = total[0];
    }
  }
}

template <class S, class D, bool kToFlat, bool kLarge>
cudaError_t launch_convert(const PackSegment* segments, int64_t n, DType tensor_dtype, void* flat,
                           double scale, bool accumulate, float* nonfinite, const NormOut& norms,
                           const std::vector<int32_t>& bases, cudaStream_t stream) {
  using Meta = PackMeta<kLarge>;
  const ScaleT<S, D> kernel_scale = static_cast<ScaleT<S, D>>(scale);
  return multi_tensor_apply<Meta>(
      n, kSumChunk,
      [&](int64_t i, void*(&ptrs)[1], int64_t& numel, PackExtra& extra) {
        const PackSegment& s = segments[i];
        if (s.tensor_dtype != tensor_dtype) return false;
        ptrs[0] = s.tensor;
        numel = s.numel;
        extra = {s.offset, static_cast<int32_t>(i), bases.empty() ? 0 : bases[i]};
        return true;
      },
      [&](const Meta& meta, int blocks) {
        convert_kernel<S, D, kToFlat, Meta><<<blocks, kSumThreads, 0, stream>>>(
            meta, flat, kernel_scale, accumulate, nonfinite, norms);
        return cudaGetLastError();
      });
}

cudaError_t convert_all(const PackSegment* segments, int64_t n, void* flat, DType flat_dtype,
                        double scale, bool accumulate, float* nonfinite, bool to_flat,
                        const NormOut& norms, const std::vector<int32_t>& bases,
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
        return with_table_size([&](auto large) {
          constexpr bool kLarge = decltype(large)::value;
          return to_flat ? launch_convert<T, F, true, kLarge>(segments, n, td, flat, scale, false,
                                                              nonfinite, norms, bases, stream)
                         : launch_convert<F, T, false, kLarge>(segments, n, td, flat, scale,
                                                               accumulate, nonfinite, norms,
                                                               bases, stream);
        });
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
                     /*to_flat=*/true, NormOut{}, {}, stream);
}

size_t unpack_scratch_bytes(int64_t num_segments, int64_t total_numel) {
  return chunk_sum_scratch_bytes(num_segments, total_numel, 1);
}

cudaError_t unpack(const PackSegment* segments, int64_t num_segments, const void* flat,
                   DType flat_dtype, double scale, bool accumulate, float* nonfinite,
                   double* sq_norms, void* scratch, cudaStream_t stream) {
  NormOut norms{};
  std::vector<int32_t> bases;
  if (sq_norms != nullptr && num_segments > 0) {
    std::vector<int64_t> numels(num_segments);
    int64_t total = 0;
    for (int64_t i = 0; i < num_segments; ++i) total += numels[i] = segments[i].numel;
    norms = {sq_norms, chunk_sum_scratch(scratch, num_segments, total, 1)};
    bases = chunk_bases(num_segments, numels.data());
    // Empty segments get no block: their sums are the zeros written here.
    cudaError_t err = cudaMemsetAsync(
        sq_norms, 0, static_cast<size_t>(num_segments) * sizeof(double), stream);
    if (err == cudaSuccess) err = reset_arrivals(norms.sums, num_segments, stream);
    if (err != cudaSuccess) return err;
  }
  // The kernel only reads `flat` in this direction.
  return convert_all(segments, num_segments, const_cast<void*>(flat), flat_dtype, scale, accumulate,
                     nonfinite, /*to_flat=*/false, norms, bases, stream);
}

}  // namespace gradfuse::cuda
