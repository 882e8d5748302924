"""Loading the compiled extension safely, and reporting what it was built with.

The extension links against one torch minor release (and, with CUDA kernels, one CUDA major):
loading it under another torch fails with undefined symbols at best and corrupts memory at
worst. So before touching ``_C`` we compare the torch recorded at build time with the running
one (the rule of _torch_tag.py, which also pins the wheel's torch requirement) and refuse with
an ImportError naming both and how to get a matching build; a load that fails anyway (a torch
patch release that broke its ABI) is reported the same way.
"""

from __future__ import annotations

import importlib.util
import platform

import torch

from . import _torch_tag

REBUILD_HINT = (
    "build from source against the installed torch: "
    "pip install --no-build-isolation --no-deps --force-reinstall <gradfuse source dir>"
)


def install_hint(running_torch: str, running_cuda: str | None) -> str:
    """How to get a gradfuse that loads under the running torch: the wheel named for it, or a
    source build."""
    tag = _torch_tag.local_tag(running_torch, running_cuda)
    return (
        f"Install the gradfuse wheel built for this torch (+{tag}): "
        f"pip install --force-reinstall --no-deps gradfuse -f <wheelhouse>/{tag}.html "
        f"(scripts/build_wheels.sh builds it), or {REBUILD_HINT}."
    )


def check_torch_build(
    built_torch: str, built_cuda: str | None, running_torch: str, running_cuda: str | None
) -> None:
    """Raise ImportError unless a build against ``built_torch`` (CUDA kernels for
    ``built_cuda``, None if CPU-only) loads under the running torch."""
    why = _torch_tag.incompatibility(built_torch, built_cuda, running_torch, running_cuda)
    if why:
        cuda = f" with CUDA {built_cuda} kernels" if built_cuda else ""
        raise ImportError(
            f"gradfuse was built against torch {built_torch}{cuda} but torch {running_torch} is "
            f"installed: {why}. {install_hint(running_torch, running_cuda)}"
        )


try:
    from . import _build_info
except ImportError as exc:  # a source checkout that was never built
    raise ImportError(
        "gradfuse's compiled extension is missing (no gradfuse/_build_info.py): "
        f"this is an unbuilt source tree; {REBUILD_HINT}."
    ) from exc

_built_cuda = _build_info.torch_cuda_version if _build_info.cuda else None
check_torch_build(_build_info.torch_version, _built_cuda, torch.__version__, torch.version.cuda)

try:
    from . import _C
except (ImportError, OSError) as exc:
    raise ImportError(
        f"gradfuse's extension, built against torch {_build_info.torch_version}, failed to load "
        f"under torch {torch.__version__} ({exc}). "
        f"{install_hint(torch.__version__, torch.version.cuda)}"
    ) from exc

if _C.version != _build_info.version:
    raise ImportError(
        f"gradfuse's extension reports version {_C.version} but its build record says "
        f"{_build_info.version}: a stale build is mixed with a newer one; {REBUILD_HINT}."
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
