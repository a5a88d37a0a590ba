"""The pure analysis of a run under a Kueue quota (devcluster/queueing.py), by tables: GPU use over time from
pod intervals, and whether admissions followed priority, then queue time."""

from __future__ import annotations

import datetime as dt

import pytest

from devcluster.queueing import (
    Admission,
    Overuse,
    Span,
    gpu_seconds,
    order_violations,
    over_quota,
    peak,
    queue_waits,
    timeline,
    usage_steps,
    utilisation,
)

pytestmark = pytest.mark.unit


def S(name: str, start: float, end: float, gpus: int = 4) -> Span:
    return Span(name, start, end, gpus)


@pytest.mark.parametrize(
    ("spans", "steps", "top"),
    [
        pytest.param([], [], (0, None), id="nothing"),
        pytest.param([S("a", 0, 10)], [(0, 4), (10, 0)], (4, 0), id="one"),
        pytest.param([S("a", 0, 10), S("b", 5, 15)], [(0, 4), (5, 8), (10, 4), (15, 0)], (8, 5), id="overlap"),
        # second-resolution timestamps: one stops at 10 and the next starts at 10; they never held GPUs together
        pytest.param([S("a", 0, 10), S("b", 10, 20)], [(0, 4), (10, 4), (20, 0)], (4, 0), id="hand-over-at-one-instant"),
        pytest.param([S("cpu", 0, 10, gpus=0), S("a", 2, 3, 1)], [(2, 1), (3, 0)], (1, 2), id="cpu-pods-hold-nothing"),
        pytest.param([S("a", 5, 5)], [], (0, None), id="zero-length"),
    ],
)
def test_usage_steps_and_peak(spans, steps, top):
    assert usage_steps(spans) == steps
    assert peak(spans) == top


@pytest.mark.parametrize(
    ("spans", "quota", "expected"),
    [
        pytest.param([S("a", 0, 10), S("b", 10, 20)], 4, [], id="serial-under-quota"),
        pytest.param([S("a", 0, 10), S("b", 0, 10)], 8, [], id="exactly-the-quota"),
        pytest.param(
            [S("a", 0, 10), S("b", 0, 10), S("c", 9, 12, 1)], 8, [Overuse(9, 10, 9, ("a", "b", "c"))], id="one-second-over"
        ),
        pytest.param(
            [S("a", 0, 10, 8), S("b", 2, 4, 1), S("c", 6, 8, 1)],
            8,
            [Overuse(2, 4, 9, ("a", "b")), Overuse(6, 8, 9, ("a", "c"))],
            id="two-separate-overuses",
        ),
    ],
)
def test_over_quota(spans, quota, expected):
    assert over_quota(spans, quota) == expected


def test_gpu_seconds_utilisation_and_timeline():
    spans = [S("a", 0, 10, 4), S("b", 0, 10, 4), S("c", 10, 15, 4)]
    assert gpu_seconds(spans) == 100
    assert gpu_seconds(spans, 5, 12) == 5 * 8 + 2 * 4
    assert utilisation(spans, 8, 0, 20) == pytest.approx(100 / 160)
    assert timeline(spans, 8, 0, 20, 4) == [
        {"from": 0, "to": 5, "utilisation": 1.0},
        {"from": 5, "to": 10, "utilisation": 1.0},
        {"from": 10, "to": 15, "utilisation": 0.5},
        {"from": 15, "to": 20, "utilisation": 0.0},
    ]


@pytest.mark.parametrize(
    ("call", "match"),
    [
        pytest.param(lambda: Span("a", 5, 4, 1), "ends .* before it starts", id="backwards-span"),
        pytest.param(lambda: Span("a", 0, 1, -1), "negative", id="negative-gpus"),
        pytest.param(lambda: utilisation([], 0, 0, 1), "quota must be positive", id="no-quota"),
        pytest.param(lambda: utilisation([], 8, 3, 3), "must have a length", id="empty-window"),
        pytest.param(lambda: timeline([], 8, 0, 1, 0), "buckets must be positive", id="no-buckets"),
    ],
)
def test_bad_input_is_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


HIGH, LOW = 1000, 100


def A(name: str, priority: int, queued: float, admitted: float | None, order: float | None = None) -> Admission:
    """A wait; its queue-order timestamp is when it joined the queue unless given (a requeue keeps its creation)."""
    return Admission(name, priority, queued if order is None else order, queued, admitted)


@pytest.mark.parametrize(
    ("admissions", "violations"),
    [
        pytest.param([A("a", LOW, 0, 10), A("b", LOW, 1, 20), A("c", LOW, 2, 30)], [], id="fifo"),
        pytest.param([A("a", LOW, 0, 20), A("b", LOW, 1, 10)], [("b", "a", 10)], id="a-later-one-passes-an-earlier-one"),
        pytest.param([A("low", LOW, 0, 20), A("high", HIGH, 5, 10)], [], id="high-priority-goes-first"),
        pytest.param([A("low", LOW, 5, 10), A("high", HIGH, 0, 20)], [("low", "high", 10)], id="low-admitted-while-high-waits"),
        # Kueue had not seen b yet (created 0.5 s before a's admission): not a violation
        pytest.param([A("a", LOW, 5, 10), A("b", HIGH, 9.5, 20)], [], id="too-new-to-count"),
        # admitted in the same scheduling cycle, recorded a moment apart
        pytest.param([A("a", LOW, 1, 10.0), A("b", LOW, 0, 10.4)], [], id="same-cycle"),
        pytest.param([A("a", LOW, 0, 10), A("b", HIGH, 2, None)], [("a", "b", 10)], id="never-admitted-high-waits"),
        # a workload preempted at 10 keeps its creation as its place in the queue: ahead of y, created later
        pytest.param(
            [A("x", LOW, 0, 5), A("y", LOW, 3, 12), A("x", LOW, 10, 20, order=0)], [("y", "x", 12)], id="requeued-keeps-its-place"
        ),
        pytest.param([A("x", LOW, 0, 5), A("x", LOW, 10, 12, order=0), A("y", LOW, 3, 20)], [], id="requeued-goes-first"),
        pytest.param([A("a", LOW, 0, 10), A("a", LOW, 0, 10)], [], id="itself"),
    ],
)
def test_order_violations(admissions, violations):
    assert [(v.admitted, v.waiting, v.at) for v in order_violations(admissions)] == violations


def test_equal_timestamps_within_the_resolution_are_unordered():
    # created in the same second: Kueue may take either first
    same_second = [A("a", LOW, 0.0, 20), A("b", LOW, 0.9, 10)]  # ordered by UID: either may go first
    assert order_violations(same_second, resolution=1.0) == []
    assert [str(v) for v in order_violations(same_second, resolution=0.0)] == [
        "b admitted at 10.0 while a, ahead of it in the queue, kept waiting"
    ]


def G(name: str, priority: int, queued: float, admitted: float | None, gpus: int = 2) -> Admission:
    return Admission(name, priority, queued, queued, admitted, gpus)


# Under an 8-GPU quota `run` holds 6 GPUs from 0 to 10, so 2 are free before then.
RUN = [Span("run", 0, 10, 6)]


@pytest.mark.parametrize(
    ("admissions", "violations"),
    [
        # the 2-GPU train at the head fitted the 2 free GPUs: a later one passed it
        pytest.param([G("old", LOW, 0, 20), G("new", LOW, 1, 5)], [("new", "old", 5)], id="a-fitting-head-is-passed"),
        # the head needs 4 GPUs, 2 are free: BestEffortFIFO lets a 2-GPU workload behind it go
        pytest.param([G("big", LOW, 0, 12, gpus=4), G("small", LOW, 1, 5)], [], id="a-head-that-does-not-fit"),
        # after 10 the quota is free: a 4-GPU head fits again
        pytest.param([G("big", LOW, 0, 20, gpus=4), G("small", LOW, 1, 12)], [("small", "big", 12)], id="fits-once-freed"),
        # a CPU step (0 GPUs) behind no one of higher rank
        pytest.param([G("cpu", LOW, 0, 3, gpus=0), G("gpu", LOW, 1, 12)], [], id="cpu-step-first"),
    ],
)
def test_order_past_heads_that_fit(admissions, violations):
    found = order_violations(admissions, quota=8, holds=RUN)
    assert [(v.admitted, v.waiting, v.at) for v in found] == violations


def test_strict_order_counts_every_waiting_head():
    # StrictFIFO: no quota given, a head that does not fit still blocks the one behind it
    assert [(v.admitted, v.waiting) for v in order_violations([G("big", LOW, 0, 12, gpus=4), G("small", LOW, 1, 5)])] == [
        ("small", "big")
    ]


def test_queue_waits_sum_every_wait():
    admissions = [A("x", LOW, 0, 5), A("y", LOW, 3, 12), A("x", LOW, 10, 20), A("z", HIGH, 15, None)]
    assert queue_waits(admissions, until=30) == {"x": 15, "y": 9, "z": 15}


def _workload(reserved: str | None = None, finished: bool = False, priority: int = LOW, gpus: int = 2) -> dict:
    conditions = []
    if reserved is not None:
        conditions.append({"type": "QuotaReserved", "status": reserved})
    if finished:
        conditions.append({"type": "Finished", "status": "True"})
    container = {"name": "c", "resources": {"limits": {"nvidia.com/gpu": str(gpus)}, "requests": {"cpu": "1"}}}
    return {
        "metadata": {
            "name": "job-c00-train-m-1a2b3",
            "creationTimestamp": "2026-12-03T18:00:00Z",
            "ownerReferences": [{"kind": "Job", "name": "c00-train-m"}],
        },
        "spec": {
            "priority": priority,
            "podSets": [{"name": "main", "count": 1, "template": {"spec": {"containers": [container]}}}],
        },
        "status": {"conditions": conditions},
    }


T0 = 1796320800.0  # 2026-12-03T18:00:00Z


def test_the_recorder_folds_a_workloads_events_into_waits_and_holds():
    from devcluster.queue_run import Recorder

    rec = Recorder(api_client=None, namespace="ns")
    events = [
        ("ADDED", _workload(), T0 + 0.2),
        ("MODIFIED", _workload("False"), T0 + 0.3),  # pending: insufficient quota
        ("MODIFIED", _workload("True"), T0 + 5),  # admitted
        ("MODIFIED", _workload("True"), T0 + 5.5),  # a replayed state changes nothing
        ("MODIFIED", _workload("False"), T0 + 8),  # preempted: back in the queue
        ("MODIFIED", _workload("True"), T0 + 12),
        ("MODIFIED", _workload("True", finished=True), T0 + 15),
        ("DELETED", _workload("True", finished=True), T0 + 20),
    ]
    for kind, obj, now in events:
        rec.observe_workload(kind, obj, now)
    [track] = rec.workloads.values()
    assert (track.job, track.priority, track.gpus, track.created) == ("c00-train-m", LOW, 2, T0)
    assert track.waits == [[T0, T0 + 5], [T0 + 8, T0 + 12]]
    assert track.holds == [[T0 + 5, T0 + 8], [T0 + 12, T0 + 15]]
    assert track.evictions == 1
    assert rec.admissions() == [
        Admission("job-c00-train-m-1a2b3", LOW, T0, T0, T0 + 5, 2),
        Admission("job-c00-train-m-1a2b3", LOW, T0, T0 + 8, T0 + 12, 2),
    ]
    assert rec.releases() == [T0 + 8, T0 + 15]
    assert rec.quota_spans(until=T0 + 30) == [
        Span("job-c00-train-m-1a2b3", T0 + 5, T0 + 8, 2),
        Span("job-c00-train-m-1a2b3", T0 + 12, T0 + 15, 2),
    ]


def test_an_admission_is_dated_when_kueue_decided_it():
    """QuotaReserved's lastTransitionTime is stamped by Kueue's scheduler before its write lands (which on a loaded
    machine can come after the writes of later decisions); the watch's time counts only without one."""
    from devcluster.queue_run import Recorder

    rec = Recorder(api_client=None, namespace="ns")
    rec.observe_workload("ADDED", _workload(), T0 + 0.2)
    admitted = _workload("True")
    admitted["status"]["conditions"][0]["lastTransitionTime"] = "2026-12-03T18:00:03Z"
    rec.observe_workload("MODIFIED", admitted, T0 + 4.9)
    [track] = rec.workloads.values()
    assert track.waits == [[T0, T0 + 3]]  # Kueue's decision
    assert track.holds == [[T0 + 4.9, None]]  # the quota held from when the watch saw it


@pytest.mark.parametrize(
    ("pod_sets", "gpus"),
    [
        pytest.param([], 0, id="none"),
        pytest.param(
            [{"count": 1, "template": {"spec": {"containers": [{"resources": {"requests": {"cpu": "1"}}}]}}}], 0, id="cpu"
        ),
        pytest.param(
            [{"count": 2, "template": {"spec": {"containers": [{"resources": {"limits": {"nvidia.com/gpu": "4"}}}]}}}],
            8,
            id="two-pods-of-four",
        ),
    ],
)
def test_requested_gpus(pod_sets, gpus):
    from devcluster.queue_run import requested_gpus

    assert requested_gpus(pod_sets) == gpus


def _pod(name: str, job: str, step: str, gpus: int, started: float, finished: float | None):
    from types import SimpleNamespace as N

    iso = lambda t: dt.datetime.fromtimestamp(t, dt.UTC)  # noqa: E731
    terminated = N(started_at=iso(started), finished_at=iso(finished)) if finished is not None else None
    running = N(started_at=iso(started)) if finished is None else None
    limits = {"nvidia.com/gpu": str(gpus)} if gpus else {}
    return N(
        metadata=N(name=name, labels={"batch.kubernetes.io/job-name": job, "ftc.dev/step": step}),
        spec=N(containers=[N(resources=N(limits=limits, requests={}))]),
        status=N(container_statuses=[N(state=N(running=running, terminated=terminated))]),
    )


def test_summary_of_a_recorded_run():
    """Two train Workloads of 4 GPUs each under an 8-GPU quota, one after the other's release, and a CPU step."""
    from devcluster.queue_run import ManyRun, Recorder, summary

    rec = Recorder(api_client=None, namespace="ns")
    for job, created, admitted, done in (("c00-train-m", 0, 1, 11), ("c01-train-m", 0, 1, 21)):
        wl = _workload(gpus=4)
        wl["metadata"].update(name=f"job-{job}", ownerReferences=[{"kind": "Job", "name": job}])
        wl["metadata"]["creationTimestamp"] = dt.datetime.fromtimestamp(T0 + created, dt.UTC).isoformat()
        rec.observe_workload("ADDED", wl, T0 + created)
        rec.observe_workload(
            "MODIFIED", {**wl, "status": {"conditions": [{"type": "QuotaReserved", "status": "True"}]}}, T0 + admitted
        )
        done_conditions = [{"type": "QuotaReserved", "status": "True"}, {"type": "Finished", "status": "True"}]
        rec.observe_workload("MODIFIED", {**wl, "status": {"conditions": done_conditions}}, T0 + done)
    rec.observe_pod("MODIFIED", _pod("a", "c00-train-m", "train", 4, T0 + 2, T0 + 10), T0 + 10)
    rec.observe_pod("MODIFIED", _pod("b", "c01-train-m", "train", 4, T0 + 2, T0 + 20), T0 + 20)
    rec.observe_pod("DELETED", _pod("p", "c00-prepare", "prepare", 0, T0, None), T0 + 3.7)
    jobs = {
        j: {"ftc.dev/comparison": j[:3], "ftc.dev/step": "train", "ftc.dev/model": "m"} for j in ("c00-train-m", "c01-train-m")
    }
    run = ManyRun(["c00", "c01"], {"c00": "ftc-high", "c01": "ftc-low"}, {}, {}, T0, None, T0 + 20, rec, jobs)
    figures = summary(run)
    assert figures["makespanSeconds"] == 20
    assert figures["gpuSeconds"] == 8 * 4 + 18 * 4
    assert figures["utilisation"] == round((8 * 4 + 18 * 4) / (8 * 20), 3)
    assert figures["sumOfStepSeconds"] == {"prepare": 3.0, "train": 26.0}  # the deleted pod ends at the second it went
    assert figures["peakGpusHeld"] == figures["peakGpusHeldBySteps"] == figures["peakGpusAdmittedToSteps"] == 8
    assert figures["overQuota"] == [] and figures["admissionsOutOfOrder"] == []
    assert [(m["comparison"], m["priorityClass"], m["queueWaitSeconds"]) for m in figures["models"]] == [
        ("c00", "ftc-high", 1.0),
        ("c01", "ftc-low", 1.0),
    ]
    assert len(figures["utilisationTimeline"]) == 2
    assert figures["quotaAdmittedUtilisation"] == round((10 * 4 + 19 * 4) / (8 * 20), 3)  # holds from 1 to 11 and 1 to 20
