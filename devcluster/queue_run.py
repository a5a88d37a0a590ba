"""Many comparisons under one Kueue quota: run them on the local cluster and record what Kueue and the kubelets
did, for the many-comparisons cluster test and `bench/queue_bench.py`.

- :class:`Recorder` watches a namespace's Workloads and pods while the comparisons run: every admission and
  release of each Workload (its waits in the queue), every pod's container start and end with the GPUs it
  requested, and prints ``kubectl get workloads -A`` snapshots as it goes.
- :func:`run_many` applies N comparisons at once (stubbed steps; two WorkloadPriorityClasses mixed), optionally
  behind a *blocker* (a Job holding the whole GPU quota until every train Workload waits, so Kueue's order
  decides every admission), waits for every comparison to end and returns a :class:`ManyRun`.
- :func:`summary` turns a run into the figures of `bench/queue.json` with the pure functions of
  `devcluster/queueing.py`.
"""

from __future__ import annotations

import datetime as dt
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from devcluster.kube import kueue as kq
from devcluster.kube.images import BASE_IMAGE
from devcluster.queueing import (
    Admission,
    Span,
    gpu_seconds,
    order_violations,
    over_quota,
    peak,
    queue_waits,
    timeline,
)
from devcluster.queueing import utilisation as quota_utilisation

BLOCKER = "quota-blocker"
RELEASE_FILE = "/release/now"


def _ts(value: Any) -> float | None:
    """An RFC 3339 string or a datetime as epoch seconds."""
    if value is None:
        return None
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return float(value.timestamp())


def requested_gpus(pod_sets: list[dict[str, Any]]) -> int:
    """GPUs a Workload's pod sets request: per container max(request, limit), times each pod set's count."""
    total = 0
    for ps in pod_sets:
        per_pod = 0
        for c in ps.get("template", {}).get("spec", {}).get("containers", []):
            res = c.get("resources") or {}
            per_pod += max(int((res.get(k) or {}).get(kq.GPU_RESOURCE, 0)) for k in ("requests", "limits"))
        total += per_pod * int(ps.get("count", 1))
    return total


@dataclass
class WorkloadTrack:
    """One Workload as recorded: its owner Job, priority, creation, GPU request and every wait and hold."""

    name: str
    job: str | None
    priority: int
    created: float
    gpus: int
    # [queued, admitted or None]; admitted: QuotaReserved's lastTransitionTime (whole seconds) when Kueue set one
    waits: list[list[float | None]] = field(default_factory=list)
    holds: list[list[float | None]] = field(default_factory=list)  # [admitted, released or None]
    evictions: int = 0

    def reserved(self) -> bool:
        return bool(self.holds) and self.holds[-1][1] is None


@dataclass
class PodTrack:
    name: str
    labels: dict[str, str]
    gpus: int
    started: float | None = None
    finished: float | None = None


def _condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in (obj.get("status") or {}).get("conditions", []) if c.get("type") == type_), None)


class Recorder:
    """Watches the Workloads and pods of `namespace` from `start()` to `stop()` (see the module docstring)."""

    def __init__(
        self,
        api_client: Any,
        namespace: str,
        snapshot: Callable[[], str] | None = None,
        every: float = 10.0,
        log: Callable[[str], None] = print,
        clock: Callable[[], float] = time.time,
    ):
        self.api, self.namespace, self.snapshot, self.every, self.log, self.clock = (
            api_client,
            namespace,
            snapshot,
            every,
            log,
            clock,
        )
        self.workloads: dict[str, WorkloadTrack] = {}
        self.pods: dict[str, PodTrack] = {}
        self.snapshots: list[tuple[float, str]] = []
        # every Workload event as seen: (when, kind, name, generation, {condition type: status})
        self.workload_events: list[tuple[float, str, str, int, dict[str, str]]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.t0 = clock()

    # -- watching -------------------------------------------------------------------------------------

    def start(self) -> Recorder:
        for target in (self._watch_workloads, self._watch_pods, self._snapshots):
            t = threading.Thread(target=target, daemon=True, name=f"recorder-{target.__name__}")
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=15)

    def _stream(self, list_func: Callable[..., Any], *args: Any, **kwargs: Any):
        from kubernetes import watch

        rv: str | None = None  # each watch resumes where the last one ended, so no event (a deletion) falls between
        while not self._stop.is_set():
            w = watch.Watch()
            more = {"resource_version": rv} if rv else {}
            try:
                for event in w.stream(list_func, *args, timeout_seconds=3, **kwargs, **more):
                    if event.get("type") == "ERROR":  # 410 Gone: the resourceVersion expired
                        raise RuntimeError(f"watch error: {event.get('object')}")
                    yield event
                    if self._stop.is_set():
                        w.stop()
                        return
                rv = w.resource_version or rv
            except Exception as e:  # noqa: BLE001 - a broken or expired watch starts over with a LIST (replays the state)
                self.log(f"recorder: watch of {getattr(list_func, '__name__', list_func)} broke ({e}); watching again")
                rv = None
                time.sleep(0.5)

    def _watch_workloads(self) -> None:
        from kubernetes import client

        custom = client.CustomObjectsApi(self.api)
        for event in self._stream(
            custom.list_namespaced_custom_object, kq.KUEUE_GROUP, kq.KUEUE_API_VERSION, self.namespace, "workloads"
        ):
            self.observe_workload(event["type"], event["object"], self.clock())

    def _watch_pods(self) -> None:
        from kubernetes import client

        core = client.CoreV1Api(self.api)
        for event in self._stream(core.list_namespaced_pod, self.namespace):
            self.observe_pod(event["type"], event["object"], self.clock())

    def _snapshots(self) -> None:
        while not self._stop.wait(self.every):
            self.take_snapshot("periodic")

    def take_snapshot(self, why: str) -> None:
        if self.snapshot is None:
            return
        try:
            text = self.snapshot()
        except Exception as e:  # noqa: BLE001 - a snapshot is for the log only
            text = f"(snapshot failed: {e})"
        now = self.clock()
        with self._lock:
            self.snapshots.append((now - self.t0, text))
        self.log(f"--- kubectl get workloads -A at +{now - self.t0:.1f}s ({why}) ---\n{text.rstrip()}")

    # -- state ----------------------------------------------------------------------------------------

    def observe_workload(self, kind: str, obj: dict[str, Any], now: float) -> None:
        """Fold one watch event of a Workload into its track (idempotent: a replayed state changes nothing)."""
        meta = obj["metadata"]
        name = meta["name"]
        spec = obj.get("spec") or {}
        with self._lock:
            conditions = {c["type"]: c["status"] for c in (obj.get("status") or {}).get("conditions", [])}
            self.workload_events.append((now, kind, name, int(meta.get("generation") or 0), conditions))
            track = self.workloads.get(name)
            if track is None:
                owner = next((o["name"] for o in meta.get("ownerReferences", []) if o.get("kind") == "Job"), None)
                created = _ts(meta.get("creationTimestamp")) or now
                track = WorkloadTrack(
                    name, owner, int(spec.get("priority") or 0), created, requested_gpus(spec.get("podSets", []))
                )
                track.waits.append([created, None])
                self.workloads[name] = track
            finished = _condition(obj, "Finished")
            reserved_cond = _condition(obj, "QuotaReserved")
            reserved = bool(reserved_cond and reserved_cond["status"] == "True") and kind != "DELETED"
            if finished and finished["status"] == "True" or kind == "DELETED":
                reserved = False
            if reserved and not track.reserved():
                if track.waits and track.waits[-1][1] is None:
                    # when Kueue decided: its scheduler stamps QuotaReserved before the write, which lands later
                    # and, on a loaded machine, after writes of later decisions (1.9 s seen on 2 cores)
                    track.waits[-1][1] = _ts((reserved_cond or {}).get("lastTransitionTime")) or now
                track.holds.append([now, None])
            elif not reserved and track.reserved():
                track.holds[-1][1] = now
                if not (finished and finished["status"] == "True") and kind != "DELETED":  # evicted: back in the queue
                    track.evictions += 1
                    track.waits.append([now, None])

    def observe_pod(self, kind: str, pod: Any, now: float) -> None:
        """Fold one watch event of a pod (the client's V1Pod) into its track."""
        meta = pod.metadata
        with self._lock:
            track = self.pods.get(meta.name)
            if track is None:
                gpus = 0
                for c in pod.spec.containers:
                    res = c.resources
                    for group in (res.limits if res else None, res.requests if res else None):
                        if group and kq.GPU_RESOURCE in group:
                            gpus = max(gpus, int(group[kq.GPU_RESOURCE]))
                track = self.pods[meta.name] = PodTrack(meta.name, dict(meta.labels or {}), gpus)
            for status in (pod.status.container_statuses if pod.status else None) or []:
                state = status.state
                running = state.running if state else None
                terminated = state.terminated if state else None
                started = (terminated.started_at if terminated else None) or (running.started_at if running else None)
                if started is not None and track.started is None:
                    track.started = _ts(started)
                if terminated is not None and terminated.finished_at is not None:
                    track.finished = _ts(terminated.finished_at)
            if kind == "DELETED" and track.started is not None and track.finished is None:
                track.finished = float(math.floor(now))  # deleted while running: it held its GPUs until now

    # -- results --------------------------------------------------------------------------------------

    def gpu_workloads(self) -> list[WorkloadTrack]:
        with self._lock:
            return [w for w in self.workloads.values() if w.gpus > 0]

    def admissions(self, gpu_only: bool = True) -> list[Admission]:
        """Every wait of every Workload (of those requesting GPUs), in the analysis' terms."""
        with self._lock:
            tracks = [w for w in self.workloads.values() if w.gpus > 0 or not gpu_only]
            return [Admission(w.name, w.priority, w.created, q, a, w.gpus) for w in tracks for q, a in w.waits if q is not None]

    def releases(self, gpu_only: bool = True) -> list[float]:
        """When a Workload gave its quota back (finished, deleted or evicted): Kueue's cue to requeue the parked."""
        with self._lock:
            return sorted(r for w in self.workloads.values() if w.gpus > 0 or not gpu_only for _, r in w.holds if r is not None)

    def pod_spans(self, until: float) -> list[Span]:
        """Each pod's container run with the GPUs it requested (a pod still running ends at `until`)."""
        with self._lock:
            return [
                Span(p.name, p.started, p.finished if p.finished is not None else until, p.gpus)
                for p in self.pods.values()
                if p.started is not None
            ]

    def quota_spans(self, until: float) -> list[Span]:
        """Each Workload's holds of quota (admitted to released) with its GPUs."""
        with self._lock:
            return [
                Span(w.name, a, r if r is not None else until, w.gpus)
                for w in self.workloads.values()
                for a, r in w.holds
                if a is not None
            ]


@dataclass
class ManyRun:
    """What :func:`run_many` saw: see the fields."""

    names: list[str]
    priority_class: dict[str, str]  # comparison -> WorkloadPriorityClass
    created: dict[str, float]  # comparison -> when its create call returned
    statuses: dict[str, dict[str, Any]]  # comparison -> final status
    started: float  # before the first create
    released: float | None  # when the blocker was told to finish
    ended: float  # every comparison ended
    recorder: Recorder
    jobs: dict[str, dict[str, str]]  # Job name -> its labels (ftc.dev/comparison, ftc.dev/step, ftc.dev/model)
    quota: int = kq.GPU_QUOTA
    strategy: str = kq.BEST_EFFORT_FIFO  # the ClusterQueue's queueingStrategy


def blocker_job(gpus: int, priority_class: str, queue: str = kq.LOCAL_QUEUE) -> dict[str, Any]:
    """A queued Job holding `gpus` GPUs until a file appears in its emptyDir (`kubectl exec ... touch`): Kueue counts
    its Workload against the quota until the Job completes, which happens only after its pod ended."""
    container = {
        "name": "hold",
        "image": BASE_IMAGE,
        "command": ["sh", "-c", f"until [ -e {RELEASE_FILE} ]; do sleep 0.2; done"],
        "resources": {"limits": {kq.GPU_RESOURCE: str(gpus)}, "requests": {"cpu": "10m", "memory": "16Mi"}},
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "release", "mountPath": "/release"}],
    }
    pod = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": 1,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "automountServiceAccountToken": False,
        "containers": [container],
        "volumes": [{"name": "release", "emptyDir": {}}],
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": BLOCKER,
            "labels": {
                kq.QUEUE_LABEL: queue,
                kq.PRIORITY_LABEL: priority_class,
                "app.kubernetes.io/part-of": "ftc-tests",
            },
        },
        "spec": {"suspend": True, "backoffLimit": 0, "template": {"spec": pod}},
    }


def _wait(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def run_many(
    api_client: Any,
    kubectl: Callable[..., str],
    namespace: str,
    spec: dict[str, Any],
    count: int = 20,
    high: Callable[[int], bool] = lambda i: i % 3 == 2,
    gpus: int = 2,
    blocker: bool = True,
    timeout: float = 600,
    snapshot_every: float = 10.0,
    log: Callable[[str], None] = print,
    on_all_queued: Callable[[ManyRun], None] | None = None,
    queue: str = kq.LOCAL_QUEUE,
    strategy: str = kq.BEST_EFFORT_FIFO,
) -> ManyRun:
    """Apply `count` comparisons of `spec` at once in `namespace` (which has the LocalQueue), each of its models on
    `gpus` GPUs through the queue, priority class ``ftc-high`` where `high(i)` else ``ftc-low``, and wait until
    every one ended. With `blocker`, a Job of the ``ftc-high`` class holds the whole GPU quota until every
    comparison's train Workloads exist and wait; `on_all_queued(run)` is called then, before the release. `queue`
    is the LocalQueue, `strategy` its ClusterQueue's queueingStrategy (how :func:`summary` checks the order)."""
    import copy

    from kubernetes import client

    from devcluster.harness import Comparisons
    from devcluster.kube.typed import body, present

    ftc = Comparisons(api_client)
    batch = client.BatchV1Api(api_client)
    models = len(spec["models"])
    recorder = Recorder(
        api_client, namespace, snapshot=lambda: kubectl("get", "workloads", "-A"), every=snapshot_every, log=log
    ).start()
    run = ManyRun([], {}, {}, {}, time.time(), None, 0.0, recorder, {}, strategy=strategy)
    try:
        if blocker:
            batch.create_namespaced_job(namespace, body(client.V1Job, blocker_job(kq.GPU_QUOTA, "ftc-high", queue)))

            def blocker_running() -> bool:
                pods = client.CoreV1Api(api_client).list_namespaced_pod(namespace, label_selector=f"job-name={BLOCKER}")
                return any(p.status and p.status.phase == "Running" for p in pods.items)

            _wait(blocker_running, 120, "the blocker Job admitted and running")
            recorder.take_snapshot("the blocker holds the GPU quota")
        run.started = time.time()
        for i in range(count):
            name = f"c{i:02d}"
            cls = "ftc-high" if high(i) else "ftc-low"
            s = copy.deepcopy(spec)
            s["placement"] = {
                **s.get("placement", {}),
                "gpuCount": gpus,
                "queueName": queue,
                "workloadPriorityClassName": cls,
            }
            ftc.create(name, namespace, s)
            run.names.append(name)
            run.priority_class[name] = cls
            run.created[name] = time.time()
        log(f"{count} comparisons created in {time.time() - run.started:.1f}s")

        def train_workloads_waiting() -> bool:
            jobs = {j.metadata.name: dict(j.metadata.labels or {}) for j in ftc.jobs(namespace)}
            trains = [
                w
                for w in recorder.gpu_workloads()
                if w.job in jobs and jobs[w.job].get("ftc.dev/step") == "train" and not w.holds
            ]
            return len(trains) == count * models

        if blocker:
            _wait(train_workloads_waiting, timeout, f"{count * models} train Workloads waiting behind the blocker", interval=1)
            recorder.take_snapshot("every train Workload waits")
            if on_all_queued is not None:
                on_all_queued(run)
            [pod] = client.CoreV1Api(api_client).list_namespaced_pod(namespace, label_selector=f"job-name={BLOCKER}").items
            kubectl("exec", "-n", namespace, present(pod.metadata).name, "--", "touch", RELEASE_FILE)
            run.released = time.time()
            log("blocker released")

        def all_ended() -> bool:
            for n in run.names:
                if n not in run.statuses:
                    st = ftc.status(n, namespace)
                    if st.get("phase") in ("Succeeded", "Failed"):
                        run.statuses[n] = st
            return len(run.statuses) == count

        _wait(all_ended, timeout, f"{count} comparisons to end", interval=1)
        run.ended = time.time()
        recorder.take_snapshot("every comparison ended")
        time.sleep(1.5)  # the last pods' final states and Workloads' Finished conditions reach the watches
        run.jobs = {j.metadata.name: dict(j.metadata.labels or {}) for j in ftc.jobs(namespace)}
        return run
    finally:
        recorder.stop()


def _status_queued(run: ManyRun, labels: dict[str, str]) -> float | None:
    """What ftc's status says the model's train Job waited (status.models[].queue.queuedSeconds), for train steps."""
    if labels.get("ftc.dev/step") != "train":
        return None
    st = run.statuses.get(labels["ftc.dev/comparison"], {})
    model: dict[str, Any] = next((m for m in st.get("models", []) if m.get("name") == labels.get("ftc.dev/model")), {})
    return (model.get("queue") or {}).get("queuedSeconds")


def summary(run: ManyRun) -> dict[str, Any]:
    """The figures of a run (`bench/queue.json`): queue wait per model, quota utilisation over the makespan and as a
    coarse time series, makespan against the sum of step times, and the checks (peak GPUs, admissions out of
    order)."""
    rec = run.recorder
    origin = run.released if run.released is not None else run.started
    end = run.ended
    pods = rec.pod_spans(end)
    step_of = {p.name: p.labels.get("ftc.dev/step", "other") for p in rec.pods.values()}
    ftc_pods = [s for s in pods if step_of.get(s.name) != "other"]
    gpu_pods = [s for s in ftc_pods if s.gpus > 0]
    all_gpu_pods = [s for s in pods if s.gpus > 0]  # with the blocker
    admissions = rec.admissions()
    step_workloads = {w.name for w in rec.gpu_workloads() if "ftc.dev/comparison" in run.jobs.get(w.job or "", {})}
    step_holds = [h for h in rec.quota_spans(end) if h.name in step_workloads]
    waits = queue_waits(admissions, end)
    per_model = []
    for w in sorted(rec.gpu_workloads(), key=lambda w: w.name):
        labels = run.jobs.get(w.job or "", {})
        if "ftc.dev/comparison" not in labels:
            continue
        per_model.append(
            {
                "comparison": labels["ftc.dev/comparison"],
                "model": labels.get("ftc.dev/model"),
                "step": labels.get("ftc.dev/step"),
                "priorityClass": run.priority_class.get(labels["ftc.dev/comparison"]),
                "gpus": w.gpus,
                "queueWaitSeconds": round(waits.get(w.name, 0.0), 2),
                "statusQueuedSeconds": _status_queued(run, labels),
                "evictions": w.evictions,
            }
        )
    step_seconds: dict[str, float] = {}
    for s in ftc_pods:
        step_seconds[step_of[s.name]] = step_seconds.get(step_of[s.name], 0.0) + (s.end - s.start)
    makespan = end - origin
    # StrictFIFO: every Workload (CPU and GPU steps, the blocker) in priority, then creation order. BestEffortFIFO:
    # the GPU Workloads admitted past an earlier one that fitted the free GPUs (what happened, not a check).
    strict = run.strategy == kq.STRICT_FIFO
    out_of_order = (
        order_violations(rec.admissions(gpu_only=False))
        if strict
        else order_violations(admissions, quota=run.quota, holds=rec.quota_spans(end))
    )
    buckets = max(1, min(20, int(makespan // 10)))
    top, at = peak(all_gpu_pods)
    train_waits = sorted(
        waits.get(w.name, 0.0) for w in rec.gpu_workloads() if run.jobs.get(w.job or "", {}).get("ftc.dev/step") == "train"
    )
    return {
        "comparisons": len(run.names),
        "phases": {ph: sum(1 for st in run.statuses.values() if st.get("phase") == ph) for ph in ("Succeeded", "Failed")},
        "quotaGpus": run.quota,
        "gpuWorkloads": len(per_model),
        "makespanSeconds": round(makespan, 1),
        "makespanFrom": "the blocker's release" if run.released is not None else "the first comparison created",
        "gpuSeconds": round(gpu_seconds(gpu_pods, origin, end), 1),
        "utilisation": round(quota_utilisation(gpu_pods, run.quota, origin, end), 3) if makespan > 0 else None,
        "utilisationTimeline": timeline(gpu_pods, run.quota, origin, end, buckets) if makespan > 0 else [],
        # the same from Kueue's side: the GPUs admitted to the steps' Workloads (a pod starting holds its quota)
        "quotaAdmittedUtilisation": round(quota_utilisation(step_holds, run.quota, origin, end), 3) if makespan > 0 else None,
        "quotaAdmittedTimeline": timeline(step_holds, run.quota, origin, end, buckets) if makespan > 0 else [],
        "sumOfStepSeconds": {k: round(v, 1) for k, v in sorted(step_seconds.items())},
        "sumOfAllStepSeconds": round(sum(step_seconds.values()), 1),
        "sumOfGpuStepSeconds": round(sum(s.end - s.start for s in gpu_pods), 1),
        "peakGpusHeld": top,
        "peakAtSeconds": round(at - origin, 1) if at is not None else None,
        "peakGpusHeldBySteps": peak(gpu_pods)[0],
        "peakGpusAdmittedToSteps": peak(step_holds)[0],
        "overQuota": [vars(o) for o in over_quota(all_gpu_pods, run.quota)],
        "quotaHeldOverQuota": [vars(o) for o in over_quota(rec.quota_spans(end), run.quota)],
        "queueingStrategy": run.strategy,
        "admissionsChecked": "every Workload" if strict else "the GPU Workloads, past heads that fitted",
        "admissionsOutOfOrder": [str(v) for v in out_of_order],
        "evictions": sum(w.evictions for w in rec.gpu_workloads()),
        "trainQueueWaitSeconds": {
            "min": round(train_waits[0], 1) if train_waits else None,
            "median": round(train_waits[len(train_waits) // 2], 1) if train_waits else None,
            "max": round(train_waits[-1], 1) if train_waits else None,
        },
        "models": per_model,
    }
