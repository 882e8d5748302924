// sum_squares: each tensor's sum of squares (float64), deterministic (chunk_sums.cuh), one
// multi_tensor_apply per dtype present. The same thread mapping, accumulation types and chunks
// as the norms LARS and unpack take in passing, so the same values give the same bits here.
#include "chunk_sums.cuh"
#include "dtype.cuh"
#include "kernels.h"
#include "multi_tensor.cuh"

namespace gradfuse::cuda {
namespace {

constexpr int kVec = 4;

struct NormExtra {
  int32_t index;       // the tensor's position in the list: its output slot and counter
  int32_t chunk_base;  // its first chunk in the partials
};

template <bool kLarge>
using NormMeta = TensorListMeta<1, NormExtra, kLarge>;

template <class T, class Meta>
__global__ void __launch_bounds__(kSumThreads)
    sum_squares_kernel(Meta meta, ChunkSumScratch scratch, double* out) {
  static_assert(sizeof(Meta) + sizeof(ChunkSumScratch) + sizeof(double*) <=
                kParamBytes<Meta::large>);
  const BlockRange r = block_range(meta, kSumChunk);
  const T* x = static_cast<const T*>(meta.ptr[0][r.slot]) + r.begin;
  SquareSum<T> acc;
  for_each_in_block<kVec>(r.len, is_aligned<kVec>(x), [&](auto width, int64_t i) {
    constexpr int N = decltype(width)::value;
    acc.template add_loaded<N>(x, i);
  });
  const NormExtra e = meta.extra[r.slot];
  const double mine[1] = {acc.value()};
  double total[1];
  if (finish_chunk_sums<1>(mine, scratch, e.index, e.chunk_base, r.chunk, r.num_chunks, total)) {
    out[e.index] = total[0];
  }
}

template <class T, bool kLarge>
cudaError_t launch_sum_squares(const NormTensor* tensors, int64_t n, DType dtype,
                               const std::vector<int32_t>& bases, ChunkSumScratch scratch,
                               double* out, cudaStream_t stream) {
  using Meta = NormMeta<kLarge>;
  return multi_tensor_apply<Meta>(
      n, kSumChunk,
      [&](int64_t i, void*(&ptrs)[1], int64_t& numel, NormExtra& extra) {
        if (tensors[i].dtype != dtype) return false;
        ptrs[0] = const_cast<void*>(tensors[i].data);
        numel = tensors[i].numel;
        extra = {static_cast<int32_t>(i), bases[i]};
        return true;
      },
      [&](const Meta& meta, int blocks) {
        sum_squares_kernel<T, Meta><<<blocks, kSumThreads, 0, stream>>>(meta, scratch, out);
        return cudaGetLastError();
      });
}

}  // namespace

size_t sum_squares_scratch_bytes(int64_t num_tensors, int64_t total_numel) {
  return chunk_sum_scratch_bytes(num_tensors, total_numel, 1);
}

cudaError_t sum_squares(const NormTensor* tensors, int64_t num_tensors, double* out,
                        void* scratch, cudaStream_t stream) {
  if (num_tensors <= 0) return cudaSuccess;
  std::vector<int64_t> numels(num_tensors);
  int64_t total = 0;
  for (int64_t i = 0; i < num_tensors; ++i) total += numels[i] = tensors[i].numel;
  const ChunkSumScratch s = chunk_sum_scratch(scratch, num_tensors, total, 1);
  const std::vector<int32_t> bases = chunk_bases(num_tensors, numels.data());
  // Empty tensors get no block: their sums are the zeros written here.
  cudaError_t err = cudaMemsetAsync(out, 0, static_cast<size_t>(num_tensors) * sizeof(double),
                                    stream);
  if (err == cudaSuccess) err = reset_arrivals(s, num_tensors, stream);
  for (DType dtype : {DType::kFloat32, DType::kFloat16, DType::kBFloat16, DType::kFloat64}) {
    if (err != cudaSuccess) return err;
    bool present = false;
    for (int64_t i = 0; i < num_tensors && !present; ++i) {
      present = tensors[i].dtype == dtype && tensors[i].numel > 0;
    }
    if (!present) continue;
    err = dispatch_float(dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      return with_table_size([&](auto large) {
        return launch_sum_squares<T, decltype(large)::value>(tensors, num_tensors, dtype, bases, s,
                                                             out, stream);
      });
    });
  }
  return err;
}

}  // namespace gradfuse::cuda
