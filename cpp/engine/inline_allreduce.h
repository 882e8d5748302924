// Inline allreduce: a small CPU allreduce travels with its negotiation. A rank whose request is
// a response-cache hit (so every rank knows its size) and alone in its message packs its input
// into its negotiation slot as it would into a fusion buffer (prescaled, in the wire dtype).
// When every rank sent its input in the round that decides the tensor, and that round runs
// nothing else, every rank reduces the inputs in rank order and completes the tensor with no
// data collective: one round trip instead of two (a metric, a loss, a lone small gradient).
// Otherwise it runs the usual way, fused with the round's other tensors, and the inputs sent
// are ignored. Every rank reads the same slots, so every rank takes the same way.
//
// Accepted (what the tests cover): allreduce with Sum or Average, a CPU tensor of at most
// kInlineMaxBytes in the wire dtype, any dtype the engine reduces, without sq_norm.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "engine/message.h"
#include "engine/tensor_queue.h"

namespace gradfuse::engine {

constexpr int64_t kInlineMaxBytes = 1024;

// Bytes of a request's packed input: its elements in the wire dtype (engine/fusion.h).
int64_t inline_input_bytes(const Request& request);

// This rank's packed input for `entry`, or nothing when it cannot go inline or takes more than
// `room` bytes.
std::optional<std::vector<uint8_t>> inline_input(const Entry& entry, size_t room);

// Reduces the response's inline inputs in rank order (floats in float64, integers in int64,
// wrapping as the wire dtype's collective would) and writes the result into the entry's output
// as the fusion path's unpack does (postscale, and Average's 1 / size). Returns the output.
at::Tensor reduce_inline(const Response& response, const Entry& entry, int size);

}  // namespace gradfuse::engine
