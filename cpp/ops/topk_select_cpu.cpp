// See topk_select_cpu.h. Every loop over elements runs in parallel chunks whose results are
// combined in chunk order, so the result never depends on the thread count.
#include "topk_select_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <optional>

#include "cuda/topk_select.h"
#include "dtypes.h"
#include "topk_threshold.h"

namespace gradfuse::ops {
namespace {

constexpr int64_t kChunkElems = 1 << 18;

int64_t chunks_of(int64_t len) { return (len + kChunkElems - 1) / kChunkElems; }

// What a selection pass reads: every element, or the candidates (ascending indices).
struct Source {
  const float* residual;
  const int64_t* candidates;  // nullptr: every element
  int64_t len;
  int64_t index(int64_t j) const { return candidates != nullptr ? candidates[j] : j; }
  uint32_t key(int64_t j) const { return magnitude_key(residual[index(j)]); }
};

// Runs body(chunk, begin, end) for every chunk of [0, len), in parallel.
template <class Body>
void for_chunks(int64_t len, const Body& body) {
  at::parallel_for(0, chunks_of(len), 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      body(c, c * kChunkElems, std::min(len, (c + 1) * kChunkElems));
    }
  });
}

struct Candidates {
  int64_t at_least = 0;          // elements at or above the threshold
  std::vector<int64_t> indices;  // all of them, ascending, when at_least <= capacity
};

// The streaming pass: residual += grad, and collect |residual| >= threshold. Each chunk keeps up
// to a share of `expected`; chunks that found more are collected again (the residual is already
// updated) only when everything fits in `capacity`.
Candidates accumulate_and_collect(float* residual, const void* grad, cpu::DType grad_dtype,
                                  const TopkRequest& req, int64_t capacity) {
  const int64_t n = req.numel;
  const int64_t num_chunks = chunks_of(n);
  const int64_t share = req.expected / num_chunks * 2 + 64;
  std::vector<std::vector<int64_t>> found(num_chunks);
  std::vector<int64_t> counts(num_chunks);
  for_chunks(n, [&](int64_t c, int64_t begin, int64_t end) {
    found[c].resize(std::min(share, end - begin));
    counts[c] = cpu::accumulate_and_select(
        residual + begin, static_cast<const char*>(grad) + begin * cpu_dtype_size(grad_dtype),
        grad_dtype, end - begin, req.threshold, begin, found[c].data(),
        static_cast<int64_t>(found[c].size()));
  });
  Candidates out;
  for (const int64_t c : counts) out.at_least += c;
  if (out.at_least > capacity) return out;
  for_chunks(n, [&](int64_t c, int64_t begin, int64_t end) {
    if (counts[c] <= static_cast<int64_t>(found[c].size())) return found[c].resize(counts[c]);
    found[c].resize(counts[c]);
    cpu::select_at_least(residual + begin, end - begin, req.threshold, begin, found[c].data(),
                         counts[c]);
  });
  out.indices.reserve(out.at_least);
  for (const auto& f : found) out.indices.insert(out.indices.end(), f.begin(), f.end());
  return out;
}

// The radix passes that finish `select` over `src`.
void radix_select(const Source& src, RadixSelect& select) {
  using Histogram = std::array<int64_t, kRadixBins>;
  for (const int shift : kRadixShifts) {
    if (select.done) return;
    std::vector<Histogram> partial(chunks_of(src.len), Histogram{});
    for_chunks(src.len, [&](int64_t c, int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        const uint32_t key = src.key(j);
        if (select.matches(key)) ++partial[c][(key >> shift) & (kRadixBins - 1)];
      }
    });
    Histogram hist{};
    for (const Histogram& h : partial) {
      for (int d = 0; d < kRadixBins; ++d) hist[d] += h[d];
    }
    select.pick(hist.data(), shift);
  }
}

// Per chunk of `src`, in chunk order: how many keys lie above / at `t` before the chunk
// (exclusive prefix sums; the last entry is the total).
struct ChunkCounts {
  uint32_t t;
  std::vector<int64_t> above, equal;
};

ChunkCounts count_chunks(const Source& src, uint32_t t) {
  const int64_t num_chunks = chunks_of(src.len);
  ChunkCounts counts{t, std::vector<int64_t>(num_chunks + 1), std::vector<int64_t>(num_chunks + 1)};
  for_chunks(src.len, [&](int64_t c, int64_t begin, int64_t end) {
    int64_t a = 0, e = 0;
    for (int64_t j = begin; j < end; ++j) {
      const uint32_t key = src.key(j);
      a += key > t ? 1 : 0;
      e += key == t ? 1 : 0;
    }
    counts.above[c + 1] = a;
    counts.equal[c + 1] = e;
  });
  for (int64_t c = 0; c < num_chunks; ++c) {
    counts.above[c + 1] += counts.above[c];
    counts.equal[c + 1] += counts.equal[c];
  }
  return counts;
}

// Writes, in ascending index order, every element of `src` with key > counts.t and the first
// `need` with key == counts.t: element j goes to (keys above before j) + min(keys at t before j,
// need).
void emit(const Source& src, const ChunkCounts& counts, int64_t need, int64_t* out) {
  const uint32_t t = counts.t;
  for_chunks(src.len, [&](int64_t c, int64_t begin, int64_t end) {
    int64_t a = counts.above[c], e = counts.equal[c];
    for (int64_t j = begin; j < end; ++j) {
      const uint32_t key = src.key(j);
      if (key > t) {
        out[a + std::min(e, need)] = src.index(j);
        ++a;
      } else if (key == t) {
        if (e < need) out[a + e] = src.index(j);
        ++e;
      }
    }
  });
}

}  // namespace

std::vector<int64_t> accumulate_and_select_topk(float* residual, const void* grad,
                                                cpu::DType grad_dtype, const TopkRequest& req) {
  const int64_t n = req.numel, k = req.k;
  const int64_t capacity = SampledThreshold::candidate_capacity(n, k, req.expected);
  Candidates cand = accumulate_and_collect(residual, grad, grad_dtype, req, capacity);
  const uint32_t t = magnitude_key(req.threshold);
  const Source all{residual, nullptr, n};
  // The counts above the threshold over every element are needed only when the candidates do
  // not settle it; the final pass reuses them when the threshold turns out to be the k-th key.
  std::optional<ChunkCounts> at_t;
  if (cand.at_least < k || cand.at_least > capacity) at_t = count_chunks(all, t);
  TopkPlan plan = plan_topk(k, at_t ? at_t->above.back() : 0, cand.at_least, t, capacity,
                            req.sampled);
  const Source src = plan.source == TopkSource::kCandidates
                         ? Source{residual, cand.indices.data(), cand.at_least}
                         : all;
  if (src.candidates != nullptr && plan.count == src.len) return std::move(cand.indices);
  radix_select(src, plan.select);
  const bool reuse = at_t && src.candidates == nullptr && plan.select.prefix == t;
  const ChunkCounts counts = reuse ? std::move(*at_t) : count_chunks(src, plan.select.prefix);
  std::vector<int64_t> selected(plan.count);
  emit(src, counts, plan.select.rank, selected.data());
  return selected;
}

}  // namespace gradfuse::ops
