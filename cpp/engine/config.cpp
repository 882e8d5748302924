#include "engine/config.h"

#include <c10/util/Exception.h>

namespace gradfuse::engine {

void validate(const EngineConfig& c) {
  TORCH_CHECK_VALUE(c.size >= 1, "gradfuse: size must be >= 1, got ", c.size);
  TORCH_CHECK_VALUE(c.rank >= 0 && c.rank < c.size, "gradfuse: rank must be in [0, ", c.size,
                    "), got ", c.rank);
  TORCH_CHECK_VALUE(c.process_set_id >= 0, "gradfuse: process_set_id must be >= 0, got ",
                    c.process_set_id);
  TORCH_CHECK_VALUE(c.global_ranks.empty() || static_cast<int>(c.global_ranks.size()) == c.size,
                    "gradfuse: global_ranks must be empty or hold size=", c.size, " ranks, got ",
                    c.global_ranks.size());
  TORCH_CHECK_VALUE(c.process_set_id == 0 || (c.local_group.empty() && c.cuda_local_group.empty()),
                    "gradfuse: hierarchical allreduce is only supported on the global process "
                    "set (id 0), got process_set_id=", c.process_set_id);
  TORCH_CHECK_VALUE(!c.control_group.empty(), "gradfuse: control_group must name a group");
  TORCH_CHECK_VALUE(!c.cpu_group.empty(), "gradfuse: cpu_group must name a group");
  TORCH_CHECK_VALUE(c.local_group.empty() == c.cross_group.empty(),
                    "gradfuse: local_group and cross_group must both be given or both be empty");
  TORCH_CHECK_VALUE(c.cuda_local_group.empty() == c.cuda_cross_group.empty(),
                    "gradfuse: cuda_local_group and cuda_cross_group must both be given or both be "
                    "empty");
  TORCH_CHECK_VALUE(c.hierarchical_max_bytes >= -1,
                    "gradfuse: hierarchical_max_bytes must be >= -1 (-1: no limit), got ",
                    c.hierarchical_max_bytes);
  TORCH_CHECK_VALUE(c.fusion_threshold_bytes >= 0,
                    "gradfuse: fusion_threshold_bytes must be >= 0, got ",
                    c.fusion_threshold_bytes);
  TORCH_CHECK_VALUE(c.cache_capacity >= 0 && c.cache_capacity <= (int64_t{1} << 24),
                    "gradfuse: cache_capacity must be in [0, 16777216], got ", c.cache_capacity);
  TORCH_CHECK_VALUE(c.cycle_time_ms > 0, "gradfuse: cycle_time_ms must be > 0, got ",
                    c.cycle_time_ms);
  TORCH_CHECK_VALUE(c.timeout_s > 0, "gradfuse: timeout_s must be > 0, got ", c.timeout_s);
  TORCH_CHECK_VALUE(c.stall_warning_s > 0, "gradfuse: stall_warning_s must be > 0, got ",
                    c.stall_warning_s);
  TORCH_CHECK_VALUE(c.stall_shutdown_s >= 0, "gradfuse: stall_shutdown_s must be >= 0, got ",
                    c.stall_shutdown_s);
  TORCH_CHECK_VALUE(c.pending_names_limit >= 0,
                    "gradfuse: pending_names_limit must be >= 0, got ", c.pending_names_limit);
}

}  // namespace gradfuse::engine
