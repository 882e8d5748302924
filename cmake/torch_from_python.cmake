# Ask the build's Python interpreter where torch is and how it was built. Sets:
#   TORCH_VERSION, TORCH_CUDA_VERSION (empty for CPU builds), TORCH_INCLUDE_DIRS,
#   TORCH_LIBRARY_DIR, TORCH_CXX11_ABI, NCCL_INCLUDE_DIR / NCCL_LIBRARY_DIR (may be empty),
#   GRADFUSE_VERSION (from python/gradfuse/_version.py).
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c [=[
import os, torch
from torch.utils import cpp_extension
nccl_include = nccl_lib = ""
try:
    import nvidia.nccl as nccl
    root = list(nccl.__path__)[0]
    nccl_include, nccl_lib = os.path.join(root, "include"), os.path.join(root, "lib")
except ImportError:
    pass
print("TORCH_VERSION=" + torch.__version__)
print("TORCH_CUDA_VERSION=" + (torch.version.cuda or ""))
print("TORCH_INCLUDE_DIRS=" + ";".join(cpp_extension.include_paths()))
print("TORCH_LIBRARY_DIR=" + os.path.join(os.path.dirname(torch.__file__), "lib"))
print("TORCH_CXX11_ABI=" + str(int(torch._C._GLIBCXX_USE_CXX11_ABI)))
print("NCCL_INCLUDE_DIR=" + nccl_include)
print("NCCL_LIBRARY_DIR=" + nccl_lib)
]=]
  OUTPUT_VARIABLE _torch_info
  ERROR_VARIABLE _torch_err
  RESULT_VARIABLE _torch_rc)
if(NOT _torch_rc EQUAL 0)
  message(FATAL_ERROR
    "gradfuse needs torch installed in the build's Python (${Python_EXECUTABLE}); "
    "install torch first and build with --no-build-isolation.\n${_torch_err}")
endif()
foreach(_key TORCH_VERSION TORCH_CUDA_VERSION TORCH_INCLUDE_DIRS TORCH_LIBRARY_DIR TORCH_CXX11_ABI
             NCCL_INCLUDE_DIR NCCL_LIBRARY_DIR)
  string(REGEX MATCH "${_key}=([^\n]*)" _ "${_torch_info}")
  set(${_key} "${CMAKE_MATCH_1}")
endforeach()
message(STATUS "gradfuse: torch ${TORCH_VERSION} (CUDA '${TORCH_CUDA_VERSION}') at ${TORCH_LIBRARY_DIR}")

file(STRINGS "${CMAKE_CURRENT_SOURCE_DIR}/python/gradfuse/_version.py" _version_line
     REGEX "^__version__ = ")
string(REGEX MATCH "\"([^\"]+)\"" _ "${_version_line}")
set(GRADFUSE_VERSION "${CMAKE_MATCH_1}")
