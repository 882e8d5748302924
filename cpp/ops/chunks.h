// Splitting a list of tensors into equal-sized element ranges, so one at::parallel_for (or one
// CUDA launch) covers many tensors of very different sizes with balanced work.
#pragma once

#include <cstdint>
#include <vector>

namespace gradfuse::ops {

// Chunk size of every CPU kernel that takes per-tensor norms (unpack_ with sq_norms, both LARS
// ops): a norm is the sum of its chunks' partial sums in chunk order, so with one chunk size the
// same values give the same bits in any of them, whatever the thread count.
constexpr int64_t kNormChunkElems = 1 << 15;

struct Chunk {
  int64_t tensor;  // index into the tensor list
  int64_t begin;   // element range [begin, end) within that tensor
  int64_t end;
};

inline std::vector<Chunk> split_into_chunks(const std::vector<int64_t>& numels,
                                            int64_t chunk_elems) {
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < static_cast<int64_t>(numels.size()); ++t) {
    for (int64_t b = 0; b < numels[t]; b += chunk_elems) {
      chunks.push_back({t, b, b + chunk_elems < numels[t] ? b + chunk_elems : numels[t]});
    }
  }
  return chunks;
}

// Per-tensor sums of per-chunk partials, added in chunk order (deterministic).
inline std::vector<double> sum_by_tensor(const std::vector<Chunk>& chunks,
                                         const std::vector<double>& partials, size_t num_tensors) {
  std::vector<double> sums(num_tensors, 0.0);
  for (size_t c = 0; c < chunks.size(); ++c) sums[chunks[c].tensor] += partials[c];
  return sums;
}

}  // namespace gradfuse::ops
