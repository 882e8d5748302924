"""The engine's Chrome-trace timeline (chrome://tracing, Perfetto): start/stop it at run time
and read a file back, also one from a killed process (no closing bracket)."""

from __future__ import annotations

import json
import os
import warnings

from . import _engine


def start_timeline(file_path, mark_cycles: bool = False) -> None:
    """Rank 0 writes a timeline of every tensor's phases (negotiate, queue, pack, collective,
    unpack) to `file_path`, replacing the file; other ranks do nothing. Horovod's signature:
    `mark_cycles=True` (Horovod's marks of each negotiation cycle) warns that gradfuse's
    timeline has no cycle marks, and the timeline is written without them. Raises ValueError
    before init(), as Horovod does."""
    state = _engine._require()
    if mark_cycles:
        warnings.warn(
            "gradfuse.start_timeline(mark_cycles=True): gradfuse's timeline does not mark "
            "negotiation cycles; it is written without them (the engine's cycle counts are in "
            "gradfuse.stats())",
            stacklevel=2,
        )
    if state.rank == 0:
        _engine._C().engine_start_timeline(os.fspath(file_path))


def stop_timeline() -> None:
    """Closes the timeline file (also done by shutdown()). Raises ValueError before init()."""
    if _engine._require().rank == 0:
        _engine._C().engine_stop_timeline()


def load(path) -> list[dict]:
    """The events of a timeline file. A file whose writer was killed lacks the closing "]"
    and may end in a partial event or a comma: those are dropped, the rest is returned."""
    with open(path) as f:
        text = f.read().rstrip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    # Events are written one per line, each line after the first prefixed by ",".
    events = []
    for line in text.splitlines()[1:]:
        line = line.strip().rstrip(",").lstrip(",").strip()
        if not line or line == "]":
            continue
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            break  # the event being written when the process died
    return events
