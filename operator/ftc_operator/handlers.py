"""kopf handlers: watch comparisons, and feed a per-comparison work queue; ftc's informers watch the rest.

Only an ``@kopf.on.event`` handler is used for comparisons: it needs no finalizer and no progress
annotations, so deleting a comparison never waits for the operator, and kopf never patches the objects.
The Jobs and pods ftc made are watched by the informers of `cache.py`, with a server-side label selector
(kopf filters labels in the client, so every pod of the cluster would reach the operator). Every event
(on the comparison, one of its Jobs, or one of its pods, e.g. a new progress annotation) enqueues the
comparison; a periodic resync enqueues every unfinished one. The queue (`workqueue.py`) runs at most one
reconcile per comparison at a time, coalesces bursts, and retries failures with backoff.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import kopf
from ftc_api.base import API_GROUP, API_VERSION, PLURAL
from ftc_api.status import Phase

from . import metrics
from .cache import Cache, Informer, WorkloadStore
from .config import OperatorConfig
from .kube import JOBSET_GROUP, JOBSET_VERSION, JOBSETS, Kube, new_api_client
from .observe import LABEL_MANAGED_BY, MANAGED_BY
from .reconcile import Reconciler
from .workloads import KUEUE_GROUP, WORKLOADS
from .workqueue import WorkQueue

log = logging.getLogger("ftc.operator")
Key = tuple[str, str]


async def _discover(what: str, probe: Any) -> Any:
    """Ask the API server (in a thread) whether an optional API is served; None when the call fails (logged): the
    next resync asks again."""
    try:
        return await asyncio.to_thread(probe)
    except Exception as e:  # discovery failed: look again at the next resync
        log.warning("%s discovery failed: %s: %s", what, type(e).__name__, e)
        return None


def _enqueue_from_thread(memo: kopf.Memo) -> Any:
    """An informer's change callback: enqueue the comparison on the operator's event loop."""
    return partial(asyncio.get_running_loop().call_soon_threadsafe, memo.queue.add)


async def watch_kueue(memo: kopf.Memo) -> None:
    """Watch Kueue's Workloads once the API server serves them (checked at start and on every resync while not:
    Kueue may be installed after the operator; without it everything works as before)."""
    if memo.reconciler.kueue_version is not None:
        return
    version = await _discover("Kueue", memo.kube.workloads_version)
    if version is None:
        return
    on_change = _enqueue_from_thread(memo)
    memo.cache.watch_workloads(workload_informers(memo.kube, memo.namespaces, version, on_change, memo.cache))
    memo.reconciler.kueue_version = version
    log.info("Kueue's Workloads (%s/%s) served: watching them", KUEUE_GROUP, version)


async def watch_jobsets(memo: kopf.Memo) -> None:
    """Watch ftc's JobSets once the API server serves them (checked at start and on every resync while not: JobSet
    may be installed after the operator); until then a model on several nodes is refused (resolve.jobset_refusals)."""
    if memo.reconciler.jobset_available:
        return
    if not await _discover("JobSet", memo.kube.jobsets_served):
        return
    memo.cache.watch_jobsets(jobset_informers(memo.kube, memo.namespaces, _enqueue_from_thread(memo)))
    memo.reconciler.jobset_available = True
    log.info("JobSets (%s/%s) served: watching them; models may train on several nodes", JOBSET_GROUP, JOBSET_VERSION)


def jobset_informers(kube: Kube, namespaces: list[str] | None, on_change: Any) -> list[Informer]:
    """Informers of the JobSets ftc made (train steps on several nodes), per watched namespace or cluster-wide."""
    selector = f"{LABEL_MANAGED_BY}={MANAGED_BY}"
    if namespaces:
        calls = [
            partial(kube.custom.list_namespaced_custom_object, JOBSET_GROUP, JOBSET_VERSION, ns, JOBSETS) for ns in namespaces
        ]
    else:
        calls = [partial(kube.custom.list_cluster_custom_object, JOBSET_GROUP, JOBSET_VERSION, JOBSETS)]
    return [Informer(JOBSETS, call, selector, on_change) for call in calls]


def workload_informers(kube: Kube, namespaces: list[str] | None, version: str, on_change: Any, cache: Cache) -> list[Informer]:
    """Informers of Kueue's Workloads, per watched namespace or cluster-wide. Workloads carry no ftc label, so they
    are listed whole (in a watched namespace, most are ftc's) and matched to a comparison through their owner Job."""
    if namespaces:
        calls = [partial(kube.custom.list_namespaced_custom_object, KUEUE_GROUP, version, ns, WORKLOADS) for ns in namespaces]
    else:
        calls = [partial(kube.custom.list_cluster_custom_object, KUEUE_GROUP, version, WORKLOADS)]
    return [Informer(WORKLOADS, call, "", on_change, store=WorkloadStore(cache.comparison_of_owner)) for call in calls]


async def _resync(memo: kopf.Memo) -> None:
    config: OperatorConfig = memo.config
    while True:
        try:
            await watch_kueue(memo)
            await watch_jobsets(memo)
            items = await asyncio.to_thread(memo.kube.list_comparisons, memo.namespaces or None)
            counts = dict.fromkeys((p.value for p in Phase), 0)
            for obj in items:
                status = obj.get("status") or {}
                phase = status.get("phase") or Phase.PENDING.value
                counts[phase] = counts.get(phase, 0) + 1
                finished = phase in (Phase.SUCCEEDED.value, Phase.FAILED.value)
                if not finished or status.get("observedGeneration") != obj["metadata"].get("generation"):
                    memo.queue.add((obj["metadata"]["namespace"], obj["metadata"]["name"]))
            for phase, n in counts.items():
                metrics.COMPARISONS.labels(phase=phase).set(n)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            metrics.RECONCILE_ERRORS.labels(kind="Resync" + type(e).__name__).inc()
            log.warning("resync failed: %s: %s", type(e).__name__, e)
        await asyncio.sleep(config.resync_seconds)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    config: OperatorConfig = memo.config
    settings.posting.level = logging.WARNING  # kopf's own Events only for problems; ours are explicit
    settings.scanning.disabled = True  # no CRD watching: no cluster-wide RBAC on CRDs needed
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60
    memo.kube = Kube(new_api_client(connections=config.workers + 4))  # + the informers' watches
    loop = asyncio.get_running_loop()
    memo.cache = informers(memo.kube, memo.namespaces, lambda key: loop.call_soon_threadsafe(memo.queue.add, key))
    reconciler = Reconciler(memo.kube, config, cache=memo.cache)

    memo.executor = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="ftc-reconcile")

    async def process(key: Key) -> float | None:
        return await asyncio.get_running_loop().run_in_executor(memo.executor, reconciler.reconcile, *key)

    memo.queue = WorkQueue(process, config.workers)
    memo.reconciler = reconciler
    await watch_kueue(memo)
    memo.cache.start()
    await watch_jobsets(memo)
    metrics.serve(config.metrics_port)

    def lead() -> None:  # events queue up meanwhile; the resync enqueues every unfinished comparison
        memo.queue.start()
        memo.resync = asyncio.create_task(_resync(memo), name="ftc-resync")
        metrics.LEADER.set(1)
        log.info("ftc operator reconciling: %d workers, resync every %.0fs", config.workers, config.resync_seconds)

    memo.resync = None
    lease = getattr(memo, "lease", None)
    if lease is None:
        lead()
    else:  # several replicas: only the Lease holder reconciles
        from .leader import elect

        elect(memo.kube.api, lease, lambda: loop.call_soon_threadsafe(lead))


def informers(kube: Kube, namespaces: list[str] | None, on_change: Any) -> Cache:
    """Job and pod informers selecting what ftc made (server side), per watched namespace or cluster-wide."""
    selector = f"{LABEL_MANAGED_BY}={MANAGED_BY}"
    if namespaces:
        jobs = [Informer("jobs", partial(kube.batch.list_namespaced_job, ns), selector, on_change) for ns in namespaces]
        pods = [Informer("pods", partial(kube.core.list_namespaced_pod, ns), selector, on_change) for ns in namespaces]
    else:
        jobs = [Informer("jobs", kube.batch.list_job_for_all_namespaces, selector, on_change)]
        pods = [Informer("pods", kube.core.list_pod_for_all_namespaces, selector, on_change)]
    return Cache(jobs, pods)


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    if memo.resync is not None:
        memo.resync.cancel()
    memo.cache.stop()
    await memo.queue.stop()
    memo.executor.shutdown(wait=False, cancel_futures=True)


@kopf.on.event(API_GROUP, API_VERSION, PLURAL)
async def comparison_event(type: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    namespace, name = body.metadata.namespace, body.metadata.name
    if type == "DELETED" or body.metadata.get("deletionTimestamp"):
        memo.cache.comparisons.forget(namespace, name)
        return
    memo.cache.comparisons.seen(copy.deepcopy(dict(body)))
    status = body.get("status") or {}
    memo.queue.add((namespace, name), urgent=status.get("observedGeneration") != body.metadata.get("generation"))
