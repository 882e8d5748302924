// Negotiation logic: which named tensors are ready on every rank, and do the ranks agree on
// what they are? Pure bookkeeping (no communication): every rank feeds the same all-gathered
// requests in the same order into its own Controller, so every rank computes the same
// responses in the same order without a second round trip.
#pragma once

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "engine/message.h"

namespace gradfuse::engine {

// "rank 3" / "ranks 0, 2": how errors and reports list ranks.
std::string rank_list(const std::vector<int>& ranks);

class Controller {
 public:
  explicit Controller(int size) : size_(size), joined_(size, false) {}

  // Records `requests` sent by `rank` this cycle. A name that is now ready on every rank
  // becomes a response (kRun, or kError when the ranks disagree), appended to `out` in the
  // order the names completed.
  // `cache_indices[i]` (when given) is the response-cache reference requests[i] came as, or -1:
  // a name every rank sent as the same reference is equal everywhere in every attribute, so it
  // runs without comparing them (attributes are compared only on a cache miss).
  void add(int rank, const std::vector<Request>& requests, std::vector<Response>& out,
           const std::vector<int64_t>* cache_indices = nullptr);

  // True when no name is pending and no rank has joined: a round in which every rank sent the
  // same cached requests may then skip add() and run them with run_cached().
  bool settled() const { return table_.empty(); }
  // The response for a cached request every rank sent as the same reference this round, while
  // settled(): it ran before, so it is valid, and every rank's copy equals it.
  Response run_cached(const Request& request) const;

  // A name some rank has submitted that is not yet ready everywhere.
  struct Pending {
    uint64_t arrival = 0;  // order of first submission, the same on every rank
    std::vector<std::optional<Request>> per_rank;  // empty where not submitted yet
    std::vector<int64_t> cache_index;  // per rank: the reference it came as, or -1
  };
  // Names some rank has submitted that are not yet ready everywhere (for shutdown messages).
  size_t pending() const { return table_.size(); }
  const std::map<std::string, Pending>& pending_table() const { return table_; }
  // Forgets a pending name (the stall inspector gave up on it).
  void drop(const std::string& name) { table_.erase(name); }

 private:
  Response decide(const std::string& name, const Pending& pending);
  // The first attribute the present ranks disagree on, as the error every rank raises; "" when
  // they agree.
  std::string mismatch(const std::string& name, const Pending& pending,
                       const std::vector<int>& present) const;
  // Whether every present rank sent the name as the same cache reference.
  bool same_cache_reference(const Pending& pending, const std::vector<int>& present) const;
  // join (engine/join.h): a name is ready once every rank that has not joined submitted it.
  bool ready(const std::vector<std::optional<Request>>& per_rank) const;
  void emit_ready_after_join(std::vector<Response>& out);

  int size_;
  std::vector<bool> joined_;  // ranks that called join() and wait for the others
  int last_joined_ = -1;
  std::map<std::string, Pending> table_;
  uint64_t next_arrival_ = 0;
};

}  // namespace gradfuse::engine
