// The device steps of topk_compress (the order and the host logic between them are in
// cpp/ops/cuda/topk_cuda.cpp; cpp/ops/topk.cpp is the CPU twin with identical results).
//
// Ranking: by |residual| with NaN above +inf above every number. For a non-negative float the
// IEEE bit pattern read as uint32 orders like the value, and |NaN| (sign cleared) has bits above
// +inf's, so magnitude_key() is the bit pattern with every NaN mapped to one canonical NaN (all
// NaNs tie, and ties go to the lower index as on the CPU).
#include <cub/device/device_radix_sort.cuh>

#include <cmath>

#include "dtype.cuh"
#include "kernels.h"

namespace gradfuse::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 4096;  // grid-stride beyond that: about 1M threads in flight

int blocks_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<int>(b < 1 ? 1 : b < kMaxBlocks ? b : kMaxBlocks);
}

__device__ __forceinline__ uint32_t magnitude_key(float x) {
  return isnan(x) ? 0x7fc00000u : __float_as_uint(fabsf(x));
}

// Bits needed for every index in [0, numel): radix sorts of indices skip the rest.
int index_bits(int64_t numel) {
  int bits = 1;
  while (bits < 63 && (int64_t{1} << bits) < numel) ++bits;
  return bits;
}

// The candidates are int64 indices >= 0; radix sorting them as uint64 orders them the same.
const uint64_t* as_u64(const int64_t* p) { return reinterpret_cast<const uint64_t*>(p); }
uint64_t* as_u64(int64_t* p) { return reinterpret_cast<uint64_t*>(p); }

template <class G>
__global__ void __launch_bounds__(kThreads)
    sample_kernel(const float* residual, const G* grad, SamplePlan plan, float* sample) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= plan.size) return;
  const int64_t pos = plan.position(j);
  const float s = fabsf(residual[pos] + to_float(grad[pos]));
  sample[j] = isnan(s) ? INFINITY : s;  // ThresholdLadder's rule: NaN sorts as +inf
}

// Grid-stride over the elements, one warp-aligned group of 32 at a time so that the warp can
// reserve output slots with a single atomicAdd (ballot + popc) instead of one per candidate.
template <class G, bool kAccumulate>
__global__ void __launch_bounds__(kThreads)
    select_kernel(float* residual, const G* grad, int64_t n, const float* threshold,
                  int64_t* candidates, int64_t capacity, unsigned long long* count) {
  const float t = *threshold;
  const unsigned lane = threadIdx.x % 32;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  // `base` is the same for the whole warp, so the loop condition and the ballot are uniform.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x + (threadIdx.x - lane);
       base < n; base += stride) {
    const int64_t i = base + lane;
    bool pass = false;
    if (i < n) {
      float r = residual[i];
      if constexpr (kAccumulate) {
        r += to_float(grad[i]);
        residual[i] = r;
      }
      pass = !(fabsf(r) < t);  // NaN passes every threshold
    }
    const unsigned mask = __ballot_sync(0xffffffffu, pass);
    if (mask == 0) continue;
    unsigned long long first = 0;
    if (lane == 0) first = atomicAdd(count, static_cast<unsigned long long>(__popc(mask)));
    first = __shfl_sync(0xffffffffu, first, 0);
    if (pass) {
      const unsigned long long slot = first + __popc(mask & ((1u << lane) - 1u));
      if (slot < static_cast<unsigned long long>(capacity)) candidates[slot] = i;
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    key_kernel(const float* residual, const int64_t* idx, int64_t n, uint32_t* keys) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j < n) keys[j] = magnitude_key(residual[idx[j]]);
}

template <class I>
__global__ void __launch_bounds__(kThreads)
    gather_clear_kernel(float* residual, const int64_t* idx, int64_t n, float* values, I* indices) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= n) return;
  const int64_t i = idx[j];
  values[j] = residual[i];
  residual[i] = 0.0f;
  indices[j] = static_cast<I>(i);
}

// Scratch layout of topk_order: [sorted idx | keys | keys out | idx out | CUB temp], each piece
// 256-byte aligned; without a trim (keep == n) only the CUB temp.
struct OrderScratch {
  uint64_t* sorted;
  uint32_t* keys;
  uint32_t* keys_out;
  uint64_t* idx_out;
  void* temp;
  size_t temp_bytes;
  size_t total;
};

size_t align_up(size_t x) { return (x + 255) / 256 * 256; }

// The CUB temporary storage of the sorts topk_order will run (a size query: no device work).
cudaError_t order_temp_bytes(int64_t n, int64_t keep, int64_t numel, size_t* bytes) {
  const int bits = index_bits(numel);
  size_t a = 0, b = 0, c = 0;
  cudaError_t err =
      cub::DeviceRadixSort::SortKeys(nullptr, a, static_cast<const uint64_t*>(nullptr),
                                     static_cast<uint64_t*>(nullptr), n, 0, bits);
  if (err != cudaSuccess) return err;
  if (keep < n) {
    err = cub::DeviceRadixSort::SortPairsDescending(
        nullptr, b, static_cast<const uint32_t*>(nullptr), static_cast<uint32_t*>(nullptr),
        static_cast<const uint64_t*>(nullptr), static_cast<uint64_t*>(nullptr), n);
    if (err != cudaSuccess) return err;
    err = cub::DeviceRadixSort::SortKeys(nullptr, c, static_cast<const uint64_t*>(nullptr),
                                         static_cast<uint64_t*>(nullptr), keep, 0, bits);
    if (err != cudaSuccess) return err;
  }
  *bytes = a > b ? (a > c ? a : c) : (b > c ? b : c);
  return cudaSuccess;
}

// Byte offsets of the pieces, then pointers into `base` (null base: sizes only).
OrderScratch order_layout(void* base, int64_t n, int64_t keep, size_t temp_bytes) {
  const auto trim_items = static_cast<size_t>(keep < n ? n : 0);
  const size_t sorted_at = 0;
  const size_t keys_at = sorted_at + align_up(trim_items * sizeof(uint64_t));
  const size_t keys_out_at = keys_at + align_up(trim_items * sizeof(uint32_t));
  const size_t idx_out_at = keys_out_at + align_up(trim_items * sizeof(uint32_t));
  const size_t temp_at = idx_out_at + align_up(trim_items * sizeof(uint64_t));
  OrderScratch s{};
  s.temp_bytes = temp_bytes;
  s.total = temp_at + align_up(temp_bytes);
  if (base != nullptr) {
    char* p = static_cast<char*>(base);
    s.sorted = reinterpret_cast<uint64_t*>(p + sorted_at);
    s.keys = reinterpret_cast<uint32_t*>(p + keys_at);
    s.keys_out = reinterpret_cast<uint32_t*>(p + keys_out_at);
    s.idx_out = reinterpret_cast<uint64_t*>(p + idx_out_at);
    s.temp = p + temp_at;
  }
  return s;
}

}  // namespace

cudaError_t topk_sample(const float* residual, const void* grad, DType grad_dtype,
                        const SamplePlan& plan, float* sample, cudaStream_t stream) {
  if (plan.size <= 0) return cudaSuccess;
  return dispatch_low_or_float(grad_dtype, [&](auto tag) {
    using G = typename decltype(tag)::type;
    const auto blocks = static_cast<unsigned>((plan.size + kThreads - 1) / kThreads);
    sample_kernel<G>
        <<<blocks, kThreads, 0, stream>>>(residual, static_cast<const G*>(grad), plan, sample);
    return cudaGetLastError();
  });
}

size_t topk_sort_sample_scratch_bytes(int64_t sample_size) {
  size_t bytes = 0;
  // A size query: no device work. On failure report 1 byte; the sort itself then fails loudly.
  if (cub::DeviceRadixSort::SortKeysDescending(nullptr, bytes, static_cast<const float*>(nullptr),
                                               static_cast<float*>(nullptr),
                                               sample_size) != cudaSuccess) {
    return 1;
  }
  return bytes > 0 ? bytes : 1;
}

cudaError_t topk_sort_sample(const float* sample_in, float* sample_out, int64_t sample_size,
                             void* scratch, size_t scratch_bytes, cudaStream_t stream) {
  if (sample_size <= 0) return cudaSuccess;
  // Every entry is a number or +inf (NaN was mapped in topk_sample), so the float order CUB
  // sorts by is the magnitude order.
  const cudaError_t err = cub::DeviceRadixSort::SortKeysDescending(
      scratch, scratch_bytes, sample_in, sample_out, sample_size, 0, 32, stream);
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

cudaError_t topk_select(float* residual, const void* grad, DType grad_dtype, int64_t numel,
                        const float* threshold, int64_t* candidates, int64_t capacity,
                        unsigned long long* count, cudaStream_t stream) {
  if (numel <= 0) return cudaSuccess;
  const int blocks = blocks_for(numel);
  if (grad == nullptr) {
    select_kernel<float, false><<<blocks, kThreads, 0, stream>>>(
        residual, nullptr, numel, threshold, candidates, capacity, count);
    return cudaGetLastError();
  }
  return dispatch_low_or_float(grad_dtype, [&](auto tag) {
    using G = typename decltype(tag)::type;
    select_kernel<G, true><<<blocks, kThreads, 0, stream>>>(
        residual, static_cast<const G*>(grad), numel, threshold, candidates, capacity, count);
    return cudaGetLastError();
  });
}

size_t topk_order_scratch_bytes(int64_t num_candidates, int64_t keep, int64_t numel) {
  if (keep > num_candidates) keep = num_candidates;
  size_t temp = 0;
  if (num_candidates <= 0 || order_temp_bytes(num_candidates, keep, numel, &temp) != cudaSuccess) {
    return 1;  // nothing to sort, or a failed query that topk_order will report itself
  }
  return order_layout(nullptr, num_candidates, keep, temp).total;
}

cudaError_t topk_order(const float* residual, int64_t numel, const int64_t* candidates,
                       int64_t num_candidates, int64_t keep, int64_t* selected, void* scratch,
                       size_t scratch_bytes, cudaStream_t stream) {
  const int64_t n = num_candidates;
  if (n <= 0 || keep <= 0) return cudaSuccess;
  if (keep > n) keep = n;
  size_t temp = 0;
  cudaError_t err = order_temp_bytes(n, keep, numel, &temp);
  if (err != cudaSuccess) return err;
  OrderScratch s = order_layout(scratch, n, keep, temp);  // not const: CUB takes temp_bytes by &
  if (s.total > scratch_bytes) return cudaErrorInvalidValue;  // caller sized it for other args
  const int bits = index_bits(numel);

  if (keep == n) {  // no trim: just ascending
    err = cub::DeviceRadixSort::SortKeys(s.temp, s.temp_bytes, as_u64(candidates), as_u64(selected),
                                         n, 0, bits, stream);
    return err != cudaSuccess ? err : cudaGetLastError();
  }

  // Ascending indices first: the descending sort by magnitude below is stable (CUB's radix
  // sort is), so equal magnitudes keep ascending index order and the lower index wins a tie.
  err = cub::DeviceRadixSort::SortKeys(s.temp, s.temp_bytes, as_u64(candidates), s.sorted, n, 0,
                                       bits, stream);
  if (err != cudaSuccess) return err;
  key_kernel<<<static_cast<unsigned>((n + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      residual, reinterpret_cast<const int64_t*>(s.sorted), n, s.keys);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  err = cub::DeviceRadixSort::SortPairsDescending(s.temp, s.temp_bytes, s.keys, s.keys_out,
                                                  s.sorted, s.idx_out, n, 0, 32, stream);
  if (err != cudaSuccess) return err;
  // The first `keep` are the winners; hand them back in ascending index order.
  err = cub::DeviceRadixSort::SortKeys(s.temp, s.temp_bytes, s.idx_out, as_u64(selected), keep, 0,
                                       bits, stream);
  return err != cudaSuccess ? err : cudaGetLastError();
}

cudaError_t topk_gather_and_clear(float* residual, const int64_t* idx, int64_t count, float* values,
                                  void* indices, bool indices_int32, cudaStream_t stream) {
  if (count <= 0) return cudaSuccess;
  const auto blocks = static_cast<unsigned>((count + kThreads - 1) / kThreads);
  if (indices_int32) {
    gather_clear_kernel<int32_t><<<blocks, kThreads, 0, stream>>>(residual, idx, count, values,
                                                                  static_cast<int32_t*>(indices));
  } else {
    gather_clear_kernel<int64_t><<<blocks, kThreads, 0, stream>>>(residual, idx, count, values,
                                                                  static_cast<int64_t*>(indices));
  }
  return cudaGetLastError();
}

}  // namespace gradfuse::cuda
