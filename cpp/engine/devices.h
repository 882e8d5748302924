// Which device a rank's engine runs a collective on. Ranks agree on the device *type* of every
// collective (the controller checks it); the index is each rank's own: with one GPU per rank,
// rank 0's gradient lives on cuda:0 and rank 1's on cuda:1. So the index never travels in a
// request; each rank executes on its own tensor's device, and one process drives one GPU (as in
// Horovod, and as c10d's NCCL groups require). These decisions are host logic without CUDA
// calls, so CPU tests drive them through gradfuse._C._testing.
#pragma once

#include <c10/core/Device.h>

#include <mutex>
#include <optional>
#include <string>

namespace gradfuse::engine {

// Empty when the engine can run `op` on a tensor on `device`; otherwise the message enqueue
// raises (c10::ValueError): CUDA in a CPU-only build names the rebuild, CUDA without a CUDA
// process group says why there is none.
std::string unsupported_device_error(const char* op, c10::Device device, bool built_with_cuda,
                                     bool has_cuda_group);

// The CUDA device this rank's engine runs on. The first CUDA tensor enqueued binds it (or
// join(device=...), for a rank that joins before it submitted any); a later tensor on another
// CUDA device is a ValueError at enqueue, not a collective that pairs cuda:0 here with cuda:1
// there inside one NCCL communicator. Thread-safe: callers enqueue from any thread.
class CudaDeviceBinding {
 public:
  // Binds `device` (a CUDA device with an index) if nothing is bound; raises c10::ValueError
  // naming `op` when another device is bound.
  void bind(const char* op, c10::Device device);
  // join(device=...): binds `device` unless a device is bound already (then it is ignored: the
  // placeholders belong where the rank's data was).
  void bind_if_unbound(c10::Device device);
  // The bound index, if any.
  std::optional<c10::DeviceIndex> bound() const;
  // Where this rank creates a joined-rank placeholder for a collective on `type`: the CPU, or
  // the bound CUDA device, or `fallback` (the current device) when nothing is bound yet.
  c10::Device placeholder_device(c10::DeviceType type, c10::DeviceIndex fallback) const;

 private:
  mutable std::mutex mu_;
  std::optional<c10::DeviceIndex> index_;
};

}  // namespace gradfuse::engine
