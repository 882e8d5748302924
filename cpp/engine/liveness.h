// Liveness monitor: tells a dead, stopped or failed peer from a slow one, and names it. A Gloo
// error says only that a connection broke (or a wait timed out), not which rank is gone, and a
// rank blocked in a collective cannot ask the others. So each engine's monitor thread (no GIL,
// independent of the engine thread) works the ranks' notice board in the job's TCP store
// (engine/peer_board.h):
//  - a fault a rank posted (its engine failed: "rank r failed: <error>") or an observer posted
//    (rank r's process exited) is read within a tick (<= 0.25 s);
//  - a peer process on this machine that exited (SIGKILL included) is seen in /proc within a
//    tick, and posted for the ranks on other machines;
//  - a peer whose heartbeat has not moved for `timeout_s` is silent: stopped (SIGSTOP, a
//    debugger: its process is suspended), unresponsive (it runs), or, on another machine, dead
//    or stopped.
#pragma once

#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "engine/peer_board.h"

namespace gradfuse::engine {

class LivenessMonitor {
 public:
  // `on_verdict(message)` runs once, on the monitor's thread, when some peer is known to be
  // gone (or the store itself stopped answering).
  LivenessMonitor(std::shared_ptr<PeerBoard> board, double timeout_s,
                  std::function<void(const std::string&)> on_verdict);
  ~LivenessMonitor();

  // The verdict, waiting for it until `deadline`; empty if every peer is still fine then.
  std::string wait_for_verdict(std::chrono::steady_clock::time_point deadline);
  // How long after a peer's death the verdict can come: the timeout plus up to two beat
  // intervals (the last beat is seen late, the silence is checked late).
  std::chrono::steady_clock::duration verdict_delay() const;

 private:
  void loop();
  // One look at the board and at the peers' processes; a verdict, or "".
  std::string look();
  std::string silence_verdict(const std::vector<int>& silent);
  void declare(const std::string& verdict);

  std::shared_ptr<PeerBoard> board_;
  const double timeout_s_;
  const std::chrono::steady_clock::duration interval_;  // between heartbeats
  const std::chrono::steady_clock::duration tick_;      // between looks at faults and processes
  std::function<void(const std::string&)> on_verdict_;
  // The monitor thread's own bookkeeping.
  const ProcessId self_ = ProcessId::self();
  std::vector<int64_t> seen_;
  std::vector<std::chrono::steady_clock::time_point> changed_;
  std::vector<std::optional<ProcessId>> processes_;
  int64_t faults_seen_ = 0;
  std::chrono::steady_clock::time_point next_beat_;

  std::mutex mu_;
  std::condition_variable cv_;
  bool stopping_ = false;
  std::string verdict_;
  std::thread thread_;
};

}  // namespace gradfuse::engine
