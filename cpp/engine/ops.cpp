// torch.ops.gradfuse._enqueue / _engine_result: how tensors cross from Python into the engine
// and back. Going through the dispatcher (not pybind11) means no Tensor type casters are
// involved, so the module does not depend on pybind11 matching torch's build.
#include <torch/library.h>

#include <limits>

#include "engine/engine.h"
#include "engine/handles.h"

namespace gradfuse::engine {

namespace {

int64_t enqueue_op(c10::string_view name, int64_t op, const at::Tensor& tensor,
                   const std::optional<at::Tensor>& output, int64_t root, int64_t reduce_op,
                   double prescale, double postscale, at::IntArrayRef splits,
                   int64_t process_set_id, const std::optional<at::Tensor>& sq_norm) {
  TORCH_CHECK_VALUE(op >= 0 && op <= static_cast<int64_t>(OpType::kJoin),
                    "gradfuse._enqueue: op must be 0 (allreduce), 1 (allgather), 2 (broadcast), "
                    "3 (reducescatter), 4 (alltoall), 5 (barrier) or 6 (join), got ",
                    op);
  EnqueueArgs args;
  args.name = std::string(name);
  args.op = static_cast<OpType>(op);
  args.tensor = tensor;
  args.output = output;
  // Checked before the cast: 2**32 must not become rank 0.
  TORCH_CHECK_VALUE(root >= std::numeric_limits<int>::min() &&
                        root <= std::numeric_limits<int>::max(), "gradfuse._enqueue: root ", root,
                    " is not a rank");
  args.root = static_cast<int>(root);
  args.reduce_op = static_cast<ReduceOp>(reduce_op);
  TORCH_CHECK_VALUE(reduce_op >= 0 && reduce_op <= static_cast<int64_t>(ReduceOp::kProduct),
                    "gradfuse._enqueue: reduce_op must be in [0, 4], got ", reduce_op);
  args.prescale = prescale;
  args.postscale = postscale;
  args.splits = splits.vec();
  args.sq_norm = sq_norm;
  TORCH_CHECK_VALUE(process_set_id >= 0 && process_set_id <= std::numeric_limits<int>::max(),
                    "gradfuse._enqueue: process_set_id must be >= 0, got ", process_set_id);
  return process_set_engine(static_cast<int>(process_set_id))->enqueue(std::move(args));
}

// Blocks until done (callers wait with the GIL released in _C.wait first), returns the
// output and forgets the handle.
at::Tensor result_op(int64_t handle) { return HandleTable::get().release(handle); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(gradfuse, m) {
  // Queues `tensor` for a collective in process set `process_set_id` (0: the global set; ranks,
  // e.g. root, are the set's) and returns a handle at once. `output` (allreduce, broadcast) is
  // written asynchronously by the engine's thread, as is `sq_norm` (float allreduce: the
  // result's sum of squares, float64).
  m.def(
      "_enqueue(str name, int op, Tensor tensor, Tensor(a!)? output, int root, int reduce_op, "
      "float prescale, float postscale, int[] splits=[], int process_set_id=0, "
      "Tensor(b!)? sq_norm=None) -> int",
      &enqueue_op);
  m.def("_engine_result(int handle) -> Tensor", &result_op);
  // alltoall's received splits; call before _engine_result (which forgets the handle).
  m.def("_engine_aux(int handle) -> Tensor",
        [](int64_t handle) { return HandleTable::get().aux(handle); });
}

}  // namespace gradfuse::engine
