// Tensor fusion: negotiated tensors that can share one collective (same operation, dtype,
// device type, reduce op and root) are grouped into batches of at most `threshold_bytes`, and
// copied into / out of one flat fusion buffer with the gradfuse::pack_ / unpack_ kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <chrono>
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
  std::chrono::steady_clock::time_point negotiated;  // timeline: when negotiation agreed on it
};

// Groups responses (in negotiated order) into batches. Only agreed attributes (rank 0's
// request, allgather's first_dims) decide the grouping, so every rank forms the same batches.
std::vector<Batch> make_batches(std::vector<Response> responses, int64_t threshold_bytes);

// The dtype a tensor travels in: Gloo cannot reduce int16, so int16 goes as int32.
at::ScalarType wire_dtype(at::ScalarType dtype);

// The fusion buffer's layout: every tensor starts at a multiple of kFusionAlignBytes, so the
// vectorised pack/unpack kernels (whole 16-byte loads and stores) never fall back to one
// element at a time. Returns numels.size() + 1 offsets in elements of `element_size` bytes:
// offsets[i] is where tensor i starts, the last is where the last tensor ends (no padding
// after it). Offsets are relative to an aligned start, so any suffix of the list laid out from
// its own first offset lands where the whole list puts it. The padding between tensors is
// never read back: every collective the engine runs on a fusion buffer is elementwise (or
// moves bytes), so a padding slot only ever meets other ranks' padding slots, whatever the
// reduce op, and unpack reads exact ranges.
constexpr int64_t kFusionAlignBytes = 16;
std::vector<int64_t> fusion_offsets(const std::vector<int64_t>& numels, int64_t element_size);
// numel rounded up to a whole number of kFusionAlignBytes (a segment the next one follows).
int64_t align_numel(int64_t numel, int64_t element_size);

// Writes scale * tensors (converted to flat's dtype) into flat at fusion_offsets(), and the
// inverse. Float dtypes use the pack_/unpack_ kernels (one call per run of tensors that lie
// back to back in the layout); integers a plain (scaled in float64) copy.
void pack(const std::vector<at::Tensor>& tensors, const at::Tensor& flat, double scale);
// sq_norms (float tensors only): one float64 per tensor, the sum of squares of what was written.
void unpack(const at::Tensor& flat, const std::vector<at::Tensor>& tensors, double scale,
            const std::optional<at::Tensor>& sq_norms = std::nullopt);

// Fusion buffers kept between cycles (allocation and first-touch page faults of a 64 MiB
// buffer cost more than the copy into it). One buffer per (dtype, device, slot), zeroed when
// allocated so the layout's padding never holds uninitialized memory. Used by the engine's
// executor thread only.
class BufferPool {
 public:
  at::Tensor get(at::ScalarType dtype, c10::Device device, int slot, int64_t numel);
  void clear() { buffers_.clear(); }

 private:
  std::map<std::tuple<int, int, int, int>, at::Tensor> buffers_;
};

}  // namespace gradfuse::engine
