// The engine's control surface for cpp/python/module.cpp: plain types only (no tensors).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "engine/config.h"

namespace gradfuse::engine {

void start_engine(const EngineConfig& config);
void stop_engine();
bool engine_running();
// Starts (truncating `path`) / stops the running engine's timeline.
void start_timeline(const std::string& path);
void stop_timeline();
bool poll_handle(int64_t handle);
// Blocks until the handle is done; throws std::runtime_error with its error if it failed.
void wait_handle(int64_t handle);
// wait_handle for at most timeout_s: true once done, false when the time ran out first.
bool wait_handle_for(int64_t handle, double timeout_s);
// Releases a handle without its result (after its failure was raised). Unknown: no-op.
void forget_handle(int64_t handle);
// How many handles the table holds (tests: nothing leaks).
int64_t handle_count();
// {cycles, busy_cycles, tensors, collectives, bytes, negotiate_ns, stalled, cache_hits,
// cache_misses, in_place} of the running engine.
std::vector<int64_t> engine_stats();
// Requests enqueued between hold and release are negotiated together (TensorQueue::hold).
void hold_submissions();
void release_submissions();

}  // namespace gradfuse::engine
