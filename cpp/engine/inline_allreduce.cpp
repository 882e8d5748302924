#include "engine/inline_allreduce.h"

#include <ATen/ATen.h>
#include <c10/core/DeviceType.h>

#include "engine/fusion.h"

namespace gradfuse::engine {

namespace {

int64_t numel_of(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// A flat tensor over packed bytes (no copy; the bytes outlive it).
at::Tensor packed_view(const uint8_t* data, int64_t numel, at::ScalarType wire) {
  return at::from_blob(const_cast<uint8_t*>(data), {numel}, at::TensorOptions().dtype(wire));
}

}  // namespace

int64_t inline_input_bytes(const Request& request) {
  return numel_of(request.shape) *
         static_cast<int64_t>(c10::elementSize(wire_dtype(request.dtype)));
}

std::optional<std::vector<uint8_t>> inline_input(const Entry& entry, size_t room) {
  const Request& r = entry.request;
  const bool sum_like = r.reduce_op == ReduceOp::kSum || r.reduce_op == ReduceOp::kAverage;
  if (r.op != OpType::kAllreduce || !sum_like ||
      r.device_type != static_cast<int8_t>(c10::DeviceType::CPU) || entry.sq_norm.defined() ||
      !entry.output.defined() || !entry.tensor.defined()) {
    return std::nullopt;
  }
  const int64_t bytes = inline_input_bytes(r);
  if (bytes > kInlineMaxBytes || bytes > static_cast<int64_t>(room)) return std::nullopt;
  std::vector<uint8_t> out(bytes);
  pack({entry.tensor}, packed_view(out.data(), entry.tensor.numel(), wire_dtype(r.dtype)),
       entry.prescale);
  return out;
}

at::Tensor reduce_inline(const Response& response, const Entry& entry, int size) {
  const Request& r = response.request;
  TORCH_CHECK(static_cast<int>(response.inline_inputs.size()) == size,
              "gradfuse: inline allreduce of '", response.name, "' has ",
              response.inline_inputs.size(), " inputs for ", size, " ranks (internal error)");
  const at::ScalarType wire = wire_dtype(r.dtype);
  const int64_t numel = numel_of(r.shape);
  const at::ScalarType wide = at::isFloatingType(wire) ? at::kDouble : at::kLong;
  const auto& inputs = response.inline_inputs;
  at::Tensor sum = packed_view(inputs[0].data(), numel, wire).to(wide, false, /*copy=*/true);
  for (size_t k = 1; k < inputs.size(); ++k) sum.add_(packed_view(inputs[k].data(), numel, wire));
  const double average = r.reduce_op == ReduceOp::kAverage ? 1.0 / size : 1.0;
  unpack(sum.to(wire), {entry.output}, entry.postscale * average);
  return entry.output;
}

}  // namespace gradfuse::engine
