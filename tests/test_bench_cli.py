"""gradfuse-bench's parts and its refusals of bad arguments. Each subcommand's end-to-end run,
as the README gives it, is in tests/test_readme_commands.py."""

from __future__ import annotations

import pytest


def test_resnet50_has_resnet50s_parameter_shapes():
    import torch
    from gradfuse.bench.models import resnet50
    from gradfuse.bench.shapes import resnet50_shapes

    model = resnet50()
    assert [tuple(p.shape) for p in model.parameters()] == resnet50_shapes()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 1000)


def phase(name, tensor, start, end):
    return {"name": name, "ph": "X", "ts": start, "dur": end - start, "args": {"tensor": tensor}}


def test_timeline_summary_tells_overlapped_negotiation_from_serial():
    from gradfuse.bench.timeline_summary import format_summary, summarize

    # Batch 0 (a, b) runs 100-200 us. c, submitted at 120 us, is agreed at 150 us: during it.
    # d, submitted at 250 us while c's collective (220-300 us) runs, is agreed only at 320 us.
    # e is submitted at 420 us, after d's collective ended: it waited for backward.
    events = [{"name": "thread_name", "ph": "M", "tid": 1, "args": {"name": "a"}}]
    for tensor, submitted, agreed, coll in (
        ("a", 0, 90, (100, 200)),
        ("b", 10, 95, (100, 200)),
        ("c", 120, 150, (220, 300)),
        ("d", 250, 320, (330, 400)),
        ("e", 420, 440, (450, 500)),
    ):
        events += [
            phase("negotiate", tensor, submitted, agreed),
            phase("collective", tensor, *coll),
        ]
    s = summarize(events)
    assert s["tensors"] == 5 and [b["tensors"] for b in s["collectives"]] == [2, 1, 1, 1]
    assert [b.get("agreed_during_previous") for b in s["collectives"]] == [None, True, False, None]
    assert [round(b.get("gap_ms", -1), 3) for b in s["collectives"]] == [-1, 0.02, 0.03, 0.05]
    assert s["submitted_during_previous"] == 2 and s["overlapped"] == 1
    assert "partly (1 of the 2 batches submitted while" in format_summary(s)
    with pytest.raises(ValueError, match="no phase events"):
        summarize(events[:1])


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--np", "1,x"], "--np must be like 1,2,4"),
        (["train", "--np", "0"], "--np needs rank counts >= 1"),
        (["allreduce", "--np", "0"], "--np must be >= 1"),
        (["allreduce", "--max-size", "10"], "--max-size must be at least 1024"),
        (["resnet50-allreduce", "--np", "0"], "--np must be >= 1, got 0"),
        (["resnet50-allreduce", "--iters", "0"], "--iters must be >= 1, got 0"),
        (["resnet50-allreduce", "--scale", "2"], "--scale must be in (0, 1], got 2.0"),
        (["train", "--rounds", "0"], "--rounds must be >= 1, got 0"),
        (["train", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["train", "--model", "resnet50", "--batch-size", "1"], "needs --batch-size >= 2"),
        (["train", "--bucket-view", "maybe"], "argument --bucket-view: invalid choice"),
        (["train", "--model", "resnet51"], "argument --model: invalid choice"),
        (["ops", "--device", "cuda:0"], None),
    ],
)
def test_bad_arguments(args, message, capsys):
    import torch
    from gradfuse.bench.__main__ import main

    if message is None:
        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
        message = "no CUDA device is available"
    with pytest.raises(SystemExit) as exit_:  # argparse's usage error, before any job starts
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err, err
