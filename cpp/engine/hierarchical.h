// Hierarchical all-reduce (Tencent's 4-minute ImageNet run, shared/seeds/002): reduce-scatter
// inside the node, all-reduce of each shard across nodes among the ranks with the same local
// rank, all-gather inside the node. The slow inter-node links then carry 1/local_size of the
// buffer per rank instead of the whole of it.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

namespace gradfuse::engine {

class BufferPool;

struct HierarchyGroups {
  c10::intrusive_ptr<c10d::ProcessGroup> local;  // the ranks of this node
  c10::intrusive_ptr<c10d::ProcessGroup> cross;  // the ranks with this rank's local rank
  explicit operator bool() const { return local && cross; }
};

// Reduces `flat` (1-D, contiguous) in place over all ranks with `op`, in the three steps
// above. Buffers whose length does not divide by local_size go through a zero-padded copy
// from `buffers` (slot `pad_slot`). Runs to completion; throws on transport errors.
void hierarchical_allreduce(const at::Tensor& flat, c10d::ReduceOp op, const HierarchyGroups& g,
                            BufferPool* buffers, int pad_slot);

}  // namespace gradfuse::engine
