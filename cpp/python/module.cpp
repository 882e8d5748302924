// gradfuse._C: importing it registers torch.ops.gradfuse.* (the TORCH_LIBRARY blocks in
// cpp/ops are linked into this module). The pybind11 surface is thin: build facts and
// switches for the CPU kernels; no logic lives here.
#include <pybind11/pybind11.h>

#include "ops/cpu/dispatch.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "gradfuse compiled extension";
  m.attr("version") = GRADFUSE_VERSION;
#ifdef GRADFUSE_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def("cpu_simd", [] { return std::string(gradfuse::cpu::simd_name()); },
        "The vector instruction set the CPU kernels use: 'avx2' or 'scalar'.");
  m.def(
      "set_cpu_simd", [](const std::string& name) { gradfuse::cpu::set_simd(name); },
      py::arg("name"),
      "Force the CPU kernels' vector path: 'avx2', 'scalar' or 'auto' (tests use this to cover "
      "both paths). Raises ValueError for anything else or an unsupported choice.");
}
