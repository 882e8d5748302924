// Splitting a list of tensors into equal-sized element ranges, so one at::parallel_for (or one
// CUDA launch) covers many tensors of very different sizes with balanced work.
#pragma once

#include <cstdint>
#include <vector>

namespace gradfuse::ops {

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

}  // namespace gradfuse::ops
