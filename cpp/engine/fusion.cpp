#include "engine/fusion.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <numeric>

namespace gradfuse::engine {

namespace {

int64_t numel_of(const std::vector<int64_t>& shape) {
  return std::accumulate(shape.begin(), shape.end(), int64_t{1}, std::multiplies<int64_t>());
}

// Bytes this response puts through the collective (on the wire, per rank).
int64_t wire_bytes(const Response& r) {
  int64_t numel = numel_of(r.request.shape);
  if (r.request.op == OpType::kAllgather) {
    // The batch is padded to the largest contribution; count the gathered total.
    const int64_t rows = r.request.shape.empty() ? 1 : r.request.shape[0];
    const int64_t row = rows ? numel / rows : 0;
    numel = row * std::accumulate(r.first_dims.begin(), r.first_dims.end(), int64_t{0});
  }
  return numel * c10::elementSize(wire_dtype(r.request.dtype));
}

bool same_batch_key(const Request& a, const Request& b) {
  // An alltoall's send and receive sizes differ per rank: each runs on its own.
  if (a.op == OpType::kAlltoall || b.op == OpType::kAlltoall) return false;
  const bool reduces = a.op == OpType::kAllreduce || a.op == OpType::kReducescatter;
  // The device type, not the index: a rank's CUDA tensors all live on its one device
  // (engine/devices.h), which differs from rank to rank.
  return a.op == b.op && a.dtype == b.dtype && a.device_type == b.device_type &&
         (!reduces || a.reduce_op == b.reduce_op) &&
         (a.op != OpType::kBroadcast || a.root == b.root);
}

}  // namespace

std::vector<Batch> make_batches(std::vector<Response> responses, int64_t threshold_bytes) {
  // Open batches, one per key, filled in negotiated order; a batch closes when the next tensor
  // would push it past the threshold. A tensor larger than the threshold gets its own batch.
  std::vector<Batch> done;
  std::vector<std::pair<Batch, int64_t>> open;  // (batch, bytes)
  for (Response& r : responses) {
    const int64_t bytes = wire_bytes(r);
    auto it = std::find_if(open.begin(), open.end(),
                           [&](auto& b) { return same_batch_key(b.first.key, r.request); });
    if (it != open.end() && it->second + bytes > threshold_bytes) {
      done.push_back(std::move(it->first));
      open.erase(it);
      it = open.end();
    }
    if (it == open.end()) {
      open.emplace_back(Batch{r.request, {}, {}}, 0);
      it = std::prev(open.end());
    }
    it->second += bytes;
    it->first.responses.push_back(std::move(r));
  }
  for (auto& [batch, bytes] : open) done.push_back(std::move(batch));
  return done;
}

at::ScalarType wire_dtype(at::ScalarType dtype) { return dtype == at::kShort ? at::kInt : dtype; }

void pack(const std::vector<at::Tensor>& tensors, const at::Tensor& flat, double scale) {
  if (tensors.empty()) return;
  if (at::isFloatingType(flat.scalar_type())) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("gradfuse::pack_", "")
                         .typed<void(at::TensorList, const at::Tensor&, double,
                                     const std::optional<at::Tensor>&)>();
    op.call(tensors, flat, scale, std::nullopt);
    return;
  }
  int64_t offset = 0;
  for (const at::Tensor& t : tensors) {
    at::Tensor dst = flat.narrow(0, offset, t.numel());
    if (scale == 1.0) {
      dst.copy_(t.reshape(-1));
    } else {
      dst.copy_(t.reshape(-1).to(at::kDouble).mul_(scale));  // truncates toward zero
    }
    offset += t.numel();
  }
}

void unpack(const at::Tensor& flat, const std::vector<at::Tensor>& tensors, double scale,
            const std::optional<at::Tensor>& sq_norms) {
  if (tensors.empty()) return;
  if (at::isFloatingType(flat.scalar_type())) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("gradfuse::unpack_", "")
                         .typed<void(const at::Tensor&, at::TensorList, double, bool,
                                     const std::optional<at::Tensor>&,
                                     const std::optional<at::Tensor>&)>();
    op.call(flat, tensors, scale, false, std::nullopt, sq_norms);
    return;
  }
  int64_t offset = 0;
  for (const at::Tensor& t : tensors) {
    at::Tensor src = flat.narrow(0, offset, t.numel());
    at::Tensor dst = t.view(-1);
    if (scale == 1.0) {
      dst.copy_(src);
    } else {
      dst.copy_(src.to(at::kDouble).mul_(scale));
    }
    offset += t.numel();
  }
}

at::Tensor BufferPool::get(at::ScalarType dtype, c10::Device device, int slot, int64_t numel) {
  const auto key = std::make_tuple(static_cast<int>(dtype), static_cast<int>(device.type()),
                                   static_cast<int>(device.index()), slot);
  at::Tensor& buf = buffers_[key];
  if (!buf.defined() || buf.numel() < numel) {
    buf = at::empty({numel}, at::TensorOptions().dtype(dtype).device(device));
  }
  return buf.narrow(0, 0, numel);
}

}  // namespace gradfuse::engine
