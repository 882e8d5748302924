"""init() / shutdown() and the rank queries: sets up torch.distributed and the engine's own
process groups, then starts the C++ engine (gradfuse._C) on them by group name."""

from __future__ import annotations

import atexit
import datetime
import os
import threading

import torch
import torch.distributed as dist

from . import _fault_report
from . import config as _config
from . import launch as _launch
from . import process_sets as _process_sets
from .exceptions import NotInitializedError

_lock = threading.Lock()
_state = None  # _State while initialized
_forked_from = None  # in a child of os.fork(): the pid of the parent that ran the engine


class _State:
    def __init__(self, rank, size, nodes, groups):
        self.pid = os.getpid()  # the process whose threads run the engine
        self.rank, self.size = rank, size
        self.nodes = nodes  # the ranks of each node, in local-rank order (launch.node_layout)
        node = next(n for n in nodes if rank in n)
        self.local_rank, self.local_size = node.index(rank), len(node)
        # As Horovod's cross communicator: the ranks with this local rank, one per node that
        # has it, in rank order (on a node with fewer ranks, the higher local ranks have
        # fewer peers).
        peers = sorted(n[self.local_rank] for n in nodes if len(n) > self.local_rank)
        self.cross_rank, self.cross_size = peers.index(rank), len(peers)
        self.groups = groups
        # The process sets whose engine a DistributedOptimizer tunes (gradfuse.autotune).
        self.autotuned_sets = set()


def _C():
    from . import _C as module  # loading it also registers torch.ops.gradfuse.*

    return module


def init(**options) -> None:
    """Start gradfuse: join (or create) the torch.distributed job, create the engine's own
    process groups and start its background thread. Options (each defaults to a GRADFUSE_*
    environment variable): fusion_threshold_bytes, cache_capacity (response cache entries:
    steady-state steps announce a cached tensor as a 4-byte index; 0 disables), cycle_time_ms, timeout_s (a peer silent
    this long fails every pending handle with an error naming it), stall_warning_s,
    stall_shutdown_s, pending_names_limit (names submitted by some ranks and not yet by all;
    past it the newest fail), timeline (a Chrome-trace file path, written by rank 0),
    hierarchical_allreduce (reduce-scatter in the node, allreduce across nodes, allgather in the
    node), hierarchical_threshold_bytes (hybrid: fused messages larger than this go flat; -1,
    the default: all hierarchical), plan (a `gradfuse-bench plan --json` file or
    GRADFUSE_PLAN: its settings for this job's size, below explicit arguments), cuda_backend ("nccl", the default, one GPU per rank; or "gloo", which lets several
    ranks share one GPU, for tests) and test_local_size (tests only: consecutive ranks act as
    nodes of that size). autotune (Horovod's HOROVOD_AUTOTUNE; with autotune_log,
    autotune_warmup_samples, autotune_steps_per_sample, autotune_max_samples):
    DistributedOptimizer tunes the fusion threshold, cycle time and bucket size that were not
    set explicitly (gradfuse.autotune). process_sets (Horovod's): ProcessSets (or rank lists)
    to add right away, as add_process_set() does, in order.

    Calling init() while initialized does nothing; after shutdown() it starts again."""
    global _state, _created_default_group
    if _forked_from is not None:
        raise RuntimeError(_FORKED.format(pid=_forked_from))
    process_sets = options.pop("process_sets", None)
    planned = options.get("plan") is not None or os.environ.get("GRADFUSE_PLAN")
    cfg = _config.resolve(plan_size=_job_size() if planned else None, **options)
    with _lock:
        if _state is not None and _C().engine_running():
            return
        process_sets = process_sets if _state is None else None
        timeout = datetime.timedelta(seconds=cfg.timeout_s)
        cuda = _cuda_backend(cfg)
        if not dist.is_initialized():
            info = _launch.detect()
            # The user's own CUDA collectives on the default group get NCCL where torch has it,
            # unless CUDA tensors were asked to go through Gloo (ranks sharing one GPU, where
            # an NCCL communicator cannot be formed).
            nccl = (
                cfg.cuda_backend == "nccl"
                and torch.cuda.is_available()
                and dist.is_nccl_available()
            )
            backend = "cpu:gloo,cuda:nccl" if nccl else "gloo"
            dist.init_process_group(
                backend,
                init_method=f"tcp://{info.master_addr}:{info.master_port}",
                rank=info.rank,
                world_size=info.size,
                timeout=timeout,
            )
            _created_default_group = True
        rank, size = dist.get_rank(), dist.get_world_size()
        # The engine's own groups (every rank creates them, in the same order), so its
        # collectives never interleave with the user's on the default group. (The group on
        # which add/remove_process_set agree is made by their first call: each Gloo group
        # polls its sockets every 10 ms, which is most of what an idle engine costs.)
        groups = {
            "control": dist.new_group(backend="gloo", timeout=timeout),
            "cpu": dist.new_group(backend="gloo", timeout=timeout),
        }
        try:
            # Before any group whose construction depends on them: ranks creating groups of
            # different backends would wait on each other until the timeout.
            placements = _agreed_settings(groups["control"], cfg, cuda)
            if cuda:
                groups["cuda"] = _new_cuda_group(cuda, timeout=timeout)
            nodes = _nodes(placements, cfg)
            if cfg.hierarchical_allreduce:
                groups.update(_hierarchy_groups(nodes, rank, timeout, cuda))
        except Exception:
            # Every rank saw the same settings and layout, so every rank fails here alike;
            # leave no groups.
            _destroy(groups)
            raise
        try:
            _start_engine(cfg, groups, rank=rank, size=size)
        except Exception:
            # A rank whose engine fails to start posts why; the others' engines wait for every
            # rank's start (engine.cpp, the start handshake) and fail with it, so every rank
            # ends up here.
            _destroy(groups)
            raise
        _state = _State(rank, size, nodes, groups)
        _state.cfg, _state.cuda = cfg, cuda  # what process sets' engines are started with
        _process_sets._on_init(size)
    if process_sets:
        try:
            _process_sets._add_at_init(process_sets)
        except BaseException:
            shutdown()  # every rank fails alike (add_process_set agrees first)
            raise


def _job_size():
    """The job's rank count before init() joins it (a plan file is chosen by it), or None when
    the launcher does not say."""
    if dist.is_initialized():
        return dist.get_world_size()
    found = _launch._launcher(os.environ)  # no rendezvous: only the launcher's variables
    return 1 if found == "single" else _launch._int_env(_launch._RANK_VARS[found][1])


def _destroy(groups):
    for group in groups.values():
        dist.destroy_process_group(group)


def _start_engine(cfg, groups, rank, size, process_set_id=0, global_ranks=()):
    """Starts the engine of a process set (0: the global set) on its groups; rank and size are
    this rank's within the set. An uncaught exception on this rank is then posted on its
    peer board too (_fault_report)."""
    store_host, store_port = _tcp_store_address()
    _C().engine_start(
        rank=rank,
        size=size,
        control_group=groups["control"].group_name,
        cpu_group=groups["cpu"].group_name,
        cuda_group=_group_name(groups, "cuda"),
        fusion_threshold_bytes=cfg.fusion_threshold_bytes,
        cycle_time_ms=cfg.cycle_time_ms,
        local_group=_group_name(groups, "local"),
        cross_group=_group_name(groups, "cross"),
        cuda_local_group=_group_name(groups, "cuda_local"),
        cuda_cross_group=_group_name(groups, "cuda_cross"),
        timeout_s=cfg.timeout_s,
        store_host=store_host,
        store_port=store_port,
        heartbeat_prefix=_board_prefix(groups),
        stall_warning_s=cfg.stall_warning_s,
        stall_shutdown_s=cfg.stall_shutdown_s,
        # One timeline: the global set's, written by rank 0.
        timeline_path=cfg.timeline if rank == 0 and process_set_id == 0 else "",
        cache_capacity=cfg.cache_capacity,
        pending_names_limit=cfg.pending_names_limit,
        hierarchical_max_bytes=cfg.hierarchical_threshold_bytes,
        process_set_id=process_set_id,
        global_ranks=list(global_ranks),
    )
    store = _tcp_store()
    if store is not None and size > 1:
        global_rank = global_ranks[rank] if global_ranks else rank
        _fault_report.install(store, _board_prefix(groups), rank, global_rank)


def _board_prefix(groups):
    """The engine's keys in the job's store (cpp/engine/peer_board.h). The control group's name
    is new for every engine, so a restarted engine never reads the previous one's, and no two
    process sets share keys."""
    return f"gradfuse/{groups['control'].group_name}/heartbeat/"


def _tcp_store():
    """The job's TCP store, or None when the job has none (e.g. file:// rendezvous)."""
    store = dist.distributed_c10d._get_default_store()
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    return store if isinstance(store, dist.TCPStore) else None


def _tcp_store_address():
    """(host, port) of the job's TCP store, where the engine's liveness monitor beats; ("", 0)
    when the job has none: then a dead peer still fails pending work through the transport's
    own timeout, just without being named."""
    store = _tcp_store()
    return (store.host, store.port) if store is not None else ("", 0)


def _cuda_backend(cfg):
    """The backend of the engine's CUDA group, or None when the engine gets none: CUDA
    tensors are then rejected at enqueue, saying why. The engine never creates a group it
    cannot use: none in a CPU-only build of gradfuse, none without a GPU, no NCCL group
    where torch has no NCCL."""
    if not (_C().with_cuda and torch.cuda.is_available()):
        return None
    if cfg.cuda_backend == "nccl" and not dist.is_nccl_available():
        return None
    return cfg.cuda_backend


def _new_cuda_group(backend, **kwargs):
    """dist.new_group for CUDA tensors. An NCCL group is created with
    TORCH_NCCL_ASYNC_ERROR_HANDLING=2 (unless the user set it): on a dead peer or a timed-out
    collective, c10d's watchdog then aborts the communicator and records the error, which
    reaches the waiting handle as an exception (engine/transport_health.h), instead of
    tearing the whole process down (torch's default, 3). The variable is read when the group
    is constructed; the user's own groups keep the user's setting."""
    if backend != "nccl":
        return dist.new_group(backend=backend, **kwargs)
    key = "TORCH_NCCL_ASYNC_ERROR_HANDLING"
    saved = os.environ.get(key)
    if saved is None:
        os.environ[key] = "2"
    try:
        return dist.new_group(backend="nccl", **kwargs)
    finally:
        if saved is None:
            del os.environ[key]


# The settings every rank must share, checked at init(): they decide how requests are batched
# (a tensor fused on one rank and alone on another pairs different collectives), which groups
# exist, and when a stalled tensor (or one past pending_names_limit) fails. (cycle_time_ms,
# timeout_s and the stall warning may differ: they only change when a rank acts.)
_AGREED = (
    "fusion_threshold_bytes",
    "cache_capacity",
    "stall_shutdown_s",
    "pending_names_limit",
    "hierarchical_allreduce",
    "hierarchical_threshold_bytes",
    "test_local_size",
    # Every rank's DistributedOptimizer runs the same tuner, whose collectives pair by step.
    "autotune",
    "autotune_warmup_samples",
    "autotune_steps_per_sample",
    "autotune_max_samples",
)


def _local_init_error(cfg):
    """Why this rank's engine would fail to start, found before the ranks part ways (so every
    rank raises it, instead of the others waiting for this one until timeout_s); None if
    nothing is known to be wrong."""
    if cfg.timeline and dist.get_rank() == 0:  # rank 0 writes the timeline
        try:
            open(cfg.timeline, "a").close()  # the engine truncates it when it starts
        except OSError as e:
            return f"cannot open the timeline file {cfg.timeline!r}: {e.strerror}"
    return None


def _agreed_settings(group, cfg, cuda):
    """Checks on every rank that no rank already knows it cannot start (raising the same
    RuntimeError everywhere, naming the rank), and that the settings in _AGREED and the CUDA
    transport are the same everywhere, raising the same ValueError on every rank (naming each
    rank's value) if not. Returns every rank's launch.Placement, for _nodes."""
    try:
        where, error = _launch.placement(), None
    except ValueError as e:  # a launcher variable that is not a number: raised everywhere
        where, error = None, str(e)
    mine = {
        "placement": where,
        "error": _local_init_error(cfg) or error,
        **{key: getattr(cfg, key) for key in _AGREED},
        # Resolved: a rank without a GPU (or without NCCL) gets no CUDA group at all.
        "CUDA transport": cuda,
    }
    infos = [None] * dist.get_world_size()
    dist.all_gather_object(infos, mine, group=group)
    failed = [f"on rank {r}: {info['error']}" for r, info in enumerate(infos) if info["error"]]
    if failed:
        raise RuntimeError("gradfuse.init() failed " + "; ".join(failed))
    differing = []
    for key in [*_AGREED, "CUDA transport"]:
        if len({repr(info[key]) for info in infos}) > 1:
            per_rank = ", ".join(f"rank {r}: {info[key]!r}" for r, info in enumerate(infos))
            differing.append(f"{key} ({per_rank})")
    if differing:
        raise ValueError(
            "gradfuse.init(): settings that must be equal on every rank differ: "
            + "; ".join(differing)
        )
    return [info["placement"] for info in infos]


def _nodes(placements, cfg):
    """The ranks of each node (in local-rank order), nodes in order of their lowest rank. A
    node is what the launcher says (launch.node_layout), or with the test-only
    test_local_size, a run of that many consecutive ranks."""
    size = len(placements)
    k = cfg.test_local_size
    if k:
        if size % k:
            raise ValueError(
                f"GRADFUSE_TEST_LOCAL_SIZE / test_local_size={k} must divide the job size {size}"
            )
        return [list(range(start, start + k)) for start in range(0, size, k)]
    return _launch.node_layout(placements)


def _hierarchy_groups(nodes, rank, timeout, cuda):
    """This rank's local (its node) and cross (same local rank on every node) groups, Gloo for
    CPU tensors and NCCL for CUDA ones. new_group is collective over all ranks: every rank
    creates every group, in the same order, and keeps the ones it belongs to."""
    # A group orders its members by global rank, and a rank's shard of the buffer is its
    # position there: the cross groups pair the ranks at the same position, which need not be
    # the same launcher-reported local rank.
    nodes = [sorted(node) for node in nodes]
    sizes = sorted({len(n) for n in nodes})
    if len(sizes) > 1:
        raise ValueError(
            "gradfuse.init(hierarchical_allreduce=True) needs the same number of ranks on every "
            f"node; nodes have {', '.join(str(len(n)) for n in nodes)} ranks"
        )
    backends = {"": "gloo"}
    if cuda:
        backends["cuda_"] = cuda
    groups = {}
    for prefix, backend in backends.items():
        new_group = dist.new_group if prefix == "" else _new_cuda_group
        for node in nodes:
            group = new_group(ranks=node, backend=backend, timeout=timeout)
            if rank in node:
                groups[prefix + "local"] = group
        for local_rank in range(sizes[0]):
            ranks = [node[local_rank] for node in nodes]
            group = new_group(ranks=ranks, backend=backend, timeout=timeout)
            if rank in ranks:
                groups[prefix + "cross"] = group
    return groups


def _group_name(groups, key):
    return groups[key].group_name if key in groups else ""


def shutdown() -> None:
    """Stop the engine on every rank. Pending handles fail with an error saying so."""
    global _state, _was_shut_down
    with _lock:
        if _state is None:
            return
        _fault_report.clear()
        _C().engine_stop()  # every process set's; releases the GIL while the threads finish
        _process_sets._on_shutdown()
        for group in _state.groups.values():
            dist.destroy_process_group(group)
        # The default group is kept so that init() can be called again.
        _state, _was_shut_down = None, True


_was_shut_down = False
_created_default_group = False

_FORKED = (
    "gradfuse: this process is a fork of process {pid}, which ran gradfuse's engine. The "
    "engine's threads and connections stay in that process, so a forked child (a DataLoader "
    "worker, a multiprocessing 'fork' child) cannot run collectives or init() again; the "
    "gradfuse ops (torch.ops.gradfuse.*) work. Run collectives in the parent."
)


def _after_fork_in_child():
    """os.fork(): the child forgets the parent's engine (without stopping it: its threads are
    not in the child) and its process groups, so neither a collective nor the child's exit
    (shutdown at exit) touches them. The C++ side forgets its engine likewise
    (engine.cpp, forget_engine_in_child)."""
    global _state, _forked_from, _created_default_group, _lock
    if _forked_from is None and (_state is not None or _created_default_group):
        # The parent ran the engine, or still has the process group gradfuse created for it.
        _forked_from = _state.pid if _state is not None else os.getppid()
    _state = None
    _created_default_group = False
    _fault_report.clear()  # the child's exceptions are not the engine's rank's
    _lock = threading.Lock()  # another thread may have held it at fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


@atexit.register
def _at_exit():
    shutdown()
    if _created_default_group and dist.is_initialized():
        dist.destroy_process_group()


def is_initialized() -> bool:
    return _state is not None


def _require():
    if _state is None:
        if _forked_from is not None:
            raise RuntimeError(_FORKED.format(pid=_forked_from))
        if _was_shut_down:
            raise NotInitializedError(
                "gradfuse has been shut down: call gradfuse.init() again first"
            )
        raise NotInitializedError("gradfuse has not been initialized: call gradfuse.init() first")
    return _state


def rank() -> int:
    return _require().rank


def size() -> int:
    return _require().size


def local_rank() -> int:
    return _require().local_rank


def local_size() -> int:
    return _require().local_size


def cross_rank() -> int:
    return _require().cross_rank


def cross_size() -> int:
    return _require().cross_size


def stats(process_set=None) -> dict:
    """Counters of this rank's engine since init() (with process_set: that set's engine since
    add_process_set): negotiation cycles (and those with work), tensors and bytes reduced,
    collectives launched, fusion ratio (tensors per collective), seconds spent negotiating,
    stalled tensors given up on, and the response cache's hits (requests this rank announced as
    a cache index), misses (announced in full) and hit rate, and in_place: allreduce batches
    reduced in their tensors' own memory, with no fusion buffer; fast_cycles: rounds decided
    from cache references alone; inline_reduced: small allreduces completed from inputs sent
    with the negotiation (no data collective)."""
    _require()
    ps = _process_sets._check(process_set, "stats")
    raw = _C().engine_stats(ps.process_set_id)
    out = {k: v for k, v in raw.items() if k != "negotiate_ns"}
    out["negotiation_s"] = raw["negotiate_ns"] / 1e9
    out["fusion_ratio"] = raw["tensors"] / raw["collectives"] if raw["collectives"] else 0.0
    requests = raw["cache_hits"] + raw["cache_misses"]
    out["cache_hit_rate"] = raw["cache_hits"] / requests if requests else 0.0
    return out
