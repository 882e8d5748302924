// Liveness monitor: tells a dead or frozen peer from a slow one, and names it. A Gloo error
// says only that a connection broke (or a wait timed out), not which rank is gone, and a rank
// blocked in a collective cannot ask the others. So each engine beats a counter in the job's
// TCP store from its own thread (no GIL, independent of the engine thread) and watches the
// peers' counters: a counter that has not moved for `timeout` means that rank is dead or stuck.
#pragma once

#include <torch/csrc/distributed/c10d/Store.hpp>

#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace gradfuse::engine {

class LivenessMonitor {
 public:
  // `on_verdict(message)` runs once, on the monitor's thread, when some peer has been silent
  // for `timeout_s` (or the store itself stopped answering).
  LivenessMonitor(std::string host, int port, std::string prefix, int rank, int size,
                  double timeout_s, std::function<void(const std::string&)> on_verdict);
  ~LivenessMonitor();

  // The verdict ("rank 1 did not answer ..."), waiting for it until `deadline`; empty if every
  // peer still beats then.
  std::string wait_for_verdict(std::chrono::steady_clock::time_point deadline);
  // How long after a peer's death the verdict can come: the timeout plus up to two beat
  // intervals (the last beat is seen late, the silence is checked late).
  std::chrono::steady_clock::duration verdict_delay() const;

 private:
  void loop();
  void declare(const std::string& verdict);

  const std::string host_;
  const int port_;
  const std::string prefix_;
  const int rank_;
  const int size_;
  const double timeout_s_;
  const std::chrono::steady_clock::duration interval_;
  std::function<void(const std::string&)> on_verdict_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stopping_ = false;
  std::string verdict_;
  std::thread thread_;
};

}  // namespace gradfuse::engine
