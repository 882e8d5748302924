#include "engine/negotiation.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <unordered_set>

#include "engine/inline_allreduce.h"

namespace gradfuse::engine {

Negotiator::Encoded Negotiator::encode(const std::vector<Request>& requests,
                                       const InlineInput& inline_input, size_t budget) {
  // A request sent inline earlier waits as long as the controller holds it: once it ran or
  // failed (a mismatch, the stall inspector), its input is no longer wanted.
  const auto& pending = controller_.pending_table();
  std::erase_if(inline_waiting_, [&](const Request& r) { return !pending.count(r.name); });
  Encoded out;
  std::vector<std::optional<uint32_t>> indices;
  serialize_requests(
      requests,
      [&](const Request& r) {
        std::optional<uint32_t> index = cache_.lookup(r);
        (index ? out.cache_hits : out.cache_misses)++;
        indices.push_back(index);
        return index;
      },
      out.message.requests);
  // Only a request alone in its message: a group (a bucket of gradients) goes the usual way,
  // fused, where tensors that lie back to back are reduced in place (engine/collectives.h).
  if (!inline_input || requests.size() + inline_waiting_.size() != 1) return out;
  constexpr size_t kRecordHeader = 2 * sizeof(uint32_t);
  size_t used = out.message.requests.size();
  auto offer = [&](const Request& r, std::optional<uint32_t> index) {
    if (!index || used + kRecordHeader >= budget) return false;
    std::optional<std::vector<uint8_t>> bytes = inline_input(r, budget - used - kRecordHeader);
    if (!bytes) return false;
    serialize_inline(*index, *bytes, out.message.inline_data);
    used += kRecordHeader + bytes->size();
    out.inlined++;
    return true;
  };
  // Earlier ones first: their peers already wait on them.
  for (const Request& r : inline_waiting_) offer(r, cache_.lookup(r));
  for (size_t i = 0; i < requests.size(); ++i) {
    if (offer(requests[i], indices[i])) inline_waiting_.push_back(requests[i]);
  }
  return out;
}

std::vector<std::unordered_map<std::string, InlineRecord>> Negotiator::inline_inputs(
    const std::vector<RankMessage>& messages) const {
  std::vector<std::unordered_map<std::string, InlineRecord>> by_name(size_);
  for (int r = 0; r < size_; ++r) {
    const auto& data = messages[r].inline_data;
    for (const InlineRecord& record : deserialize_inline(data.data(), data.size(), r)) {
      by_name[r][cache_.at(record.cache_index, r).name] = record;
    }
  }
  return by_name;
}

void Negotiator::attach_inline_inputs(
    const std::vector<std::unordered_map<std::string, InlineRecord>>& by_name,
    std::vector<Response>& responses) const {
  // Only a tensor that runs alone in its round: one that runs beside others shares their
  // collective (and a batch's in-place span) instead.
  const auto runs = std::count_if(responses.begin(), responses.end(), [](const Response& r) {
    return r.kind == Response::Kind::kRun;
  });
  if (runs != 1) return;
  for (Response& resp : responses) {
    if (resp.kind != Response::Kind::kRun || resp.request.op != OpType::kAllreduce ||
        !resp.joined.empty()) {
      continue;
    }
    const bool everywhere = std::all_of(by_name.begin(), by_name.end(),
                                        [&](const auto& inputs) { return inputs.count(resp.name); });
    if (!everywhere) continue;
    const int64_t expected = inline_input_bytes(resp.request);
    for (int r = 0; r < size_; ++r) {
      const InlineRecord& record = by_name[r].at(resp.name);
      TORCH_CHECK(record.size == expected, "gradfuse: rank ", r, " sent an inline input of ",
                  record.size, " bytes for tensor '", resp.name, "', which takes ", expected,
                  ": a corrupt message, or a peer running another version");
      resp.inline_inputs.emplace_back(record.data, record.data + record.size);
    }
  }
}

std::optional<std::vector<Response>> Negotiator::decide_fast(
    const std::vector<RankMessage>& messages) {
  if (!controller_.settled()) return std::nullopt;
  const std::vector<uint8_t>& first = messages[0].requests;
  for (const RankMessage& m : messages) {
    if (m.requests != first) return std::nullopt;
  }
  const auto indices = cache_references_only(first.data(), first.size());
  if (!indices) return std::nullopt;
  // A repeated reference is a name sent twice: the controller's error to raise.
  std::unordered_set<uint32_t> seen(indices->begin(), indices->end());
  if (seen.size() != indices->size()) return std::nullopt;
  std::vector<Response> responses;
  responses.reserve(indices->size());
  for (uint32_t index : *indices) responses.push_back(controller_.run_cached(cache_.at(index, 0)));
  for (uint32_t index : *indices) cache_.touch(index);
  fast_rounds_++;
  return responses;
}

std::vector<Response> Negotiator::decide_in_full(const std::vector<RankMessage>& messages) {
  // Every rank feeds the same messages in rank order, so every rank's controller decides the
  // same responses in the same order (the decision rank 0 would broadcast, without the extra
  // round trip). All cache indices are resolved before the cache changes below.
  std::vector<std::vector<Request>> requests(size_);
  std::vector<std::vector<int64_t>> indices(size_);
  for (int r = 0; r < size_; ++r) {
    const auto& bytes = messages[r].requests;
    requests[r] = deserialize_requests(
        bytes.data(), bytes.size(), r,
        [&](uint32_t index) -> const Request& { return cache_.at(index, r); }, &indices[r]);
  }
  std::vector<Response> responses;
  for (int r = 0; r < size_; ++r) controller_.add(r, requests[r], responses, &indices[r]);
  for (const Response& resp : responses) {
    // join changes meaning with who joined; an error may be a disagreement: neither is cached.
    if (resp.kind == Response::Kind::kRun && resp.request.op != OpType::kJoin) {
      cache_.put(resp.request);
    }
  }
  return responses;
}

std::vector<Response> Negotiator::decide(const std::vector<RankMessage>& messages) {
  TORCH_CHECK(static_cast<int>(messages.size()) == size_, "gradfuse: negotiation got ",
              messages.size(), " messages for ", size_, " ranks (internal error)");
  // Inline inputs name their tensors by cache index: resolved before the cache changes.
  std::vector<Response> responses;
  const bool any_inline = std::any_of(messages.begin(), messages.end(),
                                      [](const RankMessage& m) { return !m.inline_data.empty(); });
  std::vector<std::unordered_map<std::string, InlineRecord>> by_name;
  if (any_inline) by_name = inline_inputs(messages);
  if (auto fast = decide_fast(messages)) {
    responses = std::move(*fast);
  } else {
    responses = decide_in_full(messages);
  }
  if (any_inline) attach_inline_inputs(by_name, responses);
  return responses;
}

}  // namespace gradfuse::engine
