// Argument validation shared by the op implementations. Every failure is a TORCH_CHECK whose
// message names the op, the argument (with its list index), what was expected and what came;
// from Python these surface as RuntimeError / TypeError / ValueError.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace gradfuse::ops {

// "grads[3]" or "out".
inline std::string arg_name(const char* name, int64_t index = -1) {
  return index < 0 ? std::string(name) : std::string(name) + "[" + std::to_string(index) + "]";
}

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

inline void check_same_length(const char* op, const char* a, size_t na, const char* b,
                              size_t nb) {
  TORCH_CHECK_VALUE(na == nb, op, ": ", b, " must have one entry per ", a, " (", na,
                    " entries), got ", nb);
}

inline void check_defined(const char* op, const std::string& name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", name, " is an undefined tensor");
}

inline void check_contiguous(const char* op, const std::string& name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name,
                    " must be contiguous, got a tensor with sizes ", t.sizes(), " and strides ",
                    t.strides(), " (call .contiguous() first)");
}

inline void check_device(const char* op, const std::string& name, const at::Tensor& t,
                         const at::Device& expected, const char* expected_from) {
  TORCH_CHECK_VALUE(t.device() == expected, op, ": all tensors must be on one device; ", name,
                    " is on ", t.device(), " but ", expected_from, " is on ", expected);
}

inline void check_float(const char* op, const std::string& name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(is_float_dtype(t.scalar_type()), op, ": ", name,
                   " must be float32, float16, bfloat16 or float64, got ", t.scalar_type());
}

inline void check_dtype(const char* op, const std::string& name, const at::Tensor& t,
                        at::ScalarType expected, const char* why) {
  TORCH_CHECK_TYPE(t.scalar_type() == expected, op, ": ", name, " must be ", expected, " (",
                   why, "), got ", t.scalar_type());
}

inline void check_same_numel(const char* op, const std::string& a, const at::Tensor& ta,
                             const std::string& b, const at::Tensor& tb) {
  TORCH_CHECK_VALUE(ta.numel() == tb.numel(), op, ": ", b, " must have as many elements as ", a,
                    " (", ta.numel(), "), got ", tb.numel(), " (sizes ", tb.sizes(), ")");
}

// A optional one-element float32 flag/scalar on `device` (found_inf, grad_scale, nonfinite).
inline void check_scalar_flag(const char* op, const char* name, const at::Tensor& t,
                              const at::Device& device) {
  TORCH_CHECK_VALUE(t.numel() == 1, op, ": ", name, " must have exactly one element, got ",
                    t.numel(), " (sizes ", t.sizes(), ")");
  check_dtype(op, name, t, at::kFloat, "a float32 flag, as torch.amp.GradScaler uses");
  check_device(op, name, t, device, "the other tensors");
}

inline void check_finite(const char* op, const char* name, double value) {
  TORCH_CHECK_VALUE(std::isfinite(value), op, ": ", name, " must be a finite number, got ", value);
}

// One tensor of a call for check_no_overlap: its argument name and whether the op writes it.
struct MemoryUse {
  std::string name;
  const at::Tensor* tensor;
  bool written;
};

// A tensor the op writes must share no memory with a tensor it reads (nor, unless
// `writes_may_overlap`, with another it writes): the kernels read and write in parallel chunks,
// so an overlap gives silently wrong results. (unpack_ lets its outputs overlap: the engine
// unpacks a broadcast into tied weights, the same tensor twice, with the same values.) The
// tensors are contiguous (checked before), so each occupies [data, data + nbytes): one sort and
// one sweep, cheap for many tensors. Tensors without memory (meta) are skipped.
inline void check_no_overlap(const char* op, const std::vector<MemoryUse>& uses,
                             bool writes_may_overlap = false) {
  struct Span {
    uintptr_t begin, end;
    size_t use;
  };
  std::vector<Span> spans;
  spans.reserve(uses.size());
  for (size_t i = 0; i < uses.size(); ++i) {
    const at::Tensor& t = *uses[i].tensor;
    if (!t.defined() || t.is_meta() || t.numel() == 0) continue;
    const auto begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
    spans.push_back({begin, begin + static_cast<uintptr_t>(t.nbytes()), i});
  }
  std::sort(spans.begin(), spans.end(),
            [](const Span& a, const Span& b) { return a.begin < b.begin; });
  // Of the spans before this one, the one reaching furthest per kind: if any earlier span of a
  // kind overlaps this one, that one does too.
  const Span* furthest_read = nullptr;
  const Span* furthest_written = nullptr;
  auto overlaps = [](const Span* earlier, const Span& s) {
    return earlier != nullptr && earlier->end > s.begin;
  };
  for (const Span& s : spans) {
    const bool written = uses[s.use].written;
    const Span* clash = nullptr;
    if (overlaps(furthest_written, s) && (!written || !writes_may_overlap)) {
      clash = furthest_written;
    } else if (written && overlaps(furthest_read, s)) {
      clash = furthest_read;
    }
    TORCH_CHECK_VALUE(clash == nullptr, op, ": ", uses[clash ? clash->use : 0].name,
                      " and ", uses[s.use].name,
                      " overlap in memory; a tensor the op writes must not share memory with "
                      "another argument (pass separate tensors, e.g. .clone())");
    const Span*& furthest = written ? furthest_written : furthest_read;
    if (furthest == nullptr || s.end > furthest->end) furthest = &s;
  }
}

}  // namespace gradfuse::ops
