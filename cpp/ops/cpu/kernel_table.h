// The CPU kernels of one instruction set, as a table of function pointers. dispatch.cpp picks
// a table at run time and forwards the public functions of kernels.h to it.
#pragma once

#include "kernels.h"

namespace gradfuse::cpu {

struct KernelTable {
  const char* name;
  bool (*convert)(const void*, DType, void*, DType, int64_t, double, bool, double*);
  double (*sum_squares)(const void*, DType, int64_t);
  double (*lars_update)(void*, DType, const void*, DType, void*, void*, DType, int64_t,
                      const LarsStep&);
  int64_t (*accumulate_and_select)(float*, const void*, DType, int64_t, float, int64_t, int64_t*,
                                   int64_t);
  int64_t (*select_at_least)(const float*, int64_t, float, int64_t, int64_t*, int64_t);
};

const KernelTable& scalar_kernels();
// nullptr where the AVX2 variant was not compiled (non-x86 builds).
const KernelTable* avx2_kernels();

}  // namespace gradfuse::cpu
