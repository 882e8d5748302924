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

// Tensors are processed in waves of about this many bytes of (param + grad): the norm pass of
// a wave leaves it in the last-level cache for the update pass that follows.
constexpr int64_t kWaveBytes = 8 << 20;
constexpr int64_t kChunkElems = 1 << 15;

void lars_update_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_bufs,
                     at::TensorList model_copies, const c10::List<bool>& use_lars,
                     const c10::List<bool>& use_weight_decay, double lr, double momentum,
                     double weight_decay, double trust_coefficient, double eps, bool nesterov,
                     bool lr_in_momentum, const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf) {
  check_lars_args(params, grads, momentum_bufs, model_copies, use_lars, use_weight_decay, lr,
                  momentum, weight_decay, trust_coefficient, eps, grad_scale, found_inf);
  const int64_t n = static_cast<int64_t>(params.size());
  if (n == 0) return;
  if (found_inf.has_value() && found_inf->item<float>() != 0.0f) return;
  const float inv_scale = grad_scale.has_value() ? 1.0f / grad_scale->item<float>() : 1.0f;

  const cpu::DType param_dtype = cpu_dtype(params[0].scalar_type());
  const cpu::DType grad_dtype = cpu_dtype(grads[0].scalar_type());
  const bool has_copy = !model_copies.empty();
  const cpu::DType copy_dtype = has_copy ? cpu_dtype(model_copies[0].scalar_type()) : param_dtype;
  const int64_t bytes_per_elem = params[0].element_size() + grads[0].element_size();

  int64_t wave_begin = 0;
  while (wave_begin < n) {
    // One wave: consecutive tensors up to kWaveBytes (at least one tensor).
    int64_t wave_end = wave_begin;
    int64_t wave_bytes = 0;
    std::vector<int64_t> numels;
    while (wave_end < n && (wave_end == wave_begin || wave_bytes < kWaveBytes)) {
      numels.push_back(params[wave_end].numel());
      wave_bytes += params[wave_end].numel() * bytes_per_elem;
      ++wave_end;
    }
    const auto chunks = split_into_chunks(numels, kChunkElems);
    const auto num_chunks = static_cast<int64_t>(chunks.size());

    // Pass 1: sums of squares per chunk, then per tensor.
    std::vector<double> w2(num_chunks), g2(num_chunks);
    at::parallel_for(0, num_chunks, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        const Chunk& ch = chunks[c];
        const int64_t t = wave_begin + ch.tensor;
        if (!use_lars.get(t)) continue;  // trust ratio 1: norms not needed
        const int64_t len = ch.end - ch.begin;
        w2[c] = cpu::sum_squares(static_cast<const char*>(params[t].const_data_ptr()) +
                                     ch.begin * params[t].element_size(),
                                 param_dtype, len);
        g2[c] = cpu::sum_squares(static_cast<const char*>(grads[t].const_data_ptr()) +
                                     ch.begin * grads[t].element_size(),
                                 grad_dtype, len);
      }
    });
    std::vector<double> w_norm(numels.size(), 0.0), g_norm(numels.size(), 0.0);
    for (int64_t c = 0; c < num_chunks; ++c) {
      w_norm[chunks[c].tensor] += w2[c];
      g_norm[chunks[c].tensor] += g2[c];
    }

    std::vector<cpu::LarsStep> steps(numels.size());
    for (size_t i = 0; i < numels.size(); ++i) {
      const int64_t t = wave_begin + static_cast<int64_t>(i);
      const double wd = use_weight_decay.get(t) ? weight_decay : 0.0;
      const double wn = std::sqrt(w_norm[i]);
      const double gn = std::sqrt(g_norm[i]) * inv_scale;
      // `!= 0` rather than `> 0`: a NaN norm must poison the ratio (and so the update), not
      // silently fall back to ratio 1 and a step hundreds of times too large.
      double trust = 1.0;
      if (use_lars.get(t) && wn != 0.0 && gn != 0.0) {
        trust = trust_coefficient * wn / (gn + wd * wn + eps);
      }
      steps[i] = {inv_scale,
                  static_cast<float>(wd),
                  static_cast<float>(momentum),
                  static_cast<float>(lr_in_momentum ? lr * trust : trust),
                  static_cast<float>(lr_in_momentum ? 1.0 : lr),
                  nesterov};
    }

    // Pass 2: the update.
    at::parallel_for(0, num_chunks, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        const Chunk& ch = chunks[c];
        const int64_t t = wave_begin + ch.tensor;
        auto at_begin = [&](const at::Tensor& x) {
          return static_cast<char*>(x.data_ptr()) + ch.begin * x.element_size();
        };
        cpu::lars_update(at_begin(params[t]), param_dtype, at_begin(grads[t]), grad_dtype,
                         at_begin(momentum_bufs[t]),
                         has_copy ? at_begin(model_copies[t]) : nullptr, copy_dtype,
                         ch.end - ch.begin, steps[ch.tensor]);
      }
    });
    wave_begin = wave_end;
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(gradfuse, CPU, m) { m.impl("lars_update_", &lars_update_cpu); }

}  // namespace gradfuse::ops
