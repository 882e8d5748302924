"""scikit-build-core dynamic-metadata provider (pyproject.toml): the version and dependencies of
a gradfuse build follow the torch it is built against, as torch extension wheels do.

version: __version__ of python/gradfuse/_version.py plus a local label naming the torch minor
and CUDA flavor ('0.1.0+pt214cu130'); dependencies: 'torch==2.14.*' and numpy. The rules live
in python/gradfuse/_torch_tag.py, which the import-time check uses too.

Where no torch is installed (an sdist, or an isolated build, which then fails in CMake with its
own message) the version is plain and torch is the supported range.
"""

from __future__ import annotations

import importlib.util
import os
import re
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "python" / "gradfuse"
SUPPORTED_TORCH = "torch>=2.11,<2.15"


def _load_torch_tag():
    spec = importlib.util.spec_from_file_location("_gradfuse_torch_tag", PACKAGE / "_torch_tag.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _installed_torch() -> tuple[str, str | None] | None:
    """(version, CUDA version or None) of the torch the build will use, read from torch/version.py
    without importing torch; None when torch is not installed."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    torch_dir = next(iter(spec.submodule_search_locations))
    info = runpy.run_path(os.path.join(torch_dir, "version.py"))
    return info["__version__"], info.get("cuda")


def _base_version() -> str:
    text = (PACKAGE / "_version.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.MULTILINE).group(1)


def dynamic_metadata(settings=None, project=None) -> dict:
    """The [project] fields this provider sets: version and dependencies."""
    torch = _installed_torch()
    if torch is None:
        return {"version": _base_version(), "dependencies": [SUPPORTED_TORCH, "numpy"]}
    version, cuda = torch
    # GRADFUSE_CUDA=OFF builds no CUDA kernels (CMakeLists.txt): a CPU wheel, whatever torch.
    if os.environ.get("GRADFUSE_CUDA", "").upper() == "OFF":
        cuda = None
    tag = _load_torch_tag()
    return {
        "version": f"{_base_version()}+{tag.local_tag(version, cuda)}",
        "dependencies": [tag.torch_requirement(version), "numpy"],
    }


def dynamic_wheel(settings=None) -> dict:
    """Both fields are set again when a wheel is built from an sdist (with torch installed)."""
    return {"version": True, "dependencies": True}
