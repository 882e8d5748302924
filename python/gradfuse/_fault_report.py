"""Tells the other ranks why this one goes away. An exception nobody caught ends the process
through atexit's shutdown(), which the others would see only as "shutdown() was called on rank
r"; so it is posted first on the engine's peer board (cpp/engine/peer_board.h: this mirrors
its fault/<r> key and faults counter), and the peers fail with "rank r failed: uncaught
<type>: <message>"."""

from __future__ import annotations

import contextlib
import sys

_target = None  # (store, key prefix, rank) while an engine runs
_previous_hook = None


def install(store, prefix: str, rank: int) -> None:
    global _target, _previous_hook
    _target = (store, prefix, rank)
    if _previous_hook is None:
        _previous_hook = sys.excepthook
        sys.excepthook = _post_then_report


def clear() -> None:
    global _target
    _target = None


def _post_then_report(exc_type, exc, tb):
    target = _target
    if target is not None:
        store, prefix, rank = target
        message = f"gradfuse: rank {rank} failed: uncaught {exc_type.__name__}: {exc}"
        # A store that left with its host (DistError, a RuntimeError) hears nothing.
        with contextlib.suppress(RuntimeError):
            # The first account of a rank stands, as in PeerBoard::publish_fault.
            if store.compare_set(f"{prefix}fault/{rank}", "", message) == message.encode():
                store.add(f"{prefix}faults", 1)
    _previous_hook(exc_type, exc, tb)
