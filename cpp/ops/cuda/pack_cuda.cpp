// pack_ / unpack_ on CUDA: the same validation as the CPU (check_pack_args, cpp/ops/pack.cpp),
// then cuda::pack / cuda::unpack on the current stream. No host sync: the non-finite flag and
// unpack_'s sq_norms are written on the device.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "cuda/kernels.h"
#include "ops/cuda/cuda_check.h"
#include "ops/dtypes.h"
#include "ops/op_args.h"

namespace gradfuse::ops {
namespace {

std::vector<cuda::PackSegment> segments_of(at::TensorList tensors,
                                           const std::vector<int64_t>& offsets) {
  std::vector<cuda::PackSegment> segments(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    segments[i] = {tensors[i].data_ptr(), offsets[i], tensors[i].numel(),
                   cuda_dtype(tensors[i].scalar_type())};
  }
  return segments;
}

float* flag_ptr(const std::optional<at::Tensor>& nonfinite) {
  return nonfinite.has_value() ? nonfinite->data_ptr<float>() : nullptr;
}

void pack_cuda(at::TensorList tensors, const at::Tensor& out, double scale,
               const std::optional<at::Tensor>& nonfinite) {
  const auto offsets = check_pack_args("pack_", tensors, out, "out", nonfinite, scale, true);
  if (offsets.back() == 0) return;
  const c10::cuda::CUDAGuard device_guard(out.device());
  const auto segments = segments_of(tensors, offsets);
  // The scale reaches the kernels as double, as it reaches the CPU kernels (cpu::convert):
  // float64 data is scaled in fp64 by it, other dtypes in fp32 by its nearest float.
  check_cuda(cuda::pack(segments.data(), static_cast<int64_t>(segments.size()), out.data_ptr(),
                        cuda_dtype(out.scalar_type()), scale, flag_ptr(nonfinite),
                        c10::cuda::getCurrentCUDAStream().stream()),
             "pack_", "the pack kernel");
}

void unpack_cuda(const at::Tensor& flat, at::TensorList tensors, double scale, bool accumulate,
                 const std::optional<at::Tensor>& nonfinite,
                 const std::optional<at::Tensor>& sq_norms) {
  const auto offsets = check_pack_args("unpack_", tensors, flat, "flat", nonfinite, scale, false);
  check_sq_norms_arg("unpack_", sq_norms, tensors, flat);
  if (offsets.back() == 0 && !sq_norms.has_value()) return;
  const c10::cuda::CUDAGuard device_guard(flat.device());
  const auto segments = segments_of(tensors, offsets);
  const auto n = static_cast<int64_t>(segments.size());
  // The norms' per-chunk partials, from torch's caching allocator (kept for this stream until
  // the kernels queued here have used it).
  at::Tensor scratch;
  if (sq_norms.has_value()) {
    scratch = at::empty({static_cast<int64_t>(cuda::unpack_scratch_bytes(n, offsets.back()))},
                        flat.options().dtype(at::kByte));
  }
  check_cuda(cuda::unpack(segments.data(), n, flat.const_data_ptr(),
                          cuda_dtype(flat.scalar_type()), scale, accumulate, flag_ptr(nonfinite),
                          sq_norms.has_value() ? sq_norms->data_ptr<double>() : nullptr,
                          scratch.defined() ? scratch.data_ptr() : nullptr,
                          c10::cuda::getCurrentCUDAStream().stream()),
             "unpack_", "the unpack kernel");
}

}  // namespace

TORCH_LIBRARY_IMPL(gradfuse, CUDA, m) {
  m.impl("pack_", &pack_cuda);
  m.impl("unpack_", &unpack_cuda);
}

}  // namespace gradfuse::ops
