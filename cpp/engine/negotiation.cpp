#include "engine/negotiation.h"

#include <c10/util/Exception.h>

namespace gradfuse::engine {

Negotiator::Encoded Negotiator::encode(const std::vector<Request>& requests) const {
  Encoded out;
  serialize_requests(
      requests,
      [&](const Request& r) {
        std::optional<uint32_t> index = cache_.lookup(r);
        (index ? out.cache_hits : out.cache_misses)++;
        return index;
      },
      out.bytes);
  return out;
}

std::vector<Response> Negotiator::decide(const std::vector<std::vector<uint8_t>>& messages) {
  TORCH_CHECK(static_cast<int>(messages.size()) == size_, "gradfuse: negotiation got ",
              messages.size(), " messages for ", size_, " ranks (internal error)");
  // Every rank feeds the same messages in rank order, so every rank's controller decides the
  // same responses in the same order (the decision rank 0 would broadcast, without the extra
  // round trip). All cache indices are resolved before the cache changes below.
  std::vector<std::vector<Request>> requests(size_);
  for (int r = 0; r < size_; ++r) {
    requests[r] =
        deserialize_requests(messages[r].data(), messages[r].size(), r,
                             [&](uint32_t index) -> const Request& { return cache_.at(index, r); });
  }
  std::vector<Response> responses;
  for (int r = 0; r < size_; ++r) controller_.add(r, requests[r], responses);
  for (const Response& resp : responses) {
    // join changes meaning with who joined; an error may be a disagreement: neither is cached.
    if (resp.kind == Response::Kind::kRun && resp.request.op != OpType::kJoin) {
      cache_.put(resp.request);
    }
  }
  return responses;
}

}  // namespace gradfuse::engine
