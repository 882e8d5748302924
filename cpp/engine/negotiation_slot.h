// What a rank puts on the control group each negotiation round: one fixed-size slot per rank,
// all-gathered, holding a header and the first bytes of the rank's message (its requests, then
// its inline inputs: engine/negotiation.h). A message longer than the slot sends the rest in an
// overflow round. The steady state (response-cache references, a small allreduce inline) fits
// in one slot, so a round is one small allgather.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#include "engine/settings.h"

namespace gradfuse::engine {

// Named fields, copied as one struct: a new field is one more line here (all ranks run the same
// binary, so the layout is shared).
struct SlotHeader {
  int64_t request_bytes = 0;  // this rank's encoded requests (RankMessage::requests)
  int64_t inline_bytes = 0;   // its inline inputs, after them (RankMessage::inline_data)
  int64_t stop = 0;           // 1 once this rank's engine is stopping (shutdown)
  int64_t clock_ms = 0;       // since this rank's engine started; rank 0's ages stalled tensors
  // This rank's latest request for new engine settings (SettingsAgreement::announce), agreed
  // from every rank's header.
  int64_t settings[SettingsAgreement::kWords] = {};
};
static_assert(std::is_trivially_copyable_v<SlotHeader>);

// 2 KiB: the header, a 1 KiB inline input (engine/inline_allreduce.h) and a few hundred
// cache references (ResNet-50's 161 gradients are 644 bytes).
constexpr int64_t kSlotBytes = 2048;
constexpr int64_t kSlotInline = kSlotBytes - static_cast<int64_t>(sizeof(SlotHeader));

// The slot tensors, kept between rounds (no allocation per round).
struct SlotBuffers {
  at::Tensor mine;                           // this rank's slot
  std::vector<std::vector<at::Tensor>> all;  // [0][r]: rank r's slot, after the allgather
};

}  // namespace gradfuse::engine
