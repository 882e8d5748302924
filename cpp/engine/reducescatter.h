// Reduce-scatter: every rank contributes a tensor of the same shape; rank r receives its rows
// of the reduced tensor. Dim 0 is split as evenly as possible, the first (d0 % size) ranks
// getting one extra row (Horovod's split).
#pragma once

#include <vector>

#include "engine/collectives.h"

namespace gradfuse::engine {

// First row and row count of `rank`'s part of a dim 0 of `dim0` rows over `size` ranks.
int64_t scatter_first_row(int64_t dim0, int size, int rank);
int64_t scatter_rows(int64_t dim0, int size, int rank);

// Runs a fused batch of reduce-scatters (Sum or Average) to completion; one output per entry.
std::vector<at::Tensor> run_reducescatter(const Batch& batch, const CollectiveContext& ctx);

}  // namespace gradfuse::engine
