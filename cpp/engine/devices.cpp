#include "engine/devices.h"

#include <c10/util/Exception.h>

namespace gradfuse::engine {

std::string unsupported_device_error(const char* op, c10::Device device, bool built_with_cuda,
                                     bool has_cuda_group) {
  const std::string prefix = std::string("gradfuse.") + op + ": tensor is on " + device.str();
  if (device.is_cpu()) return "";
  if (!device.is_cuda()) {
    return prefix + "; gradfuse runs collectives on CPU and CUDA tensors only";
  }
  if (!built_with_cuda) {
    return prefix +
           ", but this gradfuse was built without CUDA (gradfuse.build_info()['cuda'] is "
           "False). Rebuild it where nvcc and a CUDA build of torch are present: "
           "GRADFUSE_CUDA=ON pip install --no-build-isolation .";
  }
  if (!has_cuda_group) {
    return prefix +
           ", but the engine has no process group for CUDA tensors: at init() CUDA was not "
           "available (torch.cuda.is_available() was False) or NCCL was not "
           "(torch.distributed.is_nccl_available()). Call gradfuse.init() where both are.";
  }
  return "";
}

void CudaDeviceBinding::bind(const char* op, c10::Device device) {
  TORCH_CHECK(device.is_cuda() && device.has_index(),
              "gradfuse: CudaDeviceBinding::bind needs a CUDA device with an index, got ",
              device.str(), " (internal error)");
  std::lock_guard<std::mutex> lock(mu_);
  if (!index_) {
    index_ = device.index();
    return;
  }
  TORCH_CHECK_VALUE(*index_ == device.index(), "gradfuse.", op, ": tensor is on ", device.str(),
                    ", but this rank's engine runs on cuda:", static_cast<int>(*index_),
                    " (the device of its first CUDA collective). One process drives one GPU: "
                    "call torch.cuda.set_device(gradfuse.local_rank()) and keep the model and "
                    "its gradients on that device.");
}

void CudaDeviceBinding::bind_if_unbound(c10::Device device) {
  TORCH_CHECK(device.is_cuda() && device.has_index(),
              "gradfuse: CudaDeviceBinding::bind_if_unbound needs a CUDA device with an index, "
              "got ",
              device.str(), " (internal error)");
  std::lock_guard<std::mutex> lock(mu_);
  if (!index_) index_ = device.index();
}

std::optional<c10::DeviceIndex> CudaDeviceBinding::bound() const {
  std::lock_guard<std::mutex> lock(mu_);
  return index_;
}

c10::Device CudaDeviceBinding::placeholder_device(c10::DeviceType type,
                                                  c10::DeviceIndex fallback) const {
  if (type != c10::DeviceType::CUDA) return c10::Device(type);
  const auto index = bound();
  return c10::Device(c10::DeviceType::CUDA, index ? *index : fallback);
}

}  // namespace gradfuse::engine
