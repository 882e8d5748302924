// pack_ / unpack_: many tensors <-> one contiguous (fusion) buffer, with dtype conversion and a
// scale applied in fp32 (in fp64, with the scale as given, when either side is float64) and one
// rounding. Validation for both devices and the CPU kernels.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>

#include "checks.h"
#include "chunks.h"
#include "dtypes.h"
#include "op_args.h"

namespace gradfuse::ops {

std::vector<int64_t> check_pack_args(const char* op, at::TensorList tensors, const at::Tensor& flat,
                                     const char* flat_name,
                                     const std::optional<at::Tensor>& nonfinite, double scale,
                                     bool flat_written) {
  check_finite(op, "scale", scale);
  check_defined(op, flat_name, flat);
  check_float(op, flat_name, flat);
  check_contiguous(op, flat_name, flat);
  std::vector<int64_t> offsets{0};
  offsets.reserve(tensors.size() + 1);
  for (size_t i = 0; i < tensors.size(); ++i) {
    const std::string name = arg_name("tensors", static_cast<int64_t>(i));
    check_defined(op, name, tensors[i]);
    check_float(op, name, tensors[i]);
    check_contiguous(op, name, tensors[i]);
    check_device(op, name, tensors[i], flat.device(), flat_name);
    offsets.push_back(offsets.back() + tensors[i].numel());
  }
  TORCH_CHECK_VALUE(offsets.back() <= flat.numel(), op, ": ", flat_name, " has ", flat.numel(),
                    " elements but the tensors hold ", offsets.back(), " in all");
  if (nonfinite.has_value()) check_scalar_flag(op, "nonfinite", *nonfinite, flat.device());
  std::vector<MemoryUse> uses{{flat_name, &flat, flat_written}};
  for (size_t i = 0; i < tensors.size(); ++i) {
    uses.push_back({arg_name("tensors", static_cast<int64_t>(i)), &tensors[i], !flat_written});
  }
  if (nonfinite.has_value()) uses.push_back({"nonfinite", &*nonfinite, true});
  check_no_overlap(op, uses, /*writes_may_overlap=*/!flat_written);
  return offsets;
}

void check_sq_norms_arg(const char* op, const std::optional<at::Tensor>& sq_norms,
                       at::TensorList tensors, const at::Tensor& flat) {
  if (!sq_norms.has_value()) return;
  const at::Tensor& t = *sq_norms;
  check_defined(op, "sq_norms", t);
  check_dtype(op, "sq_norms", t, at::kDouble, "one float64 sum of squares per tensor");
  check_contiguous(op, "sq_norms", t);
  check_device(op, "sq_norms", t, flat.device(), "flat");
  TORCH_CHECK_VALUE(t.dim() == 1 && t.numel() == static_cast<int64_t>(tensors.size()), op,
                    ": sq_norms must be 1-D with one element per tensor (", tensors.size(),
                    "), got sizes ", t.sizes());
  std::vector<MemoryUse> uses{{"sq_norms", &t, true}, {"flat", &flat, false}};
  for (size_t i = 0; i < tensors.size(); ++i) {
    uses.push_back({arg_name("tensors", static_cast<int64_t>(i)), &tensors[i], false});
  }
  check_no_overlap(op, uses);
}

namespace {

// Runs convert() over every (tensor, flat segment) pair in parallel chunks; true when any
// written value was non-finite. With `sq_norms`, sq_norms[i] = the sum of squares of what was
// written to tensors[i] (per-chunk partials, summed in chunk order: deterministic).
bool convert_all_cpu(at::TensorList tensors, const at::Tensor& flat,
                     const std::vector<int64_t>& offsets, double scale, bool to_flat,
                     bool accumulate, double* sq_norms = nullptr) {
  std::vector<int64_t> numels;
  for (const auto& t : tensors) numels.push_back(t.numel());
  const auto chunks = split_into_chunks(numels, kNormChunkElems);
  std::vector<double> partials(sq_norms != nullptr ? chunks.size() : 0);
  const cpu::DType flat_dtype = cpu_dtype(flat.scalar_type());
  const int64_t flat_elem = flat.element_size();
  char* flat_base = static_cast<char*>(flat.data_ptr());
  std::atomic<bool> nonfinite{false};
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t cb, int64_t ce) {
    bool bad = false;
    for (int64_t c = cb; c < ce; ++c) {
      const Chunk& ch = chunks[c];
      const at::Tensor& t = tensors[ch.tensor];
      char* t_ptr = static_cast<char*>(t.data_ptr()) + ch.begin * t.element_size();
      char* f_ptr = flat_base + (offsets[ch.tensor] + ch.begin) * flat_elem;
      const cpu::DType t_dtype = cpu_dtype(t.scalar_type());
      const int64_t n = ch.end - ch.begin;
      bad |= to_flat ? cpu::convert(t_ptr, t_dtype, f_ptr, flat_dtype, n, scale, accumulate)
                     : cpu::convert(f_ptr, flat_dtype, t_ptr, t_dtype, n, scale, accumulate,
                                    sq_norms != nullptr ? &partials[c] : nullptr);
    }
    if (bad) nonfinite.store(true, std::memory_order_relaxed);
  });
  if (sq_norms != nullptr) {
    const auto sums = sum_by_tensor(chunks, partials, tensors.size());
    std::copy(sums.begin(), sums.end(), sq_norms);
  }
  return nonfinite.load();
}

void pack_cpu(at::TensorList tensors, const at::Tensor& out, double scale,
              const std::optional<at::Tensor>& nonfinite) {
  const auto offsets = check_pack_args("pack_", tensors, out, "out", nonfinite, scale, true);
  const bool bad = convert_all_cpu(tensors, out, offsets, scale, /*to_flat=*/true, false);
  if (bad && nonfinite.has_value()) nonfinite->fill_(1.0);
}

void unpack_cpu(const at::Tensor& flat, at::TensorList tensors, double scale, bool accumulate,
                const std::optional<at::Tensor>& nonfinite,
                const std::optional<at::Tensor>& sq_norms) {
  const auto offsets = check_pack_args("unpack_", tensors, flat, "flat", nonfinite, scale, false);
  check_sq_norms_arg("unpack_", sq_norms, tensors, flat);
  const bool bad =
      convert_all_cpu(tensors, flat, offsets, scale, /*to_flat=*/false, accumulate,
                      sq_norms.has_value() ? sq_norms->data_ptr<double>() : nullptr);
  if (bad && nonfinite.has_value()) nonfinite->fill_(1.0);
}

}  // namespace

TORCH_LIBRARY_IMPL(gradfuse, CPU, m) {
  m.impl("pack_", &pack_cpu);
  m.impl("unpack_", &unpack_cpu);
}


}  // namespace gradfuse::ops
