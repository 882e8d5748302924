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
      open.emplace_back(Batch{r.request, {}, {}, {}}, 0);
      it = std::prev(open.end());
    }
    it->second += bytes;
    it->first.responses.push_back(std::move(r));
  }
  for (auto& [batch, bytes] : open) done.push_back(std::move(batch));
  return done;
}

at::ScalarType wire_dtype(at::ScalarType dtype) { return dtype == at::kShort ? at::kInt : dtype; }

int64_t align_numel(int64_t numel, int64_t element_size) {
  // Element sizes (1, 2, 4, 8) divide kFusionAlignBytes.
  const int64_t per_align = kFusionAlignBytes / element_size;
  return (numel + per_align - 1) / per_align * per_align;
}

std::vector<int64_t> fusion_offsets(const std::vector<int64_t>& numels, int64_t element_size) {
  std::vector<int64_t> offsets{0};
  offsets.reserve(numels.size() + 1);
  for (size_t i = 0; i < numels.size(); ++i) {
    const int64_t end = offsets.back() + numels[i];
    offsets.push_back(i + 1 == numels.size() ? end : align_numel(end, element_size));
  }
  return offsets;
}

namespace {

std::vector<int64_t> layout_of(const std::vector<at::Tensor>& tensors, const at::Tensor& flat) {
  std::vector<int64_t> numels;
  numels.reserve(tensors.size());
  for (const at::Tensor& t : tensors) numels.push_back(t.numel());
  const auto offsets = fusion_offsets(numels, flat.element_size());
  TORCH_CHECK(offsets.back() <= flat.numel(), "gradfuse: a fusion buffer of ", flat.numel(),
              " elements for tensors laid out over ", offsets.back(), " (internal error)");
  return offsets;
}

// Calls fn(begin, end) for each maximal run of tensors the layout puts back to back (a run
// breaks only after a tensor whose bytes are not a multiple of kFusionAlignBytes), so the
// kernels see one flat segment per run.
template <class Fn>
void for_each_packed_run(const std::vector<at::Tensor>& tensors,
                         const std::vector<int64_t>& offsets, Fn fn) {
  size_t begin = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (i + 1 == tensors.size() || offsets[i] + tensors[i].numel() != offsets[i + 1]) {
      fn(begin, i + 1);
      begin = i + 1;
    }
  }
}

std::vector<at::Tensor> slice(const std::vector<at::Tensor>& tensors, size_t begin, size_t end) {
  return {tensors.begin() + static_cast<std::ptrdiff_t>(begin),
          tensors.begin() + static_cast<std::ptrdiff_t>(end)};
}

// The part of `flat` that tensors [begin, end), one run, occupy.
at::Tensor run_segment(const at::Tensor& flat, const std::vector<at::Tensor>& tensors,
                       const std::vector<int64_t>& offsets, size_t begin, size_t end) {
  return flat.narrow(0, offsets[begin], offsets[end - 1] + tensors[end - 1].numel() - offsets[begin]);
}

}  // namespace

void pack(const std::vector<at::Tensor>& tensors, const at::Tensor& flat, double scale) {
  if (tensors.empty()) return;
  const auto offsets = layout_of(tensors, flat);
  if (at::isFloatingType(flat.scalar_type())) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("gradfuse::pack_", "")
                         .typed<void(at::TensorList, const at::Tensor&, double,
                                     const std::optional<at::Tensor>&)>();
    for_each_packed_run(tensors, offsets, [&](size_t b, size_t e) {
      op.call(slice(tensors, b, e), run_segment(flat, tensors, offsets, b, e), scale,
              std::nullopt);
    });
    return;
  }
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    at::Tensor dst = flat.narrow(0, offsets[i], t.numel());
    if (scale == 1.0) {
      dst.copy_(t.reshape(-1));
    } else {
      dst.copy_(t.reshape(-1).to(at::kDouble).mul_(scale));  // truncates toward zero
    }
  }
}

void unpack(const at::Tensor& flat, const std::vector<at::Tensor>& tensors, double scale,
            const std::optional<at::Tensor>& sq_norms) {
  if (tensors.empty()) return;
  const auto offsets = layout_of(tensors, flat);
  if (at::isFloatingType(flat.scalar_type())) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("gradfuse::unpack_", "")
                         .typed<void(const at::Tensor&, at::TensorList, double, bool,
                                     const std::optional<at::Tensor>&,
                                     const std::optional<at::Tensor>&)>();
    for_each_packed_run(tensors, offsets, [&](size_t b, size_t e) {
      std::optional<at::Tensor> norms;
      if (sq_norms) {
        norms = sq_norms->narrow(0, static_cast<int64_t>(b), static_cast<int64_t>(e - b));
      }
      op.call(run_segment(flat, tensors, offsets, b, e), slice(tensors, b, e), scale, false,
              std::nullopt, norms);
    });
    return;
  }
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    at::Tensor src = flat.narrow(0, offsets[i], t.numel());
    at::Tensor dst = t.view(-1);
    if (scale == 1.0) {
      dst.copy_(src);
    } else {
      dst.copy_(src.to(at::kDouble).mul_(scale));
    }
  }
}

at::Tensor BufferPool::get(at::ScalarType dtype, c10::Device device, int slot, int64_t numel) {
  const auto key = std::make_tuple(static_cast<int>(dtype), static_cast<int>(device.type()),
                                   static_cast<int>(device.index()), slot);
  at::Tensor& buf = buffers_[key];
  if (!buf.defined() || buf.numel() < numel) {
    buf = at::zeros({numel}, at::TensorOptions().dtype(dtype).device(device));
  }
  return buf.narrow(0, 0, numel);
}

}  // namespace gradfuse::engine
