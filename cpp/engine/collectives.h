// Runs one fused batch on a process group: pack into a fusion buffer, one collective, unpack
// into the outputs. Called only by the background thread, in negotiated order, so every rank
// issues the same collectives in the same order on the engine's own groups.
#pragma once

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <vector>

#include "engine/fusion.h"

namespace gradfuse::engine {

struct CollectiveContext {
  c10::intrusive_ptr<c10d::ProcessGroup> group;
  int rank = 0;
  int size = 1;
  BufferPool* buffers = nullptr;
};

// Returns the output tensor of each entry, in batch order. Throws on transport errors.
std::vector<at::Tensor> run_batch(const Batch& batch, const CollectiveContext& ctx);

}  // namespace gradfuse::engine
