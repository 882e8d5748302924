// Stall inspector: names the ranks that hold up a tensor. The controller sees every rank's
// requests, so a name pending for a long time is one that some ranks submitted and others did
// not (a rank stuck elsewhere, or code that skips a collective on some ranks). After
// `warning_s` every rank logs which ranks are missing which tensors; after `shutdown_s` (when
// > 0) the tensor fails on the ranks that submitted it instead of waiting forever (a join is
// only reported: it waits for the ranks that still have data, however long they take).
//
// It also bounds the controller's table of such names: a rank that keeps submitting names the
// others never submit would otherwise grow it (and every rank's memory) without end. Past
// `pending_limit` names (when > 0), the newest ones fail on the ranks that submitted them, and
// every rank logs which names and ranks they were.
#pragma once

#include <cstdint>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include "engine/controller.h"

namespace gradfuse::engine {

class StallInspector {
 public:
  // `global_ranks` (empty: the identity) maps the engine's ranks to the global ranks that
  // reports name; `process_set_id` > 0 says which process set the tensor is in.
  StallInspector(int rank, double warning_s, double shutdown_s, int64_t pending_limit,
                 std::vector<int> global_ranks = {}, int process_set_id = 0)
      : rank_(rank),
        warning_ms_(static_cast<int64_t>(warning_s * 1000)),
        shutdown_ms_(static_cast<int64_t>(shutdown_s * 1000)),
        pending_limit_(pending_limit),
        global_ranks_(std::move(global_ranks)),
        process_set_id_(process_set_id) {}

  // Once per cycle, after the controller has seen every rank's requests. `now_ms` is rank 0's
  // clock, carried in the negotiation, so every rank ages names identically and gives up on
  // the same ones in the same cycle (the ranks must agree on what runs). Names given up on
  // leave the controller and become error responses appended to `out`.
  void check(Controller& controller, int64_t now_ms, std::vector<Response>& out);

 private:
  // "submitted by rank 0, missing on ranks 1, 2" for one pending name, in global ranks.
  std::string submitted_by(const Controller::Pending& pending) const;
  // "tensor 'x'" or "tensor 'x' (process set 2)".
  std::string tensor(const std::string& name) const;
  // This rank, as reports name it (its global rank).
  int reporting_rank() const { return global_ranks_.empty() ? rank_ : global_ranks_[rank_]; }
  // Fails the newest names past pending_limit_; returns them.
  std::vector<std::string> fail_over_limit(const Controller& controller, std::vector<Response>& out,
                                           std::ostringstream& log);

  int rank_;
  int64_t warning_ms_;
  int64_t shutdown_ms_;
  int64_t pending_limit_;
  std::vector<int> global_ranks_;
  int process_set_id_;
  std::unordered_map<std::string, int64_t> first_seen_ms_;
  std::unordered_map<std::string, int64_t> warned_ms_;  // last warning per name
};

}  // namespace gradfuse::engine
