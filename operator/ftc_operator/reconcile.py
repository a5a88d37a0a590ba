"""One reconcile pass: read the comparison and what it owns, plan, apply the plan, write status.

Synchronous (it runs in a worker thread). The comparison, its Jobs and its pods come from the operator's
watches (`cache.py`) once they have synced, else from the API server; nothing else is remembered between
passes, so a restarted operator picks up where the last one stopped. The planner builds every object; this
module only applies: it deletes and creates what the plan lists, and when a create meets an object that
already has the name, it plans again with that observation, so the status and Events say so.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from typing import Any

from ftc_api.names import fit
from ftc_api.status import FineTuneComparisonStatus

from . import metrics
from .cache import Cache, owner_uid
from .comparison import Comparison, read_comparison
from .config import OperatorConfig
from .kube import Conflict, Kube
from .observe import ObservedJob, observe
from .planning import Plan, only_progress_changed, plan, retry_requested, settled
from .rendering import KUEUE_QUEUE_LABEL, selector_labels
from .workloads import attach_workloads

log = logging.getLogger("ftc.operator")


def _selector(name: str) -> str:
    return ",".join(f"{k}={v}" for k, v in selector_labels(name).items())


class Reconciler:
    def __init__(
        self,
        kube: Kube,
        config: OperatorConfig,
        clock: Callable[[], dt.datetime] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        cache: Cache | None = None,
        jobset_available: bool = False,
    ):
        self.kube = kube
        self.jobset_available = jobset_available  # the cluster serves JobSets (train steps on several nodes)
        self.config = config
        self.cache = cache
        self.kueue_version: str | None = None  # the kueue.x-k8s.io version serving Workloads, once found (handlers)
        self.clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self.monotonic = monotonic
        self.status_written: dict[tuple[str, str], float] = {}  # when each comparison's status was last written

    def reconcile(self, namespace: str, name: str) -> float | None:
        """Bring one comparison one step forward (raises kube.Conflict when the object changed meanwhile).
        Returns in how many seconds to look again: a progress-only status write was held back, or the plan has a
        deadline (a pod that found no node fails its step then)."""
        started = time.perf_counter()
        try:
            return self._reconcile(namespace, name)
        except Conflict:
            if self.cache is not None:  # what the cache held was stale: read it afresh next time
                self.cache.comparisons.forget(namespace, name)
            raise
        finally:
            metrics.RECONCILE_SECONDS.observe(time.perf_counter() - started)

    def _comparison(self, namespace: str, name: str) -> dict | None:
        held = self.cache.comparisons.get(namespace, name) if self.cache is not None else None
        if held is not None:
            return held
        obj = self.kube.get_comparison(namespace, name)
        if obj is not None and self.cache is not None:
            self.cache.comparisons.seen(obj)
        return obj

    def _owned(self, comparison: Comparison) -> list[ObservedJob]:
        """The comparison's Jobs as the planner sees them; none when the planner keeps a finished status as is."""
        old, owner = comparison.status, comparison.owner
        if old is not None and settled(old, owner.generation) and not retry_requested(old, comparison.retry):
            return []
        if self.cache is not None and self.cache.synced:
            jobs, pods = self.cache.owned(owner.namespace, fit(owner.name))
            jobsets = self.cache.owned_jobsets(owner.namespace, fit(owner.name))
        else:
            sel = _selector(owner.name)
            jobs, pods = self.kube.list_jobs(owner.namespace, sel), self.kube.list_pods(owner.namespace, sel)
            jobsets = self.kube.list_jobsets(owner.namespace, sel) if self.jobset_available else []
        owners = [*jobs, *jobsets]
        return attach_workloads(observe(jobs, pods, owner.uid, jobsets), owners, pods, self._workloads(owner.namespace, owners))

    def _workloads(self, namespace: str, owners: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Kueue's Workloads of the comparison's Jobs that name a queue: from the informers once they listed, else
        from the API server; none where Kueue's API is not served."""
        queued = {
            uid
            for o in owners
            if KUEUE_QUEUE_LABEL in ((o.get("metadata") or {}).get("labels") or {}) and (uid := o["metadata"].get("uid"))
        }
        if not queued or self.kueue_version is None:
            return []
        held = self.cache.owned_workloads(namespace, sorted(queued)) if self.cache is not None else None
        if held is not None:
            return held
        return [w for w in self.kube.list_workloads(namespace, self.kueue_version) if owner_uid(w) in queued]

    def _reconcile(self, namespace: str, name: str) -> float | None:
        obj = self._comparison(namespace, name)
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            self.status_written.pop((namespace, name), None)
            return None  # deleted: ownerReferences let the garbage collector remove Jobs and ConfigMaps
        c = read_comparison(obj)
        now = self.clock()
        observed = self._owned(c)

        def planned(not_created: dict[str, str | None] | None = None) -> Plan:
            return plan(
                c.spec,
                c.status,
                observed,
                now,
                owner=c.owner,
                config=self.config,
                retry=c.retry,
                not_created=not_created,
                jobset_available=self.jobset_available,
            )

        p = planned()
        jobsets = {o.name for o in observed if o.kind == "JobSet"}
        for job_name in p.deletes:  # a retry: the failed Jobs go (their pods with them) before their steps rerun
            if job_name in jobsets:
                self.kube.delete_jobset(namespace, job_name)
            else:
                self.kube.delete_job(namespace, job_name)
            log.info("%s/%s: retry %r: deleted failed Job %s", namespace, name, c.retry, job_name)
        not_created = self._create(namespace, name, p)
        if not_created:  # what the apply met is an observation: plan again with it, and report that plan
            p = planned(not_created)
        held = self._write_status(obj, c.status, p, now)
        taken = any(why is not None for why in not_created.values())
        soon = self.config.resync_seconds / 6 if taken else None  # a name taken: look again soon (a deleted owner's objects go)
        # the soonest of: a held-back progress write, a taken name, a deadline of the plan (an unschedulable pod's)
        return min((s for s in (held, soon, p.requeue_after) if s is not None), default=None)

    def _create(self, namespace: str, name: str, p: Plan) -> dict[str, str | None]:
        """Create what the plan lists; returns what was not created, by Job name: the message naming the object
        that holds the name, or None when this comparison's own object already had it."""
        not_created: dict[str, str | None] = {}
        for c in p.creates:
            made = self.kube.create(c.configmap)
            if made.blocked is None:  # the Job only ever reads this comparison's own input
                made = self.kube.create(c.job)
            if made.created:
                metrics.JOBS_CREATED.labels(step=c.step).inc()
                log.info("%s/%s: created %s Job %s", namespace, name, c.step, c.name)
                continue
            not_created[c.name] = made.blocked
            if made.blocked is not None:
                log.warning("%s/%s: %s", namespace, name, made.blocked)
        return not_created

    def _write_status(self, obj: dict[str, Any], old: FineTuneComparisonStatus | None, p: Plan, now: dt.datetime) -> float | None:
        """Write the planned status when it changed, then record the plan's Events; returns in how many seconds
        to look again when a progress-only write is held back (config.progressWriteSeconds)."""
        if not (old is None or p.status != old or obj.get("status") is None):
            return None
        meta = obj["metadata"]
        key, clock = (meta["namespace"], meta["name"]), self.monotonic()
        wait = self.config.progress_write_seconds - (clock - self.status_written.get(key, float("-inf")))
        if wait > 0 and not p.creates and only_progress_changed(old, p.status):
            metrics.STATUS_WRITES_HELD.inc()
            return wait  # live progress only: written with the next change, or when the interval is up
        written = self.kube.replace_status(obj, p.status_doc())
        if self.cache is not None and isinstance(written, dict) and written.get("metadata"):
            self.cache.comparisons.seen(written)
        self.status_written[key] = clock
        metrics.STATUS_WRITES.inc()
        if old is None or p.status.phase != old.phase:
            log.info("%s/%s: phase %s", key[0], key[1], p.status.phase.value)
        for e in p.events:
            self.kube.event(obj, e.type.value, e.reason, e.message, now)
        return None
