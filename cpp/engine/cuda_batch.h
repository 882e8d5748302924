// How the engine runs a batch of CUDA tensors: on its own stream of this rank's GPU, ordered
// after the streams that produced the tensors (events, no host sync), with the handles done
// only once the device has finished and the transport reported no error. CUDA builds only.
#pragma once

#ifdef GRADFUSE_WITH_CUDA
#include <c10/core/Device.h>
#include <c10/cuda/CUDAStream.h>

#include <functional>
#include <map>
#include <memory>

#include "engine/collectives.h"
#include "engine/fusion.h"
#include "engine/handles.h"
#include "engine/transport_health.h"

namespace gradfuse::engine {

// Called at enqueue, on the caller's thread: records an event on the caller's current stream of
// `device` (the tensor's device, whatever the current device is). The returned function, run
// by CudaBatchRunner::run under the engine's stream, makes that stream wait for the event
// before it reads the tensor.
std::function<void()> order_after_producer(c10::Device device);

// What a CUDA batch hands its handles: per entry the output and what synchronize() runs (the
// caller's stream waits for the engine's), and the device work they all wait for.
struct CudaBatchResult {
  std::vector<at::Tensor> outputs;
  std::vector<std::function<void()>> on_release;
  std::shared_ptr<DeviceCompletion> completion;
};

class CudaBatchRunner {
 public:
  // `health`: what the CUDA group's transport reports after the fact (engine/transport_health.h).
  explicit CudaBatchRunner(std::shared_ptr<const TransportHealth> health)
      : health_(std::move(health)) {}

  // Runs `batch` (its entries taken; a joined rank's missing ones still to make) on `device`
  // (this rank's GPU), queueing work on the engine's stream only (the host never waits for the
  // GPU): `fill_placeholders` runs under that stream, so a joined rank's zero placeholders are
  // written by the stream that reads them; the stream waits for each tensor's producer; the
  // collective runs. The caller completes the handles with the result.
  CudaBatchResult run(Batch& batch, const CollectiveContext& ctx, c10::Device device,
                      const std::function<void(Batch&)>& fill_placeholders);

 private:
  std::map<c10::DeviceIndex, c10::cuda::CUDAStream> streams_;  // one engine stream per GPU
  std::shared_ptr<const TransportHealth> health_;
};

}  // namespace gradfuse::engine
#endif
