"""gradfuse: fused kernels and a fusing communication engine for data-parallel PyTorch.

``import gradfuse as hvd`` gives the common Horovod surface."""

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

__all__ = [
    "Average", "Max", "Min", "Product", "Sum", "__version__", "allgather", "allgather_async",
    "allreduce", "allreduce_", "allreduce_async", "allreduce_async_", "broadcast", "broadcast_",
    "broadcast_async", "broadcast_async_", "build_info", "cross_rank", "cross_size",
    "grouped_allreduce", "grouped_allreduce_async", "init", "is_initialized", "local_rank",
    "local_size", "poll", "rank", "shutdown", "size", "synchronize",
]
