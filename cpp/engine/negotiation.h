// The transport-free half of a negotiation round, identical on every rank: encode this rank's
// new requests (a response-cache index where the request is cached, else in full), and decide
// from every rank's message, read in rank order, which tensors run and which fail. The engine
// moves the bytes (Engine::negotiate, an allgather on the control group); tests drive this class
// directly with several simulated ranks (engine/testing.h), with no process group at all.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/controller.h"
#include "engine/message.h"
#include "engine/response_cache.h"

namespace gradfuse::engine {

class Negotiator {
 public:
  Negotiator(int size, int64_t cache_capacity)
      : size_(size), controller_(size), cache_(cache_capacity) {}

  struct Encoded {
    std::vector<uint8_t> bytes;
    int64_t cache_hits = 0;    // requests sent as a cache index
    int64_t cache_misses = 0;  // requests sent in full
  };
  Encoded encode(const std::vector<Request>& requests) const;

  // messages[r] is rank r's encoded message for this round. Returns the responses in negotiated
  // order, the same on every rank, and records the ones that run in the response cache (after
  // every index of this round was resolved, so senders and receivers read the same state).
  std::vector<Response> decide(const std::vector<std::vector<uint8_t>>& messages);

  Controller& controller() { return controller_; }

 private:
  int size_;
  Controller controller_;
  ResponseCache cache_;
};

}  // namespace gradfuse::engine
