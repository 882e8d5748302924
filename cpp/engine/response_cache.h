// Response cache: a training step submits the same tensors with the same attributes every
// step, so after the first step a rank need not describe them again. Every rank keeps an
// identical cache of the requests that ran (name, operation, shape, dtype, ...), each at a bit
// position; a rank whose new request equals a cached one sends only that bit, and the others
// read the full request back from their own copy.
//
// Why the copies stay identical: only the background thread touches the cache, lookups never
// change it, and put() is called with the negotiated responses, which every rank computes in
// the same order (engine/controller.h). Bits a rank sends in a cycle are resolved before that
// cycle's put() calls, so sender and receivers read the same state.
//
// With ResNet-50's 161 gradients this turns a ~10 KB negotiation message (two allgather rounds
// past the 4 KB slot) into a 21-byte bit vector (one round).
#pragma once

#include <cstdint>
#include <list>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "engine/message.h"

namespace gradfuse::engine {

class ResponseCache {
 public:
  // capacity 0 disables the cache (every request travels in full).
  explicit ResponseCache(int64_t capacity) : capacity_(capacity) {}

  // The bit of a cached request equal to `request` in every attribute, if any.
  std::optional<uint32_t> lookup(const Request& request) const;
  // The request cached at `bit`. `sender` names the rank whose message held the bit, for the
  // error when a bit is out of range (a corrupt message, never a valid one).
  const Request& at(uint32_t bit, int sender) const;
  // Records a request that ran: it keeps its bit (with the new attributes if they changed) or
  // takes a free one; when the cache is full it takes the least recently run name's bit.
  void put(const Request& request);

  // Number of bits in use: a bit vector of this many bits covers every cached request.
  size_t size() const { return slots_.size(); }

 private:
  struct Slot {
    Request request;
    std::list<uint32_t>::iterator recency;  // position in recency_ (front: most recent)
  };
  int64_t capacity_;
  std::vector<Slot> slots_;  // by bit
  std::unordered_map<std::string, uint32_t> bit_of_;
  std::list<uint32_t> recency_;
};

// A rank's negotiation message: the bits of its cached requests as a bit vector, then its
// other requests in full. An empty message means "nothing new".
void serialize_message(const std::vector<uint32_t>& bits, const std::vector<Request>& full,
                       std::vector<uint8_t>& out);
// The requests a message stands for: the cached ones (in bit order) resolved through `cache`,
// then those sent in full. `sender` names the rank in errors.
std::vector<Request> deserialize_message(const uint8_t* data, size_t size, int sender,
                                         const ResponseCache& cache);

}  // namespace gradfuse::engine
