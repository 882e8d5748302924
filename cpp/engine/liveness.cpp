#include "engine/liveness.h"

#include <algorithm>
#include <sstream>

#include "engine/engine_thread.h"

namespace gradfuse::engine {

namespace {
using Clock = std::chrono::steady_clock;

Clock::duration seconds(double s) {
  return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(s));
}

// Several beats per timeout, so a live peer is never mistaken for a silent one, but not so
// often that the store (rank 0's TCP server) gets busy.
Clock::duration beat_interval(double timeout_s) {
  return seconds(std::clamp(timeout_s / 5, 0.02, 1.0));
}

// Faults and exits are read often, so peers learn of them well within 2 s: one store read
// (the faults counter) and a /proc read per same-machine peer.
constexpr double kMaxTick = 0.25;

// After a closed connection: a live monitor sees the report within a tick, then beats every
// kFastBeat, so in kWatch it beats several times, even on a loaded machine; a dead one never.
// A dead peer is then named about kMaxTick + kWatch + kMaxTick after its death.
constexpr double kFastBeat = 0.1;
constexpr double kWatch = 1.0;

std::string describe_silence(const std::string& state, int64_t pid) {
  const std::string process = "its process, pid " + std::to_string(pid);
  if (state == "stopped") return "stopped (" + process + ", is suspended: SIGSTOP or a debugger)";
  if (state == "running") return "unresponsive (" + process + ", is running)";
  if (state == "exited") return "dead (" + process + ", exited)";
  return "dead or stopped (it runs on another machine: its process cannot be checked from here)";
}
}  // namespace

LivenessMonitor::LivenessMonitor(std::shared_ptr<PeerBoard> board, double timeout_s,
                                 std::function<void(const std::string&)> on_verdict)
    : board_(std::move(board)),
      timeout_s_(timeout_s),
      interval_(beat_interval(timeout_s)),
      tick_(std::min(interval_, seconds(kMaxTick))),
      on_verdict_(std::move(on_verdict)),
      seen_(board_->size(), -1),
      changed_(board_->size(), Clock::now()),
      processes_(board_->size()),
      next_beat_(Clock::now()) {
  thread_ = std::thread([this] {
    prepare_engine_thread("gradfuse-live");
    loop();
  });
}

LivenessMonitor::~LivenessMonitor() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  try {
    board_->mark_left();  // from now on this rank beats no more, and is not dead for that
  } catch (const std::exception&) {
    // The store left with its host: nobody is left to tell.
  }
}

void LivenessMonitor::report_broken_connection() {
  try {
    board_->publish_broken_connection();
  } catch (const std::exception&) {
    return;  // the store is gone: the loop says so
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    wake_ = true;
  }
  cv_.notify_all();
}

Clock::duration LivenessMonitor::verdict_delay() const {
  return seconds(timeout_s_) + 2 * interval_;
}

std::string LivenessMonitor::wait_for_verdict(Clock::time_point deadline) {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait_until(lock, deadline, [&] { return !verdict_.empty() || stopping_; });
  return verdict_;
}

void LivenessMonitor::declare(const std::string& verdict) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!verdict_.empty() || stopping_) return;
    verdict_ = verdict;
  }
  cv_.notify_all();
  on_verdict_(verdict);
}

std::string LivenessMonitor::look() {
  const auto now = Clock::now();
  std::string verdict = news(now);
  if (verdict.empty()) verdict = exited_peer();
  if (verdict.empty() && beat_if_due(now)) verdict = silence(now);
  if (verdict.empty()) verdict = watch_verdict(now);
  return verdict;
}

std::string LivenessMonitor::news(Clock::time_point now) {
  const int64_t faults = board_->fault_count();
  if (faults == faults_seen_) return "";
  faults_seen_ = faults;
  notice_broken_connections(now);
  for (int r = 0; r < board_->size(); ++r) {
    if (r == board_->rank()) continue;  // this rank's own failure is already its engine's error
    std::string fault = board_->fault(r);
    if (!fault.empty()) return fault;
  }
  return "";
}

std::string LivenessMonitor::exited_peer() {
  for (int r = 0; r < board_->size(); ++r) {
    if (r == board_->rank()) continue;
    if (!processes_[r]) processes_[r] = board_->process(r);
    if (processes_[r] && processes_[r]->state_seen_from(self_) == "exited") {
      // Posted for the ranks on other machines, which cannot see this process; a fault the
      // rank posted itself before it exited stands instead.
      return board_->publish_fault(r, "gradfuse: rank " + std::to_string(board_->global_rank(r)) +
                                          " is dead: its process (pid " +
                                          std::to_string(processes_[r]->pid) + ") exited");
    }
  }
  return "";
}

bool LivenessMonitor::beat_if_due(Clock::time_point now) {
  if (now < next_beat_) return false;
  next_beat_ = now + (watching(now) ? seconds(kFastBeat) : interval_);
  board_->beat();
  return true;
}

std::string LivenessMonitor::silence(Clock::time_point now) {
  const std::vector<int64_t> beats = board_->beats();
  std::vector<int> silent;
  for (int r = 0; r < board_->size(); ++r) {
    if (r == board_->rank()) continue;
    if (beats[r] != seen_[r]) {
      seen_[r] = beats[r];
      changed_[r] = now;
    } else if (now - changed_[r] > seconds(timeout_s_)) {
      silent.push_back(r);
    }
  }
  if (silent.empty()) return "";
  // Posted too: a rank whose own transport timed out meanwhile may be waiting for a verdict,
  // and would otherwise blame a survivor that exited after its error, not the silent rank.
  const std::string verdict = silence_verdict(silent);
  for (int r : silent) board_->publish_fault(r, verdict);
  return verdict;
}

void LivenessMonitor::notice_broken_connections(Clock::time_point now) {
  const int64_t broken = board_->broken_connections();
  if (broken == broken_seen_) return;
  broken_seen_ = broken;
  if (watching(now)) return;  // the watch under way covers this report too
  watch_until_ = now + seconds(kWatch);
  watch_start_ = board_->beats();
  next_beat_ = now;  // the watchers must see this rank beat at once
}

std::string LivenessMonitor::watch_verdict(Clock::time_point now) {
  if (watch_start_.empty() || watching(now)) return "";
  const std::vector<int64_t> beats = board_->beats();
  std::vector<int> dead;
  for (int r = 0; r < board_->size(); ++r) {
    if (r == board_->rank() || beats[r] != watch_start_[r]) continue;
    // A process this machine sees running or stopped is not dead, whatever its heartbeat.
    const std::string state = process_state(r);
    if ((state.empty() || state == "exited") && !board_->has_left(r)) dead.push_back(r);
  }
  watch_start_.clear();
  if (dead.empty()) return "";
  const bool many = dead.size() > 1;
  std::ostringstream msg;
  msg << "gradfuse: rank" << (many ? "s " : " ");
  for (size_t i = 0; i < dead.size(); ++i) msg << (i ? ", " : "") << board_->global_rank(dead[i]);
  msg << (many ? " are dead: their connections closed and their heartbeats stopped"
               : " is dead: its connection closed and its heartbeat stopped");
  const std::string verdict = msg.str();
  for (int r : dead) board_->publish_fault(r, verdict);
  return verdict;
}

std::string LivenessMonitor::process_state(int r) const {
  return processes_[r] ? processes_[r]->state_seen_from(self_) : "";
}

std::string LivenessMonitor::silence_verdict(const std::vector<int>& silent) {
  std::ostringstream msg;
  msg << "gradfuse: rank" << (silent.size() > 1 ? "s " : " ");
  for (size_t i = 0; i < silent.size(); ++i) {
    msg << (i ? ", " : "") << board_->global_rank(silent[i]);
  }
  msg << " did not answer for " << timeout_s_ << " s (timeout_s): ";
  for (size_t i = 0; i < silent.size(); ++i) {
    const int r = silent[i];
    const auto& process = processes_[r];
    if (silent.size() > 1) msg << (i ? "; " : "") << "rank " << board_->global_rank(r) << " ";
    msg << describe_silence(process_state(r), process ? process->pid : 0);
  }
  return msg.str();
}

void LivenessMonitor::loop() {
  try {
    board_->publish_process();
    bool judged = false;
    while (true) {
      if (!judged) {
        const std::string verdict = look();
        judged = !verdict.empty();
        if (judged) declare(verdict);
      } else {
        // This rank lives on: peers that have not heard of the fault yet, or that watch who
        // still beats after a closed connection, must not take it for a silent or dead one.
        const auto now = Clock::now();
        news(now);
        beat_if_due(now);
      }
      const auto tick = watching(Clock::now()) ? seconds(kFastBeat) : tick_;
      std::unique_lock<std::mutex> lock(mu_);
      if (cv_.wait_for(lock, tick, [&] { return stopping_ || wake_; }) && stopping_) return;
      wake_ = false;
    }
  } catch (const std::exception& e) {
    // The store lives in the process that created the job (rank 0 under gradfuse.run and
    // mpiexec, the agent under torchrun): losing it means that process is gone.
    std::string why = "gradfuse: the job's rendezvous store stopped answering";
    int host = 0;  // the board's index of global rank 0, if it is in this engine's set
    while (host < board_->size() && board_->global_rank(host) != 0) ++host;
    if (host < board_->size() && host != board_->rank() && process_state(host) == "exited") {
      why = "gradfuse: rank 0 is dead: its process (pid " + std::to_string(processes_[host]->pid) +
            ") exited, and with it " + why.substr(std::string("gradfuse: ").size());
    } else {
      why += " (its host, usually rank 0, is dead?)";
    }
    declare(why + ": " + e.what());
  }
}

}  // namespace gradfuse::engine
