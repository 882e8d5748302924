// Liveness monitor: tells a dead, stopped or failed peer from a slow one, and names it. A Gloo
// error says only that a connection broke (or a wait timed out), not which rank is gone, and a
// rank blocked in a collective cannot ask the others. So each engine's monitor thread (no GIL,
// independent of the engine thread) works the ranks' notice board in the job's TCP store
// (engine/peer_board.h):
//  - a fault a rank posted (its engine failed: "rank r failed: <error>") or an observer posted
//    (rank r's process exited) is read within a tick (<= 0.25 s);
//  - a peer process on this machine that exited (SIGKILL included) is seen in /proc within a
//    tick, and posted for the ranks on other machines;
//  - a peer on another machine that died closes its connections: a rank whose transport says
//    so reports it (report_broken_connection()), every monitor then beats fast (kFastBeat) and
//    watches the heartbeats for kWatch, and the peers that did not beat once meanwhile are
//    dead (a live rank's monitor thread beats whatever its Python or engine thread does; one
//    that left with shutdown() says so on the board and is never named);
//  - a peer whose heartbeat has not moved for `timeout_s` is silent: stopped (SIGSTOP, a
//    debugger: its process is suspended), unresponsive (it runs), or, on another machine, dead
//    or stopped (a stopped process closes no connection).
// Messages name global ranks (PeerBoard::global_rank).
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
  // This rank's transport says a connection to a peer closed: every monitor watches who stops
  // beating (any thread; the board's errors are swallowed: a lost store is the loop's news).
  void report_broken_connection();

 private:
  using Clock = std::chrono::steady_clock;

  void loop();
  // One look at the board and at the peers' processes; a verdict, or "".
  std::string look();
  // The board's news, at the cost of one store read (the faults counter): a fault a peer
  // posted (returned), or a closed connection (starts a watch).
  std::string news(Clock::time_point now);
  std::string exited_peer();
  // Beats when due (fast while a watch runs); true when it did.
  bool beat_if_due(Clock::time_point now);
  std::string silence(Clock::time_point now);
  std::string silence_verdict(const std::vector<int>& silent);
  // Starts a watch when some rank reported a closed connection since the last news.
  void notice_broken_connections(Clock::time_point now);
  // At the end of a watch: the peers that did not beat during it, named dead; or "".
  std::string watch_verdict(Clock::time_point now);
  bool watching(Clock::time_point now) const { return now < watch_until_; }
  // "" when this machine cannot see rank r's process.
  std::string process_state(int r) const;
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
  int64_t broken_seen_ = 0;
  Clock::time_point watch_until_;        // a watch runs until then
  std::vector<int64_t> watch_start_;     // the heartbeats when it began

  std::mutex mu_;
  std::condition_variable cv_;
  bool stopping_ = false;
  bool wake_ = false;  // report_broken_connection(): look now
  std::string verdict_;
  std::thread thread_;
};

}  // namespace gradfuse::engine
