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
  // Hybrid all-reduce (the seed slides' third strategy): a fused message of more than this
  // many bytes goes flat (one ring over all ranks, bandwidth-optimal), one of at most this many
  // goes hierarchical (fewer latency steps). -1: every message is hierarchical.
  int64_t max_bytes = -1;
  explicit operator bool() const { return local && cross; }
  // Whether a message of `nbytes` goes hierarchical. Every rank sees the same negotiated batch
  // and wire dtype, hence the same nbytes, so every rank picks the same path.
  bool takes(int64_t nbytes) const {
    return local && cross && (max_bytes < 0 || nbytes <= max_bytes);
  }
};

// Reduces `flat` (1-D, contiguous) in place over all ranks with `op`, in the three steps
// above. Buffers whose length does not divide by local_size go through a zero-padded copy
// from `buffers` (slot `pad_slot`). Runs to completion; throws on transport errors.
void hierarchical_allreduce(const at::Tensor& flat, c10d::ReduceOp op, const HierarchyGroups& g,
                            BufferPool* buffers, int pad_slot);

// How many messages this process has reduced hierarchically (every engine, since load): the
// tests' way to see which path the hybrid chose for a message.
int64_t hierarchical_allreduce_count();

}  // namespace gradfuse::engine
