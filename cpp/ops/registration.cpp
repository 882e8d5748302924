// The gradfuse operator library: schemas only. Kernels register themselves per dispatch key in
// their own files (lars.cpp, pack.cpp, topk.cpp for CPU; cuda/*.cpp for CUDA); the fake (meta)
// implementations live in python/gradfuse/_fake.py.
#include <torch/library.h>

TORCH_LIBRARY(gradfuse, m) {
  // Multi-tensor fused LARS with momentum. Updates params and momentum_bufs (and model_copies
  // when given) in place. use_lars / use_weight_decay are per tensor. grad_scale divides the
  // grads; found_inf != 0 skips the whole update on the device.
  m.def(
      "lars_update_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_bufs, "
      "Tensor(c!)[] model_copies, bool[] use_lars, bool[] use_weight_decay, float lr, "
      "float momentum, float weight_decay, float trust_coefficient, float eps, bool nesterov, "
      "bool lr_in_momentum, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");

  // The same step in one pass from given squared norms (float64, one per param): the grads'
  // (unscaled) and the params'; param_sq_norms is overwritten with the new params' squared norms,
  // taken while the update writes them (the next step's input).
  m.def(
      "lars_update_from_norms_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_bufs, "
      "Tensor(c!)[] model_copies, bool[] use_lars, bool[] use_weight_decay, "
      "Tensor grad_sq_norms, Tensor(d!) param_sq_norms, float lr, float momentum, "
      "float weight_decay, float trust_coefficient, float eps, bool nesterov, "
      "bool lr_in_momentum, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");

  // Each tensor's sum of squares (float64, one element per tensor; deterministic order).
  m.def("sum_squares(Tensor[] tensors) -> Tensor");

  // Many tensors into one contiguous buffer (out[...] = round(scale * t)), converting dtype.
  // nonfinite (a float32 one-element tensor) is set to 1 when any written value is inf/NaN.
  m.def("pack_(Tensor[] tensors, Tensor(a!) out, float scale=1.0, Tensor(b!)? nonfinite=None) -> ()");

  // The inverse: t = round(scale * flat[...]), or t = round(t + scale * flat[...]) when
  // accumulate. sq_norms (float64, one element per tensor), when given, receives the sum of
  // squares of each tensor's written values, taken in the same pass (deterministic order).
  m.def(
      "unpack_(Tensor flat, Tensor(a!)[] tensors, float scale=1.0, bool accumulate=False, "
      "Tensor(b!)? nonfinite=None, Tensor(c!)? sq_norms=None) -> ()");

  // Top-k by magnitude with error feedback: residual += grad; select; residual[selected] = 0.
  m.def(
      "topk_compress(Tensor grad, Tensor(a!) residual, float ratio, bool sampled=False, "
      "ScalarType? index_dtype=None, int seed=0) -> (Tensor values, Tensor indices)");

  // Dense tensor of numel elements: zeros, then scatter-add of values at indices.
  m.def("topk_decompress(Tensor values, Tensor indices, int numel) -> Tensor");
}
