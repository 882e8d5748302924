#include "engine/liveness.h"

#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <algorithm>
#include <sstream>

namespace gradfuse::engine {

namespace {
using Clock = std::chrono::steady_clock;

// Several beats per timeout, so a live peer is never mistaken for a silent one, but not so
// often that the store (rank 0's TCP server) gets busy.
Clock::duration beat_interval(double timeout_s) {
  return std::chrono::duration_cast<Clock::duration>(
      std::chrono::duration<double>(std::clamp(timeout_s / 5, 0.02, 1.0)));
}
}  // namespace

LivenessMonitor::LivenessMonitor(std::string host, int port, std::string prefix, int rank, int size,
                                 double timeout_s,
                                 std::function<void(const std::string&)> on_verdict)
    : host_(std::move(host)),
      port_(port),
      prefix_(std::move(prefix)),
      rank_(rank),
      size_(size),
      timeout_s_(timeout_s),
      interval_(beat_interval(timeout_s)),
      on_verdict_(std::move(on_verdict)) {
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
  return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeout_s_)) +
         2 * interval_;
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

void LivenessMonitor::loop() {
  const auto timeout = std::chrono::duration<double>(timeout_s_);
  const auto interval = interval_;
  const auto key = [&](int r) { return prefix_ + std::to_string(r); };
  try {
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<uint16_t>(port_);
    opts.isServer = false;
    opts.waitWorkers = false;
    opts.timeout = std::chrono::duration_cast<std::chrono::milliseconds>(timeout);
    c10d::TCPStore store(host_, opts);
    std::vector<int64_t> seen(size_, -1);
    std::vector<Clock::time_point> changed(size_, Clock::now());
    while (true) {
      store.add(key(rank_), 1);
      const auto now = Clock::now();
      std::vector<int> silent;
      for (int r = 0; r < size_; ++r) {
        if (r == rank_) continue;
        const int64_t beats = store.add(key(r), 0);  // reads without blocking on a missing key
        if (beats != seen[r]) {
          seen[r] = beats;
          changed[r] = now;
        } else if (now - changed[r] > timeout) {
          silent.push_back(r);
        }
      }
      if (!silent.empty()) {
        std::ostringstream msg;
        msg << "gradfuse: rank" << (silent.size() > 1 ? "s " : " ");
        for (size_t i = 0; i < silent.size(); ++i) msg << (i ? ", " : "") << silent[i];
        msg << " did not answer for " << timeout_s_ << " s (timeout_s): dead or stuck";
        declare(msg.str());
        return;
      }
      std::unique_lock<std::mutex> lock(mu_);
      if (cv_.wait_for(lock, interval, [&] { return stopping_; })) return;
    }
  } catch (const std::exception& e) {
    // The store lives in the process that created the job (rank 0 under gradfuse.run and
    // mpiexec, the agent under torchrun): losing it means that process is gone.
    declare(std::string("gradfuse: the job's rendezvous store at ") + host_ + ":" +
            std::to_string(port_) +
            " stopped answering (its host, usually rank 0, is dead?): " + e.what());
  }
}

}  // namespace gradfuse::engine
