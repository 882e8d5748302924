// All-to-all: rank r sends rows [sum(splits[:k]), +splits[k]) of its tensor to rank k and
// receives, concatenated in rank order, what every rank sent it. Splits may differ per rank;
// they were exchanged during negotiation (Response::all_splits), so every rank knows what it
// receives before the data moves.
#pragma once

#include <vector>

#include "engine/collectives.h"

namespace gradfuse::engine {

// Runs one alltoall (alltoalls are never fused) to completion: {output}.
std::vector<at::Tensor> run_alltoall(const Batch& batch, const CollectiveContext& ctx);

// The rows `rank` receives from each rank (int64, size entries): alltoall's second output.
at::Tensor received_splits(const Response& response, int rank, int size);

}  // namespace gradfuse::engine
