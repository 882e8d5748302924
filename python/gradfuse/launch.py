"""Where this process sits in the job: rank, size and the rendezvous address, from whichever
launcher started it (torchrun, mpiexec/mpirun, Slurm srun, ``python -m gradfuse.run``)."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass


@dataclass
class LaunchInfo:
    rank: int
    size: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "mpi", "slurm" or "single"


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def free_port() -> int:
    """A TCP port free on this host right now (the launcher passes it to every rank)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list: 'gpu[03-05,07],cpu1' -> 'gpu03'."""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not m:
        raise ValueError(f"SLURM_STEP_NODELIST={nodelist!r} is not a Slurm node list")
    prefix, _, ranges = m.groups()
    if not ranges:
        return prefix
    return prefix + re.split(r"[-,]", ranges)[0]


def _mpi_rendezvous(rank: int) -> tuple[str, int]:
    """Under MPI without MASTER_ADDR: rank 0 picks its address and a free port, MPI broadcasts
    it to everyone (mpi4py; no home-made sockets)."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise RuntimeError(
            "gradfuse.init(): launched by MPI without MASTER_ADDR/MASTER_PORT; set them or "
            "install mpi4py so rank 0 can broadcast its address"
        ) from None
    addr = None
    if rank == 0:
        addr = (socket.gethostbyname(socket.gethostname()), free_port())
    return MPI.COMM_WORLD.bcast(addr, root=0)


def detect() -> LaunchInfo:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun and gradfuse.run
        rank, size, launcher = _int_env("RANK"), _int_env("WORLD_SIZE"), "torchrun"
    elif "OMPI_COMM_WORLD_RANK" in env:  # Open MPI
        rank, size = _int_env("OMPI_COMM_WORLD_RANK"), _int_env("OMPI_COMM_WORLD_SIZE")
        launcher = "mpi"
    elif "PMI_RANK" in env:  # MPICH / Intel MPI (hydra)
        rank, size, launcher = _int_env("PMI_RANK"), _int_env("PMI_SIZE"), "mpi"
    elif "SLURM_PROCID" in env:
        rank, size, launcher = _int_env("SLURM_PROCID"), _int_env("SLURM_NTASKS"), "slurm"
    else:
        rank, size, launcher = 0, 1, "single"
    if size is None or rank is None or not 0 <= rank < size:
        raise ValueError(f"gradfuse.init(): inconsistent rank {rank} / size {size} from {launcher}")

    addr, port = env.get("MASTER_ADDR"), _int_env("MASTER_PORT")
    if addr is None or port is None:
        if launcher == "mpi" and size > 1:
            addr, port = _mpi_rendezvous(rank)
        elif launcher == "slurm":
            addr = addr or _first_slurm_host(env.get("SLURM_STEP_NODELIST", "localhost"))
            # Same port on every rank without talking: derived from the job id.
            port = port or 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000
        elif size == 1:
            addr, port = addr or "127.0.0.1", port or free_port()
        else:
            raise ValueError(
                f"gradfuse.init(): {launcher} launch without MASTER_ADDR and MASTER_PORT"
            )
    return LaunchInfo(rank, size, addr, port, launcher)
