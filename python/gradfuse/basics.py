"""Horovod's build and capability queries (horovod.common.basics), answered for this gradfuse
build and job. gradfuse's engine moves data with torch.distributed: Gloo for CPU tensors (and
for its control messages), NCCL for CUDA tensors. It never uses MPI (mpiexec only launches the
ranks), oneCCL, DDL or ROCm. Return types are Horovod 0.28's: bools, except nccl_built, an int."""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import _engine


def mpi_built() -> bool:
    """False: gradfuse's collectives never go through MPI."""
    return False


def mpi_enabled() -> bool:
    """False: MPI is not used at run time (an mpiexec launch only starts the ranks)."""
    return False


def mpi_threads_supported() -> bool:
    """Raises ValueError, as Horovod does when MPI is not enabled: there is no MPI to ask."""
    raise ValueError(
        "gradfuse.mpi_threads_supported(): MPI is not enabled (gradfuse's collectives run on "
        "torch.distributed's Gloo and NCCL, never on MPI), so there is no MPI threading level to "
        "report. mpi4py may be used beside gradfuse freely."
    )


def gloo_built() -> bool:
    """Whether this torch has Gloo, the transport of gradfuse's control messages and CPU
    tensors (without it init() cannot start)."""
    return bool(dist.is_available() and dist.is_gloo_available())


def gloo_enabled() -> bool:
    """True once init() has started the engine, whose control and CPU groups are Gloo."""
    return _engine.is_initialized() and gloo_built()


def nccl_built() -> int:
    """The NCCL version code (NCCL_VERSION_CODE, e.g. 22105 for 2.21.5) when CUDA tensors go
    through NCCL: this gradfuse was built with CUDA and torch has NCCL. 0 otherwise."""
    if not (cuda_built() and dist.is_available() and dist.is_nccl_available()):
        return 0
    major, minor, patch = torch.cuda.nccl.version()[:3]
    # NCCL_VERSION(X, Y, Z) in nccl.h: the encoding widened with 2.9.
    if major <= 2 and minor <= 8:
        return major * 1000 + minor * 100 + patch
    return major * 10000 + minor * 100 + patch


def ddl_built() -> bool:
    return False


def ccl_built() -> bool:
    return False


def cuda_built() -> bool:
    """Whether this gradfuse was built with its CUDA kernels and CUDA transport."""
    return bool(_engine._C().with_cuda)


def rocm_built() -> bool:
    """Whether gradfuse's GPU code was built for ROCm (a CUDA build under a HIP torch)."""
    return cuda_built() and torch.version.hip is not None


def is_homogeneous() -> bool:
    """Whether every node runs the same number of ranks. Needs init(), like the rank queries
    (raises ValueError before it)."""
    nodes = _engine._require().nodes
    return len({len(node) for node in nodes}) == 1


__all__ = [
    "ccl_built",
    "cuda_built",
    "ddl_built",
    "gloo_built",
    "gloo_enabled",
    "is_homogeneous",
    "mpi_built",
    "mpi_enabled",
    "mpi_threads_supported",
    "nccl_built",
    "rocm_built",
]
