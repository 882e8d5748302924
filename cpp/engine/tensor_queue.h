// The queue between the caller's thread (enqueue) and the background thread: entries in
// flight by name, and the requests not yet announced to the other ranks.
#pragma once

#include <ATen/core/Tensor.h>

#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "engine/message.h"

namespace gradfuse::engine {

struct Entry {
  int64_t handle = 0;
  Request request;
  at::Tensor tensor;  // the input, contiguous
  at::Tensor output;  // allreduce / broadcast destination (may alias tensor); allgather: none
  double prescale = 1.0;
  double postscale = 1.0;
  at::Tensor sq_norm;  // allreduce, optional: receives the result's sum of squares (float64)
  std::chrono::steady_clock::time_point enqueued = std::chrono::steady_clock::now();  // timeline
  // CUDA only: makes the engine's stream wait until the caller's stream produced `tensor`.
  std::function<void()> wait_for_producer;
};

// A name is in use from push() until its handle finishes (HandleTable::finished: completed,
// with any device work done, or failed), as in Horovod, whose handle is done only when the
// operation is: a second tensor of that name meanwhile would pair with the first one's
// collective on a rank where negotiation was quick and with its own on a slow one.
class TensorQueue {
 public:
  // Adds an entry and wakes the background thread. A name still in use is a c10::ValueError
  // (Python ValueError) raised here, on the calling rank only.
  void push(Entry entry);

  // Background thread: sleeps until a new entry arrives, wake() is called or `deadline`.
  void wait_for_work(std::chrono::steady_clock::time_point deadline);
  void wake();

  // Requests pushed since the last call, in push order; none while held.
  std::vector<Request> take_new_requests();
  // Between hold() and release(), pushed requests wait, so a group of tensors submitted one by
  // one reaches the other ranks in one message (one negotiation, one fused collective) rather
  // than split across cycles by the background thread waking at the first push. Holds nest.
  void hold();
  void release();
  // The in-flight entry called `name` (negotiated: it leaves the queue; its name stays in use
  // until its handle finishes).
  Entry take(const std::string& name);
  // take(), or nothing when this rank does not hold `name`: it joined (engine/join.h), or
  // never sent a tensor the stall inspector gave up on.
  std::optional<Entry> try_take(const std::string& name);
  // Calls fn on the in-flight entry called `name`, under the queue's lock (fn must not call
  // the queue); false when there is none. Negotiation reads a small input to send it inline.
  bool visit(const std::string& name, const std::function<void(const Entry&)>& fn);
  // Whether any entry was pushed and not yet taken (submitted, not yet sent in a negotiation).
  bool has_unsent();
  // Every entry still in flight, and closes the queue: a later push() raises a RuntimeError
  // with `reason` (shutdown / fatal error), so nothing waits on a thread that is gone.
  std::vector<Entry> close(const std::string& reason);

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool woken_ = false;
  int holds_ = 0;
  std::string closed_reason_;  // non-empty once closed
  // The entry leaves in_flight_; its name moves to running_.
  Entry take_locked(std::unordered_map<std::string, Entry>::iterator it);
  // Whether `name` is submitted or running; forgets it when its handle has finished.
  bool in_use_locked(const std::string& name);

  std::vector<Request> new_requests_;
  std::unordered_map<std::string, Entry> in_flight_;
  // Negotiated names -> their handles, until seen finished. Swept whenever it doubles, so it
  // stays within twice the number of names really running (CUDA work in flight).
  std::unordered_map<std::string, int64_t> running_;
  size_t sweep_at_ = 64;
};

}  // namespace gradfuse::engine
