// The device steps of topk_compress and topk_decompress (the host glue is in
// cpp/ops/cuda/topk_cuda.cpp; cpp/ops/topk.cpp and cpp/ops/topk_select_cpu.cpp are the CPU twin,
// with the same selection rule and decisions from topk_select.h, so both devices agree bit for
// bit).
//
// Selection without a host sync: every decision that depends on the data (how many passed the
// sampled threshold, whether a radix select is needed and over what) is taken by a one-thread
// kernel and written to a device state; later kernels read it and return at once when their
// step is not needed. Buffers are sized from host-known bounds (the candidate capacity, k).
//
// Ordered compaction, without a global atomic: a tile of kTileItems consecutive elements is
// counted by one block, a device-wide scan of the tile counts gives each tile its output offset,
// and a second pass writes each selected element at its rank (a block scan inside the tile).
// Outputs therefore come out in ascending index order, with no sort.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include <cstdio>

#include "dtype.cuh"
#include "kernels.h"
#include "topk_select.h"

namespace gradfuse::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 8;
constexpr int64_t kTileItems = int64_t{kThreads} * kItems;
// Block sums of (above, equal) flags travel packed in one uint32: at most kTileItems each.
static_assert(kTileItems < (1 << 16), "packed tile counts need 16 bits each");

int64_t tiles_for(int64_t n) { return (n + kTileItems - 1) / kTileItems; }

// What topk_select decided on the device (written by plan_kernel, read by every later step).
struct SelectState {
  RadixSelect select;
  uint32_t threshold;  // the key of the sampled threshold
  int32_t source;      // TopkSource
  int64_t num_candidates;
  unsigned long long hist[kRadixBins];
};

// What one selection pass reads: every element against the sampled threshold (the first pass),
// or the decided source against the decided key and tie count (the final pass).
struct PassView {
  const int64_t* candidates;  // nullptr: every element
  int64_t len;
  uint32_t t;
  int64_t need;
};

__device__ PassView first_view(const SelectState* st, int64_t n) {
  return {nullptr, n, st->threshold, INT64_MAX};
}

__device__ PassView final_view(const SelectState* st, const int64_t* candidates, int64_t n) {
  const bool from_candidates = st->source == static_cast<int32_t>(TopkSource::kCandidates);
  return {from_candidates ? candidates : nullptr, from_candidates ? st->num_candidates : n,
          st->select.prefix, st->select.rank};
}

__device__ __forceinline__ int64_t index_at(const PassView& v, int64_t j) {
  return v.candidates != nullptr ? v.candidates[j] : j;
}

template <class G>
__global__ void __launch_bounds__(kThreads)
    sample_kernel(const float* residual, const G* grad, SamplePlan plan, float* sample) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= plan.size) return;
  const int64_t pos = plan.position(j);
  const float s = fabsf(residual[pos] + to_float(grad[pos]));
  sample[j] = isnan(s) ? INFINITY : s;  // the CPU's rule: NaN sorts as +inf
}

__global__ void threshold_kernel(const float* sorted, int64_t sample_size, int64_t rank,
                                 SelectState* st) {
  st->threshold = rank <= sample_size ? magnitude_key(sorted[rank - 1]) : 0u;
}

// Per tile: how many keys are above / equal to the pass's key. The first pass also does
// residual += grad. Tiles past the end count zero (the scan reads every tile).
template <class G, bool kFirst>
__global__ void __launch_bounds__(kThreads)
    count_kernel(float* residual, const G* grad, int64_t n, const int64_t* candidates,
                 const SelectState* st, int64_t* tile_above, int64_t* tile_equal) {
  const PassView v = kFirst ? first_view(st, n) : final_view(st, candidates, n);
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kTileItems;
  uint32_t flags = 0;  // above in the low 16 bits, equal in the high 16
  for (int it = 0; it < kItems; ++it) {
    const int64_t j = base + it * kThreads + threadIdx.x;
    if (j >= v.len) break;
    const int64_t i = index_at(v, j);
    float r = residual[i];
    if constexpr (kFirst) {
      r += to_float(grad[i]);
      residual[i] = r;
    }
    const uint32_t key = magnitude_key(r);
    flags += (key > v.t ? 1u : 0u) + (key == v.t ? 1u << 16 : 0u);
  }
  using Reduce = cub::BlockReduce<uint32_t, kThreads>;
  __shared__ typename Reduce::TempStorage temp;
  const uint32_t sum = Reduce(temp).Sum(flags);
  if (threadIdx.x == 0) {
    tile_above[blockIdx.x] = sum & 0xffffu;
    tile_equal[blockIdx.x] = sum >> 16;
  }
}

__global__ void plan_kernel(SelectState* st, const int64_t* above_incl, const int64_t* equal_incl,
                            int64_t num_tiles, int64_t k, int64_t capacity, bool sampled,
                            int64_t* count) {
  const int64_t above = above_incl[num_tiles - 1];
  const int64_t at_least = above + equal_incl[num_tiles - 1];
  const TopkPlan plan = plan_topk(k, above, at_least, st->threshold, capacity, sampled);
  st->select = plan.select;
  st->source = static_cast<int32_t>(plan.source);
  st->num_candidates = plan.source == TopkSource::kCandidates ? at_least : 0;
  for (int d = 0; d < kRadixBins; ++d) st->hist[d] = 0;
  *count = plan.count;
}

// Ordered compaction: writes, in ascending index order, every key above the pass's key and the
// first `need` keys equal to it. The first pass collects the candidates (need: all), and runs
// only when the plan reads from them.
template <bool kFirst>
__global__ void __launch_bounds__(kThreads)
    write_kernel(const float* residual, int64_t n, int64_t* candidates, const SelectState* st,
                 const int64_t* above_incl, const int64_t* equal_incl, int64_t* selected) {
  if (kFirst && st->source != static_cast<int32_t>(TopkSource::kCandidates)) return;
  const PassView v = kFirst ? first_view(st, n) : final_view(st, candidates, n);
  int64_t* out = kFirst ? candidates : selected;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kTileItems;
  if (base >= v.len) return;  // the whole block: before any barrier
  int64_t above = blockIdx.x > 0 ? above_incl[blockIdx.x - 1] : 0;
  int64_t equal = blockIdx.x > 0 ? equal_incl[blockIdx.x - 1] : 0;
  using Scan = cub::BlockScan<uint32_t, kThreads>;
  __shared__ typename Scan::TempStorage temp;
  for (int it = 0; it < kItems; ++it) {
    const int64_t j = base + it * kThreads + threadIdx.x;
    const bool inside = j < v.len;
    const int64_t i = inside ? index_at(v, j) : 0;
    const uint32_t key = inside ? magnitude_key(residual[i]) : 0u;
    const bool is_above = inside && key > v.t, is_equal = inside && key == v.t;
    uint32_t before, round_total;
    Scan(temp).ExclusiveSum((is_above ? 1u : 0u) + (is_equal ? 1u << 16 : 0u), before,
                            round_total);
    const int64_t my_above = above + (before & 0xffffu), my_equal = equal + (before >> 16);
    if (is_above) out[my_above + (my_equal < v.need ? my_equal : v.need)] = i;
    if (is_equal && my_equal < v.need) out[my_above + my_equal] = i;
    above += round_total & 0xffffu;
    equal += round_total >> 16;
    __syncthreads();  // temp is reused by the next round's scan
  }
}

// One radix pass: the histogram of the digit at `shift` among the keys that match the digits
// chosen so far (block histogram in shared memory, added once per block and bin).
__global__ void __launch_bounds__(kThreads)
    radix_hist_kernel(const float* residual, int64_t n, const int64_t* candidates,
                      SelectState* st, int shift) {
  if (st->select.done) return;
  const PassView v = final_view(st, candidates, n);
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kTileItems;
  if (base >= v.len) return;
  __shared__ uint32_t hist[kRadixBins];
  for (int d = threadIdx.x; d < kRadixBins; d += kThreads) hist[d] = 0;
  __syncthreads();
  const RadixSelect sel = st->select;
  for (int it = 0; it < kItems; ++it) {
    const int64_t j = base + it * kThreads + threadIdx.x;
    if (j >= v.len) break;
    const uint32_t key = magnitude_key(residual[index_at(v, j)]);
    if (sel.matches(key)) atomicAdd(&hist[(key >> shift) & (kRadixBins - 1)], 1u);
  }
  __syncthreads();
  for (int d = threadIdx.x; d < kRadixBins; d += kThreads) {
    if (hist[d] != 0) atomicAdd(&st->hist[d], static_cast<unsigned long long>(hist[d]));
  }
}

__global__ void radix_pick_kernel(SelectState* st, int shift) {
  if (st->select.done) return;
  int64_t hist[kRadixBins];
  for (int d = 0; d < kRadixBins; ++d) {
    hist[d] = static_cast<int64_t>(st->hist[d]);
    st->hist[d] = 0;  // ready for the next pass
  }
  st->select.pick(hist, shift);
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

// Scratch layout of topk_select, each piece 256-byte aligned.
struct SelectScratch {
  float* sorted_sample;
  SelectState* state;
  int64_t* tile_above;
  int64_t* tile_equal;
  int64_t* above_incl;
  int64_t* equal_incl;
  int64_t* candidates;
  void* temp;
  size_t temp_bytes;
  size_t total;
};

size_t align_up(size_t x) { return (x + 255) / 256 * 256; }

// CUB's temporary storage for the sample sort and the tile scans (size queries: no device work).
cudaError_t select_temp_bytes(int64_t numel, int64_t sample_size, size_t* bytes) {
  size_t sort = 0, scan = 0;
  cudaError_t err = cub::DeviceRadixSort::SortKeysDescending(
      nullptr, sort, static_cast<const float*>(nullptr), static_cast<float*>(nullptr),
      sample_size);
  if (err != cudaSuccess) return err;
  err = cub::DeviceScan::InclusiveSum(nullptr, scan, static_cast<const int64_t*>(nullptr),
                                      static_cast<int64_t*>(nullptr), tiles_for(numel));
  *bytes = sort > scan ? sort : scan;
  return err;
}

SelectScratch select_layout(void* base, int64_t numel, int64_t capacity, int64_t sample_size,
                            size_t temp_bytes) {
  const auto tiles = static_cast<size_t>(tiles_for(numel));
  size_t at[8];
  at[0] = 0;
  at[1] = at[0] + align_up(static_cast<size_t>(sample_size) * sizeof(float));
  at[2] = at[1] + align_up(sizeof(SelectState));
  at[3] = at[2] + align_up(tiles * sizeof(int64_t));
  at[4] = at[3] + align_up(tiles * sizeof(int64_t));
  at[5] = at[4] + align_up(tiles * sizeof(int64_t));
  at[6] = at[5] + align_up(tiles * sizeof(int64_t));
  at[7] = at[6] + align_up(static_cast<size_t>(capacity) * sizeof(int64_t));
  SelectScratch s{};
  s.temp_bytes = temp_bytes;
  s.total = at[7] + align_up(temp_bytes);
  if (base != nullptr) {
    char* p = static_cast<char*>(base);
    s.sorted_sample = reinterpret_cast<float*>(p + at[0]);
    s.state = reinterpret_cast<SelectState*>(p + at[1]);
    s.tile_above = reinterpret_cast<int64_t*>(p + at[2]);
    s.tile_equal = reinterpret_cast<int64_t*>(p + at[3]);
    s.above_incl = reinterpret_cast<int64_t*>(p + at[4]);
    s.equal_incl = reinterpret_cast<int64_t*>(p + at[5]);
    s.candidates = reinterpret_cast<int64_t*>(p + at[6]);
    s.temp = p + at[7];
  }
  return s;
}

// The two device-wide scans of the tile counts.
cudaError_t scan_tiles(SelectScratch& s, int64_t tiles, cudaStream_t stream) {
  cudaError_t err = cub::DeviceScan::InclusiveSum(s.temp, s.temp_bytes, s.tile_above,
                                                  s.above_incl, tiles, stream);
  if (err != cudaSuccess) return err;
  return cub::DeviceScan::InclusiveSum(s.temp, s.temp_bytes, s.tile_equal, s.equal_incl, tiles,
                                       stream);
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

size_t topk_select_scratch_bytes(int64_t numel, int64_t capacity, int64_t sample_size) {
  size_t temp = 0;
  // On a failed size query report 1 byte: topk_select repeats the query and fails loudly.
  if (numel <= 0 || select_temp_bytes(numel, sample_size, &temp) != cudaSuccess) return 1;
  return select_layout(nullptr, numel, capacity, sample_size, temp).total;
}

cudaError_t topk_select(float* residual, const void* grad, DType grad_dtype,
                        const TopkSelectArgs& a, const float* sample, int64_t* selected,
                        int64_t* count, void* scratch, size_t scratch_bytes, cudaStream_t stream) {
  const int64_t n = a.numel;
  if (n <= 0) return cudaSuccess;
  size_t temp = 0;
  cudaError_t err = select_temp_bytes(n, a.sample_size, &temp);
  if (err != cudaSuccess) return err;
  SelectScratch s = select_layout(scratch, n, a.capacity, a.sample_size, temp);
  if (s.total > scratch_bytes) return cudaErrorInvalidValue;  // sized for other arguments
  const int64_t tiles = tiles_for(n);
  const auto grid = static_cast<unsigned>(tiles);

  // The threshold: the entry of rank a.rank in the sample sorted descending, or 0.
  err = cub::DeviceRadixSort::SortKeysDescending(s.temp, s.temp_bytes, sample, s.sorted_sample,
                                                 a.sample_size, 0, 32, stream);
  if (err != cudaSuccess) return err;
  threshold_kernel<<<1, 1, 0, stream>>>(s.sorted_sample, a.sample_size, a.rank, s.state);

  // residual += grad, counted against the threshold; the plan; the candidates if it uses them.
  err = dispatch_low_or_float(grad_dtype, [&](auto tag) {
    using G = typename decltype(tag)::type;
    count_kernel<G, true><<<grid, kThreads, 0, stream>>>(
        residual, static_cast<const G*>(grad), n, nullptr, s.state, s.tile_above, s.tile_equal);
    return cudaGetLastError();
  });
  if (err != cudaSuccess || (err = scan_tiles(s, tiles, stream)) != cudaSuccess) return err;
  plan_kernel<<<1, 1, 0, stream>>>(s.state, s.above_incl, s.equal_incl, tiles, a.k, a.capacity,
                                   a.sampled, count);
  write_kernel<true><<<grid, kThreads, 0, stream>>>(residual, n, s.candidates, s.state,
                                                    s.above_incl, s.equal_incl, nullptr);

  // The k-th largest key when the plan did not settle it, one digit per pass.
  for (const int shift : kRadixShifts) {
    radix_hist_kernel<<<grid, kThreads, 0, stream>>>(residual, n, s.candidates, s.state, shift);
    radix_pick_kernel<<<1, 1, 0, stream>>>(s.state, shift);
  }

  // The final ordered compaction, from the candidates or from every element.
  count_kernel<float, false><<<grid, kThreads, 0, stream>>>(residual, nullptr, n, s.candidates,
                                                            s.state, s.tile_above, s.tile_equal);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  if ((err = scan_tiles(s, tiles, stream)) != cudaSuccess) return err;
  write_kernel<false><<<grid, kThreads, 0, stream>>>(residual, n, s.candidates, s.state,
                                                     s.above_incl, s.equal_incl, selected);
  return cudaGetLastError();
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

// ---- topk_decompress ------------------------------------------------------------------------
//
// Deterministic scatter-add: the (index, position) pairs are radix sorted by index -- a stable
// sort, so equal indices keep ascending positions -- and the first entry of each run of equal
// indices sums the run's values in that order. The CPU (cpp/ops/topk.cpp) adds in the same order
// with the same roundings.

// Out-of-range indices are caught on the device (no host sync): an assertion that stays on in
// release builds, as torch's own index kernels do.
#undef NDEBUG
#include <cassert>

namespace gradfuse::cuda {
namespace {

// Bits needed for every index in [0, numel): the radix sort skips the rest.
int index_bits(int64_t numel) {
  int bits = 1;
  while (bits < 63 && (int64_t{1} << bits) < numel) ++bits;
  return bits;
}

template <class I>
__global__ void __launch_bounds__(kThreads)
    decompress_keys_kernel(const I* indices, int64_t count, int64_t numel, uint64_t* keys,
                           int64_t* positions) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= count) return;
  const auto i = static_cast<int64_t>(indices[j]);
  assert(i >= 0 && i < numel && "topk_decompress: index out of [0, numel)");
  keys[j] = static_cast<uint64_t>(i);
  positions[j] = j;
}

template <class T>
__device__ __forceinline__ T add_rounded(T a, T b) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    return a + b;
  } else {
    return from_float<T>(to_float(a) + to_float(b));  // as c10::Half / BFloat16's operator+
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    segment_sum_kernel(const uint64_t* keys, const int64_t* positions, const T* values,
                       int64_t count, T* dense) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= count) return;
  const uint64_t key = keys[p];
  if (p > 0 && keys[p - 1] == key) return;  // not the first of its run
  T sum = dense[key];                         // the zero the CPU starts from
  for (int64_t q = p; q < count && keys[q] == key; ++q) {
    sum = add_rounded(sum, values[positions[q]]);
  }
  dense[key] = sum;
}

struct DecompressScratch {
  uint64_t* keys_in;
  uint64_t* keys_out;
  int64_t* pos_in;
  int64_t* pos_out;
  void* temp;
  size_t temp_bytes;
  size_t total;
};

DecompressScratch decompress_layout(void* base, int64_t count, size_t temp_bytes) {
  const size_t piece = align_up(static_cast<size_t>(count) * sizeof(int64_t));
  DecompressScratch s{};
  s.temp_bytes = temp_bytes;
  s.total = 4 * piece + align_up(temp_bytes);
  if (base != nullptr) {
    char* p = static_cast<char*>(base);
    s.keys_in = reinterpret_cast<uint64_t*>(p);
    s.keys_out = reinterpret_cast<uint64_t*>(p + piece);
    s.pos_in = reinterpret_cast<int64_t*>(p + 2 * piece);
    s.pos_out = reinterpret_cast<int64_t*>(p + 3 * piece);
    s.temp = p + 4 * piece;
  }
  return s;
}

cudaError_t decompress_temp_bytes(int64_t count, int64_t numel, size_t* bytes) {
  return cub::DeviceRadixSort::SortPairs(nullptr, *bytes, static_cast<const uint64_t*>(nullptr),
                                         static_cast<uint64_t*>(nullptr),
                                         static_cast<const int64_t*>(nullptr),
                                         static_cast<int64_t*>(nullptr), count, 0,
                                         index_bits(numel));
}

}  // namespace

size_t topk_decompress_scratch_bytes(int64_t count, int64_t numel) {
  size_t temp = 0;
  if (count <= 0 || decompress_temp_bytes(count, numel, &temp) != cudaSuccess) return 1;
  return decompress_layout(nullptr, count, temp).total;
}

cudaError_t topk_decompress(const void* values, DType values_dtype, const void* indices,
                            bool indices_int32, int64_t count, int64_t numel, void* dense,
                            void* scratch, size_t scratch_bytes, cudaStream_t stream) {
  if (count <= 0) return cudaSuccess;
  size_t temp = 0;
  cudaError_t err = decompress_temp_bytes(count, numel, &temp);
  if (err != cudaSuccess) return err;
  DecompressScratch s = decompress_layout(scratch, count, temp);
  if (s.total > scratch_bytes) return cudaErrorInvalidValue;
  const auto blocks = static_cast<unsigned>((count + kThreads - 1) / kThreads);
  if (indices_int32) {
    decompress_keys_kernel<<<blocks, kThreads, 0, stream>>>(
        static_cast<const int32_t*>(indices), count, numel, s.keys_in, s.pos_in);
  } else {
    decompress_keys_kernel<<<blocks, kThreads, 0, stream>>>(
        static_cast<const int64_t*>(indices), count, numel, s.keys_in, s.pos_in);
  }
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  err = cub::DeviceRadixSort::SortPairs(s.temp, s.temp_bytes, s.keys_in, s.keys_out, s.pos_in,
                                        s.pos_out, count, 0, index_bits(numel), stream);
  if (err != cudaSuccess) return err;
  return dispatch_float(values_dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    segment_sum_kernel<T><<<blocks, kThreads, 0, stream>>>(
        s.keys_out, s.pos_out, static_cast<const T*>(values), count, static_cast<T*>(dense));
    return cudaGetLastError();
  });
}

}  // namespace gradfuse::cuda
