// The ranks' shared notice board: one engine's keys in the job's TCP store, which every rank
// reaches without going through the (possibly broken) collective transport. Under `prefix`
// (unique per engine instance):
//   <r>           rank r's heartbeat counter (engine/liveness.h)
//   proc/<r>      where rank r's process runs: "<machine id> <pid> <start time>", so a peer on
//                 the same machine can tell an exited or stopped process from a slow one
//   fault/<r>     the first account of what happened to rank r: its own ("gradfuse: rank r
//                 failed: ...") or an observer's ("... exited", "... did not answer ...");
//                 later accounts do not replace it
//   faults        a counter bumped after each fault/<r> and each broken report, so readers
//                 poll one key
//   started/<r>   rank r's engine started (the start handshake of Engine's constructor)
//   broken        a counter bumped by a rank whose transport reported a closed connection: the
//                 monitors then beat fast and watch who stopped beating (engine/liveness.h)
//   left/<r>      rank r's monitor stopped on purpose (shutdown()): its silence is no death
// Ranks are the engine's (a process set's ranks count from 0); messages name global ranks
// (global_rank()).
//
// Test only: GRADFUSE_TEST_REMOTE_PEERS=1 gives every process a machine of its own, so that no
// peer can look at another in /proc and one host plays a job spread over machines.
// The TCPStore client is thread-safe: the monitor's thread and the engine's share one board.
#pragma once

#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace gradfuse::engine {

// A process as another process on the same machine can find it.
struct ProcessId {
  std::string machine;  // boot id and pid namespace: equal means /proc shows the same processes
  int64_t pid = 0;
  int64_t start_time = 0;  // clock ticks after boot: tells a reused pid from the original
  // This process.
  static ProcessId self();
  // "exited", "stopped" (SIGSTOP, a debugger), "running", or "" when this process cannot look
  // (another machine).
  std::string state_seen_from(const ProcessId& observer) const;
};

class PeerBoard {
 public:
  // `global_ranks[r]`: rank r's global rank (empty: the identity).
  PeerBoard(const std::string& host, int port, std::string prefix, int rank, int size,
            double timeout_s, std::vector<int> global_ranks = {});

  int rank() const { return rank_; }
  int size() const { return size_; }
  // How messages name rank r: as the user knows it.
  int global_rank(int r) const { return global_ranks_.empty() ? r : global_ranks_[r]; }

  void beat();
  // Every rank's heartbeat count (0 before its first beat).
  std::vector<int64_t> beats();

  void publish_process();
  // Rank r's process, once it has published it.
  std::optional<ProcessId> process(int r);

  // Posts `message` as rank r's fault unless one is there already; returns the one that
  // stands.
  std::string publish_fault(int r, const std::string& message);
  int64_t fault_count();
  // Rank r's fault, or "".
  std::string fault(int r);

  void mark_started();
  bool all_started();

  void publish_broken_connection();
  int64_t broken_connections();

  void mark_left();
  bool has_left(int r);

 private:
  std::string key(const std::string& what, int r) const;
  // The Store interface, whose string overloads TCPStore hides.
  c10d::Store& store() { return *store_; }

  std::unique_ptr<c10d::TCPStore> store_;
  const std::string prefix_;
  const int rank_;
  const int size_;
  const std::vector<int> global_ranks_;
};

}  // namespace gradfuse::engine
