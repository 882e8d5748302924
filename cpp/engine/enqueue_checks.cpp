#include "engine/enqueue_checks.h"

#include <c10/util/Exception.h>

#include <cmath>

namespace gradfuse::engine {

namespace {

bool supported_dtype(at::ScalarType t) {
  switch (t) {
    case at::kByte:
    case at::kChar:
    case at::kShort:
    case at::kInt:
    case at::kLong:
    case at::kHalf:
    case at::kBFloat16:
    case at::kFloat:
    case at::kDouble:
      return true;
    default:
      return false;
  }
}

}  // namespace

std::vector<int64_t> check_enqueue(const EnqueueArgs& a, int size) {
  const char* op = op_name(a.op);
  TORCH_CHECK_VALUE(!a.name.empty(), "gradfuse.", op, ": name must not be empty");
  TORCH_CHECK_VALUE(a.tensor.defined(), "gradfuse.", op, ": tensor is undefined");
  // The engine scales inside its fusion kernels, which reject a non-finite scale: caught here,
  // on the calling rank, rather than failing the engine after negotiation.
  TORCH_CHECK_VALUE(std::isfinite(a.prescale), "gradfuse.", op,
                    ": prescale_factor must be a finite number, got ", a.prescale);
  TORCH_CHECK_VALUE(std::isfinite(a.postscale), "gradfuse.", op,
                    ": postscale_factor must be a finite number, got ", a.postscale);
  TORCH_CHECK_VALUE(supported_dtype(a.tensor.scalar_type()), "gradfuse.", op, ": tensor has dtype ",
                    a.tensor.scalar_type(),
                    "; supported: uint8, int8, int16, int32, int64, float16, bfloat16, float32, "
                    "float64");
  TORCH_CHECK_VALUE(!a.tensor.is_sparse() && a.tensor.layout() == at::kStrided, "gradfuse.", op,
                    ": tensor must be dense (strided)");
  TORCH_CHECK_VALUE(a.tensor.dim() <= 64, "gradfuse.", op, ": tensor has ", a.tensor.dim(),
                    " dimensions; at most 64 are supported");
  // These operations make their own output (its shape depends on the other ranks).
  const bool own_output = a.op != OpType::kAllreduce && a.op != OpType::kBroadcast;
  if (a.op == OpType::kAllgather) {
    TORCH_CHECK_VALUE(a.tensor.dim() >= 1,
                      "gradfuse.allgather: tensor must have at least one "
                      "dimension (the one gathered along)");
    TORCH_CHECK_VALUE(!a.output.has_value(), "gradfuse.allgather: output must be None");
  } else if (own_output) {
    TORCH_CHECK_VALUE(!a.output.has_value(), "gradfuse.", op, ": output must be None");
  } else {
    TORCH_CHECK_VALUE(a.output.has_value() && a.output->defined(), "gradfuse.", op,
                      ": output is required");
    const at::Tensor& out = *a.output;
    TORCH_CHECK_VALUE(out.sizes() == a.tensor.sizes() &&
                          out.scalar_type() == a.tensor.scalar_type() &&
                          out.device() == a.tensor.device(),
                      "gradfuse.", op, ": output must match tensor (", a.tensor.sizes(), ", ",
                      a.tensor.scalar_type(), ", ", a.tensor.device(), "), got ", out.sizes(), ", ",
                      out.scalar_type(), ", ", out.device());
    TORCH_CHECK_VALUE(out.is_contiguous(), "gradfuse.", op, ": output must be contiguous");
  }
  if (a.sq_norm.has_value()) {
    const at::Tensor& sq = *a.sq_norm;
    TORCH_CHECK_VALUE(a.op == OpType::kAllreduce && at::isFloatingType(a.tensor.scalar_type()),
                      "gradfuse.", op, ": sq_norm is for allreduces of floating-point tensors");
    TORCH_CHECK_VALUE(sq.defined() && sq.numel() == 1 && sq.scalar_type() == at::kDouble &&
                          sq.is_contiguous() && sq.device() == a.tensor.device(),
                      "gradfuse.", op, ": sq_norm must be a one-element float64 tensor on ",
                      a.tensor.device(), ", got ", sq.sizes(), " ", sq.scalar_type(), " on ",
                      sq.device());
  }
  if (a.op == OpType::kBroadcast) {
    TORCH_CHECK_VALUE(a.root >= 0 && a.root < size, "gradfuse.broadcast: root_rank ", a.root,
                      " is not a rank (size ", size, ")");
  }
  if (a.op == OpType::kReducescatter || a.op == OpType::kAlltoall) {
    TORCH_CHECK_VALUE(a.tensor.dim() >= 1, "gradfuse.", op,
                      ": tensor must have at least one dimension (the one split along)");
  }
  if (a.op == OpType::kReducescatter) {
    TORCH_CHECK_VALUE(a.reduce_op == ReduceOp::kSum || a.reduce_op == ReduceOp::kAverage,
                      "gradfuse.reducescatter: op must be Sum or Average, got ",
                      reduce_op_name(a.reduce_op));
  }
  std::vector<int64_t> splits = a.splits;
  if (a.op == OpType::kAlltoall) {
    const int64_t dim0 = a.tensor.size(0);
    if (splits.empty()) {
      TORCH_CHECK_VALUE(dim0 % size == 0, "gradfuse.alltoall: tensor's first dimension (", dim0,
                        ") does not divide by the number of ranks (", size, "); pass splits");
      splits.assign(size, dim0 / size);
    }
    TORCH_CHECK_VALUE(static_cast<int>(splits.size()) == size,
                      "gradfuse.alltoall: splits must have one entry per rank (", size, "), got ",
                      splits.size());
    // Summed without overflow: each split must fit in what is left of dim0.
    int64_t sum = 0;
    for (int64_t s : splits) {
      TORCH_CHECK_VALUE(s >= 0, "gradfuse.alltoall: splits must be >= 0, got ", s);
      TORCH_CHECK_VALUE(s <= dim0 - sum,
                        "gradfuse.alltoall: splits must sum to the tensor's first dimension (",
                        dim0, "), but they exceed it");
      sum += s;
    }
    TORCH_CHECK_VALUE(sum == dim0,
                      "gradfuse.alltoall: splits must sum to the tensor's first "
                      "dimension (",
                      dim0, "), got ", sum);
  } else {
    TORCH_CHECK_VALUE(splits.empty(), "gradfuse.", op, ": splits are for alltoall only");
  }
  if (a.op == OpType::kAllreduce) {
    const int r = static_cast<int>(a.reduce_op);
    TORCH_CHECK_VALUE(r >= 0 && r <= static_cast<int>(ReduceOp::kProduct),
                      "gradfuse.allreduce: op ", r, " is not Sum, Average, Min, Max or Product");
  }

  return splits;
}

}  // namespace gradfuse::engine
