// Errors a transport reports after the fact. NCCL runs a collective asynchronously on the
// device: a peer that dies or a collective that times out is noticed later by c10d's watchdog,
// which (with TORCH_NCCL_ASYNC_ERROR_HANDLING=2, set by gradfuse.init() for the engine's NCCL
// group) aborts the communicator, so the kernels end, and records the error in the backend
// instead of tearing the process down. A handle's device completion asks here whether its work
// really succeeded. Gloo reports its errors synchronously, from Work::wait(), and has nothing to
// say here.
#pragma once

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <string>

namespace gradfuse::engine {

class TransportHealth {
 public:
  // `group`: the group whose backend for `device_type` ran the work (may be null: healthy).
  TransportHealth(const c10::intrusive_ptr<c10d::ProcessGroup>& group, c10::DeviceType device_type,
                  int rank);
  // Empty while healthy; otherwise the error, naming this rank and what the transport said.
  std::string error() const;

 private:
  c10::intrusive_ptr<c10d::Backend> backend_;  // null when the backend cannot tell (Gloo)
  int rank_;
};

}  // namespace gradfuse::engine
