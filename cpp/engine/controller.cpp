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

std::string device_str(const Request& r) {
  return c10::Device(static_cast<c10::DeviceType>(r.device_type), r.device_index).str();
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
    {"device", [](const Request& r, bool) { return device_str(r); }},
    {"reduce op",
     [](const Request& r, bool) {
       return r.op == OpType::kAllreduce ? std::string(reduce_op_name(r.reduce_op)) : "-";
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
    bool ready = true;
    for (const auto& q : per_rank) ready = ready && q.has_value();
    if (ready) {
      out.push_back(decide(r.name, per_rank));
      table_.erase(r.name);
    }
  }
}

Response Controller::decide(const std::string& name,
                            const std::vector<std::optional<Request>>& per_rank) {
  Response resp;
  resp.name = name;
  resp.request = *per_rank[0];
  const bool allgather = resp.request.op == OpType::kAllgather;
  // The first attribute that differs is reported, with every rank's value grouped, e.g.
  // "shape: [2, 3] on ranks 0, 2; [4] on rank 1".
  for (const Attribute& attr : kAttributes) {
    std::vector<std::pair<std::string, std::vector<int>>> groups;
    for (int r = 0; r < size_; ++r) {
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
  if (allgather) {
    for (int r = 0; r < size_; ++r) {
      const auto& shape = per_rank[r]->shape;
      resp.first_dims.push_back(shape.empty() ? 1 : shape[0]);
    }
  }
  return resp;
}

}  // namespace gradfuse::engine
