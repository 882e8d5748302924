// Deterministic per-tensor sums (squared norms) over the chunks of a multi_tensor_apply launch,
// shared by every kernel that takes a norm: sum_squares (norms.cu), LARS (lars.cu) and unpack
// with sq_norms (pack.cu).
//
// No floating-point atomics: the low bits of an atomic sum depend on which block came first,
// and ranks taking different trust ratios from "the same" gradient drift apart. Instead (as
// Apex's multi_tensor_l2norm):
//   1. each thread sums its elements in a fixed order (for_each_in_block's mapping, fp32 for
//      fp32/16-bit data, fp64 for float64), the block adds its threads' sums in a fixed tree
//      (fp64) and writes the chunk's partial to partials[chunk_base + chunk];
//   2. the tensor's last block to finish (an integer counter per tensor, the only atomic) adds
//      the tensor's partials in a fixed tree and writes the sum.
// So the result depends only on the values, the chunk size and the block size: bitwise the same
// run to run, rank to rank, in every kernel here. Every kernel that takes norms uses
// kSumThreads threads and kSumChunk-element chunks.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__CUDACC__)
#include "dtype.cuh"
#endif

namespace gradfuse::cuda {

constexpr int kSumThreads = 512;
constexpr int64_t kSumChunk = 65536;  // 32 four-element groups per thread

// Scratch of one call: `sums_per_chunk` partials per chunk, then one arrival counter per
// tensor (zeroed on the stream by reset_arrivals before the first launch).
struct ChunkSumScratch {
  double* partials;
  unsigned int* arrivals;
};

// Bytes of scratch for `num_tensors` tensors of `total_numel` elements in all (an upper bound
// on their chunk count: total_numel / kSumChunk + num_tensors).
inline size_t chunk_sum_scratch_bytes(int64_t num_tensors, int64_t total_numel,
                                      int sums_per_chunk) {
  const int64_t chunks = total_numel / kSumChunk + num_tensors;
  return static_cast<size_t>(chunks * sums_per_chunk) * sizeof(double) +
         static_cast<size_t>(num_tensors + 1) * sizeof(unsigned int);
}

inline ChunkSumScratch chunk_sum_scratch(void* scratch, int64_t num_tensors, int64_t total_numel,
                                         int sums_per_chunk) {
  const int64_t chunks = total_numel / kSumChunk + num_tensors;
  double* partials = static_cast<double*>(scratch);
  return {partials, reinterpret_cast<unsigned int*>(partials + chunks * sums_per_chunk)};
}

inline cudaError_t reset_arrivals(const ChunkSumScratch& s, int64_t num_tensors,
                                  cudaStream_t stream) {
  return cudaMemsetAsync(s.arrivals, 0, static_cast<size_t>(num_tensors) * sizeof(unsigned int),
                         stream);
}

// Each tensor's first chunk in the partials (host side; tensors in list order).
inline std::vector<int32_t> chunk_bases(int64_t num_tensors, const int64_t* numels) {
  std::vector<int32_t> bases(num_tensors);
  int64_t next = 0;
  for (int64_t i = 0; i < num_tensors; ++i) {
    bases[i] = static_cast<int32_t>(next);
    next += (numels[i] + kSumChunk - 1) / kSumChunk;
  }
  return bases;
}

#if defined(__CUDACC__)

// One thread's sum of squares over the values it sees, in the order it sees them: fp32 for
// fp32/16-bit values (as fp32, exactly as stored), fp64 for float64. Each square is added with
// one fused multiply-add, as the CPU kernels do.
template <class T>
struct SquareSum {
  using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
  Acc sum = 0;

  __device__ __forceinline__ void add(Acc x) {
    if constexpr (std::is_same_v<Acc, double>) {
      sum = fma(x, x, sum);
    } else {
      sum = fmaf(x, x, sum);
    }
  }
  // The N stored values p[i .. i + N) (aligned as for_each_in_block's body gets them).
  template <int N>
  __device__ __forceinline__ void add_loaded(const T* p, int64_t i) {
    if constexpr (std::is_same_v<T, double>) {
      double v[N];
      load_raw<N>(p, i, v);
#pragma unroll
      for (int k = 0; k < N; ++k) add(v[k]);
    } else {
      float v[N];
      load_f32<N>(p, i, v);
#pragma unroll
      for (int k = 0; k < N; ++k) add(v[k]);
    }
  }
  __device__ __forceinline__ double value() const { return sum; }
};

// Sum of v over the block (kSumThreads threads), in thread 0; a fixed tree. Every thread of the
// block must call it. The leading barrier lets calls follow one another on the same `shared`.
__device__ __forceinline__ double block_sum_fixed(double v, double* shared) {
  __syncthreads();
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    v = threadIdx.x < kSumThreads / 32 ? shared[threadIdx.x] : 0.0;
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

// Ends a chunk: `thread_sums` are this thread's K sums over the chunk. Returns true in thread 0
// of the tensor's last block to finish, with `tensor_sums` holding the tensor's K sums (and
// false everywhere else). A tensor of one chunk needs no partials: its block's sums are the
// tensor's, bit for bit what the general path gives (the tree adds only zeros to them). Every
// thread of the block must call it; the arguments are uniform over the block.
template <int K>
__device__ bool finish_chunk_sums(const double (&thread_sums)[K], const ChunkSumScratch& s,
                                  int64_t tensor, int64_t chunk_base, int64_t chunk,
                                  int64_t num_chunks, double (&tensor_sums)[K]) {
  __shared__ double shared[kSumThreads / 32];
  __shared__ bool last;
#pragma unroll
  for (int k = 0; k < K; ++k) tensor_sums[k] = block_sum_fixed(thread_sums[k], shared);
  if (num_chunks == 1) return threadIdx.x == 0;

  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) s.partials[(chunk_base + chunk) * K + k] = tensor_sums[k];
    __threadfence();  // the partials are visible before the arrival is counted
    last = atomicAdd(&s.arrivals[tensor], 1u) == static_cast<unsigned int>(num_chunks - 1);
  }
  __syncthreads();
  if (!last) return false;
  __threadfence();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    double acc = 0.0;
    for (int64_t c = threadIdx.x; c < num_chunks; c += kSumThreads) {
      acc += __ldcg(&s.partials[(chunk_base + c) * K + k]);  // from L2: other blocks wrote it
    }
    tensor_sums[k] = block_sum_fixed(acc, shared);
  }
  return threadIdx.x == 0;
}

#endif  // __CUDACC__

}  // namespace gradfuse::cuda
