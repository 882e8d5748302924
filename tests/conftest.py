import gradfuse
import pytest
import torch
from gradfuse import _C

SIMD_PATHS = ["scalar"] + (["avx2"] if gradfuse.build_info()["cpu_simd"] == "avx2" else [])


@pytest.fixture(params=SIMD_PATHS)
def simd(request):
    """Runs a test once per CPU vector path this machine supports, restoring 'auto' after."""
    _C.set_cpu_simd(request.param)
    yield request.param
    _C.set_cpu_simd("auto")


@pytest.fixture
def gen():
    """A fresh random generator per test: new inputs every run, reproducible from the seed."""
    seed = torch.randint(0, 2**31 - 1, ()).item()
    g = torch.Generator().manual_seed(seed)
    print(f"generator seed {seed}")
    return g


# Sizes that hit empty, single, odd, just below / above the 8-lane vector width and a chunk.
AWKWARD_SIZES = [0, 1, 7, 8, 9, 33, 4097, 65537, 100003]


def randn(gen, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (0 when both are empty or zero)."""
    out, ref = out.double(), ref.double()
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff
