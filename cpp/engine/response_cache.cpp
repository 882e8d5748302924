#include "engine/response_cache.h"

#include <c10/util/Exception.h>

#include <cstring>

namespace gradfuse::engine {

std::optional<uint32_t> ResponseCache::lookup(const Request& request) const {
  auto it = bit_of_.find(request.name);
  if (it == bit_of_.end() || !(slots_[it->second].request == request)) return std::nullopt;
  return it->second;
}

const Request& ResponseCache::at(uint32_t bit, int sender) const {
  TORCH_CHECK(bit < slots_.size(), "gradfuse: negotiation message from rank ", sender,
              " names response cache bit ", bit, ", but the cache holds ", slots_.size(),
              " (internal error: the ranks' caches disagree)");
  return slots_[bit].request;
}

void ResponseCache::put(const Request& request) {
  if (capacity_ <= 0) return;
  auto it = bit_of_.find(request.name);
  if (it != bit_of_.end()) {
    Slot& slot = slots_[it->second];
    slot.request = request;
    recency_.splice(recency_.begin(), recency_, slot.recency);
    return;
  }
  uint32_t bit;
  if (static_cast<int64_t>(slots_.size()) < capacity_) {
    bit = static_cast<uint32_t>(slots_.size());
    recency_.push_front(bit);
    slots_.push_back({request, recency_.begin()});
  } else {
    // Full: the least recently run name gives up its bit.
    bit = recency_.back();
    recency_.splice(recency_.begin(), recency_, std::prev(recency_.end()));
    bit_of_.erase(slots_[bit].request.name);
    slots_[bit].request = request;
  }
  bit_of_[request.name] = bit;
}

void serialize_message(const std::vector<uint32_t>& bits, const std::vector<Request>& full,
                       std::vector<uint8_t>& out) {
  // [uint32 bit-vector bytes][bit vector][requests]; nothing at all when there is nothing new,
  // so an idle cycle's message stays empty.
  if (bits.empty() && full.empty()) return;
  uint32_t highest = 0;
  for (uint32_t b : bits) highest = std::max(highest, b);
  const uint32_t nbytes = bits.empty() ? 0 : highest / 8 + 1;
  const size_t start = out.size();
  out.resize(start + sizeof(nbytes) + nbytes, 0);
  std::memcpy(out.data() + start, &nbytes, sizeof(nbytes));
  uint8_t* vector = out.data() + start + sizeof(nbytes);
  for (uint32_t b : bits) vector[b / 8] |= static_cast<uint8_t>(1u << (b % 8));
  serialize_requests(full, out);
}

std::vector<Request> deserialize_message(const uint8_t* data, size_t size, int sender,
                                         const ResponseCache& cache) {
  std::vector<Request> requests;
  if (size == 0) return requests;
  uint32_t nbytes = 0;
  TORCH_CHECK(size >= sizeof(nbytes), "gradfuse: truncated negotiation message from rank ",
              sender);
  std::memcpy(&nbytes, data, sizeof(nbytes));
  TORCH_CHECK(size - sizeof(nbytes) >= nbytes, "gradfuse: truncated negotiation message from rank ",
              sender);
  const uint8_t* vector = data + sizeof(nbytes);
  for (uint32_t byte = 0; byte < nbytes; ++byte) {
    for (uint32_t b = 0; b < 8; ++b) {
      if (vector[byte] & (1u << b)) requests.push_back(cache.at(byte * 8 + b, sender));
    }
  }
  std::vector<Request> full =
      deserialize_requests(vector + nbytes, size - sizeof(nbytes) - nbytes, sender);
  requests.insert(requests.end(), std::make_move_iterator(full.begin()),
                  std::make_move_iterator(full.end()));
  return requests;
}

}  // namespace gradfuse::engine
