"""gradfuse: fused kernels and a fusing communication engine for data-parallel PyTorch."""

from ._version import __version__
from ._build import build_info

__all__ = ["__version__", "build_info"]
