// The engine's control surface for cpp/python/module.cpp: plain types only (no tensors).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "engine/config.h"

namespace gradfuse::engine {

// One engine per process set (config.process_set_id; 0: the global set). stop_engine() stops
// them all; stop_process_set_engine() one process set's (never the global one's).
void start_engine(const EngineConfig& config);
void stop_engine();
void stop_process_set_engine(int process_set_id);
// Whether the global set's engine runs.
bool engine_running();
// Starts (truncating `path`) / stops the global set engine's timeline.
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
// cache_misses, in_place} of that process set's engine.
std::vector<int64_t> engine_stats(int process_set_id = 0);
// Asks that process set's engine for a new fusion threshold and cycle time, in force from the
// first negotiation cycle in which every rank has asked as often (engine/settings.h); returns
// the request's generation. ValueError (naming the argument) for a bad value.
int64_t request_settings(int process_set_id, int64_t fusion_threshold_bytes,
                         double cycle_time_ms);
struct AgreedSettings {
  int64_t generation;  // the last request every rank made (0: the settings of init())
  int64_t fusion_threshold_bytes;
  double cycle_time_ms;
  int64_t since_cycle;           // the negotiation cycle that switched to them (0: start)
  int64_t requested_generation;  // this rank's last request
};
AgreedSettings agreed_settings(int process_set_id);
// Requests enqueued between hold and release (in every engine) are negotiated together
// (TensorQueue::hold).
void hold_submissions();
void release_submissions();

}  // namespace gradfuse::engine
