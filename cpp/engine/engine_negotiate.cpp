// One negotiation round of the engine's loop: every rank's new requests, exchanged on the
// control group, decided by the Negotiator (engine/negotiation.h), aged by the stall inspector.
#include <ATen/ATen.h>

#include <cstring>

#include "engine/engine.h"

namespace gradfuse::engine {

std::vector<Response> Engine::negotiate(int& stop_rank) {
  // Each rank sends one fixed-size slot: [length, stop flag, clock (ms), settings (from word
  // kSettingsAt), the first bytes of its requests]. Rank 0's clock is the one every rank ages
  // stalled tensors by; the settings words are this rank's latest request for a new fusion
  // threshold and cycle time (engine/settings.h), agreed from every rank's slot.
  // Steady state (a few dozen names) fits in one slot, so a cycle is a single allgather; only
  // longer messages need a second round for the rest.
  constexpr int64_t kSlot = 4096;
  constexpr int kSettingsAt = 3;  // header words of SettingsAgreement::announce
  constexpr int64_t kHeader = (kSettingsAt + SettingsAgreement::kWords) * sizeof(int64_t);
  constexpr int64_t kInline = kSlot - kHeader;
  const int n = config_.size;
  // Requests the other ranks have seen run with these exact attributes go as cache indices.
  Negotiator::Encoded encoded = negotiator_.encode(queue_.take_new_requests());
  stats_.cache_hits += encoded.cache_hits;
  stats_.cache_misses += encoded.cache_misses;
  const std::vector<uint8_t>& mine = encoded.bytes;
  const auto my_len = static_cast<int64_t>(mine.size());

  at::Tensor slot = at::zeros({kSlot}, at::kByte);
  auto* header = reinterpret_cast<int64_t*>(slot.data_ptr<uint8_t>());
  header[0] = my_len;
  header[1] = stop_requested_.load() ? 1 : 0;
  header[2] = std::chrono::duration_cast<std::chrono::milliseconds>(
                  std::chrono::steady_clock::now() - started_)
                  .count();
  settings_.announce(header + kSettingsAt);
  std::memcpy(slot.data_ptr<uint8_t>() + kHeader, mine.data(), std::min(my_len, kInline));
  std::vector<std::vector<at::Tensor>> slots(1);
  for (int r = 0; r < n; ++r) slots[0].push_back(at::empty({kSlot}, at::kByte));
  std::vector<at::Tensor> slot_in{slot};
  control_->allgather(slots, slot_in)->wait();

  std::vector<int64_t> lengths(n);
  int64_t longest = 0;
  // A peer's length is checked before it sizes a copy or an allocation: a corrupt slot fails
  // the engine with an error naming the rank (every rank reads the same slots, so every rank
  // fails alike) instead of a crash or a huge allocation.
  constexpr int64_t kMaxMessage = int64_t{1} << 30;
  for (int r = 0; r < n; ++r) {
    const auto* h = reinterpret_cast<const int64_t*>(slots[0][r].data_ptr<uint8_t>());
    TORCH_CHECK(h[0] >= 0 && h[0] <= kMaxMessage, "gradfuse: rank ", r,
                " announced a negotiation message of ", h[0], " bytes (at most ", kMaxMessage,
                " are possible): a corrupt message, or a peer running another version");
    lengths[r] = h[0];
    longest = std::max(longest, h[0]);
    if (h[1] && stop_rank < 0) stop_rank = r;
  }
  const int64_t clock_ms = reinterpret_cast<const int64_t*>(slots[0][0].data_ptr<uint8_t>())[2];
  std::vector<Response> responses;
  stats_.cycles++;
  std::vector<const int64_t*> settings_words(n);
  for (int r = 0; r < n; ++r) {
    const auto* h = reinterpret_cast<const int64_t*>(slots[0][r].data_ptr<uint8_t>());
    settings_words[r] = h + kSettingsAt;
  }
  settings_.agree(settings_words, stats_.cycles);
  if (longest == 0) {
    stall_.check(negotiator_.controller(), clock_ms, responses);
    return responses;
  }
  stats_.busy_cycles++;

  // Every rank's full message: the inline part, plus the overflow round when needed.
  std::vector<std::vector<uint8_t>> messages(n);
  for (int r = 0; r < n; ++r) {
    const uint8_t* p = slots[0][r].data_ptr<uint8_t>() + kHeader;
    messages[r].assign(p, p + std::min(lengths[r], kInline));
  }
  if (longest > kInline) {
    const int64_t rest = longest - kInline;
    at::Tensor overflow = at::zeros({rest}, at::kByte);
    if (my_len > kInline) {
      std::memcpy(overflow.data_ptr(), mine.data() + kInline, my_len - kInline);
    }
    std::vector<std::vector<at::Tensor>> overflows(1);
    for (int r = 0; r < n; ++r) overflows[0].push_back(at::empty({rest}, at::kByte));
    std::vector<at::Tensor> overflow_in{overflow};
    control_->allgather(overflows, overflow_in)->wait();
    for (int r = 0; r < n; ++r) {
      if (lengths[r] <= kInline) continue;
      const uint8_t* p = overflows[0][r].data_ptr<uint8_t>();
      messages[r].insert(messages[r].end(), p, p + (lengths[r] - kInline));
    }
  }
  responses = negotiator_.decide(messages);
  stall_.check(negotiator_.controller(), clock_ms, responses);
  return responses;
}

}  // namespace gradfuse::engine
