// The run-time half of multi_tensor.cuh's choice of table size.
#include <atomic>

#include "multi_tensor.cuh"

namespace gradfuse::cuda {

bool large_kernel_args_supported() {
#if defined(GRADFUSE_LARGE_KERNEL_ARGS)
  constexpr int kMaxDevices = 64;
  // Per device: 0 unknown, 1 no, 2 yes. Racing first calls compute the same answer.
  static std::atomic<int> known[kMaxDevices] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (device >= 0 && device < kMaxDevices) {
    const int k = known[device].load(std::memory_order_relaxed);
    if (k != 0) return k == 2;
  }
  int driver = 0, major = 0;
  const bool yes = cudaDriverGetVersion(&driver) == cudaSuccess && driver >= 12010 &&
                   cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) ==
                       cudaSuccess &&
                   major >= 7;
  if (device >= 0 && device < kMaxDevices) {
    known[device].store(yes ? 2 : 1, std::memory_order_relaxed);
  }
  return yes;
#else
  return false;
#endif
}

}  // namespace gradfuse::cuda
