"""Horovod's process sets: collectives over a subset of the ranks. Each set runs its own engine
(its own process groups, background thread, negotiation and liveness heartbeats), so a set
whose members are busy or stalled never holds up another set.

- :class:`ProcessSet` — a sorted list of global ranks; registered by :func:`add_process_set`
  or ``init(process_sets=[...])``, which give it its ``process_set_id``.
- :data:`global_process_set` — every rank, id 0: the default ``process_set=`` of every
  collective.
- :func:`add_process_set` / :func:`remove_process_set` — collective over ALL ranks, called
  in the same order everywhere; a call that differs between ranks raises on every rank.

Ranks keep their global numbers in the API (``root_rank`` of a broadcast is a global rank, as in
Horovod); ``ProcessSet.rank()`` is this rank's place in the set (e.g. its block of an
allgather's result).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable

import torch.distributed as dist

from . import _engine, _fault_report


class ProcessSet:
    """A set of ranks that run collectives together (Horovod's class). Built from a list of
    global ranks (kept sorted); ``process_set_id`` is None until the set is registered, and
    again after it is removed."""

    process_set_id = None
    ranks = None

    def __init__(self, ranks):
        if isinstance(ranks, (str, bytes)) or not isinstance(ranks, Iterable):
            # ValueError, as Horovod raises for anything but a list of ranks.
            raise ValueError(f"ProcessSet: ranks must be a list of ints, got {ranks!r}")  # noqa: TRY004
        ranks = list(ranks)
        if any(isinstance(r, bool) or not isinstance(r, int) for r in ranks):
            raise ValueError(f"ProcessSet: ranks must be a list of ints, got {ranks!r}")
        if len(set(ranks)) != len(ranks):
            raise ValueError(f"ProcessSet: ranks must not repeat, got {ranks!r}")
        self.ranks = sorted(ranks)

    def _invalidate(self):
        self.process_set_id = None

    def size(self) -> int | None:
        """How many ranks the set has; None while it is not registered."""
        if self.process_set_id is None:
            return None
        _engine._require()
        return len(self.ranks)

    def rank(self) -> int | None:
        """This rank's place in the set (0 .. size()-1); None while it is not registered.
        Raises ValueError on a rank outside the set."""
        if self.process_set_id is None:
            return None
        me = _engine.rank()
        if me not in self.ranks:
            raise ValueError(f"rank {me} is not a member of {self}")
        return self.ranks.index(me)

    def included(self) -> bool | None:
        """Whether this rank is in the set; None when it has no ranks."""
        if self.ranks is None:
            return None
        return _engine.rank() in self.ranks

    def __str__(self) -> str:
        return (
            f"ProcessSet(process_set_id={self.process_set_id}, ranks={self.ranks}, mpi_comm=None)"
        )

    __repr__ = __str__


global_process_set = ProcessSet([])
global_process_set.process_set_id = 0

# While initialized: id -> the registered ProcessSet, and the process groups of its engine
# (control, cpu, and cuda where the global engine has one; non-members hold none).
_registered: dict[int, ProcessSet] = {}
_groups: dict[int, dict] = {}
_next_id = 1  # ids are never reused while initialized, so a stale id cannot name a new set
# Per set, the index of its next unnamed collective: ranks calling the same unnamed collectives
# on a set in the same order get the same names, whatever else they run on other sets. A set's
# count starts at its registration (ids restart after shutdown); the global set's never resets.
_auto_names: dict[int, int] = {0: 0}  # per set: the number of its next automatic name


def _on_init(size: int) -> None:
    """_engine.init(): the global set is every rank; no other set exists yet."""
    global _next_id
    global_process_set.ranks = list(range(size))
    _registered.clear()
    _groups.clear()
    _next_id = 1
    for ps_id in [k for k in _auto_names if k != 0]:
        del _auto_names[ps_id]


def _on_shutdown() -> None:
    """_engine.shutdown(), after every engine stopped: every set but the global one is gone."""
    for ps_id, groups in _groups.items():
        for group in groups.values():
            dist.destroy_process_group(group)
        _registered[ps_id]._invalidate()
    _registered.clear()
    _groups.clear()


def _forget_in_child() -> None:
    """os.fork(): the parent's groups are not the child's to destroy."""
    for ps in _registered.values():
        ps._invalidate()
    _registered.clear()
    _groups.clear()


os.register_at_fork(after_in_child=_forget_in_child)


# ---- what the collectives read ---------------------------------------------------------------


def _check(process_set, fn) -> ProcessSet:
    """The process_set argument of a collective, checked: registered, and this rank in it."""
    if process_set is None:
        return global_process_set
    if not isinstance(process_set, ProcessSet):
        raise TypeError(
            f"gradfuse.{fn}: process_set must be a gradfuse.ProcessSet, got {process_set!r}"
        )
    _engine._require()
    ps_id = process_set.process_set_id
    if ps_id != 0 and (ps_id is None or _registered.get(ps_id) is not process_set):
        raise ValueError(
            f"gradfuse.{fn}: {process_set} is not registered: pass it to add_process_set() "
            "(or init(process_sets=...)) first; a removed set cannot be used"
        )
    if ps_id != 0 and _engine.rank() not in process_set.ranks:
        raise ValueError(
            f"gradfuse.{fn}: rank {_engine.rank()} is not a member of the provided process set "
            f"{process_set}: only its members may call collectives on it"
        )
    return process_set


def _set_rank(process_set, global_rank, fn, what="root_rank") -> int:
    """A global rank's place in the set (what the set's engine numbers it); ValueError naming
    `what` when that rank is not a member."""
    if process_set.process_set_id == 0:
        return global_rank
    if global_rank not in process_set.ranks:
        raise ValueError(
            f"gradfuse.{fn}: {what}={global_rank} is not a member of {process_set} (ranks are "
            "global ranks, as in Horovod)"
        )
    return process_set.ranks.index(global_rank)


def _auto_name(kind, process_set) -> str:
    """The next automatic name of a `kind` collective on `process_set` (checked)."""
    number = _auto_names[process_set.process_set_id]
    _auto_names[process_set.process_set_id] = number + 1
    return f"{kind}.noname.{number}"


def _unused_name(name, process_set) -> None:
    """A submission named `name` was refused on this rank before it reached the engine. If that
    was the newest automatic name of the set, it is handed out again: the other ranks did not
    use it, and this rank's later unnamed collectives must keep pairing with theirs."""
    last = _auto_names.get(process_set.process_set_id, 0) - 1
    if last >= 0 and name.endswith(f".noname.{last}"):
        _auto_names[process_set.process_set_id] = last


def _global_rank(process_set, set_rank) -> int:
    return set_rank if process_set.process_set_id == 0 else process_set.ranks[set_rank]


def _size(process_set) -> int:
    return _engine.size() if process_set.process_set_id == 0 else len(process_set.ranks)


# ---- add / remove ----------------------------------------------------------------------------


def _agree(call, fn):
    """Every rank's `call` (a description, or an error string), gathered on the
    process-set group; the same ValueError on every rank (naming each rank's call) when they
    differ or one failed, so a mismatch never leaves ranks creating different groups."""
    state = _engine._require()
    if "sets" not in state.groups:
        # The first add/remove_process_set creates the group they agree on. Every rank makes
        # that call (it is collective), so every rank creates the group here, in the same order.
        timeout = datetime.timedelta(seconds=state.cfg.timeout_s)
        state.groups["sets"] = dist.new_group(backend="gloo", timeout=timeout)
    calls = [None] * state.size
    dist.all_gather_object(calls, call, group=state.groups["sets"])
    errors = [f"rank {r}: {c[1]}" for r, c in enumerate(calls) if c[0] == "error"]
    if errors:
        raise ValueError(f"gradfuse.{fn} failed on " + "; ".join(errors))
    if any(c != calls[0] for c in calls):
        per_rank = ", ".join(f"rank {r}: {c[1]!r}" for r, c in enumerate(calls))
        raise ValueError(
            f"gradfuse.{fn} must be called by every rank in the same order with the same "
            f"process set; the ranks called it with {per_rank}"
        )


def _validated(process_set, size) -> ProcessSet:
    ps = process_set if isinstance(process_set, ProcessSet) else ProcessSet(process_set)
    if ps.process_set_id is not None:
        raise ValueError(f"{ps} is registered already")
    if not ps.ranks:
        raise ValueError("a process set needs at least one rank, got []")
    if ps.ranks[0] < 0 or ps.ranks[-1] >= size:
        raise ValueError(f"process set ranks must be in [0, {size}), got {ps.ranks}")
    return ps


def add_process_set(process_set) -> ProcessSet:
    """Register a process set (a ProcessSet or a list of global ranks) and start its engine on
    its members; returns the ProcessSet, now with its process_set_id. Collective: every rank
    calls it, in the same order, with the same ranks (a call that differs raises ValueError
    on every rank). A set with the ranks of a registered one (the global set included) is a
    ValueError, as in Horovod."""
    state = _engine._require()
    try:
        ps = _validated(process_set, state.size)
        call = ("add", ps.ranks)
    except (TypeError, ValueError) as e:
        call = ("error", str(e))
    _agree(call, "add_process_set")
    for known in [global_process_set, *_registered.values()]:
        if known.ranks == ps.ranks:
            raise ValueError(f"gradfuse.add_process_set: attempted to add a duplicate of {known}")
    global _next_id
    ps_id, _next_id = _next_id, _next_id + 1
    groups = _new_groups(ps.ranks, state)
    if state.rank in ps.ranks:
        try:
            _engine._start_engine(
                state.cfg,
                groups,
                rank=ps.ranks.index(state.rank),
                size=len(ps.ranks),
                process_set_id=ps_id,
                global_ranks=ps.ranks,
            )
        except Exception:
            for group in groups.values():
                dist.destroy_process_group(group)
            raise
    ps.process_set_id = ps_id
    _registered[ps_id] = ps
    _auto_names[ps_id] = 0
    _groups[ps_id] = groups
    return ps


def _new_groups(ranks, state):
    """The set's engine groups. new_group is collective over all ranks: every rank creates
    them in the same order, and members keep them."""
    timeout = datetime.timedelta(seconds=state.cfg.timeout_s)
    groups = {
        "control": dist.new_group(ranks=ranks, backend="gloo", timeout=timeout),
        "cpu": dist.new_group(ranks=ranks, backend="gloo", timeout=timeout),
    }
    if state.cuda:
        groups["cuda"] = _engine._new_cuda_group(state.cuda, ranks=ranks, timeout=timeout)
    if state.rank not in ranks:
        return {}
    return groups


def remove_process_set(process_set) -> bool:
    """Stop the set's engine on its members (its pending handles fail) and destroy its groups;
    the ProcessSet's process_set_id becomes None. Collective, like add_process_set. Returns
    False (doing nothing) for the global set or a set that is not registered, as Horovod."""
    if not isinstance(process_set, ProcessSet):
        raise TypeError(
            f"gradfuse.remove_process_set: process_set must be a gradfuse.ProcessSet, got "
            f"{process_set!r}"
        )
    _engine._require()
    ps_id = process_set.process_set_id
    known = ps_id is not None and ps_id != 0 and _registered.get(ps_id) is not None
    _agree(("remove", (ps_id, process_set.ranks) if known else None), "remove_process_set")
    if not known:
        return False
    from . import _C

    _C.engine_stop_process_set(ps_id)
    groups = _groups.pop(ps_id)
    if groups:  # a member: its engine's board hears no more of this rank
        _fault_report.forget(_engine._board_prefix(groups))
    for group in groups.values():
        dist.destroy_process_group(group)
    _registered.pop(ps_id)._invalidate()
    del _auto_names[ps_id]
    process_set._invalidate()
    return True


def _add_at_init(process_sets) -> None:
    """init(process_sets=[...]): each set added in order, as add_process_set."""
    if isinstance(process_sets, (ProcessSet, str, bytes)) or not isinstance(process_sets, Iterable):
        raise TypeError(
            f"gradfuse.init: process_sets must be a list of ProcessSet, got {process_sets!r}"
        )
    for ps in process_sets:
        add_process_set(ps)


__all__ = ["ProcessSet", "add_process_set", "global_process_set", "remove_process_set"]
