"""Kueue: suspended Jobs with queue and priority labels, Workloads observed, and where each model waits (tables)."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from ftc_api.spec import FineTuneComparisonSpec
from ftc_api.status import ModelPhase, QueueState, QueueStatus
from ftc_operator.comparison import Owner, parse_spec
from ftc_operator.config import OperatorConfig
from ftc_operator.observe import JobState, ObservedJob
from ftc_operator.planning import plan
from ftc_operator.rendering import render_job
from ftc_operator.workloads import attach_workloads, observe_workload, queue_state, queue_status

from tests.test_operator_planning import PREP_OK, job, spec, trained

pytestmark = pytest.mark.unit

OWNER = Owner(name="bake", namespace="ns", uid="0123456789abcdef", generation=1)
NOW = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
QUOTA_MESSAGE = (
    "couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu in flavor fake-a100, 1 more needed"
)
PREEMPT_MESSAGE = "Preempted to accommodate a workload (UID: 42, JobUID: 43) due to prioritization in the ClusterQueue"


# --------------------------------------------------------------------------------------------- rendering


def _render(step: str, spec_extra: dict | None = None, model_placement: dict | None = None, config=None) -> dict:
    doc = spec(**(spec_extra or {}))
    if model_placement is not None:
        doc["models"][0]["placement"] = model_placement
    s = parse_spec(doc)
    assert isinstance(s, FineTuneComparisonSpec)
    model = s.models[0] if step in ("train", "generate") else None
    return render_job(OWNER, s, config or OperatorConfig(), step, model)


RENDER = [
    pytest.param("train", None, None, None, None, None, id="no-queue-as-before"),
    pytest.param("train", {"placement": {"queueName": "team"}}, None, None, "team", None, id="comparison-queue"),
    pytest.param(
        "train",
        {"placement": {"queueName": "team", "workloadPriorityClassName": "ftc-high"}},
        None,
        None,
        "team",
        "ftc-high",
        id="queue-and-priority",
    ),
    pytest.param("train", {"placement": {"queueName": "team"}}, {"queueName": "gpu-a"}, None, "gpu-a", None, id="model-wins"),
    pytest.param("train", None, None, {"placement": {"queueName": "chart-q"}}, "chart-q", None, id="chart-default"),
    pytest.param("prepare", {"placement": {"queueName": "team"}}, None, None, "team", None, id="prepare-queued-too"),
    pytest.param("score", None, None, {"placement": {"queueName": "chart-q"}}, "chart-q", None, id="score-chart-default"),
    pytest.param(
        "train", {"placement": {"workloadPriorityClassName": "ftc-high"}}, None, None, None, None, id="priority-without-queue"
    ),
]


@pytest.mark.parametrize(("step", "extra", "model_placement", "chart", "queue", "priority"), RENDER)
def test_a_named_queue_makes_every_step_job_suspended_with_kueue_labels(step, extra, model_placement, chart, queue, priority):
    config = OperatorConfig.model_validate(chart) if chart else None
    job_doc = _render(step, extra, model_placement, config)
    labels = job_doc["metadata"]["labels"]
    assert labels.get("kueue.x-k8s.io/queue-name") == queue
    assert labels.get("kueue.x-k8s.io/priority-class") == priority
    if queue:
        assert job_doc["spec"]["suspend"] is True
    else:  # exactly as without Kueue: no suspend field, no Kueue label
        assert "suspend" not in job_doc["spec"]
        assert not any(k.startswith("kueue.x-k8s.io/") for k in labels)
    # the pod template carries no Kueue label (Kueue's pod integration must not take the Job's pods for its own)
    assert not any(k.startswith("kueue.x-k8s.io/") for k in job_doc["spec"]["template"]["metadata"]["labels"])
    rules = job_doc["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}


# --------------------------------------------------------------------------------------------- Workloads


def _cond(type_: str, status: str, reason: str, message: str = "", at: str = "2026-01-02T03:00:00Z") -> dict:
    return {"type": type_, "status": status, "reason": reason, "message": message, "lastTransitionTime": at}


def workload(*conds: dict, evictions: int = 0, created: str = "2026-01-02T03:00:00Z", owner: str = "uid-train") -> dict:
    status: dict = {"conditions": list(conds)}
    if evictions:
        status["schedulingStats"] = {"evictions": [{"reason": "Preempted", "underlyingCause": "", "count": evictions}]}
    return {
        "apiVersion": "kueue.x-k8s.io/v1beta2",
        "kind": "Workload",
        "metadata": {
            "name": "job-bake-train-llama-1a2b3",
            "namespace": "ns",
            "creationTimestamp": created,
            "ownerReferences": [{"kind": "Job", "name": "bake-train-llama", "uid": owner, "controller": True}],
        },
        "spec": {"queueName": "ftc-queue"},
        "status": status,
    }


PENDING = workload(_cond("QuotaReserved", "False", "Pending", QUOTA_MESSAGE, "2026-01-02T03:00:01Z"))
ADMITTED_AT = "2026-01-02T03:02:00Z"
ADMITTED = workload(
    _cond("QuotaReserved", "True", "QuotaReserved", "Quota reserved in ClusterQueue ftc-cq", ADMITTED_AT),
    _cond("Admitted", "True", "Admitted", "The workload is admitted", ADMITTED_AT),
)
EVICTING = workload(
    _cond("QuotaReserved", "True", "QuotaReserved", "Quota reserved in ClusterQueue ftc-cq", ADMITTED_AT),
    _cond("Admitted", "True", "Admitted", "The workload is admitted", ADMITTED_AT),
    _cond("Evicted", "True", "Preempted", PREEMPT_MESSAGE, "2026-01-02T03:10:00Z"),
    _cond("Preempted", "True", "InClusterQueue", PREEMPT_MESSAGE, "2026-01-02T03:10:00Z"),
    evictions=1,
)
REQUEUED = workload(
    _cond("QuotaReserved", "False", "Pending", QUOTA_MESSAGE, "2026-01-02T03:10:30Z"),
    _cond("Admitted", "False", "NoReservation", "The workload has no reservation", "2026-01-02T03:10:30Z"),
    _cond("Evicted", "False", "QuotaReserved", "", "2026-01-02T03:10:30Z"),
    _cond("Requeued", "True", "Preempted", PREEMPT_MESSAGE, "2026-01-02T03:10:30Z"),
    evictions=1,
)
READMITTED_AT = "2026-01-02T03:15:00Z"
READMITTED = workload(
    _cond("QuotaReserved", "True", "QuotaReserved", "Quota reserved in ClusterQueue ftc-cq", READMITTED_AT),
    _cond("Admitted", "True", "Admitted", "The workload is admitted", READMITTED_AT),
    _cond("Evicted", "False", "QuotaReserved", "", READMITTED_AT),
    _cond("Requeued", "True", "Preempted", PREEMPT_MESSAGE, "2026-01-02T03:10:30Z"),
    evictions=1,
)
FINISHED = workload(
    _cond("QuotaReserved", "True", "QuotaReserved", "", READMITTED_AT),
    _cond("Admitted", "True", "Admitted", "The workload is admitted", READMITTED_AT),
    _cond("Finished", "True", "Succeeded", "Job finished successfully", "2026-01-02T03:30:00Z"),
    evictions=1,
)

STATES = [
    pytest.param(workload(), False, QueueState.QUEUED, None, id="new-no-condition"),
    pytest.param(PENDING, False, QueueState.QUEUED, QUOTA_MESSAGE, id="pending-quota"),
    pytest.param(ADMITTED, False, QueueState.ADMITTED, "The workload is admitted", id="admitted"),
    pytest.param(ADMITTED, True, QueueState.RUNNING, "The workload is admitted", id="running"),
    pytest.param(EVICTING, True, QueueState.PREEMPTED, PREEMPT_MESSAGE, id="preempted-stopping"),
    pytest.param(REQUEUED, False, QueueState.PREEMPTED, QUOTA_MESSAGE, id="preempted-waiting-again"),
    pytest.param(READMITTED, True, QueueState.RUNNING, "The workload is admitted", id="readmitted"),
    pytest.param(FINISHED, False, QueueState.FINISHED, "Job finished successfully", id="finished"),
]


@pytest.mark.parametrize(("obj", "running", "state", "message"), STATES)
def test_a_workloads_conditions_say_where_it_is_with_kueues_message(obj, running, state, message):
    wl = observe_workload(obj, running=running)
    assert queue_state(wl) == state
    assert wl.message == message
    assert wl.queue_name == "ftc-queue"


def test_queued_time_sums_every_wait_and_preemptions_are_counted():
    """Queued 2 min, admitted, running, preempted at 03:10, waiting again, readmitted at 03:15, finished: two waits
    (120 s + 300 s from the eviction) are summed; the count of preemptions comes from Kueue's schedulingStats."""
    seen: list[QueueStatus] = []
    prior = None
    for obj, running in [
        (workload(), False),
        (PENDING, False),
        (ADMITTED, False),
        (ADMITTED, True),
        (EVICTING, True),
        (REQUEUED, False),
        (READMITTED, True),
        (FINISHED, False),
    ]:
        prior = queue_status(prior, observe_workload(obj, running), "ftc-queue", suspended=False)
        assert prior is not None
        seen.append(prior)
    states = [q.state.value for q in seen]
    assert states == ["Queued", "Queued", "Admitted", "Running", "Preempted", "Preempted", "Running", "Finished"]
    assert [q.queued_seconds for q in seen] == [None, None, 120.0, 120.0, 120.0, 120.0, 420.0, 420.0]
    assert [q.waiting_since for q in seen] == [
        "2026-01-02T03:00:00Z",
        "2026-01-02T03:00:00Z",
        None,
        None,
        "2026-01-02T03:10:00Z",  # the wait after a preemption counts from the eviction
        "2026-01-02T03:10:00Z",
        None,
        None,
    ]
    assert [q.preemptions for q in seen] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert seen[-1].admitted_at == READMITTED_AT and seen[-1].workload == "job-bake-train-llama-1a2b3"


def test_queued_time_of_a_workload_first_seen_admitted_counts_from_its_creation():
    q = queue_status(None, observe_workload(ADMITTED), "ftc-queue", suspended=False)
    assert q is not None and q.queued_seconds == 120.0 and q.state == QueueState.ADMITTED


@pytest.mark.parametrize(
    ("prior", "suspended", "done", "state", "says"),
    [
        pytest.param(None, True, False, QueueState.QUEUED, "waiting for Kueue's Workload", id="created-no-workload-yet"),
        pytest.param(None, False, False, QueueState.ADMITTED, None, id="unsuspended-no-workload"),
        pytest.param(QueueStatus(state=QueueState.RUNNING, queued_seconds=5), False, True, QueueState.FINISHED, None, id="gone"),
    ],
)
def test_without_a_workload_the_job_says_what_it_can(prior, suspended, done, state, says):
    q = queue_status(prior, None, "ftc-queue", suspended=suspended, done=done)
    assert q is not None and q.state == state
    assert (says in (q.message or "")) if says else q.message is None


def test_workloads_are_matched_to_jobs_by_their_owners_uid():
    jobs = [{"metadata": {"name": "bake-train-llama", "uid": "uid-train"}}]
    pods = [
        {
            "metadata": {"name": "p", "ownerReferences": [{"kind": "Job", "uid": "uid-train", "name": "bake-train-llama"}]},
            "status": {"phase": "Running"},
        }
    ]
    observed = [ObservedJob(name="bake-train-llama", step="train", model="llama", state=JobState.ACTIVE)]
    stale = workload(owner="uid-of-a-deleted-namesake")
    assert attach_workloads(observed, jobs, pods, [stale])[0].workload is None
    got = attach_workloads(observed, jobs, pods, [ADMITTED])[0].workload
    assert got is not None and got.running and got.admitted


# --------------------------------------------------------------------------------------------- planning


def _queued_spec() -> dict:
    return spec(placement={"queueName": "ftc-queue"})


def _train(model: str, wl: dict | None, running: bool = False, suspended: bool = True, **kw) -> ObservedJob:
    observed = observe_workload(wl, running) if wl is not None else None
    return job("train", model, JobState.ACTIVE, suspended=suspended, workload=observed, **kw)


def _plan(observed, status=None):
    return plan(parse_spec(_queued_spec()), status, observed, NOW, owner=OWNER, config=OperatorConfig())


def _conds(p) -> dict[str, tuple[str, str, str]]:
    return {c.type: (c.status, c.reason, c.message) for c in p.status.conditions}


def test_models_waiting_for_quota_are_pending_with_kueues_message_and_the_reason_column_says_queued():
    p = _plan([PREP_OK, _train("llama", PENDING), _train("mixtral", ADMITTED, running=True, suspended=False)])
    models = {m.name: m for m in p.status.models}
    assert models["llama"].phase == ModelPhase.PENDING and models["llama"].queue is not None
    assert models["llama"].queue.state == QueueState.QUEUED and models["llama"].queue.message == QUOTA_MESSAGE
    assert models["llama"].message == f"Queued in Kueue queue ftc-queue: {QUOTA_MESSAGE}"
    assert models["mixtral"].phase == ModelPhase.TRAINING and models["mixtral"].queue.state == QueueState.RUNNING
    status, reason, message = _conds(p)["Trained"]
    assert (status, reason) == ("Unknown", "Queued")
    assert f"waiting in Kueue: llama: Queued ({QUOTA_MESSAGE})" in message
    assert p.status.phase == "Training" and not p.creates
    assert p.status.progress == "llama Queued · mixtral starting"  # the PROGRESS column


def test_a_preempted_train_job_is_preempted_not_failed_and_consumes_no_retry():
    running = _plan([PREP_OK, _train("llama", ADMITTED, True, False), _train("mixtral", ADMITTED, True, False)])
    assert _conds(running)["Trained"][1] == "JobRunning"
    p = _plan([PREP_OK, _train("llama", EVICTING, True, True), _train("mixtral", ADMITTED, True, False)], running.status)
    llama = next(m for m in p.status.models if m.name == "llama")
    assert llama.phase == ModelPhase.PENDING and llama.queue is not None
    assert llama.queue.state == QueueState.PREEMPTED and llama.queue.preemptions == 1
    assert "retry" not in (llama.message or "") and PREEMPT_MESSAGE in (llama.message or "")
    assert _conds(p)["Trained"][:2] == ("Unknown", "Preempted") and p.status.progress == "llama Preempted · mixtral starting"
    assert p.status.phase == "Training" and not p.creates and not p.deletes
    back = _plan([PREP_OK, _train("llama", READMITTED, True, False), _train("mixtral", ADMITTED, True, False)], p.status)
    llama = next(m for m in back.status.models if m.name == "llama")
    assert llama.phase == ModelPhase.TRAINING and llama.queue.state == QueueState.RUNNING
    assert llama.queue.queued_seconds == 120.0 + 300.0  # the first wait and the one after the eviction at 03:10
    assert _conds(back)["Trained"][1] == "JobRunning"


def test_a_trained_model_keeps_its_queue_record_once_its_job_is_gone():
    done = [
        job("train", m, JobState.SUCCEEDED, result=trained(m), workload=observe_workload(FINISHED)) for m in ("llama", "mixtral")
    ]
    p = _plan([PREP_OK, *done])
    queues = [m.queue for m in p.status.models]
    assert all(q is not None and q.state == QueueState.FINISHED and q.queued_seconds for q in queues)
    gone = _plan([PREP_OK], p.status)  # the Jobs and Workloads are gone: what the status recorded stays
    assert [m.queue for m in gone.status.models] == queues
    assert [m.phase for m in gone.status.models] == [ModelPhase.TRAINED, ModelPhase.TRAINED]


def test_a_suspended_prepare_job_says_queued_on_its_condition():
    p = _plan([job("prepare", state=JobState.ACTIVE, suspended=True, workload=observe_workload(PENDING))])
    status, reason, message = _conds(p)["Prepared"]
    assert (status, reason) == ("Unknown", "Queued") and QUOTA_MESSAGE in message
    assert _conds(p)["Ready"][:2] == ("True", "SpecValid")  # a Job Kueue holds is not stuck


def test_without_a_queue_nothing_about_kueue_appears():
    p = plan(
        parse_spec(spec()),
        None,
        [PREP_OK, job("train", "llama", JobState.ACTIVE), job("train", "mixtral", JobState.ACTIVE)],
        NOW,
        owner=OWNER,
        config=OperatorConfig(),
    )
    assert all(m.queue is None for m in p.status.models)
    assert _conds(p)["Trained"][1] == "JobRunning"


# --------------------------------------------------------------------------------------------- the watched view


def test_workloads_are_held_by_their_owner_job_and_enqueue_its_comparison():
    """A Workload names no comparison: the store finds it through the Job that owns it, which the Job informer holds."""
    from ftc_operator.cache import Cache, Informer, WorkloadStore

    def never(**_):
        raise AssertionError("no API call in this test")

    cache = Cache(jobs=[Informer("jobs", never, "", lambda key: None)], pods=[])
    train_job = {
        "metadata": {
            "name": "bake-train-llama",
            "namespace": "ns",
            "uid": "uid-train",
            "labels": {"ftc.dev/comparison": "bake"},
            "annotations": {"ftc.dev/comparison-name": "bake"},
        }
    }
    cache.jobs[0].store.replace([train_job])
    changed: list = []
    informer = Informer("workloads", never, "", changed.append, store=WorkloadStore(cache.comparison_of_owner))
    wl = {**PENDING, "metadata": {**PENDING["metadata"], "uid": "uid-wl"}}
    informer.store.apply("ADDED", wl)
    assert informer.store.keys() == [("ns", "bake")]
    assert informer.store.comparison(wl) == "bake"
    cache.watch_workloads([])  # no Kueue: nothing watched
    assert cache.owned_workloads("ns", ["uid-train"]) is None
    cache.workloads = [informer]
    assert cache.owned_workloads("ns", ["uid-train"]) is None  # not listed yet: the reconciler asks the API server
    informer.synced.set()
    assert cache.owned_workloads("ns", ["uid-train"]) == [wl]
    assert cache.owned_workloads("ns", ["uid-other"]) == []
    informer.store.apply("DELETED", wl)
    assert cache.owned_workloads("ns", ["uid-train"]) == []

    # a LIST (start, or a relist after the watch expired) enqueues the comparison of every Workload's owner Job
    class Listed:
        data = json.dumps({"metadata": {"resourceVersion": "7"}, "items": [wl]})

    listing = Informer("workloads", lambda **_: Listed(), "", changed.append, store=WorkloadStore(cache.comparison_of_owner))
    assert listing._list() == "7" and changed == [("ns", "bake")] and listing.synced.is_set()


@pytest.mark.parametrize(
    ("served", "version"),
    [
        pytest.param({}, None, id="no-kueue"),
        pytest.param({"v1beta1": ["workloads", "clusterqueues"]}, "v1beta1", id="old-kueue"),
        pytest.param({"v1beta1": ["workloads"], "v1beta2": ["workloads", "localqueues"]}, "v1beta2", id="v0.17"),
        pytest.param({"v1beta2": ["localqueues"]}, None, id="no-workloads-resource"),
    ],
)
def test_the_operator_finds_kueues_workload_api_by_discovery(served, version):
    from types import SimpleNamespace

    from ftc_operator.kube import Kube
    from kubernetes.client.rest import ApiException

    class Discovery:
        def get_api_resources(self, group, ver):
            assert group == "kueue.x-k8s.io"
            if ver not in served:
                raise ApiException(status=404)
            return SimpleNamespace(resources=[SimpleNamespace(name=n) for n in served[ver]])

    kube = Kube.__new__(Kube)
    kube.custom = Discovery()  # type: ignore[assignment]
    assert kube.workloads_version() == version
