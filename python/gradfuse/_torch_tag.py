"""Which torch builds one gradfuse build works with, as pip and the import check both see it.

A gradfuse binary links torch's C++ libraries, whose ABI holds within one torch minor release
(2.14.0, 2.14.1, ...) and changes between them; its CUDA kernels also need a torch built for
the same CUDA major. So a wheel is named for the torch minor and CUDA flavor it was built
against (local version ``+pt214cu130``, ``+pt213cpu``) and requires ``torch==2.14.*``.

Torch-free on purpose: the build backend loads this file by path (scripts/torch_pin_metadata.py)
before gradfuse is built.
"""

from __future__ import annotations


def torch_minor(version: str) -> str:
    """'2.14.1+cu130' -> '2.14'."""
    parts = version.split("+")[0].split(".")
    if len(parts) < 2 or not parts[0].isdigit() or not parts[1].isdigit():
        raise ValueError(f"torch version {version!r} is not like '2.14.1'")
    return f"{parts[0]}.{parts[1]}"


def local_tag(torch_version: str, cuda: str | None) -> str:
    """The wheel's local version label: torch minor and CUDA flavor ('pt214cu130', 'pt213cpu');
    ``cuda`` is the CUDA version the CUDA kernels target ('13.0'), None for a CPU-only build."""
    flavor = "cu" + cuda.replace(".", "") if cuda else "cpu"
    return "pt" + torch_minor(torch_version).replace(".", "") + flavor


def torch_requirement(torch_version: str) -> str:
    """The Requires-Dist pin for a build against ``torch_version``: 'torch==2.14.*'."""
    return f"torch=={torch_minor(torch_version)}.*"


def incompatibility(
    built_torch: str, built_cuda: str | None, running_torch: str, running_cuda: str | None
) -> str | None:
    """Why a build against ``built_torch`` (CUDA kernels for ``built_cuda``, None if CPU-only)
    cannot load under ``running_torch`` (``running_cuda``: torch.version.cuda), or None when it
    can. A CPU-only build runs under a CUDA torch of the same minor (it links no CUDA library)."""
    if torch_minor(built_torch) != torch_minor(running_torch):
        return f"torch {torch_minor(built_torch)}.x is needed"
    if built_cuda and not running_cuda:
        return f"a CUDA {built_cuda} build of torch is needed (its CUDA kernels link CUDA)"
    if built_cuda and built_cuda.split(".")[0] != running_cuda.split(".")[0]:
        return f"a CUDA {built_cuda.split('.')[0]}.x build of torch is needed"
    return None
