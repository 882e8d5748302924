// One negotiation round of the engine's loop: every rank's new requests (and inline inputs),
// exchanged on the control group, decided by the Negotiator (engine/negotiation.h), aged by the
// stall inspector; allreduces whose inputs came inline complete here.
#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>

#include "engine/engine.h"
#include "engine/handles.h"
#include "engine/inline_allreduce.h"
#include "engine/negotiation_slot.h"

namespace gradfuse::engine {

namespace {

// A peer's header is checked before its lengths size a copy or an allocation: a corrupt slot
// fails the engine with an error naming the rank (every rank reads the same slots, so every
// rank fails alike) instead of a crash or a huge allocation.
SlotHeader read_header(const at::Tensor& slot, int rank) {
  SlotHeader h;
  std::memcpy(&h, slot.data_ptr<uint8_t>(), sizeof(h));
  constexpr int64_t kMaxMessage = int64_t{1} << 30;
  for (int64_t length : {h.request_bytes, h.inline_bytes}) {
    TORCH_CHECK(length >= 0 && length <= kMaxMessage, "gradfuse: rank ", rank,
                " announced a negotiation message of ", length, " bytes (at most ", kMaxMessage,
                " are possible): a corrupt message, or a peer running another version");
  }
  return h;
}

std::vector<at::Tensor> allgather(c10d::ProcessGroup& group, std::vector<at::Tensor>& out,
                                  const at::Tensor& in, int n, int64_t bytes) {
  std::vector<std::vector<at::Tensor>> outs(1);
  if (static_cast<int>(out.size()) != n || out[0].numel() != bytes) {
    out.clear();
    for (int r = 0; r < n; ++r) out.push_back(at::empty({bytes}, at::kByte));
  }
  outs[0] = out;
  std::vector<at::Tensor> ins{in};
  group.allgather(outs, ins)->wait();
  return outs[0];
}

}  // namespace

std::vector<Response> Engine::negotiate(int& stop_rank) {
  const int n = config_.size;
  // Requests the other ranks have seen run with these exact attributes go as cache indices,
  // small allreduces among them with their input (engine/inline_allreduce.h) while the slot
  // has room.
  Negotiator::Encoded encoded = negotiator_.encode(
      queue_.take_new_requests(),
      [this](const Request& r, size_t room) {
        std::optional<std::vector<uint8_t>> bytes;
        queue_.visit(r.name, [&](const Entry& e) { bytes = inline_input(e, room); });
        return bytes;
      },
      kSlotInline);
  stats_.cache_hits += encoded.cache_hits;
  stats_.cache_misses += encoded.cache_misses;
  // My message: requests, then inline inputs; its first kSlotInline bytes go in the slot.
  std::vector<uint8_t> body = std::move(encoded.message.requests);
  body.insert(body.end(), encoded.message.inline_data.begin(), encoded.message.inline_data.end());
  SlotHeader header;
  header.request_bytes = static_cast<int64_t>(body.size() - encoded.message.inline_data.size());
  header.inline_bytes = static_cast<int64_t>(encoded.message.inline_data.size());
  header.stop = stop_requested_.load() ? 1 : 0;
  header.clock_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                        std::chrono::steady_clock::now() - started_)
                        .count();
  settings_.announce(header.settings);
  if (!slots_.mine.defined()) slots_.mine = at::zeros({kSlotBytes}, at::kByte);
  uint8_t* mine = slots_.mine.data_ptr<uint8_t>();
  std::memcpy(mine, &header, sizeof(header));
  const auto my_len = static_cast<int64_t>(body.size());
  std::memcpy(mine + sizeof(header), body.data(), std::min(my_len, kSlotInline));
  if (slots_.all.empty()) slots_.all.resize(1);
  const std::vector<at::Tensor> slots =
      allgather(*control_, slots_.all[0], slots_.mine, n, kSlotBytes);

  std::vector<SlotHeader> headers;
  int64_t longest = 0;
  for (int r = 0; r < n; ++r) {
    headers.push_back(read_header(slots[r], r));
    longest = std::max(longest, headers[r].request_bytes + headers[r].inline_bytes);
    if (headers[r].stop && stop_rank < 0) stop_rank = r;
  }
  const int64_t clock_ms = headers[0].clock_ms;
  std::vector<Response> responses;
  stats_.cycles++;
  // Every round, fast or not: a settings change takes effect in the same cycle on every rank.
  std::vector<const int64_t*> settings_words(n);
  for (int r = 0; r < n; ++r) settings_words[r] = headers[r].settings;
  settings_.agree(settings_words, stats_.cycles);
  if (longest == 0) {
    stall_.check(negotiator_.controller(), clock_ms, responses);
    return responses;
  }
  stats_.busy_cycles++;

  // Every rank's full message: the slot's part, plus the overflow round when needed.
  std::vector<std::vector<uint8_t>> bodies(n);
  for (int r = 0; r < n; ++r) {
    const int64_t length = headers[r].request_bytes + headers[r].inline_bytes;
    const uint8_t* p = slots[r].data_ptr<uint8_t>() + sizeof(SlotHeader);
    bodies[r].assign(p, p + std::min(length, kSlotInline));
  }
  if (longest > kSlotInline) {
    const int64_t rest = longest - kSlotInline;
    at::Tensor overflow = at::zeros({rest}, at::kByte);
    if (my_len > kSlotInline) {
      std::memcpy(overflow.data_ptr(), body.data() + kSlotInline, my_len - kSlotInline);
    }
    std::vector<at::Tensor> received;
    received = allgather(*control_, received, overflow, n, rest);
    for (int r = 0; r < n; ++r) {
      const int64_t length = headers[r].request_bytes + headers[r].inline_bytes;
      if (length <= kSlotInline) continue;
      const uint8_t* p = received[r].data_ptr<uint8_t>();
      bodies[r].insert(bodies[r].end(), p, p + (length - kSlotInline));
    }
  }
  std::vector<RankMessage> messages(n);
  for (int r = 0; r < n; ++r) {
    const auto split = bodies[r].begin() + headers[r].request_bytes;
    messages[r].requests.assign(bodies[r].begin(), split);
    messages[r].inline_data.assign(split, bodies[r].end());
  }
  const int64_t fast_before = negotiator_.fast_rounds();
  responses = negotiator_.decide(messages);
  stats_.fast_cycles += negotiator_.fast_rounds() - fast_before;
  stall_.check(negotiator_.controller(), clock_ms, responses);
  complete_inline(responses);
  return responses;
}

void Engine::complete_inline(std::vector<Response>& responses) {
  const auto negotiated = std::chrono::steady_clock::now();
  auto done = std::remove_if(responses.begin(), responses.end(), [&](const Response& r) {
    if (r.inline_inputs.empty()) return false;
    Entry e = queue_.take(r.name);
    try {
      at::Tensor out = reduce_inline(r, e, config_.size);
      if (timeline_.active()) {
        timeline_.phase(r.name, "negotiate", e.enqueued, negotiated);
        timeline_.phase(r.name, "inline reduce", negotiated, std::chrono::steady_clock::now());
      }
      // Counted before the handle completes, so a caller that waited on it sees the count.
      stats_.inline_reduced++;
      stats_.tensors++;
      HandleTable::get().complete(e.handle, out);
    } catch (const std::exception& ex) {
      // The entry left the queue: its handle fails here, then the engine stops as usual.
      HandleTable::get().fail(
          e.handle, std::string("gradfuse: allreduce of '") + r.name + "' failed: " + ex.what());
      throw;
    }
    return true;
  });
  responses.erase(done, responses.end());
}

}  // namespace gradfuse::engine
