#include "engine/stall_inspector.h"

#include <algorithm>
#include <iostream>

namespace gradfuse::engine {

namespace {

struct Presence {
  std::vector<int> ready, missing;
};

Presence presence(const Controller::Pending& pending) {
  Presence p;
  for (size_t r = 0; r < pending.per_rank.size(); ++r) {
    (pending.per_rank[r] ? p.ready : p.missing).push_back(static_cast<int>(r));
  }
  return p;
}

// A join waits, legitimately, as long as the other ranks have data; failing it would leave the
// controller counting its ranks as joined after their join() raised. It is only reported.
bool is_join(const Controller::Pending& pending) {
  for (const auto& request : pending.per_rank) {
    if (request) return request->op == OpType::kJoin;
  }
  return false;
}

Response error_response(const std::string& name, const Controller::Pending& pending,
                        const Presence& p, std::string error) {
  Response resp;
  resp.kind = Response::Kind::kError;
  resp.name = name;
  resp.request = *pending.per_rank[p.ready.front()];
  resp.error = std::move(error);
  return resp;
}

}  // namespace

std::string StallInspector::submitted_by(const Controller::Pending& pending) const {
  Presence p = presence(pending);
  for (auto* ranks : {&p.ready, &p.missing}) {
    if (global_ranks_.empty()) break;
    for (int& r : *ranks) r = global_ranks_[r];
  }
  return "submitted by " + rank_list(p.ready) + ", missing on " + rank_list(p.missing);
}

std::string StallInspector::tensor(const std::string& name) const {
  std::string out = "tensor '" + name + "'";
  if (process_set_id_ > 0) out += " (process set " + std::to_string(process_set_id_) + ")";
  return out;
}

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
  for (const auto& [name, pending] : table) {
    const int64_t first = first_seen_ms_.try_emplace(name, now_ms).first->second;
    const int64_t age = now_ms - first;
    if (age < warning_ms_ && (shutdown_ms_ == 0 || age < shutdown_ms_)) continue;
    const Presence p = presence(pending);
    std::ostringstream what;
    what << tensor(name) << " waited " << age / 1000.0 << " s: " << submitted_by(pending);
    if (shutdown_ms_ > 0 && age >= shutdown_ms_ && !is_join(pending)) {
      out.push_back(error_response(name, pending, p,
                                   "gradfuse: stall: " + what.str() + " (stall_shutdown_s=" +
                                       std::to_string(shutdown_ms_ / 1000.0) +
                                       "); giving up on it"));
      given_up.push_back(name);
      continue;
    }
    auto warned = warned_ms_.find(name);
    if (warned != warned_ms_.end() && now_ms - warned->second < warning_ms_) continue;
    warned_ms_[name] = now_ms;
    log << "gradfuse[rank " << reporting_rank() << "]: stall warning: " << what.str() << "\n";
  }
  // Dropped before the limit is checked, so no name fails twice.
  for (const std::string& name : given_up) controller.drop(name);
  for (std::string& name : fail_over_limit(controller, out, log)) {
    controller.drop(name);
    given_up.push_back(std::move(name));
  }
  for (const std::string& name : given_up) {
    first_seen_ms_.erase(name);
    warned_ms_.erase(name);
  }
  // One write for the whole report, so lines from several ranks do not interleave mid-line.
  const std::string text = log.str();
  if (!text.empty()) std::cerr << text << std::flush;
}

std::vector<std::string> StallInspector::fail_over_limit(const Controller& controller,
                                                         std::vector<Response>& out,
                                                         std::ostringstream& log) {
  const auto& table = controller.pending_table();
  const auto limit = static_cast<size_t>(pending_limit_);
  if (pending_limit_ <= 0 || table.size() <= limit) return {};
  // The newest names go: those that took the table past the limit (never the join).
  using Item = std::pair<const std::string, Controller::Pending>;
  std::vector<const Item*> newest;
  for (const Item& item : table) {
    if (!is_join(item.second)) newest.push_back(&item);
  }
  const size_t excess = std::min(table.size() - limit, newest.size());
  std::sort(newest.begin(), newest.end(),
            [](const Item* a, const Item* b) { return a->second.arrival > b->second.arrival; });
  newest.resize(excess);
  std::reverse(newest.begin(), newest.end());  // in submission order
  std::ostringstream what;
  what << table.size() << " tensors were submitted by some ranks and not yet by all, more than "
       << "pending_names_limit=" << pending_limit_ << " (GRADFUSE_PENDING_NAMES_LIMIT); the "
       << excess << " newest fail";
  log << "gradfuse[rank " << reporting_rank() << "]: " << what.str() << ":";
  std::vector<std::string> failed;
  for (const Item* item : newest) {
    const Presence p = presence(item->second);
    out.push_back(error_response(item->first, item->second, p,
                                 "gradfuse: " + what.str() + ", among them " + tensor(item->first) +
                                     " (" + submitted_by(item->second) + ")"));
    if (failed.size() < 8)
      log << " " << tensor(item->first) << " (" << submitted_by(item->second) << ")";
    failed.push_back(item->first);
  }
  if (failed.size() > 8) log << " and " << failed.size() - 8 << " more";
  log << "\n";
  return failed;
}

}  // namespace gradfuse::engine
