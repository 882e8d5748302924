// Where topk_compress samples |residual + grad| to estimate its threshold. Shared by the CPU
// path (cpp/ops/topk.cpp, through topk_threshold.h) and the CUDA kernel (cuda/topk.cu), so both
// devices draw exactly the same positions for a seed and so pick the same threshold.
//
// Plain C++ with no CUDA or torch headers: a host compiler sees ordinary inline functions, nvcc
// also gets device versions of position().
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(__CUDACC__)
#define GRADFUSE_HOST_DEVICE __host__ __device__
#else
#define GRADFUSE_HOST_DEVICE
#endif

namespace gradfuse {

// A stratified random sample: `size` strata of `stratum` consecutive elements, one position
// drawn in each (so no stride can alias with the layout of a convolution's weights).
struct SamplePlan {
  int64_t numel = 0;
  int64_t size = 0;
  int64_t stratum = 1;
  uint64_t seed = 0;

  // Big enough that about 64 sampled elements are expected above the k-th largest.
  static SamplePlan make(int64_t numel, int64_t k, int64_t seed) {
    SamplePlan p;
    p.numel = numel;
    const double wanted = 64.0 * static_cast<double>(numel) / static_cast<double>(k);
    p.size = std::min<int64_t>(
        numel, std::clamp<int64_t>(static_cast<int64_t>(wanted), 4096, int64_t{1} << 17));
    p.stratum = numel / p.size;
    p.seed = static_cast<uint64_t>(seed);
    return p;
  }

  // The position drawn in stratum j (0 <= j < size); always < numel.
  GRADFUSE_HOST_DEVICE int64_t position(int64_t j) const {
    // splitmix64 of (seed, j): cheap, well mixed, the same on every platform and device.
    uint64_t z = seed + 0x9e3779b97f4a7c15ull * static_cast<uint64_t>(j + 1);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return j * stratum + static_cast<int64_t>(z % static_cast<uint64_t>(stratum));
  }
};

}  // namespace gradfuse
