#include "engine/hierarchical.h"

#include <ATen/ATen.h>

#include <atomic>

#include "engine/fusion.h"

namespace gradfuse::engine {

namespace {
std::atomic<int64_t> hierarchical_runs{0};
}  // namespace

int64_t hierarchical_allreduce_count() { return hierarchical_runs.load(); }

void hierarchical_allreduce(const at::Tensor& flat, c10d::ReduceOp op, const HierarchyGroups& g,
                            BufferPool* buffers, int pad_slot) {
  ++hierarchical_runs;
  const int64_t n = flat.numel();
  if (n == 0) return;  // every rank agrees on the length, so every rank skips
  const int64_t local_size = g.local->getSize();

  // Gloo's reduce_scatter / allgather on one tensor need equal chunks: pad to a multiple of
  // local_size. The padding is zeroed so no rank reduces uninitialized memory (a NaN there
  // would be harmless, as it is dropped, but confusing under a debugger).
  const int64_t shard = (n + local_size - 1) / local_size;
  const int64_t padded = shard * local_size;
  at::Tensor buf = flat;
  if (padded != n) {
    buf = buffers->get(flat.scalar_type(), flat.device(), pad_slot, padded);
    buf.narrow(0, 0, n).copy_(flat);
    buf.narrow(0, n, padded - n).zero_();
  }
  // This rank's shard of the sum, in its own tensor: a collective's output must not alias its
  // input, and the all-gather reads it while writing every shard of `buf`.
  at::Tensor mine = local_size > 1 ? at::empty({shard}, buf.options()) : buf;
  if (local_size > 1) {
    c10d::ReduceScatterOptions rs;
    rs.reduceOp = op;
    g.local->reduce_scatter_single(mine, buf, rs)->wait();
  }
  if (g.cross->getSize() > 1) {
    c10d::AllreduceOptions ar;
    ar.reduceOp = op;
    std::vector<at::Tensor> ts{mine};
    g.cross->allreduce(ts, ar)->wait();
  }
  if (local_size > 1) g.local->all_gather_single(buf, mine)->wait();
  if (!buf.is_same(flat)) flat.copy_(buf.narrow(0, 0, n));
}

}  // namespace gradfuse::engine
