// sum_squares: each tensor's sum of squares as float64, in one launch/parallel loop over all
// of them. The LARS optimizer's fallback when a norm was not taken in passing (by unpack_'s
// sq_norms or the previous lars_update_from_norms_), with the same chunking and so the same
// bits those would give.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"
#include "chunks.h"
#include "dtypes.h"

namespace gradfuse::ops {
namespace {

at::Tensor sum_squares_cpu(at::TensorList tensors) {
  const char* op = "sum_squares";
  std::vector<int64_t> numels;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const std::string name = arg_name("tensors", static_cast<int64_t>(i));
    check_defined(op, name, tensors[i]);
    check_float(op, name, tensors[i]);
    check_contiguous(op, name, tensors[i]);
    check_device(op, name, tensors[i], at::kCPU, "the CPU kernel");
    numels.push_back(tensors[i].numel());
  }
  const auto chunks = split_into_chunks(numels, kNormChunkElems);
  std::vector<double> partials(chunks.size());
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const Chunk& ch = chunks[c];
      const at::Tensor& t = tensors[ch.tensor];
      partials[c] = cpu::sum_squares(
          static_cast<const char*>(t.const_data_ptr()) + ch.begin * t.element_size(),
          cpu_dtype(t.scalar_type()), ch.end - ch.begin);
    }
  });
  const auto sums = sum_by_tensor(chunks, partials, tensors.size());
  at::Tensor out = at::empty({static_cast<int64_t>(tensors.size())}, at::kDouble);
  std::copy(sums.begin(), sums.end(), out.data_ptr<double>());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gradfuse, CPU, m) { m.impl("sum_squares", &sum_squares_cpu); }

}  // namespace gradfuse::ops
