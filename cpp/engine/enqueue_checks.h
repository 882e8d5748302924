// What Engine::enqueue checks before a tensor joins the queue: every argument, on the calling
// thread, so a bad call raises a ValueError naming the argument at once, on its own rank, and
// never reaches the other ranks. (Disagreements between ranks are the controller's to find.)
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <vector>

#include "engine/message.h"

namespace gradfuse::engine {

struct EnqueueArgs {
  std::string name;
  OpType op;
  at::Tensor tensor;
  std::optional<at::Tensor> output;
  int root = 0;
  ReduceOp reduce_op = ReduceOp::kSum;
  double prescale = 1.0;
  double postscale = 1.0;
  std::vector<int64_t> splits;  // alltoall: rows sent to each rank (empty: even split)
  // Float allreduce only: a one-element float64 tensor on the output's device that receives the
  // reduced tensor's sum of squares, taken as it is unpacked (LARS's one-pass step).
  std::optional<at::Tensor> sq_norm;
};

// Checks `a` for a job of `size` ranks (c10::ValueError naming the bad argument). Returns the
// splits to send: alltoall's, or its even split when none were given; empty for the others.
// The device is checked separately (engine/devices.h): it depends on the engine's groups.
std::vector<int64_t> check_enqueue(const EnqueueArgs& a, int size);

}  // namespace gradfuse::engine
