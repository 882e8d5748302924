// What gradfuse.init() hands the engine. Python validates user input (GRADFUSE_* variables,
// keyword arguments); the engine re-checks ranges so a direct _C call cannot break it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace gradfuse::engine {

struct EngineConfig {
  // The process set this engine serves (0: the global set). rank and size are this rank's
  // place in the set and the set's size; global_ranks[r] is set rank r's global rank (empty:
  // the identity), so messages name ranks as the user knows them.
  int process_set_id = 0;
  std::vector<int> global_ranks;
  int global_rank(int r) const { return global_ranks.empty() ? r : global_ranks[r]; }
  int rank = 0;
  int size = 1;
  // Process groups by name (torch.distributed.new_group(...).group_name), resolved in C++ with
  // c10d::resolve_process_group. The negotiating thread issues the control group's collectives;
  // the executor thread issues every data collective, in negotiated order.
  std::string control_group;  // Gloo: negotiation
  std::string cpu_group;      // Gloo: CPU tensors
  std::string cuda_group;     // NCCL: CUDA tensors; empty when there is none
  // Hierarchical allreduce: this rank's node group and cross-node group, for CPU (Gloo) and
  // CUDA (NCCL) tensors. Empty: allreduce is flat.
  std::string local_group;
  std::string cross_group;
  std::string cuda_local_group;
  std::string cuda_cross_group;
  // Hybrid all-reduce: with the groups above, fused messages of more than this many bytes go
  // flat instead of hierarchical (engine/hierarchical.h); -1: every message is hierarchical.
  int64_t hierarchical_max_bytes = -1;
  int64_t fusion_threshold_bytes = 64 << 20;
  // Response cache entries (engine/response_cache.h); 0 disables the cache.
  int64_t cache_capacity = 1024;
  double cycle_time_ms = 1.0;
  // A peer silent this long is declared dead or stuck and every pending handle fails.
  double timeout_s = 300.0;
  // Liveness heartbeats go through the job's TCP store (host:port; empty host: no monitor),
  // under keys starting with `heartbeat_prefix` (unique per engine instance).
  std::string store_host;
  int store_port = 0;
  std::string heartbeat_prefix;
  // Stall inspector: warn when a tensor has waited this long for some ranks; fail it after
  // stall_shutdown_s (0: never).
  double stall_warning_s = 60.0;
  double stall_shutdown_s = 0.0;
  // At most this many names submitted by some ranks and not yet by all; past it the newest
  // fail (engine/stall_inspector.h). 0: no limit.
  int64_t pending_names_limit = 65536;
  std::string timeline_path;  // non-empty: write a timeline from the start (rank 0 only)
};

void validate(const EngineConfig& config);

}  // namespace gradfuse::engine
