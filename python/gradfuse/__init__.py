"""gradfuse: fused kernels and a fusing communication engine for data-parallel PyTorch.

``import gradfuse as hvd`` gives the Horovod surface: every name of Horovod's mpi_ops
(collectives, reduce ops, queries, process sets; one list, in gradfuse.mpi_ops) and the rest of
horovod.torch, plus gradfuse's own (stats, submitted_together, ops, optim, data)."""

from . import data, mpi_ops, ops, optim, optimizer, timeline
from ._build import build_info
from ._engine import stats
from ._version import __version__
from .collectives import submitted_together
from .compression import Compression
from .distributed_optimizer import DistributedOptimizer
from .exceptions import HorovodInternalError
from .functions import (
    allgather_object,
    broadcast_object,
    broadcast_optimizer_state,
    broadcast_parameters,
)
from .mpi_ops import *  # the names listed in mpi_ops.__all__
from .sync_batch_norm import SyncBatchNorm

__all__ = [
    "Compression",
    "DistributedOptimizer",
    "HorovodInternalError",
    "SyncBatchNorm",
    "__version__",
    "allgather_object",
    "broadcast_object",
    "broadcast_optimizer_state",
    "broadcast_parameters",
    "build_info",
    "data",
    "mpi_ops",
    "ops",
    "optim",
    "optimizer",
    "stats",
    "submitted_together",
    "timeline",
]
__all__ += mpi_ops.__all__
