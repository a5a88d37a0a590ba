"""What the operator sees of a comparison's Jobs and pods, distilled from API objects.

Pure: functions take the JSON dicts the API server returns (``metadata``/``spec``/``status``, camelCase)
and return small frozen records the planner reasons about. No Kubernetes client here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from ftc_api.status import Progress
from ftc_api.steps import EXIT_BAD_INPUT, PROGRESS_ANNOTATION

if TYPE_CHECKING:
    from .workloads import ObservedWorkload

LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_COMPARISON = "ftc.dev/comparison"
LABEL_MODEL = "ftc.dev/model"
LABEL_STEP = "ftc.dev/step"
ANNOTATION_COMPARISON = "ftc.dev/comparison-name"  # the full (unfitted) comparison name, on Jobs and pods
MANAGED_BY = "ftc-operator"
APP = "ftc"


class JobState(StrEnum):
    """Where a step Job stands."""

    ACTIVE = "Active"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


@dataclass(frozen=True)
class Waiting:
    """A container that cannot start (for example CreateContainerConfigError: a missing Secret)."""

    pod: str
    reason: str
    message: str


@dataclass(frozen=True)
class Unschedulable:
    """A pod the scheduler cannot place: its PodScheduled condition is False with reason Unschedulable."""

    pod: str
    message: str  # the scheduler's, e.g. "0/2 nodes are available: 2 Insufficient nvidia.com/gpu. ..."
    since: str | None  # the condition's lastTransitionTime (RFC 3339): when the pod became unschedulable


@dataclass(frozen=True)
class ObservedJob:
    """One step Job of the comparison and what its pods said."""

    name: str
    step: str
    model: str | None
    state: JobState
    result: str | None = None  # the termination message of the pod that decided the Job (JSON, usually)
    reason: str | None = None  # the Job's Failed condition reason (BackoffLimitExceeded, DeadlineExceeded...)
    message: str | None = None  # the Job's Failed condition message
    failed_pods: int = 0
    progress: Progress | None = None
    waiting: tuple[Waiting, ...] = field(default_factory=tuple)
    created: str | None = None  # the Job's creationTimestamp (RFC 3339)
    started: str | None = None  # status.startTime: when it last started (set again when Kueue unsuspends it)
    pods: int = 0  # pods of this Job seen, in any phase
    suspended: bool = False  # spec.suspend (for example queued by Kueue): no pods yet on purpose
    pod_failure: str | None = None  # how the last failed pod's container ended, when the kubelet says why (OOMKilled...)
    deleting: bool = False  # metadata.deletionTimestamp is set (a retry deleted it)
    unschedulable: Unschedulable | None = None  # an active Job's pod the scheduler cannot place (the earliest)
    image_ids: tuple[str, ...] = ()  # the images its pods ran, as the runtime resolved them (see image_ids)
    workload: ObservedWorkload | None = None  # its Kueue Workload, when it names a queue (workloads.attach_workloads)
    kind: str = "Job"  # or "JobSet": a train step on several nodes (see observe_jobset)
    restarts: int = 0  # a JobSet's group restarts (status.restarts): each one recreated every pod of the group


def _conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c.get("type", ""): c for c in (obj.get("status") or {}).get("conditions") or []}


def _terminated(pod: dict[str, Any]) -> dict[str, Any] | None:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated")
        if term:
            return term
    return None


def pod_failure(pod: dict[str, Any]) -> str | None:
    """Why the kubelet ended a failed pod's container, when it says more than an exit code: for example
    "OOMKilled (exit code 137, memory limit 64Mi)". None for a plain non-zero exit (reason Error)."""
    term = _terminated(pod)
    if not term or term.get("reason") in (None, "", "Completed", "Error"):
        return None
    extra = [f"exit code {term.get('exitCode')}"]
    if term["reason"] == "OOMKilled":
        for c in (pod.get("spec") or {}).get("containers") or []:
            limit = ((c.get("resources") or {}).get("limits") or {}).get("memory")
            if limit:
                extra.append(f"memory limit {limit}")
                break
    return f"{term['reason']} ({', '.join(extra)})"


def pod_unschedulable(pod: dict[str, Any]) -> Unschedulable | None:
    """The pod's PodScheduled=False/Unschedulable condition, if it has one (a pod held by a scheduling gate,
    reason SchedulingGated, is waiting on purpose and is not reported)."""
    if (pod.get("status") or {}).get("phase") != "Pending":
        return None
    cond = _conditions(pod).get("PodScheduled") or {}
    if cond.get("status") != "False" or cond.get("reason") != "Unschedulable":
        return None
    name = (pod.get("metadata") or {}).get("name", "")
    return Unschedulable(pod=name, message=(cond.get("message") or "").strip(), since=cond.get("lastTransitionTime"))


def image_ids(pods: list[dict[str, Any]]) -> tuple[str, ...]:
    """The images the pods' containers ran, distinct and sorted: each container status's imageID, the digest its
    node's runtime resolved the image to (containerd: `sha256:...` for an imported image, `REPO@sha256:...` for a
    pulled one; a `docker-pullable://` or `docker://` scheme is dropped). Empty until a container has started."""
    ids = set()
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            image_id = (cs.get("imageID") or "").strip()
            for scheme in ("docker-pullable://", "docker://"):
                image_id = image_id.removeprefix(scheme)
            if image_id:
                ids.add(image_id)
    return tuple(sorted(ids))


def _created(obj: dict[str, Any]) -> str:
    return (obj.get("metadata") or {}).get("creationTimestamp") or ""


def parse_progress(text: str | None) -> Progress | None:
    """The `ftc.dev/progress` annotation as Progress; None when absent or unreadable (never raises)."""
    if not text:
        return None
    try:
        return Progress.model_validate(json.loads(text))
    except (ValueError, TypeError):
        return None


def observe_job(job: dict[str, Any], pods: list[dict[str, Any]]) -> ObservedJob:
    """Distil a Job and its pods: state, the deciding termination message, live progress, stuck containers."""
    meta = job.get("metadata") or {}
    labels = meta.get("labels") or {}
    conds = _conditions(job)
    pods = sorted(pods, key=_created)
    succeeded_pods = [p for p in pods if (p.get("status") or {}).get("phase") == "Succeeded"]
    # A failed pod being deleted was counted by the Job (status.failed) or removed on purpose, uncounted: Kueue's
    # preemption suspends the Job, whose controller deletes the pods (a preempted pod consumes no retry).
    failed_pods = [
        p
        for p in pods
        if (p.get("status") or {}).get("phase") == "Failed" and not (p.get("metadata") or {}).get("deletionTimestamp")
    ]
    running = [
        p
        for p in pods
        if (p.get("status") or {}).get("phase") in ("Pending", "Running")
        and not (p.get("metadata") or {}).get("deletionTimestamp")
    ]
    waiting = []
    for p in running:
        for cs in (p.get("status") or {}).get("containerStatuses") or []:
            w = (cs.get("state") or {}).get("waiting") or {}
            if w.get("reason") in ("CreateContainerConfigError", "CreateContainerError", "ErrImagePull", "ImagePullBackOff"):
                waiting.append(Waiting(pod=p["metadata"]["name"], reason=w["reason"], message=w.get("message", "")))
    common = dict(
        name=meta.get("name", ""),
        step=labels.get(LABEL_STEP) or labels.get(LABEL_COMPONENT, ""),
        model=labels.get(LABEL_MODEL) or None,
        failed_pods=max(len(failed_pods), int((job.get("status") or {}).get("failed") or 0)),
        created=meta.get("creationTimestamp"),
        started=(job.get("status") or {}).get("startTime"),
        pods=len(pods),
        suspended=bool((job.get("spec") or {}).get("suspend")),
        pod_failure=pod_failure(failed_pods[-1]) if failed_pods else None,
        deleting=bool(meta.get("deletionTimestamp")),
        image_ids=image_ids(pods),
    )
    if conds.get("Complete", {}).get("status") == "True":
        term = _terminated(succeeded_pods[-1]) if succeeded_pods else None
        return ObservedJob(state=JobState.SUCCEEDED, result=(term or {}).get("message"), **common)
    failed = conds.get("Failed", {})
    if failed.get("status") == "True" or conds.get("FailureTarget", {}).get("status") == "True":
        cond = failed if failed.get("status") == "True" else conds["FailureTarget"]
        term = _terminated(failed_pods[-1]) if failed_pods else None
        return ObservedJob(
            state=JobState.FAILED,
            result=(term or {}).get("message"),
            reason=cond.get("reason"),
            message=cond.get("message"),
            **common,
        )
    progress = None
    for p in reversed(running):
        progress = parse_progress(((p.get("metadata") or {}).get("annotations") or {}).get(PROGRESS_ANNOTATION))
        if progress:
            break
    last_failure = _terminated(failed_pods[-1]) if failed_pods else None
    unschedulable = next((u for p in running if (u := pod_unschedulable(p)) is not None), None)
    return ObservedJob(
        state=JobState.ACTIVE,
        progress=progress,
        waiting=tuple(waiting),
        unschedulable=unschedulable,
        result=(last_failure or {}).get("message"),
        **common,
    )


JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
JOBSET_RESTART_LABEL = "jobset.sigs.k8s.io/restart-attempt"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"


def _index(pod: dict[str, Any]) -> str | None:
    return ((pod.get("metadata") or {}).get("annotations") or {}).get(COMPLETION_INDEX_ANNOTATION)


def observe_jobset(jobset: dict[str, Any], pods: list[dict[str, Any]]) -> ObservedJob:
    """Distil a train JobSet (several nodes, rendering.render_jobset) and its pods as one step Job: Succeeded when
    JobSet says Completed, with the leader pod's (node rank 0's) termination message, which carries the training
    summary; Failed when JobSet says Failed (bad input, the deadline, or more group restarts than the step's
    backoffLimit), with the message of the pod that failed last; else Active, with the leader pod's progress
    annotation. `failed_pods` counts failed pods of every attempt; `restarts` is JobSet's group restart count."""
    meta = jobset.get("metadata") or {}
    labels = meta.get("labels") or {}
    status = jobset.get("status") or {}
    conds = _conditions(jobset)
    pods = sorted(pods, key=_created)
    restarts = int(status.get("restarts") or 0)
    failed_pods = [  # as observe_job: a failed pod being deleted (Kueue suspended the JobSet) is not counted
        p
        for p in pods
        if (p.get("status") or {}).get("phase") == "Failed" and not (p.get("metadata") or {}).get("deletionTimestamp")
    ]
    leaders = [p for p in pods if _index(p) == "0"]
    current = [p for p in pods if ((p.get("metadata") or {}).get("labels") or {}).get(JOBSET_RESTART_LABEL) == str(restarts)]
    running = [
        p
        for p in current
        if (p.get("status") or {}).get("phase") in ("Pending", "Running")
        and not (p.get("metadata") or {}).get("deletionTimestamp")
    ]
    waiting = [
        Waiting(pod=p["metadata"]["name"], reason=w["reason"], message=w.get("message", ""))
        for p in running
        for cs in (p.get("status") or {}).get("containerStatuses") or []
        if (w := (cs.get("state") or {}).get("waiting") or {}).get("reason")
        in ("CreateContainerConfigError", "CreateContainerError", "ErrImagePull", "ImagePullBackOff")
    ]
    common = dict(
        name=meta.get("name", ""),
        step=labels.get(LABEL_STEP) or labels.get(LABEL_COMPONENT, ""),
        model=labels.get(LABEL_MODEL) or None,
        failed_pods=max(len(failed_pods), restarts),
        created=meta.get("creationTimestamp"),
        # the current attempt's pods; a group JobSet is recreating (restarts > 0) had pods, none missing by mistake
        pods=len(current) or int(restarts > 0),
        suspended=bool((jobset.get("spec") or {}).get("suspend")),
        pod_failure=pod_failure(failed_pods[-1]) if failed_pods else None,
        deleting=bool(meta.get("deletionTimestamp")),
        image_ids=image_ids(pods),
        kind="JobSet",
        restarts=restarts,
    )
    if conds.get("Completed", {}).get("status") == "True":
        done = [p for p in leaders if (p.get("status") or {}).get("phase") == "Succeeded"]
        term = _terminated(done[-1]) if done else None
        return ObservedJob(state=JobState.SUCCEEDED, result=(term or {}).get("message"), **common)
    failed = conds.get("Failed", {})
    if failed.get("status") == "True":
        bad = [p for p in failed_pods if (_terminated(p) or {}).get("exitCode") == EXIT_BAD_INPUT]  # the cause, if any
        deciding = bad or failed_pods
        term = _terminated(deciding[-1]) if deciding else None
        return ObservedJob(
            state=JobState.FAILED,
            result=(term or {}).get("message"),
            reason=failed.get("reason"),
            message=failed.get("message"),
            **common,
        )
    progress = None
    for p in sorted(running, key=lambda p: _index(p) != "0"):  # the leader (rank 0) reports it
        progress = parse_progress(((p.get("metadata") or {}).get("annotations") or {}).get(PROGRESS_ANNOTATION))
        if progress:
            break
    last_failure = _terminated(failed_pods[-1]) if failed_pods else None
    return ObservedJob(
        state=JobState.ACTIVE,
        progress=progress,
        waiting=tuple(waiting),
        unschedulable=next((u for p in running if (u := pod_unschedulable(p)) is not None), None),
        result=(last_failure or {}).get("message"),
        **common,
    )


def pods_by_job(pods: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Group pods by the Job that owns them: by its uid (a retried step's Job has the name of the failed one it
    replaced, whose pods may linger), else by name."""
    out: dict[str, list[dict[str, Any]]] = {}
    for pod in pods:
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        ref = next((o for o in meta.get("ownerReferences") or [] if o.get("kind") == "Job"), None)
        owner = (ref or {}).get("uid") or (
            labels.get("batch.kubernetes.io/controller-uid") or labels.get("controller-uid") or (ref or {}).get("name")
        )
        owner = owner or labels.get("batch.kubernetes.io/job-name") or labels.get("job-name")
        if owner:
            out.setdefault(owner, []).append(pod)
    return out


def owned_by(obj: dict[str, Any], uid: str) -> bool:
    """Whether `obj` has an ownerReference to the object with `uid`."""
    return any(o.get("uid") == uid for o in (obj.get("metadata") or {}).get("ownerReferences") or [])


def observe(
    jobs: list[dict[str, Any]], pods: list[dict[str, Any]], owner_uid: str, jobsets: list[dict[str, Any]] | None = None
) -> list[ObservedJob]:
    """Every Job and JobSet owned by `owner_uid`, observed with its pods, sorted by name (a JobSet's child Jobs are
    owned by the JobSet, not the comparison: they are seen through it)."""
    grouped = pods_by_job(pods)
    mine = [j for j in jobs if owned_by(j, owner_uid)]

    def pods_of(job: dict[str, Any]) -> list[dict[str, Any]]:
        meta = job["metadata"]
        return grouped.get(meta.get("uid", ""), []) or grouped.get(meta["name"], [])

    out = [observe_job(j, pods_of(j)) for j in mine]
    for js in jobsets or []:
        if owned_by(js, owner_uid):
            name = js["metadata"]["name"]
            members = [p for p in pods if ((p.get("metadata") or {}).get("labels") or {}).get(JOBSET_NAME_LABEL) == name]
            out.append(observe_jobset(js, members))
    return sorted(out, key=lambda o: o.name)
