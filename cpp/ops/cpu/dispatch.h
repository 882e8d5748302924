// Which vector path the CPU kernels take: chosen once from the CPU's features, overridable for
// tests (gradfuse._C.set_cpu_simd) and by GRADFUSE_CPU_SIMD=scalar|avx2|auto.
#pragma once

#include <string>

namespace gradfuse::cpu {

enum class Simd { kScalar, kAvx2 };

Simd active_simd();
const char* simd_name();
// "auto", "scalar" or "avx2"; throws std::invalid_argument for others or an unsupported CPU.
void set_simd(const std::string& name);

}  // namespace gradfuse::cpu
