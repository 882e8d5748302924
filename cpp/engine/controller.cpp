#include "engine/controller.h"

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include <sstream>

namespace gradfuse::engine {

std::string rank_list(const std::vector<int>& ranks) {
  std::ostringstream s;
  s << "rank" << (ranks.size() > 1 ? "s " : " ");
  for (size_t i = 0; i < ranks.size(); ++i) s << (i ? ", " : "") << ranks[i];
  return s.str();
}

namespace {

std::string shape_str(const std::vector<int64_t>& shape) {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << "]";
  return s.str();
}

std::string device_type_str(const Request& r) {
  return c10::DeviceTypeName(static_cast<c10::DeviceType>(r.device_type), /*lower_case=*/true);
}

// One attribute that must agree across ranks: its name and how to print a rank's value.
struct Attribute {
  const char* what;
  std::string (*value)(const Request&, bool allgather);
};

const Attribute kAttributes[] = {
    {"operation", [](const Request& r, bool) { return std::string(op_name(r.op)); }},
    {"number of dimensions", [](const Request& r, bool) { return std::to_string(r.shape.size()); }},
    // allgather lets dim 0 differ per rank; every other dim must agree.
    {"shape",
     [](const Request& r, bool allgather) {
       if (!allgather || r.shape.empty()) return shape_str(r.shape);
       std::vector<int64_t> rest(r.shape.begin() + 1, r.shape.end());
       return "[*, " + shape_str(rest).substr(1);
     }},
    {"dtype", [](const Request& r, bool) { return std::string(c10::toString(r.dtype)); }},
    // The type only: each rank runs on its own device (cuda:0 on rank 0, cuda:1 on rank 1).
    {"device type", [](const Request& r, bool) { return device_type_str(r); }},
    {"reduce op",
     [](const Request& r, bool) {
       const bool reduces = r.op == OpType::kAllreduce || r.op == OpType::kReducescatter;
       return reduces ? std::string(reduce_op_name(r.reduce_op)) : "-";
     }},
    {"broadcast root",
     [](const Request& r, bool) {
       return r.op == OpType::kBroadcast ? std::to_string(r.root) : "-";
     }},
};

// Why `request` cannot run while `joined` ranks wait in join(), or "" when it can. As in
// Horovod, a joined rank takes part in allreduce with zeros (Average still divides by the full
// size) and in barrier; allgather, broadcast, alltoall and reducescatter would need data it
// does not have, and Min / Max / Product would take its zeros for values (Horovod lets those
// run; here they fail). The controller decides this, so every rank raises the same error.
std::string joined_error(const std::string& name, const Request& request,
                         const std::vector<int>& joined) {
  const OpType op = request.op;
  const bool sum_like = request.reduce_op == ReduceOp::kSum ||
                        request.reduce_op == ReduceOp::kAverage;
  if ((op == OpType::kAllreduce && sum_like) || op == OpType::kBarrier || op == OpType::kJoin) {
    return "";
  }
  std::ostringstream msg;
  msg << "gradfuse: " << op_name(op);
  if (op == OpType::kAllreduce) msg << " (" << reduce_op_name(request.reduce_op) << ")";
  msg << " of '" << name << "' cannot run while " << rank_list(joined)
      << (joined.size() > 1 ? " have" : " has")
      << " joined; only allreduce (Sum, Average) and barrier go on after join()";
  if (op == OpType::kAllgather) {
    msg << " (DistributedOptimizer's top-k compression allgathers: use another compression "
           "with join())";
  }
  return msg.str();
}

}  // namespace

void Controller::add(int rank, const std::vector<Request>& requests, std::vector<Response>& out,
                     const std::vector<int64_t>* cache_indices) {
  for (size_t i = 0; i < requests.size(); ++i) {
    const Request& r = requests[i];
    Pending& pending = table_[r.name];
    if (pending.per_rank.empty()) {
      pending.per_rank.resize(size_);
      pending.cache_index.assign(size_, -1);
      pending.arrival = next_arrival_++;
    }
    auto& per_rank = pending.per_rank;
    // The enqueue side rejects a name already in flight, so a rank never sends one twice.
    TORCH_CHECK(!per_rank[rank].has_value(), "gradfuse: rank ", rank, " sent '", r.name, "' twice");
    per_rank[rank] = r;
    if (cache_indices) pending.cache_index[rank] = (*cache_indices)[i];
    if (r.op == OpType::kJoin) {
      joined_[rank] = true;
      last_joined_ = rank;
      emit_ready_after_join(out);
    } else if (ready(per_rank)) {
      out.push_back(decide(r.name, pending));
      table_.erase(r.name);
    }
  }
}

Response Controller::run_cached(const Request& request) const {
  Response resp;
  resp.name = request.name;
  resp.request = request;
  if (request.op == OpType::kAllgather) {
    resp.first_dims.assign(size_, request.shape.empty() ? 1 : request.shape[0]);
  } else if (request.op == OpType::kAlltoall) {
    for (int r = 0; r < size_; ++r) {
      resp.all_splits.insert(resp.all_splits.end(), request.splits.begin(), request.splits.end());
    }
  }
  return resp;
}

bool Controller::ready(const std::vector<std::optional<Request>>& per_rank) const {
  for (int r = 0; r < size_; ++r) {
    if (!per_rank[r].has_value() && !joined_[r]) return false;
  }
  return true;
}

namespace {
bool is_join(const std::vector<std::optional<Request>>& per_rank) {
  for (const auto& q : per_rank) {
    if (q.has_value()) return q->op == OpType::kJoin;
  }
  return false;
}
}  // namespace

void Controller::emit_ready_after_join(std::vector<Response>& out) {
  // Names that only waited for the rank that just joined are ready now. Scanned in name order
  // (the same on every rank); the join itself goes last, since completing it forgets who joined.
  std::optional<std::string> join_name;
  for (auto it = table_.begin(); it != table_.end();) {
    if (!ready(it->second.per_rank)) {
      ++it;
    } else if (is_join(it->second.per_rank)) {
      join_name = (it++)->first;
    } else {
      out.push_back(decide(it->first, it->second));
      it = table_.erase(it);
    }
  }
  if (join_name) {
    out.push_back(decide(*join_name, table_[*join_name]));
    table_.erase(*join_name);
  }
}

bool Controller::same_cache_reference(const Pending& pending,
                                      const std::vector<int>& present) const {
  // A reference names one cached request, and a pending name's entry cannot change before it
  // runs (only names that ran are put), so equal references mean equal requests.
  const int64_t first = pending.cache_index[present[0]];
  if (first < 0) return false;
  for (int r : present) {
    if (pending.cache_index[r] != first) return false;
  }
  return true;
}

std::string Controller::mismatch(const std::string& name, const Pending& pending,
                                 const std::vector<int>& present) const {
  const auto& per_rank = pending.per_rank;
  const OpType op = per_rank[present[0]]->op;
  // allgather and alltoall let dim 0 differ per rank.
  const bool allgather = op == OpType::kAllgather || op == OpType::kAlltoall;
  // The first attribute that differs is reported, with every rank's value grouped, e.g.
  // "shape: [2, 3] on ranks 0, 2; [4] on rank 1".
  for (const Attribute& attr : kAttributes) {
    std::vector<std::pair<std::string, std::vector<int>>> groups;
    for (int r : present) {
      const std::string v = attr.value(*per_rank[r], allgather);
      auto it = std::find_if(groups.begin(), groups.end(), [&](auto& g) { return g.first == v; });
      if (it == groups.end()) {
        groups.push_back({v, {r}});
      } else {
        it->second.push_back(r);
      }
    }
    if (groups.size() == 1) continue;
    std::ostringstream msg;
    msg << "gradfuse: mismatched " << attr.what << " for tensor '" << name << "' ("
        << op_name(op) << ") across ranks: ";
    for (size_t g = 0; g < groups.size(); ++g) {
      msg << (g ? "; " : "") << groups[g].first << " on rank"
          << (groups[g].second.size() > 1 ? "s " : " ");
      for (size_t i = 0; i < groups[g].second.size(); ++i)
        msg << (i ? ", " : "") << groups[g].second[i];
    }
    return msg.str();
  }
  return "";
}

Response Controller::decide(const std::string& name, const Pending& pending) {
  const auto& per_rank = pending.per_rank;
  Response resp;
  resp.name = name;
  // Joined ranks sent nothing for this name: compare the ranks that did.
  std::vector<int> present;
  for (int r = 0; r < size_; ++r) {
    if (per_rank[r].has_value()) {
      present.push_back(r);
    } else {
      resp.joined.push_back(r);
    }
  }
  resp.request = *per_rank[present[0]];
  const OpType op = resp.request.op;
  if (!same_cache_reference(pending, present)) {
    resp.error = mismatch(name, pending, present);
    if (!resp.error.empty()) {
      resp.kind = Response::Kind::kError;
      return resp;
    }
  }
  if (resp.request.op == OpType::kBroadcast &&
      (resp.request.root < 0 || resp.request.root >= size_)) {
    resp.kind = Response::Kind::kError;
    resp.error = "gradfuse: broadcast root " + std::to_string(resp.request.root) + " for tensor '" +
                 name + "' is not a rank (size " + std::to_string(size_) + ")";
    return resp;
  }
  if (!resp.joined.empty()) {
    const std::string why = joined_error(name, resp.request, resp.joined);
    if (!why.empty()) {
      resp.kind = Response::Kind::kError;
      resp.error = why;
      return resp;
    }
  }
  if (op == OpType::kJoin) {
    // Every rank has joined: the join completes everywhere with the rank that joined last.
    resp.request.root = last_joined_;
    std::fill(joined_.begin(), joined_.end(), false);
    last_joined_ = -1;
    return resp;
  }
  if (op == OpType::kAllgather) {
    for (int r = 0; r < size_; ++r) {  // (no rank has joined: joined_error)
      const auto& shape = per_rank[r]->shape;
      resp.first_dims.push_back(shape.empty() ? 1 : shape[0]);
    }
  }
  if (op == OpType::kAlltoall) {
    for (int r = 0; r < size_; ++r) {
      const auto& splits = per_rank[r]->splits;
      if (static_cast<int>(splits.size()) != size_) {
        resp.kind = Response::Kind::kError;
        resp.error = "gradfuse: alltoall of '" + name + "': rank " + std::to_string(r) + " sent " +
                     std::to_string(splits.size()) + " splits for " + std::to_string(size_) +
                     " ranks";
        return resp;
      }
      resp.all_splits.insert(resp.all_splits.end(), splits.begin(), splits.end());
    }
  }
  return resp;
}

}  // namespace gradfuse::engine
