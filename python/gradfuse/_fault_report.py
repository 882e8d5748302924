"""Tells the other ranks why this one goes away. An exception nobody caught ends the process
through atexit's shutdown(), which the others would see only as "shutdown() was called on rank
r"; so it is posted first on the peer board of every engine this rank runs (the global set's and
each of its process sets': cpp/engine/peer_board.h, whose fault/<r> key and faults counter this
mirrors), and the peers fail with "rank r failed: uncaught <type>: <message>" (r its global
rank), whichever set their pending collective is on."""

from __future__ import annotations

import contextlib
import sys

_store = None  # the job's TCP store while an engine runs
_boards: dict[str, int] = {}  # each engine's board key prefix -> this rank's rank on that board
_global_rank = None
_previous_hook = None


def install(store, prefix: str, board_rank: int, global_rank: int) -> None:
    """An engine started on this rank: post an uncaught exception on its board too."""
    global _store, _global_rank, _previous_hook
    _store, _global_rank = store, global_rank
    _boards[prefix] = board_rank
    if _previous_hook is None:
        _previous_hook = sys.excepthook
        sys.excepthook = _post_then_report


def forget(prefix: str) -> None:
    """That engine stopped (remove_process_set)."""
    _boards.pop(prefix, None)


def clear() -> None:
    global _store
    _store = None
    _boards.clear()


def _post_then_report(exc_type, exc, tb):
    store = _store
    message = f"gradfuse: rank {_global_rank} failed: uncaught {exc_type.__name__}: {exc}"
    for prefix, board_rank in list(_boards.items()) if store is not None else []:
        # A store that left with its host (DistError, a RuntimeError) hears nothing.
        with contextlib.suppress(RuntimeError):
            # The first account of a rank stands, as in PeerBoard::publish_fault.
            key = f"{prefix}fault/{board_rank}"
            if store.compare_set(key, "", message) == message.encode():
                store.add(f"{prefix}faults", 1)
    _previous_hook(exc_type, exc, tb)
