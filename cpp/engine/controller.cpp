#include "engine/controller.h"

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include <sstream>

namespace gradfuse::engine {

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

}  // namespace

void Controller::add(int rank, const std::vector<Request>& requests, std::vector<Response>& out) {
  for (const Request& r : requests) {
    auto& per_rank = table_[r.name];
    if (per_rank.empty()) per_rank.resize(size_);
    // The enqueue side rejects a name already in flight, so a rank never sends one twice.
    TORCH_CHECK(!per_rank[rank].has_value(), "gradfuse: rank ", rank, " sent '", r.name, "' twice");
    per_rank[rank] = r;
    if (r.op == OpType::kJoin) {
      joined_[rank] = true;
      last_joined_ = rank;
      emit_ready_after_join(out);
    } else if (ready(per_rank)) {
      out.push_back(decide(r.name, per_rank));
      table_.erase(r.name);
    }
  }
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
    if (!ready(it->second)) {
      ++it;
    } else if (is_join(it->second)) {
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

Response Controller::decide(const std::string& name,
                            const std::vector<std::optional<Request>>& per_rank) {
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
        << op_name(resp.request.op) << ") across ranks: ";
    for (size_t g = 0; g < groups.size(); ++g) {
      msg << (g ? "; " : "") << groups[g].first << " on rank"
          << (groups[g].second.size() > 1 ? "s " : " ");
      for (size_t i = 0; i < groups[g].second.size(); ++i)
        msg << (i ? ", " : "") << groups[g].second[i];
    }
    resp.kind = Response::Kind::kError;
    resp.error = msg.str();
    return resp;
  }
  if (resp.request.op == OpType::kBroadcast &&
      (resp.request.root < 0 || resp.request.root >= size_)) {
    resp.kind = Response::Kind::kError;
    resp.error = "gradfuse: broadcast root " + std::to_string(resp.request.root) + " for tensor '" +
                 name + "' is not a rank (size " + std::to_string(size_) + ")";
    return resp;
  }
  if (!resp.joined.empty()) {
    // Joined ranks contribute zeros to a sum (Horovod's join) and no rows to an allgather;
    // anything else would need data they do not have.
    const bool sum_like =
        op == OpType::kAllreduce &&
        (resp.request.reduce_op == ReduceOp::kSum || resp.request.reduce_op == ReduceOp::kAverage);
    if (!sum_like && op != OpType::kAllgather && op != OpType::kJoin) {
      std::ostringstream msg;
      msg << "gradfuse: " << op_name(op);
      if (op == OpType::kAllreduce) msg << " (" << reduce_op_name(resp.request.reduce_op) << ")";
      msg << " of '" << name << "' cannot run while rank";
      msg << (resp.joined.size() > 1 ? "s " : " ");
      for (size_t i = 0; i < resp.joined.size(); ++i) msg << (i ? ", " : "") << resp.joined[i];
      msg << (resp.joined.size() > 1 ? " have" : " has")
          << " joined; only allreduce (Sum, Average) and allgather go on after join()";
      resp.kind = Response::Kind::kError;
      resp.error = msg.str();
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
    for (int r = 0; r < size_; ++r) {
      const auto& shape = per_rank[r] ? per_rank[r]->shape : std::vector<int64_t>{0};
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
