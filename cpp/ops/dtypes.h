// at::ScalarType -> the kernel layers' own dtype enums (cpu/kernels.h, cuda/kernels.h).
#pragma once

#include <ATen/ATen.h>

#include "cpu/kernels.h"
#if defined(GRADFUSE_WITH_CUDA)
#include "cuda/kernels.h"
#endif

namespace gradfuse::ops {

template <class DType>
DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kFloat64;
    default: TORCH_CHECK(false, "gradfuse: no kernel dtype for ", t);  // validated earlier
  }
}

inline cpu::DType cpu_dtype(at::ScalarType t) { return kernel_dtype<cpu::DType>(t); }

#if defined(GRADFUSE_WITH_CUDA)
inline cuda::DType cuda_dtype(at::ScalarType t) { return kernel_dtype<cuda::DType>(t); }
#endif

inline int64_t cpu_dtype_size(cpu::DType t) {
  return t == cpu::DType::kFloat64 ? 8 : t == cpu::DType::kFloat32 ? 4 : 2;
}

}  // namespace gradfuse::ops
