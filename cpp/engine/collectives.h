// Runs one fused batch on a process group: pack into a fusion buffer, one collective, unpack
// into the outputs. Called only by the engine's executor thread, in negotiated order, so every
// rank issues the same collectives in the same order on the engine's own groups.
#pragma once

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <atomic>
#include <chrono>
#include <functional>
#include <optional>
#include <vector>

#include "engine/fusion.h"
#include "engine/hierarchical.h"

namespace gradfuse::engine {

// When a batch's collective started (packing done) and ended (unpacking starts), for the
// timeline.
struct BatchTimes {
  std::chrono::steady_clock::time_point packed;
  std::chrono::steady_clock::time_point reduced;
};

struct CollectiveContext {
  c10::intrusive_ptr<c10d::ProcessGroup> group;
  int rank = 0;
  int size = 1;
  BufferPool* buffers = nullptr;
  // Set when allreduce is hierarchical (init(hierarchical_allreduce=True)).
  HierarchyGroups hierarchy;
  BatchTimes* times = nullptr;  // optional; outlives the batch's finish()
  // Optional: run_batch adds 1 here when an allreduce ran in place (PreparedBatch::in_place).
  // The engine's stats counter, for batches run by run_batch (the CUDA path), which would
  // otherwise drop that fact; the CPU path counts from prepare_batch's result itself.
  std::atomic<int64_t>* in_place_count = nullptr;
};

// A batch in three steps, so the engine can overlap one batch's copies with another's
// collective while running one collective at a time (on a machine whose cores the ranks
// share, two collectives at once slow each other down more than the overlap gains):
// launch() starts the collective, wait() blocks until it is done (a second call does nothing),
// finish() waits, unpacks and returns the output tensor of each entry, in batch order.
// when_done(callback), after launch(): the collective's end (success or error) calls
// `callback` once, from any thread (at once when it already ended), so the engine's executor
// can wait for "a new batch or this one's end" without blocking in wait(); false when the
// transport cannot tell (then callback is never called).
struct PreparedBatch {
  std::function<void()> launch;
  std::function<void()> wait;
  std::function<std::vector<at::Tensor>()> finish;
  std::function<bool(std::function<void()>)> when_done;
  // An allreduce reduced in its tensors' own memory, with no fusion buffer: one lone tensor, or
  // in-place tensors lying back to back (in_place_span). False for everything else.
  bool in_place = false;
};

// Packs an allreduce batch into fusion buffer `slot` (0 or 1; the next batch must use the
// other, and a slot is reused only once its batch has been finished, i.e. unpacked) at the
// offsets fusion_offsets() gives, without starting its collective. Every other operation runs to completion here, with
// launch() and wait() doing nothing. Throws on transport errors.
PreparedBatch prepare_batch(const Batch& batch, const CollectiveContext& ctx, int slot);

// The whole batch, synchronously.
std::vector<at::Tensor> run_batch(const Batch& batch, const CollectiveContext& ctx);

}  // namespace gradfuse::engine
