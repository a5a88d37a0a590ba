"""One reconcile pass: read the comparison and what it owns, plan, create what is missing, write status.

Synchronous (it runs in a worker thread). The comparison, its Jobs and its pods come from the operator's
watches (`cache.py`) once they have synced, else from the API server; nothing else is remembered between
passes, so a restarted operator picks up where the last one stopped.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable

from ftc_api.names import fit
from ftc_api.spec import FineTuneComparisonSpec
from ftc_api.status import FineTuneComparisonStatus
from ftc_api.steps import RETRY_ANNOTATION
from pydantic import ValidationError

from . import metrics
from .cache import Cache
from .config import OperatorConfig
from .kube import Conflict, Kube
from .observe import observe
from .planning import TERMINAL, Plan, only_progress_changed, plan, retry_requested, with_names_taken
from .rendering import Owner, render_configmap, render_job, selector_labels

log = logging.getLogger("ftc.operator")


def _selector(name: str) -> str:
    return ",".join(f"{k}={v}" for k, v in selector_labels(name).items())


def _old_status(obj: dict) -> FineTuneComparisonStatus | None:
    try:
        return FineTuneComparisonStatus.model_validate(obj.get("status") or {})
    except ValidationError:
        return None


class Reconciler:
    def __init__(
        self,
        kube: Kube,
        config: OperatorConfig,
        clock: Callable[[], dt.datetime] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        cache: Cache | None = None,
    ):
        self.kube = kube
        self.config = config
        self.cache = cache
        self.clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self.monotonic = monotonic
        self.status_written: dict[tuple[str, str], float] = {}  # when each comparison's status was last written

    def reconcile(self, namespace: str, name: str) -> float | None:
        """Bring one comparison one step forward (raises kube.Conflict when the object changed meanwhile).
        Returns in how many seconds to look again when a progress-only status write was held back."""
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

    def _owned(self, namespace: str, name: str, uid: str) -> list:
        if self.cache is not None and self.cache.synced:
            jobs, pods = self.cache.owned(namespace, fit(name))
        else:
            sel = _selector(name)
            jobs, pods = self.kube.list_jobs(namespace, sel), self.kube.list_pods(namespace, sel)
        return observe(jobs, pods, uid)

    def _reconcile(self, namespace: str, name: str) -> float | None:
        obj = self._comparison(namespace, name)
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            self.status_written.pop((namespace, name), None)
            return None  # deleted: ownerReferences let the garbage collector remove Jobs and ConfigMaps
        meta = obj["metadata"]
        owner = Owner(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"], generation=meta.get("generation", 1))
        old = _old_status(obj)
        now = self.clock()
        retry = (meta.get("annotations") or {}).get(RETRY_ANNOTATION)
        settled = old is not None and old.phase in TERMINAL and old.observed_generation == owner.generation
        if settled and not (old is not None and retry_requested(old, retry)):
            observed = []  # the planner keeps a terminal status as is: no need to list anything
        else:
            observed = self._owned(namespace, owner.name, owner.uid)
        p = plan(obj.get("spec") or {}, old, observed, now, owner=owner, config=self.config, retry=retry)
        for job_name in p.deletes:  # a retry: the failed Jobs go (their pods with them) before their steps rerun
            self.kube.delete_job(namespace, job_name)
            log.info("%s/%s: retry %r: deleted failed Job %s", namespace, name, retry, job_name)
        not_created: set[str] = set()
        taken: dict[str, str] = {}
        if p.creates:
            spec = FineTuneComparisonSpec.model_validate(obj["spec"])
            models = {m.name: m for m in spec.models}
            for c in p.creates:
                made = self.kube.create(render_configmap(owner, c.step, c.model, c.input_json))
                if made.blocked is None:  # the Job only ever reads this comparison's own input
                    job = render_job(owner, spec, self.config, c.step, models.get(c.model) if c.model else None, c.scratch_gib)
                    made = self.kube.create(job)
                if made.created:
                    metrics.JOBS_CREATED.labels(step=c.step).inc()
                    log.info("%s/%s: created %s Job %s", namespace, name, c.step, c.name)
                    continue
                not_created.add(c.name)
                if made.blocked is not None:
                    taken[c.step] = made.blocked
                    log.warning("%s/%s: %s", namespace, name, made.blocked)
        if taken:
            p = Plan(status=with_names_taken(p.status, taken, now), creates=p.creates, events=p.events)
        if old is None or p.status != old or obj.get("status") is None:
            key, clock = (namespace, name), self.monotonic()
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
                log.info("%s/%s: phase %s", namespace, name, p.status.phase.value)
            for e in p.events:
                if e.reason == "JobCreated" and any(e.message.endswith(f" {n}") for n in not_created):
                    continue
                self.kube.event(obj, e.type, e.reason, e.message, now)
            for message in taken.values():
                self.kube.event(obj, "Warning", "NameTaken", message, now)
        return self.config.resync_seconds / 6 if taken else None  # look again soon: a deleted owner's objects go
