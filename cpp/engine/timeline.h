// Timeline: a Chrome-trace JSON file (chrome://tracing, Perfetto) of what the engine did to
// each tensor: negotiate (submitted -> ready on every rank), queue (-> its batch starts), pack,
// collective, unpack, as complete ("X") events on one track per tensor name. Events go
// through a queue to a writer thread doing buffered writes, so the engine thread never waits
// on the disk. The file opens with "[" and gets its closing "]" at stop(); a file from a
// killed process lacks only that (gradfuse.timeline.load() accepts it).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>

namespace gradfuse::engine {

class Timeline {
 public:
  using Clock = std::chrono::steady_clock;
  ~Timeline() { stop(); }

  // Opens `path` (truncating it) and starts the writer; an open timeline is stopped first.
  // Throws (RuntimeError) when the file cannot be opened. start() and stop() may be called
  // from any threads at once (gradfuse.start_timeline / stop_timeline, the engine's end).
  void start(const std::string& path);
  // Closes the JSON array and the file. No-op when not started.
  void stop();
  // Tensors get a track each, up to this many; later names share one last track (their
  // events still name them), so a job with endless new names keeps bounded memory.
  static constexpr int kMaxTracks = 4096;
  bool active() const { return active_.load(std::memory_order_relaxed); }

  // One phase of one tensor, [begin, end].
  void phase(const std::string& tensor, const char* phase, Clock::time_point begin,
             Clock::time_point end);

 private:
  void write_loop();
  void stop_locked();  // stop() with control_mu_ held

  std::mutex control_mu_;  // serializes start() and stop(), held across the writer's join
  std::mutex mu_;          // the event queue, shared with the writer thread
  std::condition_variable cv_;
  std::atomic<bool> active_{false};
  bool stopping_ = false;
  std::deque<std::string> events_;
  std::unordered_map<std::string, int> tids_;  // tensor name -> track (at most kMaxTracks)
  bool overflow_named_ = false;                // the shared last track has its name event
  Clock::time_point origin_;
  std::FILE* file_ = nullptr;
  std::thread writer_;
};

}  // namespace gradfuse::engine
