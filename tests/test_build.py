"""The installed package: it imports, registers its ops, and reports its build truthfully."""

import subprocess
import sys

import gradfuse
import pytest
import torch
from gradfuse import _build

# Each op and the dispatch key its CPU implementation is registered under.
OPS = {
    "lars_update_": "CPU",
    "lars_update_from_norms_": "CPU",
    "sum_squares": "CPU",
    "pack_": "CPU",
    "unpack_": "CPU",
    "topk_compress": "CPU",
    "topk_decompress": "CPU",  # and CUDA: its own deterministic kernel
}


def test_version_and_build_info_are_truthful():
    info = gradfuse.build_info()
    assert info["version"] == gradfuse.__version__
    assert info["torch_version"] == torch.__version__
    assert info["cuda"] == gradfuse._C.with_cuda
    assert info["cuda"] == (len(info["cuda_archs"]) > 0)
    assert info["cuda_available"] == (info["cuda"] and torch.cuda.is_available())
    assert info["gloo"] == torch.distributed.is_gloo_available()
    assert info["cpu_simd"] in ("avx2", "scalar")
    if not torch.version.cuda:
        assert info["cuda"] is False and info["nccl"] is False


@pytest.mark.parametrize("name, key", OPS.items())
def test_ops_are_registered(name, key):
    op = getattr(torch.ops.gradfuse, name)
    assert op.default._schema.name == f"gradfuse::{name}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"gradfuse::{name}", key)
    if gradfuse.build_info()["cuda"] and key == "CPU":
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"gradfuse::{name}", "CUDA")


def test_set_cpu_simd_rejects_unknown_names():
    with pytest.raises(ValueError, match="'auto', 'avx2' or 'scalar', got 'sse9'"):
        gradfuse._C.set_cpu_simd("sse9")


def test_version_mismatch_message():
    with pytest.raises(ImportError) as info:
        _build.check_torch_version("2.11.0+cu130", "2.13.0+cpu")
    text = str(info.value)
    assert "built against torch 2.11.0+cu130 but torch 2.13.0+cpu is installed" in text
    assert "pip install --no-build-isolation" in text
    _build.check_torch_version("2.13.0+cpu", "2.13.0+cpu")  # the same version passes


def test_import_under_another_torch_raises_import_error():
    # A real import in a fresh interpreter whose torch reports another version.
    code = "import torch; torch.__version__ = '9.9.9'; import gradfuse"
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr
    assert f"built against torch {torch.__version__} but torch 9.9.9 is installed" in proc.stderr
