// The CPU kernels for any processor: one lane at a time (the compiler may still vectorize).
#include "kernel_table.h"
#include "kernels_impl.h"

namespace gradfuse::cpu {
namespace {
#include "kernel_table_body.h"
}  // namespace

const KernelTable& scalar_kernels() {
  static const KernelTable table = make_table<VecScalar>("scalar");
  return table;
}

}  // namespace gradfuse::cpu
