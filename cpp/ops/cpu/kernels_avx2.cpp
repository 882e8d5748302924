// The CPU kernels with AVX2 + F16C + FMA, 8 fp32 lanes. This file alone is compiled with
// -mavx2 -mf16c -mfma (CMakeLists.txt); dispatch.cpp calls into it only after checking that the
// processor has those features. All code here has internal linkage, so none of it can be
// picked by the linker for the baseline build.
#define GRADFUSE_VEC_AVX2 1
#include "kernel_table.h"
#include "kernels_impl.h"

namespace gradfuse::cpu {
namespace {
#include "kernel_table_body.h"
}  // namespace

const KernelTable* avx2_kernels() {
  static const KernelTable table = make_table<VecAvx2>("avx2");
  return &table;
}

}  // namespace gradfuse::cpu
