#include "engine/reducescatter.h"

#include <ATen/ATen.h>

#include <algorithm>

namespace gradfuse::engine {

namespace {
// Fusion buffer slot of the reduce-scatter's send side (see collectives.cpp for the others).
constexpr int kSendSlot = 6;
}  // namespace

int64_t scatter_rows(int64_t dim0, int size, int rank) {
  return dim0 / size + (rank < dim0 % size ? 1 : 0);
}

int64_t scatter_first_row(int64_t dim0, int size, int rank) {
  return rank * (dim0 / size) + std::min<int64_t>(rank, dim0 % size);
}

std::vector<at::Tensor> run_reducescatter(const Batch& batch, const CollectiveContext& ctx) {
  const auto& entries = batch.entries;
  const int n = ctx.size;
  const double average = batch.key.reduce_op == ReduceOp::kAverage ? 1.0 / n : 1.0;
  // Rank k's part of the send buffer holds rows [first, first + rows) of every tensor, in the
  // fusion layout (fusion_offsets: each at an aligned offset); parts are padded to the longest
  // (rank 0's), aligned, since Gloo's reduce-scatter on one tensor needs equal parts. Fused
  // tensors thus cost one collective.
  const at::Tensor& first = entries[0].tensor;
  const at::ScalarType wire = wire_dtype(first.scalar_type());
  std::vector<int64_t> part(n, 0);
  for (int k = 0; k < n; ++k) {
    std::vector<int64_t> numels;
    for (const Entry& e : entries) {
      const int64_t dim0 = e.tensor.size(0);
      const int64_t row = dim0 ? e.tensor.numel() / dim0 : 0;
      numels.push_back(scatter_rows(dim0, n, k) * row);
    }
    part[k] = fusion_offsets(numels, c10::elementSize(wire)).back();
  }
  const int64_t longest =
      align_numel(*std::max_element(part.begin(), part.end()), c10::elementSize(wire));

  std::vector<at::Tensor> outputs;
  for (const Entry& e : entries) {
    std::vector<int64_t> shape = e.tensor.sizes().vec();
    shape[0] = scatter_rows(shape[0], n, ctx.rank);
    outputs.push_back(at::empty(shape, e.tensor.options()));
  }
  if (longest == 0) return outputs;  // every rank computes the same `longest`

  at::Tensor send = ctx.buffers->get(wire, first.device(), kSendSlot, longest * n);
  for (int k = 0; k < n; ++k) {
    std::vector<at::Tensor> rows;
    for (const Entry& e : entries) {
      const int64_t dim0 = e.tensor.size(0);
      rows.push_back(e.tensor.narrow(0, scatter_first_row(dim0, n, k), scatter_rows(dim0, n, k)));
    }
    pack(rows, send.narrow(0, k * longest, part[k]), 1.0);
    send.narrow(0, k * longest + part[k], longest - part[k]).zero_();
  }
  at::Tensor recv = at::empty({longest}, send.options());
  c10d::ReduceScatterOptions opts;
  opts.reduceOp = c10d::ReduceOp::SUM;
  ctx.group->reduce_scatter_single(recv, send, opts)->wait();
  unpack(recv.narrow(0, 0, part[ctx.rank]), outputs, average);
  return outputs;
}

}  // namespace gradfuse::engine
