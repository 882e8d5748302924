// lars_update_: multi-tensor fused LARS with momentum. Validation for both devices and the
// CPU implementation.
//
// Per tensor i (w = params[i], g = grads[i] / grad_scale, v = momentum_bufs[i]):
//   wd    = use_weight_decay[i] ? weight_decay : 0
//   trust = use_lars[i] && ||w|| != 0 && ||g|| != 0   (NaN norms propagate)
//           ? trust_coefficient * ||w|| / (||g|| + wd * ||w|| + eps) : 1
//   d     = g + wd * w
//   lr inside the momentum (You et al. 2017):  v = m*v + lr*trust*d;  w -= v
//   lr outside (torch-SGD style):              v = m*v + trust*d;     w -= lr*v
//   nesterov replaces the step v by m*v + (lr*)trust*d.
// model_copies[i], when given, receives the new w rounded once to its dtype.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "checks.h"
#include "chunks.h"
#include "dtypes.h"
#include "op_args.h"

namespace gradfuse::ops {

namespace {
constexpr const char* kOp = "lars_update_";

bool is_lars_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_lars_dtype(const std::string& name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(is_lars_dtype(t.scalar_type()), kOp, ": ", name,
                   " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

void check_hyper(const char* name, double value, bool nonnegative) {
  TORCH_CHECK_VALUE(std::isfinite(value) && (!nonnegative || value >= 0), kOp, ": ", name,
                    " must be a finite", nonnegative ? " non-negative" : "", " number, got ", value);
}
}  // namespace

void check_lars_args(at::TensorList params, at::TensorList grads, at::TensorList momentum_bufs,
                     at::TensorList model_copies, const c10::List<bool>& use_lars,
                     const c10::List<bool>& use_weight_decay, double lr, double momentum,
                     double weight_decay, double trust_coefficient, double eps,
                     const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf) {
  const size_t n = params.size();
  check_same_length(kOp, "params", n, "grads", grads.size());
  check_same_length(kOp, "params", n, "momentum_bufs", momentum_bufs.size());
  check_same_length(kOp, "params", n, "use_lars", use_lars.size());
  check_same_length(kOp, "params", n, "use_weight_decay", use_weight_decay.size());
  TORCH_CHECK_VALUE(model_copies.empty() || model_copies.size() == n, kOp,
                    ": model_copies must be empty or have one entry per params (", n,
                    " entries), got ", model_copies.size());
  check_hyper("lr", lr, true);
  check_hyper("momentum", momentum, true);
  check_hyper("weight_decay", weight_decay, true);
  check_hyper("trust_coefficient", trust_coefficient, true);
  check_hyper("eps", eps, true);
  if (n == 0) return;

  const at::Device device = params[0].device();
  const at::ScalarType param_dtype = params[0].scalar_type();
  const at::ScalarType grad_dtype = grads[0].scalar_type();
  for (size_t i = 0; i < n; ++i) {
    const auto idx = static_cast<int64_t>(i);
    const at::Tensor* tensors[] = {&params[i], &grads[i], &momentum_bufs[i]};
    const char* names[] = {"params", "grads", "momentum_bufs"};
    for (int a = 0; a < 3; ++a) {
      const std::string name = arg_name(names[a], idx);
      check_defined(kOp, name, *tensors[a]);
      check_lars_dtype(name, *tensors[a]);
      check_contiguous(kOp, name, *tensors[a]);
      check_device(kOp, name, *tensors[a], device, "params[0]");
      if (a > 0) check_same_numel(kOp, arg_name("params", idx), params[i], name, *tensors[a]);
    }
    check_dtype(kOp, arg_name("params", idx), params[i], param_dtype,
                "every param must share the dtype of params[0]");
    check_dtype(kOp, arg_name("grads", idx), grads[i], grad_dtype,
                "every grad must share the dtype of grads[0]");
    check_dtype(kOp, arg_name("momentum_bufs", idx), momentum_bufs[i], param_dtype,
                "momentum buffers have the dtype of the params");
    if (!model_copies.empty()) {
      const std::string name = arg_name("model_copies", idx);
      check_defined(kOp, name, model_copies[i]);
      check_lars_dtype(name, model_copies[i]);
      check_contiguous(kOp, name, model_copies[i]);
      check_device(kOp, name, model_copies[i], device, "params[0]");
      check_same_numel(kOp, arg_name("params", idx), params[i], name, model_copies[i]);
      check_dtype(kOp, name, model_copies[i], model_copies[0].scalar_type(),
                  "every model copy must share the dtype of model_copies[0]");
    }
  }
  if (grad_scale.has_value()) check_scalar_flag(kOp, "grad_scale", *grad_scale, device);
  if (found_inf.has_value()) check_scalar_flag(kOp, "found_inf", *found_inf, device);
  std::vector<MemoryUse> uses;
  for (size_t i = 0; i < n; ++i) {
    const auto idx = static_cast<int64_t>(i);
    uses.push_back({arg_name("params", idx), &params[i], true});
    uses.push_back({arg_name("grads", idx), &grads[i], false});
    uses.push_back({arg_name("momentum_bufs", idx), &momentum_bufs[i], true});
    if (!model_copies.empty()) {
      uses.push_back({arg_name("model_copies", idx), &model_copies[i], true});
    }
  }
  if (grad_scale.has_value()) uses.push_back({"grad_scale", &*grad_scale, false});
  if (found_inf.has_value()) uses.push_back({"found_inf", &*found_inf, false});
  check_no_overlap(kOp, uses);
}

namespace {
// The norm tensors of lars_update_from_norms_: float64, one element per param, on its device.
void check_norm_tensor(const char* op, const char* name, const at::Tensor& t, int64_t n,
                       const at::Device& device) {
  check_defined(op, name, t);
  check_dtype(op, name, t, at::kDouble, "one float64 sum of squares per param");
  check_contiguous(op, name, t);
  check_device(op, name, t, device, "params[0]");
  TORCH_CHECK_VALUE(t.dim() == 1 && t.numel() == n, op, ": ", name,
                    " must be 1-D with one element per param (", n, "), got sizes ", t.sizes());
}
}  // namespace

void check_lars_norm_args(at::TensorList params, const at::Tensor& grad_sq_norms,
                          const at::Tensor& param_sq_norms) {
  const char* op = "lars_update_from_norms_";
  const auto n = static_cast<int64_t>(params.size());
  const at::Device device = n > 0 ? params[0].device() : grad_sq_norms.device();
  check_norm_tensor(op, "grad_sq_norms", grad_sq_norms, n, device);
  check_norm_tensor(op, "param_sq_norms", param_sq_norms, n, device);
  TORCH_CHECK_VALUE(n == 0 || !param_sq_norms.is_alias_of(grad_sq_norms), op,
                    ": param_sq_norms (written) and grad_sq_norms must not share memory");
}

cpu::LarsStep lars_step_for(double w_sq, double g_sq, bool use_lars, bool use_wd,
                            const LarsHyper& h) {
  const double wd = use_wd ? h.weight_decay : 0.0;
  const double wn = std::sqrt(w_sq);
  const double gn = std::sqrt(g_sq) * h.inv_scale;
  // `!= 0` rather than `> 0`: a NaN norm must poison the ratio (and so the update), not
  // silently fall back to ratio 1 and a step hundreds of times too large.
  double trust = 1.0;
  if (use_lars && wn != 0.0 && gn != 0.0) {
    trust = h.trust_coefficient * wn / (gn + wd * wn + h.eps);
  }
  return {h.inv_scale,
          static_cast<float>(wd),
          static_cast<float>(h.momentum),
          static_cast<float>(h.lr_in_momentum ? h.lr * trust : trust),
          static_cast<float>(h.lr_in_momentum ? 1.0 : h.lr),
          h.nesterov};
}

namespace {

// Tensors are processed in waves of about this many bytes of (param + grad): the norm pass of
// a wave leaves it in the last-level cache for the update pass that follows.
constexpr int64_t kWaveBytes = 8 << 20;

// The tensors [begin, begin + numels.size()) of a call, cut into norm chunks.
struct Wave {
  int64_t begin;
  std::vector<int64_t> numels;
  std::vector<Chunk> chunks;
};

Wave make_wave(at::TensorList params, int64_t begin, int64_t end) {
  Wave w{begin, {}, {}};
  for (int64_t t = begin; t < end; ++t) w.numels.push_back(params[t].numel());
  w.chunks = split_into_chunks(w.numels, kNormChunkElems);
  return w;
}

char* chunk_ptr(const at::Tensor& x, const Chunk& ch) {
  return static_cast<char*>(x.data_ptr()) + ch.begin * x.element_size();
}

// The update of every chunk of a wave; returns the per-tensor sums of squares of the new params.
std::vector<double> update_wave(const Wave& w, at::TensorList params, at::TensorList grads,
                                at::TensorList momentum_bufs, at::TensorList model_copies,
                                const std::vector<cpu::LarsStep>& steps) {
  const cpu::DType param_dtype = cpu_dtype(params[0].scalar_type());
  const cpu::DType grad_dtype = cpu_dtype(grads[0].scalar_type());
  const bool has_copy = !model_copies.empty();
  const cpu::DType copy_dtype = has_copy ? cpu_dtype(model_copies[0].scalar_type()) : param_dtype;
  std::vector<double> w2(w.chunks.size());
  at::parallel_for(0, static_cast<int64_t>(w.chunks.size()), 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const Chunk& ch = w.chunks[c];
      const int64_t t = w.begin + ch.tensor;
      w2[c] = cpu::lars_update(chunk_ptr(params[t], ch), param_dtype, chunk_ptr(grads[t], ch),
                               grad_dtype, chunk_ptr(momentum_bufs[t], ch),
                               has_copy ? chunk_ptr(model_copies[t], ch) : nullptr, copy_dtype,
                               ch.end - ch.begin, steps[ch.tensor]);
    }
  });
  return sum_by_tensor(w.chunks, w2, w.numels.size());
}

// Per-tensor sums of squares of `xs` over a wave (only where use_lars: elsewhere 0).
std::vector<double> wave_sum_squares(const Wave& w, at::TensorList xs,
                                     const c10::List<bool>& use_lars) {
  const cpu::DType dtype = cpu_dtype(xs[0].scalar_type());
  std::vector<double> partial(w.chunks.size(), 0.0);
  at::parallel_for(0, static_cast<int64_t>(w.chunks.size()), 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const Chunk& ch = w.chunks[c];
      const int64_t t = w.begin + ch.tensor;
      if (!use_lars.get(t)) continue;  // trust ratio 1: norms not needed
      partial[c] = cpu::sum_squares(chunk_ptr(xs[t], ch), dtype, ch.end - ch.begin);
    }
  });
  return sum_by_tensor(w.chunks, partial, w.numels.size());
}

// grad_scale and found_inf, read on the host (CPU tensors). Returns false to skip the step.
bool read_amp_scalars(const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& found_inf, LarsHyper& h) {
  if (found_inf.has_value() && found_inf->item<float>() != 0.0f) return false;
  h.inv_scale = grad_scale.has_value() ? 1.0f / grad_scale->item<float>() : 1.0f;
  return true;
}

// The standalone two-pass op: norms of each wave, then its update.
void lars_update_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_bufs,
                     at::TensorList model_copies, const c10::List<bool>& use_lars,
                     const c10::List<bool>& use_weight_decay, double lr, double momentum,
                     double weight_decay, double trust_coefficient, double eps, bool nesterov,
                     bool lr_in_momentum, const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf) {
  check_lars_args(params, grads, momentum_bufs, model_copies, use_lars, use_weight_decay, lr,
                  momentum, weight_decay, trust_coefficient, eps, grad_scale, found_inf);
  const int64_t n = static_cast<int64_t>(params.size());
  LarsHyper h{lr, momentum, weight_decay, trust_coefficient, eps, nesterov, lr_in_momentum, 1.0f};
  if (n == 0 || !read_amp_scalars(grad_scale, found_inf, h)) return;
  const int64_t bytes_per_elem = params[0].element_size() + grads[0].element_size();
  int64_t begin = 0;
  while (begin < n) {
    int64_t end = begin, bytes = 0;  // one wave: up to kWaveBytes (at least one tensor)
    while (end < n && (end == begin || bytes < kWaveBytes)) {
      bytes += params[end].numel() * bytes_per_elem;
      ++end;
    }
    const Wave w = make_wave(params, begin, end);
    const auto w_sq = wave_sum_squares(w, params, use_lars);
    const auto g_sq = wave_sum_squares(w, grads, use_lars);
    std::vector<cpu::LarsStep> steps;
    for (int64_t t = begin; t < end; ++t) {
      steps.push_back(lars_step_for(w_sq[t - begin], g_sq[t - begin], use_lars.get(t),
                                    use_weight_decay.get(t), h));
    }
    update_wave(w, params, grads, momentum_bufs, model_copies, steps);
    begin = end;
  }
}

// The one-pass op: the norms come in (the grads' from the unpack that wrote them, the params'
// from the previous step), so each element is read and written once; the new params' squared
// norms go out for the next step.
void lars_update_from_norms_cpu(at::TensorList params, at::TensorList grads,
                                at::TensorList momentum_bufs, at::TensorList model_copies,
                                const c10::List<bool>& use_lars,
                                const c10::List<bool>& use_weight_decay,
                                const at::Tensor& grad_sq_norms, const at::Tensor& param_sq_norms,
                                double lr, double momentum, double weight_decay,
                                double trust_coefficient, double eps, bool nesterov,
                                bool lr_in_momentum, const std::optional<at::Tensor>& grad_scale,
                                const std::optional<at::Tensor>& found_inf) {
  check_lars_args(params, grads, momentum_bufs, model_copies, use_lars, use_weight_decay, lr,
                  momentum, weight_decay, trust_coefficient, eps, grad_scale, found_inf);
  check_lars_norm_args(params, grad_sq_norms, param_sq_norms);
  const int64_t n = static_cast<int64_t>(params.size());
  LarsHyper h{lr, momentum, weight_decay, trust_coefficient, eps, nesterov, lr_in_momentum, 1.0f};
  if (n == 0 || !read_amp_scalars(grad_scale, found_inf, h)) return;
  const double* g_sq = grad_sq_norms.const_data_ptr<double>();
  double* w_sq = param_sq_norms.data_ptr<double>();
  std::vector<cpu::LarsStep> steps;
  for (int64_t t = 0; t < n; ++t) {
    steps.push_back(lars_step_for(w_sq[t], g_sq[t], use_lars.get(t), use_weight_decay.get(t), h));
  }
  const auto new_w_sq =
      update_wave(make_wave(params, 0, n), params, grads, momentum_bufs, model_copies, steps);
  std::copy(new_w_sq.begin(), new_w_sq.end(), w_sq);
}

}  // namespace

TORCH_LIBRARY_IMPL(gradfuse, CPU, m) {
  m.impl("lars_update_", &lars_update_cpu);
  m.impl("lars_update_from_norms_", &lars_update_from_norms_cpu);
}

}  // namespace gradfuse::ops
