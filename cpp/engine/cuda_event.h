// A timing-free CUDA event recorded on one stream and waited on by others: how the engine
// orders its stream after the caller's (enqueue) and the caller's after its own (synchronize)
// without a host sync. Plain cudaEvent_t rather than at::cuda::CUDAEvent, whose header pulls in
// cuBLAS/cuSPARSE headers that a CUDA toolkit need not ship.
#pragma once

#ifdef GRADFUSE_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

namespace gradfuse::engine {

class CudaEvent {
 public:
  explicit CudaEvent(c10::DeviceIndex device) : device_(device) {
    c10::cuda::CUDAGuard guard(device_);
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming));
  }
  ~CudaEvent() {
    c10::cuda::CUDAGuard guard(device_);
    cudaEventDestroy(event_);  // no throw from a destructor; a failure here is harmless
  }
  CudaEvent(const CudaEvent&) = delete;
  CudaEvent& operator=(const CudaEvent&) = delete;

  // Under a guard of the event's device: the stream must be on it, and the current device may
  // be another one (a caller that never called torch.cuda.set_device).
  void record(const c10::cuda::CUDAStream& stream) {
    TORCH_CHECK(stream.device_index() == device_, "gradfuse: event of cuda:", int(device_),
                " recorded on a stream of cuda:", int(stream.device_index()), " (internal error)");
    c10::cuda::CUDAGuard guard(device_);
    C10_CUDA_CHECK(cudaEventRecord(event_, stream.stream()));
  }
  // Work queued on `stream` (of any device) after this call waits for the recorded point.
  void block(const c10::cuda::CUDAStream& stream) const {
    c10::cuda::CUDAGuard guard(stream.device_index());
    C10_CUDA_CHECK(cudaStreamWaitEvent(stream.stream(), event_, 0));
  }
  // True once the work recorded before it finished on the device. Never blocks.
  bool query() const {
    c10::cuda::CUDAGuard guard(device_);
    const cudaError_t status = cudaEventQuery(event_);
    if (status == cudaErrorNotReady) {
      (void)cudaGetLastError();  // not an error: clear it so later checks do not see it
      return false;
    }
    C10_CUDA_CHECK(status);
    return true;
  }

 private:
  c10::DeviceIndex device_;
  cudaEvent_t event_ = nullptr;
};

}  // namespace gradfuse::engine
#endif
