// Runs one fused batch on a process group: pack into a fusion buffer, one collective, unpack
// into the outputs. Called only by the background thread, in negotiated order, so every rank
// issues the same collectives in the same order on the engine's own groups.
#pragma once

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <chrono>
#include <functional>
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
};

// A batch whose collective may still be running. finish() waits for it, unpacks and returns
// the output tensor of each entry, in batch order.
struct StartedBatch {
  std::function<std::vector<at::Tensor>()> finish;
};

// Packs the batch and starts its collective. Allreduce returns before the collective ends, so
// the engine can pack the next batch meanwhile (its fusion buffer is `slot` 0 or 1; the next
// batch must use the other). Allgather and broadcast run to completion here. Throws on
// transport errors.
StartedBatch start_batch(const Batch& batch, const CollectiveContext& ctx, int slot);

// start_batch(...).finish(): the whole batch, synchronously.
std::vector<at::Tensor> run_batch(const Batch& batch, const CollectiveContext& ctx);

}  // namespace gradfuse::engine
