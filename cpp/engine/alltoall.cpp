#include "engine/alltoall.h"

#include <ATen/ATen.h>

namespace gradfuse::engine {

at::Tensor received_splits(const Response& response, int rank, int size) {
  at::Tensor out = at::empty({size}, at::kLong);
  auto* p = out.data_ptr<int64_t>();
  for (int k = 0; k < size; ++k) p[k] = response.all_splits[k * size + rank];
  return out;
}

std::vector<at::Tensor> run_alltoall(const Batch& batch, const CollectiveContext& ctx) {
  TORCH_CHECK(batch.entries.size() == 1, "gradfuse: alltoall batches hold one tensor");
  const Entry& e = batch.entries[0];
  const Response& resp = batch.responses[0];
  const int n = ctx.size;
  std::vector<int64_t> send_rows = e.request.splits;
  std::vector<int64_t> recv_rows;
  int64_t recv_total = 0;
  int64_t everything = 0;  // rows moved by the whole job: the same number on every rank
  for (int k = 0; k < n; ++k) {
    recv_rows.push_back(resp.all_splits[k * n + ctx.rank]);
    recv_total += recv_rows.back();
  }
  for (int64_t s : resp.all_splits) everything += s;

  std::vector<int64_t> shape = e.tensor.sizes().vec();
  shape[0] = recv_total;
  at::Tensor output = at::empty(shape, e.tensor.options());
  const int64_t row = e.tensor.size(0) ? e.tensor.numel() / e.tensor.size(0)
                                       : c10::multiply_integers(shape.begin() + 1, shape.end());
  if (everything == 0 || row == 0) return {output};

  // Nothing is reduced, so the data travels as bytes: every dtype works, including int16,
  // which Gloo does not support. Split sizes stay in rows of (row * element size) bytes.
  const int64_t row_bytes = row * e.tensor.element_size();
  // Torch calls a tensor contiguous whatever the strides of its size-1 dimensions (one element
  // of a column: stride 2) or of an empty one, and view() as bytes would refuse them; the same
  // elements, addressed with the canonical strides.
  const at::Tensor input = e.tensor.as_strided({e.tensor.size(0), row}, {row, 1});
  at::Tensor send = input.view(at::kByte);
  at::Tensor recv = output.view({recv_total, row}).view(at::kByte);
  TORCH_CHECK(send.size(1) == row_bytes && recv.size(1) == row_bytes);
  c10d::AllToAllOptions opts;
  ctx.group->all_to_all_single(recv, send, recv_rows, send_rows, opts)->wait();
  return {output};
}

}  // namespace gradfuse::engine
