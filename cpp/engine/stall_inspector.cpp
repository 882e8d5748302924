#include "engine/stall_inspector.h"

#include <iostream>
#include <sstream>

namespace gradfuse::engine {

namespace {

// A join waits, legitimately, as long as the other ranks have data; failing it would leave the
// controller counting its ranks as joined after their join() raised. It is only reported.
bool is_join(const std::vector<std::optional<Request>>& per_rank) {
  for (const auto& request : per_rank) {
    if (request) return request->op == OpType::kJoin;
  }
  return false;
}

}  // namespace

void StallInspector::check(Controller& controller, int64_t now_ms, std::vector<Response>& out) {
  const auto& table = controller.pending_table();
  // Forget names that completed (or failed) since the last cycle.
  for (auto it = first_seen_ms_.begin(); it != first_seen_ms_.end();) {
    if (table.count(it->first)) {
      ++it;
    } else {
      warned_ms_.erase(it->first);
      it = first_seen_ms_.erase(it);
    }
  }
  std::vector<std::string> given_up;
  std::ostringstream log;
  for (const auto& [name, per_rank] : table) {
    const int64_t first = first_seen_ms_.try_emplace(name, now_ms).first->second;
    const int64_t age = now_ms - first;
    if (age < warning_ms_ && (shutdown_ms_ == 0 || age < shutdown_ms_)) continue;
    std::vector<int> missing, ready;
    for (size_t r = 0; r < per_rank.size(); ++r) {
      (per_rank[r] ? ready : missing).push_back(static_cast<int>(r));
    }
    std::ostringstream what;
    what << "tensor '" << name << "' waited " << age / 1000.0 << " s: submitted by "
         << rank_list(ready) << ", missing on " << rank_list(missing);
    if (shutdown_ms_ > 0 && age >= shutdown_ms_ && !is_join(per_rank)) {
      Response resp;
      resp.kind = Response::Kind::kError;
      resp.name = name;
      resp.request = *per_rank[ready.front()];
      resp.error = "gradfuse: stall: " + what.str() +
                   " (stall_shutdown_s=" + std::to_string(shutdown_ms_ / 1000.0) +
                   "); giving up on it";
      out.push_back(std::move(resp));
      given_up.push_back(name);
      continue;
    }
    auto warned = warned_ms_.find(name);
    if (warned != warned_ms_.end() && now_ms - warned->second < warning_ms_) continue;
    warned_ms_[name] = now_ms;
    log << "gradfuse[rank " << rank_ << "]: stall warning: " << what.str() << "\n";
  }
  for (const std::string& name : given_up) {
    controller.drop(name);
    first_seen_ms_.erase(name);
    warned_ms_.erase(name);
  }
  // One write for the whole report, so lines from several ranks do not interleave mid-line.
  const std::string text = log.str();
  if (!text.empty()) std::cerr << text << std::flush;
}

}  // namespace gradfuse::engine
