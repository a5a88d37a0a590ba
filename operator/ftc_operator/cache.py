"""What the operator watches, kept in memory: the reconciler reads it instead of asking the API server.

Two informers (LIST, then WATCH from that resourceVersion, relisting when the watch expires or fails) keep the
Jobs and pods that ftc made (a third its JobSets, where the cluster serves them), selected by the API server
with the label `app.kubernetes.io/managed-by=ftc-operator`, so no other pod or Job in the cluster ever reaches
the operator. Objects are grouped by namespace and comparison label; every change enqueues its comparison.
Comparisons themselves are kept from kopf's watch (`Comparisons`), updated with what the operator's own status
writes return. A reconcile then reads nothing from the API server and writes at most its status; the periodic
resync and every relist correct any drift.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from . import metrics
from .observe import ANNOTATION_COMPARISON, LABEL_COMPARISON

log = logging.getLogger("ftc.operator")
Key = tuple[str, str]  # (namespace, comparison name)
WATCH_SECONDS = 300


def comparison_of(obj: dict[str, Any]) -> str | None:
    """The full name of the comparison an object belongs to (annotation, else controlling owner)."""
    meta = obj.get("metadata") or {}
    name = (meta.get("annotations") or {}).get(ANNOTATION_COMPARISON)
    if name:
        return str(name)
    return next((o["name"] for o in meta.get("ownerReferences") or [] if o.get("kind") == "FineTuneComparison"), None)


def newer(a: str | None, b: str | None) -> bool:
    """Whether resourceVersion `a` is newer than `b` (etcd's are integers; anything else counts as newer)."""
    if not b:
        return True
    if a and a.isdigit() and b.isdigit():
        return int(a) > int(b)
    return True


class Store:
    """Objects of one kind by (namespace, comparison label value), then uid. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._groups: dict[Key, dict[str, dict[str, Any]]] = {}
        self._where: dict[str, Key] = {}  # uid -> group

    @staticmethod
    def group(obj: dict[str, Any]) -> Key | None:
        meta = obj.get("metadata") or {}
        label = (meta.get("labels") or {}).get(LABEL_COMPARISON)
        return (meta.get("namespace", ""), label) if label else None

    def replace(self, items: list[dict[str, Any]]) -> None:
        with self._lock:
            self._groups.clear()
            self._where.clear()
            for obj in items:
                self._put(obj)

    def apply(self, kind: str, obj: dict[str, Any]) -> None:
        """A watch event: ADDED, MODIFIED or DELETED."""
        with self._lock:
            uid = (obj.get("metadata") or {}).get("uid", "")
            old = self._where.pop(uid, None)
            if old is not None:
                self._groups.get(old, {}).pop(uid, None)
            if kind != "DELETED":
                self._put(obj)

    def _put(self, obj: dict[str, Any]) -> None:
        key = self.group(obj)
        uid = (obj.get("metadata") or {}).get("uid", "")
        if key is not None and uid:
            self._groups.setdefault(key, {})[uid] = obj
            self._where[uid] = key

    def objects(self, namespace: str, label: str) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._groups.get((namespace, label), {}).values())

    def get(self, uid: str) -> dict[str, Any] | None:
        """The object with this uid, if held."""
        with self._lock:
            key = self._where.get(uid)
            return self._groups.get(key, {}).get(uid) if key is not None else None

    def comparison(self, obj: dict[str, Any]) -> str | None:
        """The full name of the comparison `obj` belongs to."""
        return comparison_of(obj)

    def keys(self) -> list[Key]:
        """(namespace, comparison name) of every object held."""
        with self._lock:
            objs = [o for g in self._groups.values() for o in g.values()]
        return sorted({(o["metadata"]["namespace"], n) for o in objs if (n := self.comparison(o))})


def owner_uid(obj: dict[str, Any]) -> str | None:
    """The uid of the object's controller owner (else its first owner)."""
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    ref = next((r for r in refs if r.get("controller")), None) or next(iter(refs), None)
    return (ref or {}).get("uid")


class WorkloadStore(Store):
    """Kueue Workloads, grouped by (namespace, uid of the Job or JobSet that owns them): a Workload carries no ftc
    label; its owner does. `comparison_of_owner` finds the comparison of an owner uid in the operator's other
    stores."""

    def __init__(self, comparison_of_owner: Callable[[str], str | None]) -> None:
        super().__init__()
        self.comparison_of_owner = comparison_of_owner

    def group(self, obj: dict[str, Any]) -> Key | None:  # type: ignore[override]
        uid = owner_uid(obj)
        return ((obj.get("metadata") or {}).get("namespace", ""), uid) if uid else None

    def comparison(self, obj: dict[str, Any]) -> str | None:
        uid = owner_uid(obj)
        return self.comparison_of_owner(uid) if uid else None


class Informer:
    """LIST + WATCH of one kind with a server-side label selector into a `Store`, in a daemon thread."""

    def __init__(
        self,
        kind: str,
        list_call: Callable[..., Any],
        selector: str,
        on_change: Callable[[Key], None],
        watch_seconds: int = WATCH_SECONDS,
        store: Store | None = None,
    ) -> None:
        self.kind = kind
        self.list_call = list_call
        self.selector = selector
        self.on_change = on_change
        self.watch_seconds = watch_seconds
        self.store = store if store is not None else Store()
        self.synced = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"ftc-informer-{kind}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            try:
                version: str | None = self._list()
                backoff = 1.0
                while version is not None and not self._stop.is_set():
                    version = self._watch(version)  # None: expired (410 Gone) or failed: relist
            except Exception as err:  # the API server is away: keep trying, never die
                metrics.RECONCILE_ERRORS.labels(kind=f"Informer{type(err).__name__}").inc()
                log.warning("%s informer: %s: %s; relisting in %.0fs", self.kind, type(err).__name__, err, backoff)
                self._stop.wait(backoff)
                backoff = min(30.0, backoff * 2)

    def _list(self) -> str:
        metrics.API_REQUESTS.labels(verb="list", resource=self.kind).inc()
        doc = json.loads(self.list_call(label_selector=self.selector, _preload_content=False).data)
        before = set(self.store.keys())
        self.store.replace(doc.get("items") or [])
        self.synced.set()
        for key in before | set(self.store.keys()):  # whatever changed while not watching
            self.on_change(key)
        return str((doc.get("metadata") or {}).get("resourceVersion") or "")

    def _watch(self, version: str) -> str | None:
        """Follow changes from `version`; the newest version when the watch ends, None to relist."""
        from kubernetes import watch

        metrics.API_REQUESTS.labels(verb="watch", resource=self.kind).inc()
        stream = watch.Watch()
        started = time.monotonic()
        for event in stream.stream(
            self.list_call,
            label_selector=self.selector,
            resource_version=version,
            timeout_seconds=self.watch_seconds,
            allow_watch_bookmarks=True,
            deserialize=False,  # plain dicts: no model objects built for each event
        ):
            kind, raw = event.get("type"), event.get("raw_object") or event.get("object") or {}
            if kind == "ERROR":
                return None  # typically 410 Gone: the version is too old
            version = str((raw.get("metadata") or {}).get("resourceVersion") or version)
            if kind == "BOOKMARK":
                continue
            metrics.WATCH_EVENTS.labels(resource=self.kind).inc()
            self.store.apply(str(kind), raw)
            name = self.store.comparison(raw)
            if name:
                self.on_change((raw["metadata"].get("namespace", ""), name))
            if self._stop.is_set():
                return None
        if time.monotonic() - started < 1:  # ended at once: do not spin
            self._stop.wait(1)
        return version


class Comparisons:
    """The comparisons as last seen (kopf's watch, and the operator's own status writes)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bodies: dict[Key, dict[str, Any]] = {}

    def seen(self, obj: dict[str, Any]) -> None:
        """Keep `obj` unless a newer version of it is already held."""
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        with self._lock:
            held = self._bodies.get(key)
            if held is None or newer(meta.get("resourceVersion"), (held.get("metadata") or {}).get("resourceVersion")):
                self._bodies[key] = obj

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._bodies.pop((namespace, name), None)

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            return self._bodies.get((namespace, name))


class Cache:
    """The operator's view of the cluster: comparisons, and the Jobs and pods it made (one informer per kind
    and watched namespace, or per kind for the whole cluster)."""

    def __init__(
        self, jobs: list[Informer] | None = None, pods: list[Informer] | None = None, jobsets: list[Informer] | None = None
    ) -> None:
        self.comparisons = Comparisons()
        self.jobs = jobs or []
        self.pods = pods or []
        self.workloads: list[Informer] = []  # Kueue's Workloads, once its API is found (watch_workloads)
        self.jobsets = jobsets or []  # only where the cluster serves JobSets

    @property
    def synced(self) -> bool:
        informers = self.jobs + self.pods + self.jobsets
        return bool(informers) and all(i.synced.is_set() for i in informers)

    def owned(self, namespace: str, label: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The Jobs and pods carrying one comparison's label (the caller checks ownership by uid)."""
        jobs = [o for i in self.jobs for o in i.store.objects(namespace, label)]
        pods = [o for i in self.pods for o in i.store.objects(namespace, label)]
        return jobs, pods

    def watch_jobsets(self, informers: list[Informer]) -> None:
        """Start watching ftc's JobSets (`informers`), once JobSet's API is found."""
        self.jobsets = informers
        for informer in informers:
            informer.start()

    def owned_jobsets(self, namespace: str, label: str) -> list[dict[str, Any]]:
        """The JobSets carrying one comparison's label (train steps on several nodes)."""
        return [o for i in self.jobsets for o in i.store.objects(namespace, label)]

    def start(self) -> None:
        for informer in self.jobs + self.pods + self.jobsets:
            informer.start()

    def stop(self) -> None:
        for informer in self.workloads:
            informer.stop()
        for informer in self.jobs + self.pods + self.jobsets:
            informer.stop()

    def watch_workloads(self, informers: list[Informer]) -> None:
        """Start watching Kueue's Workloads (`informers`, made with a WorkloadStore over comparison_of_owner)."""
        self.workloads = informers
        for informer in informers:
            informer.start()

    def comparison_of_owner(self, uid: str) -> str | None:
        """The comparison of the Job (or JobSet) with this uid, if the operator holds it."""
        for informer in [*self.jobs, *getattr(self, "jobsets", [])]:
            obj = informer.store.get(uid)
            if obj is not None:
                return comparison_of(obj)
        return None

    def owned_workloads(self, namespace: str, owner_uids: list[str]) -> list[dict[str, Any]] | None:
        """The Workloads Kueue made for these Jobs; None while Workloads are not watched or not yet listed."""
        if not self.workloads or not all(i.synced.is_set() for i in self.workloads):
            return None
        return [o for i in self.workloads for uid in owner_uids for o in i.store.objects(namespace, uid)]
