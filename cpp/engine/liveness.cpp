#include "engine/liveness.h"

#include <algorithm>
#include <sstream>

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
  thread_ = std::thread([this] { loop(); });
}

LivenessMonitor::~LivenessMonitor() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
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
  const int me = board_->rank();
  const int64_t faults = board_->fault_count();
  if (faults != faults_seen_) {
    faults_seen_ = faults;
    for (int r = 0; r < board_->size(); ++r) {
      if (r == me) continue;  // this rank's own failure is already its engine's error
      std::string fault = board_->fault(r);
      if (!fault.empty()) return fault;
    }
  }
  for (int r = 0; r < board_->size(); ++r) {
    if (r == me) continue;
    if (!processes_[r]) processes_[r] = board_->process(r);
    if (processes_[r] && processes_[r]->state_seen_from(self_) == "exited") {
      // Posted for the ranks on other machines, which cannot see this process; a fault the
      // rank posted itself before it exited stands instead.
      return board_->publish_fault(r, "gradfuse: rank " + std::to_string(r) +
                                          " is dead: its process (pid " +
                                          std::to_string(processes_[r]->pid) + ") exited");
    }
  }
  const auto now = Clock::now();
  if (now < next_beat_) return "";
  next_beat_ = now + interval_;
  board_->beat();
  const std::vector<int64_t> beats = board_->beats();
  std::vector<int> silent;
  for (int r = 0; r < board_->size(); ++r) {
    if (r == me) continue;
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

std::string LivenessMonitor::silence_verdict(const std::vector<int>& silent) {
  std::ostringstream msg;
  msg << "gradfuse: rank" << (silent.size() > 1 ? "s " : " ");
  for (size_t i = 0; i < silent.size(); ++i) msg << (i ? ", " : "") << silent[i];
  msg << " did not answer for " << timeout_s_ << " s (timeout_s): ";
  for (size_t i = 0; i < silent.size(); ++i) {
    const int r = silent[i];
    const auto& process = processes_[r];
    const std::string state = process ? process->state_seen_from(self_) : "";
    if (silent.size() > 1) msg << (i ? "; " : "") << "rank " << r << " ";
    msg << describe_silence(state, process ? process->pid : 0);
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
      } else if (Clock::now() >= next_beat_) {
        // This rank lives on: peers that have not heard of the fault yet must not take it for
        // a silent one.
        next_beat_ = Clock::now() + interval_;
        board_->beat();
      }
      std::unique_lock<std::mutex> lock(mu_);
      if (cv_.wait_for(lock, tick_, [&] { return stopping_; })) return;
    }
  } catch (const std::exception& e) {
    // The store lives in the process that created the job (rank 0 under gradfuse.run and
    // mpiexec, the agent under torchrun): losing it means that process is gone.
    std::string why = "gradfuse: the job's rendezvous store stopped answering";
    const auto& first = processes_[0];  // the monitor runs only with 2 ranks or more
    if (board_->rank() != 0 && first && first->state_seen_from(self_) == "exited") {
      why = "gradfuse: rank 0 is dead: its process (pid " + std::to_string(first->pid) +
            ") exited, and with it " + why.substr(std::string("gradfuse: ").size());
    } else {
      why += " (its host, usually rank 0, is dead?)";
    }
    declare(why + ": " + e.what());
  }
}

}  // namespace gradfuse::engine
