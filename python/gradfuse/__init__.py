"""gradfuse: fused kernels and a fusing communication engine for data-parallel PyTorch.

``import gradfuse as hvd`` gives the common Horovod surface."""

from . import data, ops, optim, timeline
from ._build import build_info
from ._engine import (
    cross_rank,
    cross_size,
    init,
    is_initialized,
    local_rank,
    local_size,
    rank,
    shutdown,
    size,
    stats,
)
from ._version import __version__
from .collectives import (
    Average,
    Max,
    Min,
    Product,
    Sum,
    allgather,
    allgather_async,
    allreduce,
    allreduce_,
    allreduce_async,
    allreduce_async_,
    broadcast,
    broadcast_,
    broadcast_async,
    broadcast_async_,
    grouped_allreduce,
    grouped_allreduce_async,
    poll,
    synchronize,
)
from .compression import Compression
from .distributed_optimizer import DistributedOptimizer
from .functions import (
    allgather_object,
    broadcast_object,
    broadcast_optimizer_state,
    broadcast_parameters,
)
from .timeline import start_timeline, stop_timeline

__all__ = [
    "Average",
    "Compression",
    "DistributedOptimizer",
    "Max",
    "Min",
    "Product",
    "Sum",
    "__version__",
    "allgather",
    "allgather_async",
    "allgather_object",
    "allreduce",
    "allreduce_",
    "allreduce_async",
    "allreduce_async_",
    "broadcast",
    "broadcast_",
    "broadcast_async",
    "broadcast_async_",
    "broadcast_object",
    "broadcast_optimizer_state",
    "broadcast_parameters",
    "build_info",
    "cross_rank",
    "cross_size",
    "data",
    "grouped_allreduce",
    "grouped_allreduce_async",
    "init",
    "is_initialized",
    "local_rank",
    "local_size",
    "ops",
    "optim",
    "poll",
    "rank",
    "shutdown",
    "size",
    "start_timeline",
    "stats",
    "stop_timeline",
    "synchronize",
    "timeline",
]
