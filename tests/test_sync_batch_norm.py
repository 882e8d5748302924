"""Multi-process tests of SyncBatchNorm against one-process torch.nn.BatchNorm*d on the whole
batch (tests/sync_batch_norm_worker.py), on 2 and 3 ranks with different batch sizes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import sync_batch_norm_worker
from multiproc import assert_check_ok, ranks_override, run_ranks

CHECKS = sorted(sync_batch_norm_worker.CHECKS)
WORLD_SIZES = [ranks_override(0)] if ranks_override(0) else [2, 3]


@pytest.fixture(scope="module", params=WORLD_SIZES)
def group(request, tmp_path_factory):
    n = request.param
    tmp = tmp_path_factory.mktemp(f"sbn{n}")
    return run_ranks(tmp, n, "gradfuse.run", HERE / "sync_batch_norm_worker.py", CHECKS, None, 400)


@pytest.mark.timeout(500)
@pytest.mark.parametrize("check", CHECKS)
def test_sync_batch_norm_check(group, check):
    proc, results = group
    assert_check_ok(proc, results, check)


def test_one_process_is_plain_batch_norm():
    # Without other ranks there is nothing to synchronize: the module is BatchNorm itself.
    import gradfuse as hvd
    import torch

    hvd.init()
    try:
        torch.manual_seed(0)
        x = torch.randn(5, 3, 4, dtype=torch.float64)
        sync = hvd.SyncBatchNorm(3, momentum=None).double()
        ref = torch.nn.BatchNorm1d(3, momentum=None).double()
        for _ in range(2):
            assert torch.equal(sync(x), ref(x))
        assert torch.equal(sync.running_var, ref.running_var)
        sync.eval()
        ref.eval()
        assert torch.equal(sync(x), ref(x))
    finally:
        hvd.shutdown()
