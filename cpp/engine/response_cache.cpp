#include "engine/response_cache.h"

#include <c10/util/Exception.h>

namespace gradfuse::engine {

std::optional<uint32_t> ResponseCache::lookup(const Request& request) const {
  auto it = index_of_.find(request.name);
  if (it == index_of_.end() || !(slots_[it->second].request == request)) return std::nullopt;
  return it->second;
}

const Request& ResponseCache::at(uint32_t index, int sender) const {
  TORCH_CHECK(index < slots_.size(), "gradfuse: negotiation message from rank ", sender,
              " names response cache entry ", index, ", but the cache holds ", slots_.size(),
              " (internal error: the ranks' caches disagree)");
  return slots_[index].request;
}

void ResponseCache::touch(uint32_t index) {
  Slot& slot = slots_.at(index);
  recency_.splice(recency_.begin(), recency_, slot.recency);
}

void ResponseCache::put(const Request& request) {
  if (capacity_ <= 0) return;
  auto it = index_of_.find(request.name);
  if (it != index_of_.end()) {
    Slot& slot = slots_[it->second];
    slot.request = request;
    recency_.splice(recency_.begin(), recency_, slot.recency);
    return;
  }
  uint32_t index;
  if (static_cast<int64_t>(slots_.size()) < capacity_) {
    index = static_cast<uint32_t>(slots_.size());
    recency_.push_front(index);
    slots_.push_back({request, recency_.begin()});
  } else {
    // Full: the least recently run name gives up its index.
    index = recency_.back();
    recency_.splice(recency_.begin(), recency_, std::prev(recency_.end()));
    index_of_.erase(slots_[index].request.name);
    slots_[index].request = request;
  }
  index_of_[request.name] = index;
}

}  // namespace gradfuse::engine
