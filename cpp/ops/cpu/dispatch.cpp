#include "dispatch.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

#include "kernel_table.h"

namespace gradfuse::cpu {
namespace {

bool cpu_has_avx2() {
#if defined(__x86_64__) && defined(GRADFUSE_HAVE_AVX2_KERNELS)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") &&
         __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

const KernelTable* table_for(const std::string& name) {
  if (name == "scalar") return &scalar_kernels();
  if (name == "avx2") {
    if (!cpu_has_avx2()) {
      throw std::invalid_argument(
          "gradfuse: CPU SIMD 'avx2' requested but this build or processor lacks AVX2/F16C/FMA");
    }
#if defined(GRADFUSE_HAVE_AVX2_KERNELS)
    return avx2_kernels();
#endif
  }
  if (name == "auto") return cpu_has_avx2() ? table_for("avx2") : &scalar_kernels();
  throw std::invalid_argument("gradfuse: CPU SIMD must be 'auto', 'avx2' or 'scalar', got '" +
                              name + "'");
}

const KernelTable* initial_table() {
  const char* env = std::getenv("GRADFUSE_CPU_SIMD");
  return table_for(env != nullptr && *env != '\0' ? env : "auto");
}

std::atomic<const KernelTable*>& active() {
  static std::atomic<const KernelTable*> table{initial_table()};
  return table;
}

const KernelTable& kernels() { return *active().load(std::memory_order_relaxed); }

}  // namespace

#if !defined(GRADFUSE_HAVE_AVX2_KERNELS)
const KernelTable* avx2_kernels() { return nullptr; }
#endif

Simd active_simd() { return &kernels() == &scalar_kernels() ? Simd::kScalar : Simd::kAvx2; }
const char* simd_name() { return kernels().name; }
void set_simd(const std::string& name) { active().store(table_for(name)); }

bool convert(const void* src, DType st, void* dst, DType dt, int64_t n, double scale,
             bool accumulate, double* dst_sum_squares) {
  return kernels().convert(src, st, dst, dt, n, scale, accumulate, dst_sum_squares);
}
double sum_squares(const void* x, DType t, int64_t n) { return kernels().sum_squares(x, t, n); }
double lars_update(void* p, DType pt, const void* g, DType gt, void* m, void* copy, DType ct,
                   int64_t n, const LarsStep& s) {
  return kernels().lars_update(p, pt, g, gt, m, copy, ct, n, s);
}
int64_t accumulate_and_select(float* r, const void* g, DType gt, int64_t n, float thr,
                              int64_t base, int64_t* out, int64_t cap) {
  return kernels().accumulate_and_select(r, g, gt, n, thr, base, out, cap);
}
int64_t select_at_least(const float* r, int64_t n, float thr, int64_t base, int64_t* out,
                        int64_t cap) {
  return kernels().select_at_least(r, n, thr, base, out, cap);
}

}  // namespace gradfuse::cpu
