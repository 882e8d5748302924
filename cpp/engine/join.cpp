#include "engine/join.h"

#include <ATen/ATen.h>

#include <algorithm>

#include "engine/handles.h"

namespace gradfuse::engine {

Entry joined_placeholder(const Response& response, c10::Device device) {
  const Request& r = response.request;
  const std::vector<int64_t>& shape = r.shape;
  TORCH_CHECK(device.type() == static_cast<c10::DeviceType>(r.device_type),
              "gradfuse: placeholder for '", response.name, "' on ", device.str(),
              " for a collective on another device type (internal error)");
  const auto options = at::TensorOptions().dtype(r.dtype).device(device);
  Entry e;
  e.handle = kNoHandle;
  e.request = r;
  e.tensor = at::zeros(shape, options);
  if (r.op == OpType::kAllreduce) e.output = at::empty(shape, options);
  return e;
}

bool joined_in(const Response& response, int rank) {
  return std::find(response.joined.begin(), response.joined.end(), rank) != response.joined.end();
}

}  // namespace gradfuse::engine
