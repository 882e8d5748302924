// The queue between the engine's two threads: the negotiating thread pushes fused batches in
// negotiated order (their entries already taken from the tensor queue); the executor thread
// pops them and runs their collectives in that order, so the data plane sees the same sequence
// on every rank while the next negotiation overlaps the running collective.
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <optional>
#include <vector>

#include "engine/fusion.h"

namespace gradfuse::engine {

class BatchQueue {
 public:
  // Queues a batch; false (and the batch is dropped) once closed.
  bool push(Batch batch);
  // Blocks until a batch is queued (returns it), `done` (may be null) turns true, or the queue
  // is closed with nothing left in it (both: nullopt). Batches queued before close() are
  // still returned.
  std::optional<Batch> pop(const std::atomic<bool>* done);
  // Wakes pop() to look at its `done` flag again (the in-flight collective ended). Any thread.
  void notify();
  // Blocks until the executor has taken every queued batch, or the queue is closed. The
  // negotiating thread waits here before a round, so it negotiates while the executor runs a
  // collective but does not run ahead of it: tensors submitted meanwhile then join the next
  // round's batches instead of fragmenting into many small collectives.
  void wait_until_taken();
  // No more batches: pop() returns the queued ones, then nullopt.
  void close();
  // Closes and drops the queued batches (the engine stopped; their handles already failed).
  void discard();

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Batch> batches_;
  bool closed_ = false;
};

}  // namespace gradfuse::engine
