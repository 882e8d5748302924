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


@pytest.fixture(scope="module")
def one_rank():
    """gradfuse initialized as a one-rank job in this process, for the module's tests. After
    them the process is left as if gradfuse had never run (no default process group, queries
    say "not initialized"), since later modules test exactly that."""
    from gradfuse import _engine

    mp = pytest.MonkeyPatch()
    mp.setenv("MASTER_ADDR", "127.0.0.1")
    gradfuse.init()
    yield
    gradfuse.shutdown()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _engine._was_shut_down = _engine._created_default_group = False
    mp.undo()


# Sizes that hit empty, single, odd, just below / above the 8-lane vector width and a chunk.
AWKWARD_SIZES = [0, 1, 7, 8, 9, 33, 4097, 65537, 100003]
