"""One training step as ``gradfuse-bench plan`` predicts it: forward, then backward with the
engine reducing gradients as they become ready, then the optimizer.

The engine is simulated as it runs (cpp/engine): a cycle starts when the previous cycle's
collectives are done, a gradient is ready and at least cycle_time has passed since the last
cycle began; it negotiates (a tree of log2 p hops each way), takes every gradient ready by
then in backward order, fuses them into messages of at most the fusion threshold (a larger
tensor goes alone), and runs the messages one after another: pack, allreduce, unpack. So a
larger threshold pays fewer latency terms, and a shorter cycle starts communication earlier
in backward; what is left after backward ends is exposed.

What the model assumes: backward takes twice the forward's FLOPs and each layer's share of it
follows its FLOPs; gradients become ready in reverse layer order; one collective at a time
(the engine's rule); pack and unpack are not overlapped with the collective; the optimizer is
the fused LARS after the last gradient; no stragglers, no data loading. CPU ranks (profile
cores_per_node): compute and the optimizer slow down by the sharing calibrate measured with that
many ranks computing at once (else by ranks / cores where they outnumber a node's cores); and
unless a core is left over, communication does not overlap backward (the
engine's thread and Gloo's reductions need the cores backward is using): every gradient is
taken as ready when backward ends, so all of it is exposed. A job of one rank has no collective
but still pays the engine's copies of its fused messages, unless a GPU hides them."""

from __future__ import annotations

from dataclasses import dataclass, field

from .plan_model import allreduce_time
from .plan_profiles import Profile
from .plan_workload import BACKWARD_PER_FORWARD, Workload


@dataclass
class Choice:
    algorithm: str  # flat | hierarchical | tree | hybrid
    fusion_threshold_bytes: int
    cycle_time_ms: float
    hybrid_threshold_bytes: int | None = None  # hybrid: hierarchical up to this size


@dataclass
class StepPrediction:
    choice: Choice
    compute_s: float
    comm_exposed_s: float
    pack_exposed_s: float
    optimizer_s: float
    messages: int
    comm_total_s: float  # all collectives, hidden or not
    detail: dict = field(default_factory=dict)

    @property
    def total_s(self) -> float:
        return self.compute_s + self.comm_exposed_s + self.pack_exposed_s + self.optimizer_s


def compute_seconds(workload: Workload, profile: Profile, batch_per_gpu: int, p: int):
    """(forward, backward) seconds of one rank's step in a job of p ranks, before any sharing
    of cores."""
    if workload.forward_flops_per_sample > 0:
        rate = profile.compute_flops_per_s_alone if p == 1 else profile.compute_flops_per_s
        forward = workload.forward_flops_per_sample * batch_per_gpu / rate
        return forward, BACKWARD_PER_FORWARD * forward
    return workload.forward_s, workload.backward_s


def core_sharing(profile: Profile, p: int, k: int) -> float:
    """How much slower a rank computes (and steps its optimizer) because other ranks share its
    host (>= 1). Measured where calibrate ran that many ranks at once (compute_by_ranks: cores,
    caches and memory bandwidth all shared); else ranks / cores where ranks outnumber a CPU
    node's cores."""
    ranks_here = min(p, k)
    measured = profile.compute_by_ranks.get(ranks_here) if p > 1 else None
    if measured:
        return max(1.0, profile.compute_flops_per_s / measured)
    if profile.cores_per_node and ranks_here > profile.cores_per_node:
        return ranks_here / profile.cores_per_node
    return 1.0


def _messages(sizes: list[float], threshold: int) -> list[list[float]]:
    """Fuses sizes in order: a message grows while it stays within the threshold."""
    out: list[list[float]] = []
    for n in sizes:
        if out and sum(out[-1]) + n <= threshold:
            out[-1].append(n)
        else:
            out.append([n])
    return out


def predict(
    workload: Workload,
    profile: Profile,
    p: int,
    k: int,
    batch_per_gpu: int,
    wire_bytes: int,
    choice: Choice,
) -> StepPrediction:
    forward, backward = compute_seconds(workload, profile, batch_per_gpu, p)
    share = core_sharing(profile, p, k)
    forward, backward = forward * share, backward * share
    optimizer = workload.parameters / profile.optimizer_params_per_s * share
    # CPU ranks overlap communication with backward only with a core to spare for it.
    cores = profile.cores_per_node
    overlap = not cores or min(p, k) < cores
    fractions = workload.ready_fractions()
    order = sorted(range(len(fractions)), key=lambda i: (fractions[i], -i))
    sizes = [workload.numels[i] * wire_bytes for i in order]
    if p == 1:
        # A job of one rank still hands its gradients to the engine: no collective, but the
        # fused messages are copied into the fusion buffer and back. A GPU's copies hide behind
        # backward; a lone CPU rank computes on every core, so its copies add to the step.
        copies = sum(
            2 * sum(m) / profile.pack_bytes_per_s
            for m in _messages(sizes, choice.fusion_threshold_bytes)
            if len(m) > 1 or wire_bytes != 4
        )
        return StepPrediction(
            choice, forward + backward, 0.0, copies if cores else 0.0, optimizer, 0, 0.0
        )
    intra, inter = profile.links(p, k)

    def collective(nbytes: float) -> float:
        algorithm = choice.algorithm
        if algorithm == "hybrid":
            small = nbytes <= (choice.hybrid_threshold_bytes or 0)
            algorithm = "hierarchical" if small else "flat"
        return allreduce_time(algorithm, nbytes, p, min(k, p), intra, inter)

    ready = [backward * fractions[i] if overlap else backward for i in order]
    pack_rate = profile.pack_bytes_per_s
    negotiation = profile.negotiation_s(p)
    cycle = choice.cycle_time_ms / 1e3

    t_free, last_cycle, i, messages = 0.0, float("-inf"), 0, 0
    pack_after, comm_total = 0.0, 0.0  # pack/unpack time past the end of backward
    while i < len(sizes):
        start = max(t_free, ready[i], last_cycle + cycle)
        last_cycle = start
        j = i
        while j < len(sizes) and ready[j] <= start:
            j += 1
        t = start + negotiation
        for message in _messages(sizes[i:j], choice.fusion_threshold_bytes):
            nbytes = sum(message)
            packed = len(message) > 1 or wire_bytes != 4  # a lone fp32 tensor: in place
            copy = nbytes / pack_rate if packed else 0.0
            comm = collective(nbytes)
            comm_total += comm
            for begin, length in ((t, copy), (t + copy + comm, copy)):
                pack_after += max(0.0, begin + length - max(begin, backward))
            t += 2 * copy + comm
            messages += 1
        t_free, i = t, j
    exposed = max(0.0, t_free - backward)
    pack_exposed = min(pack_after, exposed)
    return StepPrediction(
        choice,
        forward + backward,
        exposed - pack_exposed,
        pack_exposed,
        optimizer,
        messages,
        comm_total,
        {"core_sharing": share, "overlap": overlap},
    )
