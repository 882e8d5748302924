"""Smoke test of an installed gradfuse wheel (scripts/ci_wheel_check.sh runs it in a fresh venv
holding only torch and the wheel, from outside the source tree): pip chose the wheel built for
this torch, it imports, its ops are registered (for CUDA too in a CUDA wheel) and run on the
CPU, and two ranks allreduce through gradfuse over Gloo.

    python wheel_smoke.py          # the checks, then 2 ranks: python -m gradfuse.run -np 2
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import gradfuse
import torch
from gradfuse import _torch_tag

RANK_FLAG = "--allreduce-rank"
CUDA_OPS = (
    "lars_update_",
    "lars_update_from_norms_",
    "sum_squares",
    "pack_",
    "unpack_",
    "topk_compress",
    "topk_decompress",
)


def check_installed_wheel() -> None:
    """The installed distribution is the wheel for this torch, imported from site-packages."""
    version = importlib.metadata.version("gradfuse")
    want = _torch_tag.local_tag(torch.__version__, torch.version.cuda)
    assert version.endswith("+" + want), f"installed gradfuse {version}, want +{want}"
    assert "site-packages" in gradfuse.__file__, f"gradfuse imported from {gradfuse.__file__}"
    info = gradfuse.build_info()
    assert info["cuda"] == bool(torch.version.cuda), info
    for op in CUDA_OPS if info["cuda"] else ():
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"gradfuse::{op}", "CUDA"), op
    print(f"gradfuse {version} for torch {torch.__version__}: {info}")


def check_pack_unpack() -> None:
    grads = [torch.randn(5), torch.randn(3, 2)]
    flat, nonfinite = gradfuse.ops.pack(grads, torch.float16, scale=0.5)
    assert torch.equal(flat, torch.cat([(0.5 * g).flatten() for g in grads]).half())
    assert nonfinite.item() == 0.0
    out = [torch.empty_like(g) for g in grads]
    gradfuse.ops.unpack_(flat, out, scale=2.0)
    for g, o in zip(grads, out):
        assert torch.equal(o, 2.0 * (0.5 * g).half().float())
    _, nonfinite = gradfuse.ops.pack([torch.tensor([1e6])], torch.float16)
    assert nonfinite.item() == 1.0, "fp16 overflow not flagged"
    print("pack/unpack ok")


def check_lars_update() -> None:
    lr, momentum, wd, trust_coefficient, eps = 0.1, 0.9, 1e-4, 0.001, 1e-8
    w, g = torch.randn(4, 3), torch.randn(4, 3)
    buf = torch.zeros_like(w)
    want_w, want_buf = w.double(), buf.double()
    trust = trust_coefficient * want_w.norm() / (g.double().norm() + wd * want_w.norm() + eps)
    want_buf = momentum * want_buf + trust * (g.double() + wd * want_w)
    want_w = want_w - lr * want_buf
    gradfuse.ops.lars_update_(
        [w], [g], [buf], lr=lr, momentum=momentum, weight_decay=wd,
        trust_coefficient=trust_coefficient, eps=eps,
    )  # fmt: skip
    assert torch.allclose(w.double(), want_w, rtol=1e-5, atol=1e-7), (w, want_w)
    assert torch.allclose(buf.double(), want_buf, rtol=1e-5, atol=1e-9), (buf, want_buf)
    print("lars_update_ ok")


def allreduce_rank() -> None:
    """One of the ranks: sum and average of tensors that differ per rank."""
    gradfuse.init()
    rank, size = gradfuse.rank(), gradfuse.size()
    x = torch.arange(6, dtype=torch.float32) * (rank + 1)
    total = sum(range(1, size + 1))
    summed = gradfuse.allreduce(x, op=gradfuse.Sum, name="smoke.sum")
    averaged = gradfuse.allreduce(x, name="smoke.average")
    assert torch.equal(summed, torch.arange(6.0) * total), summed
    assert torch.allclose(averaged, torch.arange(6.0) * total / size), averaged
    gradfuse.shutdown()
    print(f"rank {rank}/{size}: allreduce ok")


def check_two_rank_allreduce() -> None:
    cmd = [sys.executable, "-m", "gradfuse.run", "-np", "2", os.path.abspath(__file__), RANK_FLAG]
    subprocess.run(cmd, check=True, timeout=300)
    print("2-rank Gloo allreduce ok")


if __name__ == "__main__":
    if sys.argv[1:] == [RANK_FLAG]:
        allreduce_rank()
    else:
        check_installed_wheel()
        check_pack_unpack()
        check_lars_update()
        check_two_rank_allreduce()
