"""Reading an engine timeline (gradfuse.start_timeline / GRADFUSE_TIMELINE) of one training
step: its collectives in time order and, for each, whether the batch's agreement (the end of
its tensors' "negotiate" phase) came while the previous collective was still running, i.e.
whether negotiation overlaps the previous collective or sits between collectives on the
critical path."""

from __future__ import annotations

import statistics

from .. import timeline


def summarize(events: list[dict]) -> dict:
    """The batches (one per collective) of a timeline, times in ms from its first event."""
    spans = [e for e in events if e.get("ph") == "X"]
    if not spans:
        raise ValueError("the timeline has no phase events (was a collective run while on?)")
    origin = min(e["ts"] for e in spans)
    agreed = {}  # tensor -> when its negotiation ended
    for e in spans:
        if e["name"] == "negotiate":
            agreed[e["args"]["tensor"]] = (e["ts"] + e["dur"] - origin) / 1e3
    batches = {}
    for e in spans:
        if e["name"] == "collective":
            batch = batches.setdefault(
                (e["ts"], e["dur"]),
                {
                    "start_ms": (e["ts"] - origin) / 1e3,
                    "end_ms": (e["ts"] + e["dur"] - origin) / 1e3,
                },
            )
            batch.setdefault("tensors", []).append(e["args"]["tensor"])
    ordered = sorted(batches.values(), key=lambda b: b["start_ms"])
    for prev, batch in zip([None, *ordered], ordered):
        batch["agreed_ms"] = max(agreed.get(t, batch["start_ms"]) for t in batch["tensors"])
        batch["tensors"] = len(batch["tensors"])
        if prev is not None:
            batch["gap_ms"] = batch["start_ms"] - prev["end_ms"]  # the wire idle before it
            batch["agreed_during_previous"] = batch["agreed_ms"] < prev["end_ms"]
    later = ordered[1:]
    return {
        "tensors": len(agreed),
        "collectives": ordered,
        "span_ms": max(b["end_ms"] for b in ordered),
        "collective_ms": sum(b["end_ms"] - b["start_ms"] for b in ordered),
        "overlapped": sum(b["agreed_during_previous"] for b in later),
        "median_gap_ms": statistics.median(b["gap_ms"] for b in later) if later else None,
    }


def summarize_file(path) -> dict:
    return summarize(timeline.load(path))


def format_summary(s: dict) -> str:
    n = len(s["collectives"])
    head = (
        f"timeline of one gradfuse step: {s['tensors']} tensors in {n} collectives over "
        f"{s['span_ms']:.1f} ms, collectives busy {s['collective_ms']:.1f} ms"
    )
    lines = [head]
    if n > 1:
        verdict = "yes" if s["overlapped"] == n - 1 else "partly" if s["overlapped"] else "no"
        lines.append(
            f"  negotiation overlaps the previous collective: {verdict} ({s['overlapped']} of "
            f"{n - 1} batches agreed before the previous collective ended); median idle gap "
            f"between collectives {s['median_gap_ms']:.2f} ms"
        )
    lines.append(f"  {'batch':>5} {'tensors':>7} {'agreed ms':>10} {'start ms':>9} {'end ms':>9}")
    for i, b in enumerate(s["collectives"]):
        lines.append(
            f"  {i:>5} {b['tensors']:>7} {b['agreed_ms']:>10.2f} {b['start_ms']:>9.2f} "
            f"{b['end_ms']:>9.2f}"
            + ("  (agreed during the previous)" if b.get("agreed_during_previous") else "")
        )
    return "\n".join(lines)
