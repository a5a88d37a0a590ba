"""Kueue's Workloads as the operator sees them, and where each model's train workload is in its queue. Pure.

When a step names a LocalQueue, ftc creates its Job suspended with the `kueue.x-k8s.io/queue-name` label
(rendering.py); Kueue makes a Workload for it (owned by the Job), admits it by unsuspending the Job when the
ClusterQueue has quota, and preempts it by suspending the Job again (the Job controller then deletes its pods
without counting them as failed). The Workload's conditions say which of these happened, with Kueue's own
messages ("couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu in flavor
fake-a100, 1 more needed"). `observe_workload` distils one Workload; `queue_status` turns it, the model's
previous queue status and the time into `status.models[].queue`. No Kubernetes client here, no clock.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ftc_api.status import QueueState, QueueStatus

KUEUE_GROUP = "kueue.x-k8s.io"
WORKLOAD_VERSIONS = ("v1beta2", "v1beta1")  # the operator reads the first one the API server serves
WORKLOADS = "workloads"
PREEMPTED = "Preempted"  # Kueue's reason on Evicted (WorkloadEvictedByPreemption) and its Preempted condition
WAITING = (QueueState.QUEUED, QueueState.PREEMPTED)  # states in which the workload has no quota and waits for it


@dataclass(frozen=True)
class ObservedWorkload:
    """One Kueue Workload: where its Job is in the queue, read from its conditions."""

    name: str
    queue_name: str | None = None  # spec.queueName: the LocalQueue
    quota_reserved: bool = False  # QuotaReserved=True: the ClusterQueue holds its quota
    admitted: bool = False  # Admitted=True: quota reserved and every admission check passed
    admitted_at: str | None = None  # when it was last admitted (the Admitted condition's lastTransitionTime)
    evicted: bool = False  # Evicted=True: Kueue is stopping the Job (preemption...); its pods are going
    evicted_reason: str | None = None
    requeued_after: str | None = None  # the reason of Requeued=True: why it waits again (Preempted...)
    finished: bool = False  # Finished=True: the Job ended
    wait_start: str | None = None  # when its current wait for quota began (creation, or the eviction)
    created: str | None = None  # metadata.creationTimestamp: the first wait began then
    requeued_at: str | None = None  # the Requeued condition's lastTransitionTime: when it was last queued again
    reason: str | None = None  # Kueue's reason for the current state
    message: str | None = None  # Kueue's message for the current state (why it waits, who preempted it)
    preemptions: int = 0  # schedulingStats.evictions with reason Preempted, summed
    running: bool = False  # its Job has a pod in phase Running (not being deleted)


def _conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c.get("type", ""): c for c in (obj.get("status") or {}).get("conditions") or []}


def _true(cond: dict[str, Any] | None) -> bool:
    return (cond or {}).get("status") == "True"


def observe_workload(obj: dict[str, Any], running: bool = False) -> ObservedWorkload:
    """Distil a Workload (v1beta2 or v1beta1: the same status) into where its Job is in the queue; `running`:
    whether its Job has a running pod."""
    meta = obj.get("metadata") or {}
    status = obj.get("status") or {}
    conds = _conditions(obj)
    quota, admitted, evicted = conds.get("QuotaReserved"), conds.get("Admitted"), conds.get("Evicted")
    preempted, requeued, finished = conds.get("Preempted"), conds.get("Requeued"), conds.get("Finished")
    evictions = ((status.get("schedulingStats") or {}).get("evictions")) or []
    preemptions = sum(int(e.get("count") or 0) for e in evictions if e.get("reason") == PREEMPTED)
    explain: dict[str, Any] | None
    if _true(finished):
        explain = finished
    elif _true(evicted):
        explain = preempted if _true(preempted) else evicted  # the Preempted condition names who preempted it
    elif _true(admitted):
        explain = admitted
    elif _true(quota):
        explain = admitted or quota  # quota held, admission checks pending
    else:
        explain = quota  # QuotaReserved=False, reason Pending: Kueue's message says why it waits
    if _true(evicted):
        wait_start = (evicted or {}).get("lastTransitionTime")
    elif not _true(quota) and (_true(requeued) or preemptions):  # waiting again after an eviction
        wait_start = (quota or {}).get("lastTransitionTime") or (requeued or {}).get("lastTransitionTime")
    elif not _true(quota):
        wait_start = meta.get("creationTimestamp")
    else:
        wait_start = None
    return ObservedWorkload(
        name=meta.get("name", ""),
        queue_name=(obj.get("spec") or {}).get("queueName"),
        quota_reserved=_true(quota),
        admitted=_true(admitted),
        admitted_at=(admitted or {}).get("lastTransitionTime") if _true(admitted) else None,
        evicted=_true(evicted),
        evicted_reason=(evicted or {}).get("reason") if _true(evicted) else None,
        requeued_after=(requeued or {}).get("reason") if _true(requeued) else None,
        finished=_true(finished),
        wait_start=wait_start,
        created=meta.get("creationTimestamp"),
        requeued_at=(requeued or {}).get("lastTransitionTime"),
        reason=(explain or {}).get("reason"),
        message=((explain or {}).get("message") or "").strip() or None,
        preemptions=preemptions,
        running=running,
    )


def _owner_uid(obj: dict[str, Any]) -> str | None:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    ref = next((r for r in refs if r.get("controller")), None) or next(iter(refs), None)
    return (ref or {}).get("uid")


def _running(pods: list[dict[str, Any]]) -> bool:
    return any(
        (p.get("status") or {}).get("phase") == "Running" and not (p.get("metadata") or {}).get("deletionTimestamp") for p in pods
    )


Observed = TypeVar("Observed")  # observe.ObservedJob (this module sits below observe: it imports no ftc_operator module)


def attach_workloads(
    observed: Sequence[Observed],
    jobs: Sequence[dict[str, Any]],
    pods: Sequence[dict[str, Any]],
    workloads: Sequence[dict[str, Any]],
) -> list[Observed]:
    """`observed` (observe.ObservedJob records) with each Job's Workload, matched by the Workload's owner uid (a
    retried Job's name may be shared with the old one's lingering Workload), and whether the Job (or a JobSet's
    leader) has a running pod."""
    if not workloads:
        return list(observed)
    by_uid = {uid: w for w in workloads if (uid := _owner_uid(w))}
    out = []
    for o in observed:
        name = getattr(o, "name", "")
        job = next((j for j in jobs if (j.get("metadata") or {}).get("name") == name), None)
        uid = ((job or {}).get("metadata") or {}).get("uid")
        wl = by_uid.get(uid or "")
        if wl is not None:
            mine = [p for p in pods if _owner_uid(p) == uid]
            running = _running(mine) or (getattr(o, "progress", None) is not None and not getattr(o, "suspended", False))
            o = dataclasses.replace(o, workload=observe_workload(wl, running=running))  # type: ignore[type-var]
        out.append(o)
    return out


def _parse(stamp: str | None) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat((stamp or "").replace("Z", "+00:00"))
    except ValueError:
        return None


def _seconds(start: str | None, end: str | None) -> float:
    a, b = _parse(start), _parse(end)
    return max(0.0, (b - a).total_seconds()) if a and b else 0.0


def queue_state(wl: ObservedWorkload) -> QueueState:
    """Finished; Preempted while Kueue stops it and while it waits again after a preemption; Running once admitted
    with a running pod, Admitted before; Queued otherwise."""
    if wl.finished:
        return QueueState.FINISHED
    if wl.evicted:
        return QueueState.PREEMPTED if wl.evicted_reason == PREEMPTED else QueueState.QUEUED
    if wl.admitted:
        return QueueState.RUNNING if wl.running else QueueState.ADMITTED
    if wl.requeued_after == PREEMPTED:
        return QueueState.PREEMPTED
    return QueueState.QUEUED


def queue_status(
    prior: QueueStatus | None, wl: ObservedWorkload | None, queue_name: str, suspended: bool, done: bool = False
) -> QueueStatus | None:
    """A model's `status.models[].queue` from its train Job's Workload and the previous status (pure).

    `queuedSeconds` sums the waits that ended (each from its start, the Workload's creation or the eviction, to
    the admission that ended it); the wait in progress began at `waitingSince`, so the status changes only when the
    state does. `suspended`: the Job is suspended (no Workload yet: Kueue has not seen it); `done`: the Job ended.
    """
    prior_wait = prior.waiting_since if prior is not None and prior.state in WAITING else None
    queued = prior.queued_seconds if prior is not None else None
    if wl is None:  # no Workload (yet, or any more; or the operator cannot read them)
        counts = {
            "queued_seconds": queued,
            "preemptions": prior.preemptions if prior is not None else 0,
            "admitted_at": prior.admitted_at if prior is not None else None,
        }
        if done:
            return prior.model_copy(update={"state": QueueState.FINISHED}) if prior is not None else None
        if suspended:
            if prior is not None and prior.state in WAITING:
                return prior
            why = (
                f"waiting for Kueue's Workload of this Job (if none appears: is Kueue installed, with a LocalQueue "
                f"{queue_name} in this namespace?)"
            )
            return QueueStatus(state=QueueState.QUEUED, queue_name=queue_name, message=why, **counts)
        if prior is not None and prior.state not in WAITING:
            return prior
        return QueueStatus(state=QueueState.ADMITTED, queue_name=queue_name, **counts)
    state = queue_state(wl)
    since = (prior_wait or wl.wait_start) if state in WAITING else None
    admitted_at = wl.admitted_at or (prior.admitted_at if prior is not None else None)
    if wl.admitted_at and (prior is None or prior.admitted_at != wl.admitted_at):  # a wait ended in this admission
        # its start: as the previous status saw it; else (not seen waiting) the creation for a first admission, the
        # last requeue for a later one
        later = wl.requeued_at and (prior is not None or wl.preemptions)
        queued = (queued or 0.0) + _seconds(prior_wait or (wl.requeued_at if later else wl.created), wl.admitted_at)
    return QueueStatus(
        state=state,
        queue_name=wl.queue_name or queue_name,
        workload=wl.name,
        reason=wl.reason,
        message=wl.message,
        queued_seconds=round(queued, 1) if queued is not None else None,
        preemptions=max(wl.preemptions, prior.preemptions if prior is not None else 0),
        admitted_at=admitted_at,
        waiting_since=since,
    )


def waiting_message(wl: ObservedWorkload | None, suspended: bool) -> str | None:
    """Why a step Job (its Workload `wl`; `suspended`: its spec.suspend) waits in its queue ('Queued in Kueue:
    MESSAGE'), or None when Kueue admitted it or it names no queue. For the conditions of the steps that have no
    per-model queue status (prepare, generate, score)."""
    if wl is None:
        return "waiting for Kueue to admit it (no Workload yet)" if suspended else None
    state = queue_state(wl)
    if state not in WAITING:
        return None
    return f"{state.value} in Kueue" + (f": {wl.message}" if wl.message else "")
