"""Step records of a StreamingRuntime (longlive_core.live.StepRecord) as a markdown table, by kind of step."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Iterable

from longlive_core.live import StepRecord

KINDS: list[tuple[str, Callable[[StepRecord], bool]]] = [
    ("steady: running sessions' blocks only", lambda r: r.steady),
    ("a new session's first block", lambda r: bool(r.joined) and not (r.recaches or r.restores)),
    ("a prompt encoded beside it, no recache", lambda r: r.encoding and not (r.recaches or r.restores)),
    ("with recaches (prompt switches)", lambda r: bool(r.recaches) and not r.restores),
    ("with a restore (a moved session)", lambda r: bool(r.restores)),
]


def median_max(values: Iterable[float]) -> tuple[float, float]:
    values = sorted(values)
    return (statistics.median(values), values[-1]) if values else (float("nan"), float("nan"))


def steady_ratio(records: Iterable[StepRecord], sessions: int) -> tuple[float, float, float]:
    """(median, max, max / median) of the cost of steady steps making `sessions` blocks (ms)."""
    med, top = median_max(r.cost * 1e3 for r in records if r.steady and r.sessions == sessions)
    return med, top, top / med


def step_table(records: Iterable[StepRecord]) -> list[str]:
    """One row per (kind, blocks per step): count and median / max of cost, DiT, decode and host launch."""
    records = list(records)
    rows = [
        "| step | blocks | steps | cost (ms, median / max) | max / median | DiT (ms) | decode (ms)"
        " | host launch (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, keep in KINDS:
        for sessions in sorted({r.sessions for r in records}):
            chosen = [r for r in records if keep(r) and r.sessions == sessions]
            if not chosen:
                continue
            cost = median_max(r.cost * 1e3 for r in chosen)
            dit = median_max(r.dit_seconds * 1e3 for r in chosen)
            decode = median_max(r.decode_seconds * 1e3 for r in chosen)
            launch = median_max(r.launch_seconds * 1e3 for r in chosen)
            rows.append(
                f"| {name} | {sessions} | {len(chosen)} | {cost[0]:.0f} / {cost[1]:.0f} |"
                f" {cost[1] / cost[0]:.2f} |"
                f" {dit[0]:.0f} / {dit[1]:.0f} | {decode[0]:.0f} / {decode[1]:.0f} |"
                f" {launch[0]:.0f} / {launch[1]:.0f} |"
            )
    return rows


class GcPauses:
    """Python's garbage-collection pauses while it is installed (any thread: they stop every thread)."""

    def __init__(self) -> None:
        self.pauses: list[tuple[int, float]] = []  # (generation, seconds)
        self._started = 0.0

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *_) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses.append((info["generation"], time.perf_counter() - self._started))

    def summary(self) -> str:
        """'n collections, longest x ms (generation g)'."""
        if not self.pauses:
            return "none"
        generation, longest = max(self.pauses, key=lambda p: p[1])
        return f"{len(self.pauses)}, longest {longest * 1e3:.1f} ms (generation {generation})"
