// The selection rule of topk_compress, shared by the CPU path (cpp/ops/topk_select_cpu.cpp) and
// the CUDA kernels (cuda/topk.cu), so both devices make every decision with the same code:
//   - magnitude_key: the order elements are ranked in;
//   - RadixSelect: the k-th largest key, one 8-bit digit at a time, from digit histograms;
//   - plan_topk: after one counting pass at the sampled threshold, which way the exact set is
//     found (among the few candidates, or over all elements).
// The selected set is then: every key above the k-th largest key T, and the `need` lowest
// indices among the keys equal to T. It depends on the data only (not on the sample), so it is
// torch.topk's set with ties broken towards the lower index.
//
// Plain C++ (no CUDA or torch headers); nvcc also gets device versions.
#pragma once

#include <cstdint>
#include <cstring>

#include "sample_plan.h"  // GRADFUSE_HOST_DEVICE

namespace gradfuse {

// |x| as its IEEE bits: for a non-negative float the bit pattern read as uint32 orders like the
// value, and |NaN| has bits above +inf's. Every NaN maps to one canonical NaN so that NaNs tie
// (and ties go to the lower index), ranking above every number, as in torch.topk.
GRADFUSE_HOST_DEVICE inline uint32_t magnitude_key(float x) {
#if defined(__CUDA_ARCH__)
  const uint32_t bits = __float_as_uint(x) & 0x7fffffffu;
#else
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  bits &= 0x7fffffffu;
#endif
  return bits > 0x7f800000u ? 0x7fc00000u : bits;
}

constexpr int kRadixBits = 8;
constexpr int kRadixBins = 1 << kRadixBits;
// The digit of each pass, most significant first.
constexpr int kRadixShifts[4] = {24, 16, 8, 0};

// Finds the key of rank `rank` (1-based, largest first) among a set of keys, one digit per pass:
// a pass histograms the digit at `shift` of the keys that match the digits chosen so far, and
// pick() keeps the digit holding the sought rank. After the last pass `prefix` is that key T and
// `rank` the number of keys equal to T that the top-`rank0` set takes (lowest indices first).
struct RadixSelect {
  uint32_t prefix = 0;  // the digits chosen so far
  uint32_t mask = 0;    // the bits of prefix chosen so far
  int64_t rank = 0;     // rank among the keys that match prefix/mask
  int32_t done = 0;     // 1 once prefix is the whole key

  GRADFUSE_HOST_DEVICE bool matches(uint32_t key) const { return (key & mask) == prefix; }

  GRADFUSE_HOST_DEVICE void pick(const int64_t* hist, int shift) {
    int d = kRadixBins - 1;
    // d == 0 stops the walk even if the histogram holds fewer than `rank` keys (cannot happen
    // for rank <= the number of keys; the guard keeps a bad call in bounds).
    for (; d > 0 && hist[d] < rank; --d) rank -= hist[d];
    prefix |= static_cast<uint32_t>(d) << shift;
    mask |= static_cast<uint32_t>(kRadixBins - 1) << shift;
    done = shift == 0 ? 1 : 0;
  }

  // The k-th largest key is already known to be `key`, with `need` of its ties taken.
  GRADFUSE_HOST_DEVICE static RadixSelect known(uint32_t key, int64_t need) {
    RadixSelect s;
    s.prefix = key;
    s.mask = 0xffffffffu;
    s.rank = need;
    s.done = 1;
    return s;
  }
  GRADFUSE_HOST_DEVICE static RadixSelect fresh(int64_t rank) {
    RadixSelect s;
    s.rank = rank;
    return s;
  }
};

// Where the final selection reads from: the candidates (the keys >= the sampled threshold,
// collected in ascending index order) or every element.
enum class TopkSource : int32_t { kCandidates = 0, kAll = 1 };

struct TopkPlan {
  TopkSource source;
  RadixSelect select;  // finished (done) when no radix pass is needed
  int64_t count;       // how many elements come back
};

// Decides from the counts at the sampled threshold key `t` (`above`: keys > t, `at_least`: keys
// >= t) how to find the k largest. `capacity` (>= min(numel, 2k)) bounds the candidate buffer.
//   sampled mode, k <= at_least <= 2k: all keys >= t come back (no radix pass);
//   k <= at_least <= capacity:         the k largest among the candidates;
//   above <= k <= at_least:            t is the k-th largest key: all keys > t and the lowest
//                                      k - above indices at t (sparse gradients: t = 0);
//   otherwise (rare):                  a radix select over every element.
// `above` is read only when the first two cases fail (the CPU counts it only then).
GRADFUSE_HOST_DEVICE inline TopkPlan plan_topk(int64_t k, int64_t above, int64_t at_least,
                                               uint32_t t, int64_t capacity, bool sampled) {
  if (sampled && at_least >= k && at_least <= 2 * k) {
    // need = at_least >= the ties at t: every candidate is taken.
    return {TopkSource::kCandidates, RadixSelect::known(t, at_least), at_least};
  }
  if (at_least >= k && at_least <= capacity) {
    return {TopkSource::kCandidates, RadixSelect::fresh(k), k};
  }
  if (above <= k && k <= at_least) return {TopkSource::kAll, RadixSelect::known(t, k - above), k};
  return {TopkSource::kAll, RadixSelect::fresh(k), k};
}

}  // namespace gradfuse
