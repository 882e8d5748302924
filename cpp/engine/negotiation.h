// The transport-free half of a negotiation round, identical on every rank: encode this rank's
// new requests (a response-cache index where the request is cached, else in full) and the
// inputs it sends inline (engine/inline_allreduce.h), and decide from every rank's message, read
// in rank order, which tensors run and which fail. The engine moves the bytes
// (Engine::negotiate, an allgather on the control group); tests drive this class directly with
// several simulated ranks (engine/testing.h), with no process group at all.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "engine/controller.h"
#include "engine/message.h"
#include "engine/response_cache.h"

namespace gradfuse::engine {

// One rank's part of a round.
struct RankMessage {
  std::vector<uint8_t> requests;     // engine/message.h: serialize_requests
  std::vector<uint8_t> inline_data;  // engine/message.h: serialize_inline
};

class Negotiator {
 public:
  Negotiator(int size, int64_t cache_capacity)
      : size_(size), controller_(size), cache_(cache_capacity) {}

  // This rank's packed input for an allreduce it may send inline, if it can go inline and
  // takes at most `room` bytes (engine/inline_allreduce.h).
  using InlineInput =
      std::function<std::optional<std::vector<uint8_t>>(const Request&, size_t room)>;

  struct Encoded {
    RankMessage message;
    int64_t cache_hits = 0;    // requests sent as a cache index
    int64_t cache_misses = 0;  // requests sent in full
    int64_t inlined = 0;       // inputs sent inline
  };
  // Encodes this rank's new requests. An input goes inline for a cached request only (the
  // peers must know its size) that is alone in the message (a group goes the usual way, fused),
  // while the message stays within `budget` bytes; it goes again each round until its tensor
  // is decided (a peer may submit a round later: an input counts only in the round that
  // decides its tensor, and only when that round runs nothing else).
  Encoded encode(const std::vector<Request>& requests, const InlineInput& inline_input = {},
                 size_t budget = 0);

  // messages[r] is rank r's message for this round. Returns the responses in negotiated
  // order, the same on every rank, and records the ones that run in the response cache (after
  // every index of this round was resolved, so senders and receivers read the same state).
  // When every rank sent the same cache references and nothing is pending (the steady state),
  // they run as they are, with no per-name bookkeeping or comparison (fast_rounds() counts
  // these rounds). An allreduce decided this round whose input every rank sent inline gets
  // the inputs (Response::inline_inputs).
  std::vector<Response> decide(const std::vector<RankMessage>& messages);

  Controller& controller() { return controller_; }
  int64_t fast_rounds() const { return fast_rounds_; }

 private:
  // The steady state's responses, or nothing when the round needs the controller.
  std::optional<std::vector<Response>> decide_fast(const std::vector<RankMessage>& messages);
  std::vector<Response> decide_in_full(const std::vector<RankMessage>& messages);
  // Every rank's inline inputs of this round, by tensor name (resolved before the cache changes).
  std::vector<std::unordered_map<std::string, InlineRecord>> inline_inputs(
      const std::vector<RankMessage>& messages) const;
  // Response::inline_inputs of the allreduces whose input every rank sent this round.
  void attach_inline_inputs(
      const std::vector<std::unordered_map<std::string, InlineRecord>>& by_name,
      std::vector<Response>& responses) const;

  int size_;
  Controller controller_;
  ResponseCache cache_;
  int64_t fast_rounds_ = 0;
  // This rank's requests sent inline and not decided yet: their inputs go again each round.
  std::vector<Request> inline_waiting_;
};

}  // namespace gradfuse::engine
