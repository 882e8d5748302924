"""Where this process sits in the job: rank, size and the rendezvous address, and which node
it runs on, from whichever launcher started it (torchrun, mpiexec/mpirun, Slurm srun,
``python -m gradfuse.run``)."""

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


def _int_env(name: str, env=os.environ) -> int | None:
    value = env.get(name)
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


def _launcher(env) -> str:
    """Which launcher's variables describe this process, in order of precedence (torchrun
    started under srun or mpiexec sets its own)."""
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun and gradfuse.run
        return "torchrun"
    if "OMPI_COMM_WORLD_RANK" in env:
        return "Open MPI"
    if "PMI_RANK" in env:  # MPICH / Intel MPI (Hydra)
        return "MPICH"
    if "SLURM_PROCID" in env:
        return "Slurm"
    return "single"


# Per launcher: the variables holding the rank and the size.
_RANK_VARS = {
    "torchrun": ("RANK", "WORLD_SIZE"),
    "Open MPI": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
    "MPICH": ("PMI_RANK", "PMI_SIZE"),
    "Slurm": ("SLURM_PROCID", "SLURM_NTASKS"),
}


def detect() -> LaunchInfo:
    env = os.environ
    found = _launcher(env)
    if found == "single":
        rank, size = 0, 1
    else:
        rank, size = (_int_env(name) for name in _RANK_VARS[found])
    launcher = {"Open MPI": "mpi", "MPICH": "mpi", "Slurm": "slurm"}.get(found, found)
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


# ---- which node this rank runs on ------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where one rank runs, as its launcher reports it. Every rank gathers every rank's
    placement at init(), and node_layout() turns them into the nodes."""

    host: str
    node: str | None  # the launcher's node id, or None: the node is the host
    local_rank: int | None  # None where the launcher does not say
    local_size: int | None
    source: str  # whose variables: "torchrun", "Open MPI", "MPICH", "Slurm" or "host name"


def _slurm_tasks_on_node(spec: str | None, node: int | None) -> int | None:
    """Tasks on node `node` from SLURM_STEP_TASKS_PER_NODE-style text: '2(x3),1' means 2
    tasks on each of nodes 0-2 and 1 on node 3. None when unknown or unparsable."""
    if spec is None or node is None:
        return None
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            return None
        count = int(m.group(2) or 1)
        if node < count:
            return int(m.group(1))
        node -= count
    return None


def placement(env=os.environ) -> Placement:
    """This rank's node and local rank from the launcher's variables: torchrun's GROUP_RANK
    (its node rank: two agents on one host are two nodes), LOCAL_RANK and LOCAL_WORLD_SIZE;
    Open MPI's OMPI_COMM_WORLD_LOCAL_RANK / _LOCAL_SIZE; MPICH/Hydra's MPI_LOCALRANKID /
    MPI_LOCALNRANKS; Slurm's SLURM_NODEID, SLURM_LOCALID and tasks per node. Without them the
    node is the host and local ranks follow the global rank order."""
    host = socket.gethostname()
    found = _launcher(env)
    local_vars = {
        "torchrun": ("LOCAL_RANK", "LOCAL_WORLD_SIZE"),
        "Open MPI": ("OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
        "MPICH": ("MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
        "Slurm": ("SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"),
    }.get(found)
    if local_vars is None or local_vars[0] not in env:
        return Placement(host, None, None, None, "host name")
    local_rank, local_size = (_int_env(name, env) for name in local_vars)
    node = None
    if found == "torchrun" and "GROUP_RANK" in env:
        node = f"torchrun node {_int_env('GROUP_RANK', env)}"
    elif found == "Slurm" and "SLURM_NODEID" in env:
        node_id = _int_env("SLURM_NODEID", env)
        node = f"Slurm node {node_id}"
        if local_size is None:  # set only with --ntasks-per-node
            spec = env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE"))
            local_size = _slurm_tasks_on_node(spec, node_id)
    return Placement(host, node, local_rank, local_size, found)


def _ranks_text(ranks) -> str:
    """[0, 1, 2, 5] -> 'ranks 0-2, 5'."""
    ranks = sorted(ranks)
    runs, start = [], 0
    for i in range(1, len(ranks) + 1):
        if i == len(ranks) or ranks[i] != ranks[i - 1] + 1:
            a, b = ranks[start], ranks[i - 1]
            runs.append(str(a) if a == b else f"{a}-{b}")
            start = i
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(runs)


def node_layout(placements: list[Placement]) -> list[list[int]]:
    """The ranks of each node, each node's ranks in local-rank order, nodes in order of their
    lowest rank. Raises ValueError (the same on every rank, which all pass the same list) when
    the launchers' reports contradict each other."""
    sources: dict[str, list[int]] = {}
    by_node: dict[str, list[int]] = {}
    for r, p in enumerate(placements):
        sources.setdefault(p.source, []).append(r)
        by_node.setdefault(p.node if p.node is not None else f"host {p.host!r}", []).append(r)
    if len(sources) > 1:
        per_source = "; ".join(f"{src} on {_ranks_text(rs)}" for src, rs in sources.items())
        raise ValueError(
            "gradfuse.init(): the ranks were started differently, so their nodes cannot be "
            f"compared: local ranks come from {per_source}"
        )
    nodes = []
    for name, ranks in by_node.items():
        _check_node(name, ranks, placements)
        if placements[ranks[0]].local_rank is not None:
            ranks = sorted(ranks, key=lambda r: placements[r].local_rank)
        nodes.append(ranks)
    return nodes


def _check_node(name: str, ranks: list[int], placements: list[Placement]) -> None:
    """A node's reported local ranks must be 0..n-1, once each, and its reported local sizes
    n, where n is the number of ranks that report this node."""
    where = f"{name} ({_ranks_text(ranks)}, {placements[0].source})"
    local_ranks = [placements[r].local_rank for r in ranks]
    if local_ranks[0] is not None and sorted(local_ranks) != list(range(len(ranks))):
        per_rank = ", ".join(f"rank {r}: {lr}" for r, lr in zip(ranks, local_ranks))
        raise ValueError(
            f"gradfuse.init(): inconsistent node layout: {where} should have local ranks 0 to "
            f"{len(ranks) - 1}, once each, but they report {per_rank}"
        )
    wrong = [r for r in ranks if placements[r].local_size not in (None, len(ranks))]
    if wrong:
        per_rank = ", ".join(f"rank {r}: {placements[r].local_size}" for r in wrong)
        raise ValueError(
            f"gradfuse.init(): inconsistent node layout: {where} has {len(ranks)} ranks, but "
            f"the local sizes reported are {per_rank}"
        )
