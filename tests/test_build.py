"""The installed package: it imports, registers its ops, and reports its build truthfully."""

import importlib.util
import subprocess
import sys
from pathlib import Path

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
    # Another minor release: refused, naming both versions and the two ways to a matching build.
    with pytest.raises(ImportError) as info:
        _build.check_torch_build("2.14.1+cu130", "13.0", "2.13.0+cpu", None)
    text = str(info.value)
    assert "built against torch 2.14.1+cu130 with CUDA 13.0 kernels" in text
    assert "but torch 2.13.0+cpu is installed: torch 2.14.x is needed" in text
    assert "pip install --force-reinstall --no-deps gradfuse -f <wheelhouse>/pt213cpu.html" in text
    assert "pip install --no-build-isolation" in text


def test_cuda_build_needs_a_cuda_torch_of_the_same_major():
    with pytest.raises(ImportError, match="a CUDA 13.0 build of torch is needed"):
        _build.check_torch_build("2.14.1+cu130", "13.0", "2.14.1+cpu", None)
    with pytest.raises(ImportError, match=r"a CUDA 13.x build of torch is needed.*/pt214cu128"):
        _build.check_torch_build("2.14.1+cu130", "13.0", "2.14.1+cu128", "12.8")


def test_same_minor_loads():
    # What the wheel's 'torch==2.14.*' pin admits must also pass the import check.
    _build.check_torch_build("2.14.1+cu130", "13.0", "2.14.0", "13.0")
    _build.check_torch_build("2.13.0+cpu", None, "2.13.1+cu130", "13.0")  # CPU build, CUDA torch


def test_wheel_metadata_pins_the_build_torch():
    # The build backend's provider (pyproject.toml) for the torch running here.
    path = Path(__file__).resolve().parent.parent / "scripts" / "torch_pin_metadata.py"
    spec = importlib.util.spec_from_file_location("torch_pin_metadata", path)
    provider = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(provider)
    minor = torch.__version__.split("+")[0].rsplit(".", 1)[0]
    flavor = "cu" + torch.version.cuda.replace(".", "") if torch.version.cuda else "cpu"
    metadata = provider.dynamic_metadata({}, {})
    assert metadata["version"] == f"{gradfuse.__version__}+pt{minor.replace('.', '')}{flavor}"
    assert metadata["dependencies"] == [f"torch=={minor}.*", "numpy"]


def _import_gradfuse_in_fresh_python(prelude: str) -> subprocess.CompletedProcess:
    code = prelude + "\nimport gradfuse"
    return subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)


def test_import_under_another_torch_raises_import_error():
    # A real import in a fresh interpreter whose torch reports another version.
    proc = _import_gradfuse_in_fresh_python("import torch; torch.__version__ = '9.9.9'")
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr
    assert f"built against torch {torch.__version__}" in proc.stderr
    assert "but torch 9.9.9 is installed: torch " in proc.stderr


def test_extension_load_failure_names_both_torches():
    # _C failing to load (as an undefined symbol would) is reported with the versions and fix.
    prelude = """
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name == "gradfuse._C":
            raise ImportError("_C.so: undefined symbol: _ZN3c104fake")
sys.meta_path.insert(0, Refuse())
"""
    proc = _import_gradfuse_in_fresh_python(prelude)
    assert proc.returncode != 0
    assert "undefined symbol: _ZN3c104fake" in proc.stderr
    assert f"failed to load under torch {torch.__version__}" in proc.stderr
    assert "pip install --force-reinstall --no-deps gradfuse -f <wheelhouse>" in proc.stderr
