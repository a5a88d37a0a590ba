"""Pure analysis of a run under a Kueue quota: GPU use over time from pod intervals, and whether admissions
followed the queue's order (priority, then the time the workload joined the queue). No I/O, no clock: the
many-comparisons cluster test and `bench/queue_bench.py` record the intervals and admissions
(`devcluster/queue_run.py`) and call these; pure functions, table-tested.

Times are seconds (epoch or any common origin). Kubernetes timestamps have one-second resolution, so the
functions take tolerances rather than trusting sub-second order.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """One pod holding `gpus` GPUs from `start` to `end` (its container ran; end exclusive)."""

    name: str
    start: float
    end: float
    gpus: int

    def __post_init__(self) -> None:
        if self.end < self.start:
            raise ValueError(f"span {self.name!r} ends ({self.end}) before it starts ({self.start})")
        if self.gpus < 0:
            raise ValueError(f"span {self.name!r} holds a negative number of GPUs ({self.gpus})")


@dataclass(frozen=True)
class Overuse:
    """An interval [start, end) during which the spans held more than the quota."""

    start: float
    end: float
    gpus: int
    names: tuple[str, ...]


def _steps(spans: Iterable[Span]) -> list[tuple[float, int, str]]:
    """(time, +gpus or -gpus, name), ends before starts at the same instant: a pod that stops at t and one that
    starts at t never overlap (second-resolution timestamps make such ties common)."""
    events: list[tuple[float, int, str]] = []
    for s in spans:
        if s.gpus and s.end > s.start:
            events += [(s.start, s.gpus, s.name), (s.end, -s.gpus, s.name)]
    return sorted(events, key=lambda e: (e[0], e[1]))


def usage_steps(spans: Iterable[Span]) -> list[tuple[float, int]]:
    """GPUs held from each instant on: [(t, gpus)] at every change, in time order (the step function)."""
    out: list[tuple[float, int]] = []
    held = 0
    for t, delta, _ in _steps(spans):
        held += delta
        if out and out[-1][0] == t:
            out[-1] = (t, held)
        else:
            out.append((t, held))
    return out


def peak(spans: Iterable[Span]) -> tuple[int, float | None]:
    """The most GPUs held at once and the first instant it was held (None without any GPU span)."""
    best, at = 0, None
    for t, held in usage_steps(spans):
        if held > best:
            best, at = held, t
    return best, at


def over_quota(spans: Sequence[Span], quota: int) -> list[Overuse]:
    """Every interval in which the spans held more than `quota` GPUs, with who held them."""
    out: list[Overuse] = []
    running: dict[str, int] = {}
    events = _steps(spans)
    for i, (t, delta, name) in enumerate(events):
        running[name] = running.get(name, 0) + delta
        if running[name] == 0:
            del running[name]
        nxt = events[i + 1][0] if i + 1 < len(events) else t
        held = sum(running.values())
        if held > quota and nxt > t:
            out.append(Overuse(t, nxt, held, tuple(sorted(running))))
    return out


def gpu_seconds(spans: Iterable[Span], start: float | None = None, end: float | None = None) -> float:
    """GPU-seconds the spans held, clipped to [start, end] when given."""
    total = 0.0
    for s in spans:
        lo = s.start if start is None else max(s.start, start)
        hi = s.end if end is None else min(s.end, end)
        total += max(0.0, hi - lo) * s.gpus
    return total


def utilisation(spans: Sequence[Span], quota: int, start: float, end: float) -> float:
    """GPU-seconds used / (quota x (end - start)): the share of the quota in use over [start, end]."""
    if quota <= 0:
        raise ValueError(f"quota must be positive, got {quota}")
    if end <= start:
        raise ValueError(f"the window must have a length (start {start}, end {end})")
    return gpu_seconds(spans, start, end) / (quota * (end - start))


def timeline(spans: Sequence[Span], quota: int, start: float, end: float, buckets: int) -> list[dict[str, float]]:
    """Utilisation in `buckets` equal windows of [start, end]: [{"from", "to", "utilisation"}], times relative to
    start, rounded for a JSON record."""
    if buckets <= 0:
        raise ValueError(f"buckets must be positive, got {buckets}")
    width = (end - start) / buckets
    return [
        {
            "from": round(i * width, 2),
            "to": round((i + 1) * width, 2),
            "utilisation": round(utilisation(spans, quota, start + i * width, start + (i + 1) * width), 3),
        }
        for i in range(buckets)
    ]


@dataclass(frozen=True)
class Admission:
    """One wait of a workload in the queue and how it ended. It joined the queue at `queued` (its creation, or its
    eviction when it was preempted) and was admitted at `admitted` (None: not within what was recorded); a workload
    evicted and readmitted has two. Kueue orders the queue by `priority` (higher first), then by `order`, the
    workload's queue-order timestamp: its creationTimestamp, which a preemption within the ClusterQueue keeps
    (Kueue v0.17 `workload.Ordering.GetQueueOrderTimestamp`; only a PodsReady timeout or an admission check moves
    it to the eviction), then by UID (arbitrary: equal timestamps are unordered). It requests `gpus` GPUs."""

    workload: str
    priority: int
    order: float
    queued: float
    admitted: float | None
    gpus: int = 0


@dataclass(frozen=True)
class OrderViolation:
    """`admitted` was admitted while `waiting`, which ranked ahead of it (higher priority, or the same priority
    and an earlier queue-order timestamp), stayed pending."""

    admitted: str
    waiting: str
    at: float

    def __str__(self) -> str:
        return f"{self.admitted} admitted at {self.at:.1f} while {self.waiting}, ahead of it in the queue, kept waiting"


def ranks_ahead(a: Admission, b: Admission, resolution: float = 0.0) -> bool:
    """Whether `a` is ahead of `b` in Kueue's order: higher priority, or equal priority and an order timestamp
    earlier by more than `resolution` (Kubernetes' timestamps are whole seconds; equal ones are unordered)."""
    if a.priority != b.priority:
        return a.priority > b.priority
    return a.order < b.order - resolution


def held(holds: Iterable[Span], at: float, besides: str = "") -> int:
    """GPUs the quota holds (admitted Workloads, `Span` per hold) had reserved just before `at`, leaving out
    `besides`'s own (a hold released at `at` no longer counts)."""
    return sum(h.gpus for h in holds if h.name != besides and h.start < at < h.end)


def order_violations(
    admissions: Sequence[Admission],
    settle: float = 1.5,
    same_cycle: float = 1.0,
    resolution: float = 0.0,
    quota: int | None = None,
    holds: Sequence[Span] = (),
) -> list[OrderViolation]:
    """Admissions that jumped the queue: an admission of `a` at t while a wait `b` that ranked ahead of `a`
    (:func:`ranks_ahead`) was pending (in the queue for at least `settle` s, so Kueue had seen it; not admitted by
    t + `same_cycle`, as heads are admitted one scheduling cycle after another and the writes land a moment apart).

    Without a `quota` this is the order of a StrictFIFO ClusterQueue: nothing passes a waiting head of higher or
    equal rank. With a `quota` (GPUs) and the Workloads' `holds`, only a `b` that fitted the GPUs free just before
    t counts, as BestEffortFIFO lets a workload pass a head that does not fit. Kueue v0.17's BestEffortFIFO does
    not keep even that order strictly: a head that did not fit when it was tried is parked until 1 s after quota is
    released (pkg/cache/queue ``requeueBatchPeriod``), and quota freed meanwhile goes to whichever workload is
    tried next (a newcomer, or the next one in the same sweep), so for it the list is what happened, not a check."""
    out: list[OrderViolation] = []
    for a in admissions:
        if a.admitted is None:
            continue
        t = a.admitted
        free = None if quota is None else quota - held(holds, t, besides=a.workload)
        for b in admissions:
            if b.workload == a.workload:
                continue
            pending = b.queued <= t - settle and (b.admitted is None or b.admitted > t + same_cycle)
            fits = free is None or b.gpus <= free
            if pending and fits and ranks_ahead(b, a, resolution):
                out.append(OrderViolation(a.workload, b.workload, t))
    return out


def queue_waits(admissions: Iterable[Admission], until: float) -> dict[str, float]:
    """Seconds each workload waited in the queue, summed over its waits (a wait never admitted counts to `until`)."""
    out: dict[str, float] = {}
    for a in admissions:
        end = a.admitted if a.admitted is not None else until
        out[a.workload] = out.get(a.workload, 0.0) + max(0.0, end - a.queued)
    return out
