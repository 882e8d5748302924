// join(): a rank out of data calls join() and waits; the other ranks' allreduces (Sum, Average)
// go on with it contributing zeros (Horovod's semantics: Average still divides by the full
// size), and their barriers go on without it. The controller treats a joined rank as having
// submitted every name, and fails on every rank what a joined rank cannot take part in
// (engine/controller.cpp, joined_error); on that rank the engine runs the collective on a
// placeholder.
#pragma once

#include "engine/message.h"
#include "engine/tensor_queue.h"

namespace gradfuse::engine {

// The entry a joined rank runs for a negotiated response it never submitted: zeros of the
// agreed shape on `device`, this rank's own device of the agreed type
// (engine/devices.h), handle 0 (nobody waits on it). Allocated on the current stream.
Entry joined_placeholder(const Response& response, c10::Device device);

// True when `rank` is one of the response's joined ranks.
bool joined_in(const Response& response, int rank);

}  // namespace gradfuse::engine
