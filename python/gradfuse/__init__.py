"""gradfuse: fused kernels and a fusing communication engine for data-parallel PyTorch."""

from . import data, ops, optim
from ._build import build_info
from ._version import __version__

__all__ = ["__version__", "build_info", "data", "ops", "optim"]
