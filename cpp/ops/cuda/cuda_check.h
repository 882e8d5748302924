// Shared by the CUDA op implementations in this directory: turning a cudaError_t from the
// kernel layer (cuda/kernels.h) into a torch error that names the op and the step.
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

namespace gradfuse::ops {

inline void check_cuda(cudaError_t err, const char* op, const char* step) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA error in ", step, ": ", cudaGetErrorName(err), " (",
              cudaGetErrorString(err), ")");
}

}  // namespace gradfuse::ops
