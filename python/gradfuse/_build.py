"""Loading the compiled extension safely, and reporting what it was built with.

The extension links against one exact torch build: loading it under another torch fails with
undefined symbols at best and corrupts memory at worst. So before touching ``_C`` we compare
the torch version recorded at build time with the running one and refuse with an ImportError
that says how to rebuild.
"""

from __future__ import annotations

import importlib.util
import platform

import torch

REBUILD_HINT = (
    "Rebuild gradfuse against the installed torch: "
    "pip install --no-build-isolation --no-deps --force-reinstall <gradfuse source dir> "
    "(or run scripts/test.sh, which rebuilds)."
)


def check_torch_version(built_with: str, running: str) -> None:
    """Raise ImportError unless the running torch is the one gradfuse was built against."""
    if built_with != running:
        raise ImportError(
            f"gradfuse was built against torch {built_with} but torch {running} is installed; "
            f"the compiled extension only works with the torch it was built against. "
            f"{REBUILD_HINT}"
        )


try:
    from . import _build_info
except ImportError as exc:  # a source checkout that was never built
    raise ImportError(
        "gradfuse's compiled extension is missing (no gradfuse/_build_info.py): "
        f"this is an unbuilt source tree. {REBUILD_HINT}"
    ) from exc

check_torch_version(_build_info.torch_version, torch.__version__)

from . import _C

if _C.version != _build_info.version:
    raise ImportError(
        f"gradfuse's extension reports version {_C.version} but its build record says "
        f"{_build_info.version}: a stale build is mixed with a newer one. {REBUILD_HINT}"
    )


def build_info() -> dict:
    """What the installed gradfuse was built with and what this machine can use.

    Keys: ``version``, ``torch_version`` (built against), ``cuda`` (CUDA kernels compiled),
    ``cuda_version``, ``cuda_archs``, ``cuda_available`` (compiled *and* a GPU is visible),
    ``nccl`` (torch.distributed has NCCL and CUDA is compiled), ``gloo``, ``mpi`` (mpi4py
    importable, used by the mpirun launcher), ``cpu_simd`` (the vector path the CPU kernels
    picked at run time), ``build_type``, ``compiler``, ``python``.
    """
    dist = torch.distributed
    dist_ok = dist.is_available()
    return {
        "version": _build_info.version,
        "torch_version": _build_info.torch_version,
        "cuda": _build_info.cuda,
        "cuda_version": _build_info.cuda_version,
        "cuda_archs": list(_build_info.cuda_archs),
        "cuda_available": bool(_build_info.cuda and torch.cuda.is_available()),
        "nccl": bool(_build_info.cuda and dist_ok and dist.is_nccl_available()),
        "gloo": bool(dist_ok and dist.is_gloo_available()),
        "mpi": importlib.util.find_spec("mpi4py") is not None,
        "cpu_simd": _C.cpu_simd(),
        "build_type": _build_info.build_type,
        "compiler": _build_info.cxx_compiler,
        "python": platform.python_version(),
    }
