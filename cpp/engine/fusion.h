// Tensor fusion: negotiated tensors that can share one collective (same operation, dtype,
// device type, reduce op and root) are grouped into batches of at most `threshold_bytes`, and
// copied into / out of one flat fusion buffer with the gradfuse::pack_ / unpack_ kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <map>
#include <tuple>
#include <vector>

#include "engine/message.h"
#include "engine/tensor_queue.h"

namespace gradfuse::engine {

struct Batch {
  Request key;  // op, dtype, device type, reduce op, root shared by every entry
  std::vector<Response> responses;
  std::vector<Entry> entries;  // same order as responses
};

// Groups responses (in negotiated order) into batches. Only agreed attributes (rank 0's
// request, allgather's first_dims) decide the grouping, so every rank forms the same batches.
std::vector<Batch> make_batches(std::vector<Response> responses, int64_t threshold_bytes);

// The dtype a tensor travels in: Gloo cannot reduce int16, so int16 goes as int32.
at::ScalarType wire_dtype(at::ScalarType dtype);

// flat[0 : sum numel] = scale * tensors (converted to flat's dtype), and the inverse.
// Float dtypes use the pack_/unpack_ kernels; integers a plain (scaled in float64) copy.
void pack(const std::vector<at::Tensor>& tensors, const at::Tensor& flat, double scale);
// sq_norms (float tensors only): one float64 per tensor, the sum of squares of what was written.
void unpack(const at::Tensor& flat, const std::vector<at::Tensor>& tensors, double scale,
            const std::optional<at::Tensor>& sq_norms = std::nullopt);

// Fusion buffers kept between cycles (allocation and first-touch page faults of a 64 MiB
// buffer cost more than the copy into it). One buffer per (dtype, device, slot).
class BufferPool {
 public:
  at::Tensor get(at::ScalarType dtype, c10::Device device, int slot, int64_t numel);
  void clear() { buffers_.clear(); }

 private:
  std::map<std::tuple<int, int, int, int>, at::Tensor> buffers_;
};

}  // namespace gradfuse::engine
