"""Reading an engine timeline (gradfuse.start_timeline / GRADFUSE_TIMELINE) of one training
step: its collectives in time order and, for each batch submitted in full while the previous
collective was still running, whether it was also agreed (the end of its tensors' "negotiate"
phase) before that collective ended, i.e. whether negotiation overlaps the previous collective
or sits between collectives on the critical path. A batch whose last tensor came after the
previous collective ended waited for backward, not for negotiation."""

from __future__ import annotations

import statistics

from .. import timeline


def summarize(events: list[dict]) -> dict:
    """The batches (one per collective) of a timeline, times in ms from its first event."""
    spans = [e for e in events if e.get("ph") == "X"]
    if not spans:
        raise ValueError("the timeline has no phase events (was a collective run while on?)")
    origin = min(e["ts"] for e in spans)

    def ms(us):
        return (us - origin) / 1e3

    negotiated = {}  # tensor -> (submitted, agreed)
    batches = {}  # (start, duration) of a collective -> its batch
    for e in spans:
        if e["name"] == "negotiate":
            negotiated[e["args"]["tensor"]] = (ms(e["ts"]), ms(e["ts"] + e["dur"]))
        elif e["name"] == "collective":
            batch = batches.setdefault(
                (e["ts"], e["dur"]),
                {"start_ms": ms(e["ts"]), "end_ms": ms(e["ts"] + e["dur"]), "tensors": []},
            )
            batch["tensors"].append(e["args"]["tensor"])
    ordered = sorted(batches.values(), key=lambda b: b["start_ms"])
    for prev, batch in zip([None, *ordered], ordered):
        times = [negotiated.get(t, (batch["start_ms"],) * 2) for t in batch.pop("tensors")]
        batch["tensors"] = len(times)
        batch["submitted_ms"] = max(submitted for submitted, _ in times)
        batch["agreed_ms"] = max(agreed for _, agreed in times)
        if prev is not None:
            batch["gap_ms"] = batch["start_ms"] - prev["end_ms"]  # the wire idle before it
            if batch["submitted_ms"] < prev["end_ms"]:
                batch["agreed_during_previous"] = batch["agreed_ms"] < prev["end_ms"]
    later = ordered[1:]
    candidates = [b for b in later if "agreed_during_previous" in b]
    return {
        "tensors": len(negotiated),
        "collectives": ordered,
        "span_ms": max(b["end_ms"] for b in ordered),
        "collective_ms": sum(b["end_ms"] - b["start_ms"] for b in ordered),
        "submitted_during_previous": len(candidates),
        "overlapped": sum(b["agreed_during_previous"] for b in candidates),
        "median_gap_ms": statistics.median(b["gap_ms"] for b in later) if later else None,
    }


def summarize_file(path) -> dict:
    return summarize(timeline.load(path))


def _verdict(s: dict) -> str:
    n, k = s["submitted_during_previous"], s["overlapped"]
    if n == 0:
        return "not tested (no batch was submitted while the previous collective ran)"
    word = "yes" if k == n else "partly" if k else "no"
    return (
        f"{word} ({k} of the {n} batches submitted while the previous collective ran were "
        f"agreed before it ended)"
    )


def format_summary(s: dict) -> str:
    n = len(s["collectives"])
    head = (
        f"timeline of one gradfuse step: {s['tensors']} tensors in {n} collectives over "
        f"{s['span_ms']:.1f} ms, collectives busy {s['collective_ms']:.1f} ms"
    )
    lines = [head]
    lines.append(f"  negotiation overlaps the previous collective: {_verdict(s)}")
    if n > 1:
        lines.append(f"  median idle gap between collectives {s['median_gap_ms']:.2f} ms")
    lines.append(
        f"  {'batch':>5} {'tensors':>7} {'submitted':>10} {'agreed':>9} {'start':>9} {'end':>9} ms"
    )
    notes = {True: "  agreed during the previous", False: "  agreed after the previous ended"}
    for i, b in enumerate(s["collectives"]):
        lines.append(
            f"  {i:>5} {b['tensors']:>7} {b['submitted_ms']:>10.2f} {b['agreed_ms']:>9.2f} "
            f"{b['start_ms']:>9.2f} {b['end_ms']:>9.2f}"
            + notes.get(b.get("agreed_during_previous"), "")
        )
    return "\n".join(lines)
