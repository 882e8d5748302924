#include "engine/cuda_batch.h"

#ifdef GRADFUSE_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>

#include <stdexcept>

#include "engine/cuda_event.h"
#include "engine/handles.h"

namespace gradfuse::engine {

namespace {

// A CUDA handle is done when the engine stream's event after its collective has completed, and
// only if the transport reports no error by then: an NCCL communicator aborted by c10d's
// watchdog also ends its kernels, so the event alone would call a failed collective done.
class CudaCompletion : public DeviceCompletion {
 public:
  CudaCompletion(std::shared_ptr<CudaEvent> done, std::shared_ptr<const TransportHealth> health)
      : done_(std::move(done)), health_(std::move(health)) {}
  bool query() override {
    if (health_) {
      const std::string error = health_->error();
      if (!error.empty()) throw std::runtime_error(error);
    }
    return done_->query();
  }

 private:
  std::shared_ptr<CudaEvent> done_;
  std::shared_ptr<const TransportHealth> health_;  // shared: a handle may outlive the engine
};

}  // namespace

std::function<void()> order_after_producer(c10::Device device) {
  auto ready = std::make_shared<CudaEvent>(device.index());
  ready->record(c10::cuda::getCurrentCUDAStream(device.index()));
  return [ready, device] { ready->block(c10::cuda::getCurrentCUDAStream(device.index())); };
}

CudaBatchResult CudaBatchRunner::run(Batch& batch, const CollectiveContext& ctx,
                                     c10::Device device,
                                     const std::function<void(Batch&)>& fill_placeholders) {
  const c10::DeviceIndex index = device.index();
  c10::cuda::CUDAGuard device_guard(index);
  auto it = streams_.find(index);
  if (it == streams_.end()) {
    it = streams_.emplace(index, c10::cuda::getStreamFromPool(/*isHighPriority=*/false, index))
             .first;
  }
  const c10::cuda::CUDAStream stream = it->second;
  c10::cuda::CUDAStreamGuard stream_guard(stream);
  // Joined-rank placeholders are zero-filled here, on the engine's stream, which reads them.
  fill_placeholders(batch);
  for (const Entry& e : batch.entries) {
    TORCH_CHECK(e.tensor.device() == device, "gradfuse: '", e.request.name, "' is on ",
                e.tensor.device().str(), " but the engine runs on ", device.str(),
                " (internal error)");
    if (e.wait_for_producer) e.wait_for_producer();
  }
  // NCCL orders its kernels after the current (engine) stream; Work::wait() orders the engine
  // stream after NCCL's. No host-side synchronization.
  CudaBatchResult result;
  result.outputs = run_batch(batch, ctx);
  auto done = std::make_shared<CudaEvent>(index);
  done->record(stream);
  result.completion = std::make_shared<CudaCompletion>(done, health_);
  for (size_t i = 0; i < batch.entries.size(); ++i) {
    const Entry& e = batch.entries[i];
    // The caller may free its tensors once the handle completes; the allocator must not reuse
    // the memory before the engine's stream is done with it.
    c10::cuda::CUDACachingAllocator::recordStream(e.tensor.storage().data_ptr(), stream);
    const at::Tensor out = result.outputs[i];
    c10::cuda::CUDACachingAllocator::recordStream(out.storage().data_ptr(), stream);
    result.on_release.emplace_back([done, out] {
      // synchronize(): the caller's stream (the current stream of the output's device,
      // whatever the current device is) waits for the engine's completion event.
      const auto caller = c10::cuda::getCurrentCUDAStream(out.device().index());
      done->block(caller);
      c10::cuda::CUDACachingAllocator::recordStream(out.storage().data_ptr(), caller);
    });
  }
  return result;
}

}  // namespace gradfuse::engine
#endif
