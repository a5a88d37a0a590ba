"""Training on several nodes: placement.nodes > 1 renders the train step as a JobSet (one Indexed Job of one pod per
node, a torchrun rendezvous on the leader pod's DNS name, Kueue's labels on the JobSet, a failure policy that
restarts the group), the operator observes it like a Job, refuses it where JobSet is not served, records an
effective batch that differs, and the trainer reads its rendezvous from the env the rendering sets."""

from __future__ import annotations

import json
from typing import Any

import pytest
from ftc_api.spec import FineTuneComparisonSpec, TrainingSpec
from ftc_api.status import ModelPhase, Phase
from ftc_api.steps import EXIT_BAD_INPUT
from ftc_operator.comparison import parse_spec
from ftc_operator.config import OperatorConfig
from ftc_operator.fairness import batch_deviations, effective_batch
from ftc_operator.observe import JobState, ObservedJob, observe, observe_jobset
from ftc_operator.planning import plan
from ftc_operator.rendering import (
    JOBSET_NAME_MAX,
    jobset_name,
    leader_address,
    render_job,
    render_jobset,
)

from tests.test_operator_planning import NOW, OWNER, PREP_OK, job, spec, trained

pytestmark = pytest.mark.unit

CONFIG = OperatorConfig()


def two_nodes(**placement: Any) -> dict:
    """The planner tests' spec with llama on 2 nodes (mixtral on 1)."""
    doc = spec()
    doc["models"][0]["placement"] = {"nodes": 2, **placement}
    return doc


def parsed(doc: dict) -> FineTuneComparisonSpec:
    out = parse_spec(doc)
    assert isinstance(out, FineTuneComparisonSpec)
    return out


def rendered(**placement: Any) -> dict:
    s = parsed(two_nodes(**placement))
    return render_jobset(OWNER, s, CONFIG, s.models[0], scratch_gib=3.0)


def child(jobset: dict) -> dict:
    return jobset["spec"]["replicatedJobs"][0]["template"]


def pod(jobset: dict) -> dict:
    return child(jobset)["spec"]["template"]["spec"]


def env(jobset: dict) -> dict[str, dict]:
    return {e["name"]: e for e in pod(jobset)["containers"][0]["env"]}


# --------------------------------------------------------------------------------------------- rendering


def test_the_train_step_on_two_nodes_is_one_indexed_job_of_two_pods() -> None:
    js = rendered()
    name = jobset_name("bake", "llama")
    assert (js["apiVersion"], js["kind"], js["metadata"]["name"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet", name)
    assert js["metadata"]["ownerReferences"][0]["uid"] == OWNER.uid
    assert len(js["spec"]["replicatedJobs"]) == 1 and js["spec"]["replicatedJobs"][0]["replicas"] == 1
    spec_ = child(js)["spec"]
    assert (spec_["completionMode"], spec_["completions"], spec_["parallelism"], spec_["backoffLimit"]) == ("Indexed", 2, 2, 0)
    # Each pod is the train pod of one node: gpuCount GPUs (chart default 1), the model's input, the step's image.
    single = parsed(spec())
    one = render_job(OWNER, single, CONFIG, "train", single.models[0], scratch_gib=3.0)["spec"]["template"]["spec"]
    assert pod(js)["containers"][0]["resources"] == one["containers"][0]["resources"]
    assert pod(js)["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod(js)["volumes"] == one["volumes"] and pod(js)["containers"][0]["image"] == one["containers"][0]["image"]
    # One pod per node: required anti-affinity among this JobSet's pods on the hostname.
    rule = pod(js)["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert rule == {
        "labelSelector": {"matchLabels": {"jobset.sigs.k8s.io/jobset-name": name}},
        "topologyKey": "kubernetes.io/hostname",
    }
    # Labels: the informers select the JobSet and its pods; the planner finds it by step and model.
    for labels in (
        js["metadata"]["labels"],
        child(js)["metadata"]["labels"],
        child(js)["spec"]["template"]["metadata"]["labels"],
    ):
        assert labels["app.kubernetes.io/managed-by"] == "ftc-operator"
        assert (labels["ftc.dev/step"], labels["ftc.dev/model"]) == ("train", "llama")


def test_the_rendezvous_is_on_the_leader_pods_dns_name() -> None:
    js = rendered(gpuCount=4)
    name = js["metadata"]["name"]
    e = env(js)
    assert e["FTC_NODES"]["value"] == "2" and e["FTC_GPUS"]["value"] == "4"
    assert (
        e["FTC_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
        == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    assert e["FTC_MASTER_ADDR"]["value"] == f"{name}-node-0-0.{name}" == leader_address(name)
    assert e["FTC_MASTER_PORT"]["value"] == "29500"
    assert js["spec"]["network"] == {"enableDNSHostnames": True, "subdomain": name, "publishNotReadyAddresses": True}
    assert any(v["name"] == "dshm" for v in pod(js)["volumes"])  # 4 processes per pod share /dev/shm


def test_a_failed_pod_restarts_the_group_and_bad_input_fails_it() -> None:
    js = rendered()
    policy = js["spec"]["failurePolicy"]
    assert policy["maxRestarts"] == CONFIG.step("train").backoff_limit
    assert policy["restartStrategy"] == "BlockingRecreate"
    assert [(r["action"], r["onJobFailureReasons"]) for r in policy["rules"]] == [
        ("FailJobSet", ["PodFailurePolicy"]),
        ("FailJobSet", ["DeadlineExceeded"]),
    ]
    rules = child(js)["spec"]["podFailurePolicy"]["rules"]
    assert [r["action"] for r in rules] == ["FailJob"] and rules[0]["onExitCodes"]["values"] == [EXIT_BAD_INPUT]


def test_kueue_labels_go_on_the_jobset_only() -> None:
    js = rendered(queueName="team-a")
    assert js["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    inner = [child(js)["metadata"]["labels"], child(js)["spec"]["template"]["metadata"]["labels"]]
    assert all(not any(k.startswith("kueue.x-k8s.io/") for k in labels) for labels in inner)
    assert "suspend" not in child(js)["spec"]
    single = parsed(spec(placement={"queueName": "team-a"}))
    job = render_job(OWNER, single, CONFIG, "train", single.models[0])
    queue = {k: v for k, v in job["metadata"]["labels"].items() if k.startswith("kueue.x-k8s.io/")}
    assert {k: v for k, v in js["metadata"]["labels"].items() if k.startswith("kueue.x-k8s.io/")} == queue  # as a Job's
    if "suspend" in job["spec"]:  # Kueue admits a queued Job by unsuspending it: the JobSet likewise
        assert js["spec"]["suspend"] == job["spec"]["suspend"]


NAMES = [
    pytest.param("bake", "llama", "bake-train-llama", id="short"),
    pytest.param("7b-vs-8x7b", "llama", "ftc-7b-vs-8x7b-train-llama", id="starts-with-a-digit"),
    pytest.param("a" * 60, "llama", None, id="long"),
    pytest.param("bake", "Llama.2", None, id="not-a-dns-label"),
]


@pytest.mark.parametrize(("comparison", "model", "expected"), NAMES)
def test_jobset_names_fit_jobsets_pod_name_limit(comparison: str, model: str, expected: str | None) -> None:
    name = jobset_name(comparison, model)
    if expected:
        assert name == expected
    assert len(name) <= JOBSET_NAME_MAX and name[0].isalpha()
    assert len(f"{name}-node-0-63-abcde") <= 63  # JobSet's webhook: the longest pod name of 64 nodes
    assert jobset_name(comparison, model + "x") != name


# --------------------------------------------------------------------------------------------- planning


def test_without_jobset_a_multi_node_spec_is_refused_naming_what_to_install() -> None:
    p = plan(parsed(two_nodes()), None, [], NOW, owner=OWNER, config=CONFIG, jobset_available=False)
    assert p.status.phase == Phase.FAILED and not p.creates
    ready = next(c for c in p.status.conditions if c.type == "Ready")
    assert ready.reason == "InvalidSpec"
    assert "spec.models[0].placement.nodes" in ready.message and "JobSet" in ready.message
    assert "jobset/releases/download/v0.12.0/manifests.yaml" in ready.message and "nodes: 1" in ready.message


PLANS = [
    pytest.param(spec(), False, "Job", id="one-node-needs-no-jobset"),
    pytest.param(two_nodes(), True, "JobSet", id="two-nodes-with-jobset"),
    pytest.param(spec(placement={"nodes": 1}), False, "Job", id="nodes-1"),
]


@pytest.mark.parametrize(("doc", "available", "kind"), PLANS)
def test_the_train_step_is_a_jobset_only_on_several_nodes(doc: dict, available: bool, kind: str) -> None:
    p = plan(parsed(doc), None, [PREP_OK], NOW, owner=OWNER, config=CONFIG, jobset_available=available)
    assert p.status.phase == Phase.TRAINING
    creates = {c.model: c for c in p.creates}
    assert creates["llama"].job["kind"] == kind and creates["mixtral"].job["kind"] == "Job"
    assert creates["llama"].name == creates["llama"].job["metadata"]["name"]
    llama = next(m for m in p.status.models if m.name == "llama")
    assert llama.job_name == creates["llama"].name
    # The ConfigMap the pods mount is the one created with it.
    volumes = {
        v["name"]: v
        for v in (pod(creates["llama"].job) if kind == "JobSet" else creates["llama"].job["spec"]["template"]["spec"])["volumes"]
    }
    assert volumes["input"]["configMap"]["name"] == creates["llama"].configmap["metadata"]["name"]


def jobset_observed(state: JobState, result: str | None = None, **kw: Any) -> ObservedJob:
    return ObservedJob(
        name=jobset_name("bake", "llama"), step="train", model="llama", state=state, result=result, kind="JobSet", **kw
    )


def test_a_jobset_maps_to_the_models_train_state_like_a_job() -> None:
    doc = two_nodes()
    mixtral = job("train", "mixtral", result=trained("mixtral"))
    active = plan(parsed(doc), None, [PREP_OK, jobset_observed(JobState.ACTIVE, failed_pods=2, restarts=1), mixtral], NOW,
                  owner=OWNER, config=CONFIG)  # fmt: skip
    llama = next(m for m in active.status.models if m.name == "llama")
    assert (active.status.phase, llama.phase) == (Phase.TRAINING, ModelPhase.TRAINING) and not active.creates
    assert "2 failed pod(s)" in (llama.message or "")
    done = plan(parsed(doc), active.status, [PREP_OK, jobset_observed(JobState.SUCCEEDED, trained("llama")), mixtral], NOW,
                owner=OWNER, config=CONFIG)  # fmt: skip
    assert done.status.phase == Phase.EVALUATING
    assert next(m for m in done.status.models if m.name == "llama").phase == ModelPhase.TRAINED
    failed = jobset_observed(JobState.FAILED, trained("llama", ok=False), reason="FailedJobs", message="jobset failed")
    end = plan(parsed(doc), None, [PREP_OK, failed, mixtral], NOW, owner=OWNER, config=CONFIG)
    llama = next(m for m in end.status.models if m.name == "llama")
    assert llama.phase == ModelPhase.FAILED and "CUDA out of memory" in (llama.message or "")


def test_a_retry_deletes_the_failed_jobset() -> None:
    failed = jobset_observed(JobState.FAILED, trained("llama", ok=False))
    first = plan(
        parsed(two_nodes()), None, [PREP_OK, failed, job("train", "mixtral", JobState.FAILED)], NOW, owner=OWNER, config=CONFIG
    )
    assert first.status.phase == Phase.FAILED
    again = plan(parsed(two_nodes()), first.status, [PREP_OK, failed], NOW, owner=OWNER, config=CONFIG, retry="1")
    assert jobset_name("bake", "llama") in again.deletes


# --------------------------------------------------------------------------------------------- observing


def pod_obj(name: str, index: str, phase: str, attempt: int = 0, message: str | None = None, code: int = 0,
            progress: dict | None = None) -> dict:  # fmt: skip
    status: dict[str, Any] = {"phase": phase}
    if phase in ("Succeeded", "Failed"):
        status["containerStatuses"] = [{"state": {"terminated": {"exitCode": code, "reason": "Error" if code else "Completed",
                                                                 "message": message or ""}}}]  # fmt: skip
    annotations = {"batch.kubernetes.io/job-completion-index": index}
    if progress:
        annotations["ftc.dev/progress"] = json.dumps(progress)
    return {
        "metadata": {
            "name": name,
            "uid": f"uid-{name}",
            "creationTimestamp": f"2026-01-02T03:0{attempt}:0{index}Z",
            "labels": {"jobset.sigs.k8s.io/jobset-name": "bake-train-llama", "jobset.sigs.k8s.io/restart-attempt": str(attempt)},
            "annotations": annotations,
            "ownerReferences": [{"kind": "Job", "name": "bake-train-llama-node-0", "uid": f"job-{attempt}"}],
        },
        "status": status,
    }


def jobset_obj(conditions: list[dict] | None = None, restarts: int = 0, suspend: bool = False) -> dict:
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {
            "name": "bake-train-llama",
            "uid": "js-uid",
            "labels": {"ftc.dev/step": "train", "ftc.dev/model": "llama"},
            "ownerReferences": [{"kind": "FineTuneComparison", "uid": OWNER.uid, "controller": True}],
        },
        "spec": {"suspend": suspend},
        "status": {"restarts": restarts, "conditions": conditions or []},
    }


COMPLETED = [{"type": "Completed", "status": "True"}]
FAILED = [{"type": "Failed", "status": "True", "reason": "FailedJobs", "message": "jobset failed due to reaching max restarts"}]
LEADER_OK = pod_obj("l", "0", "Succeeded", 1, message='{"ok": true, "leader": 1}')
WORKER_OK = pod_obj("w", "1", "Succeeded", 1, message='{"ok": true, "worker": 1}')
KILLED = pod_obj("k", "1", "Failed", 0, message="killed", code=137)
BAD = pod_obj("b", "1", "Failed", 1, message='{"ok": false, "error": "bad"}', code=EXIT_BAD_INPUT)
STEP_3 = {"step": 3, "totalSteps": 12}

OBSERVED = [
    pytest.param(jobset_obj(COMPLETED, 1), [KILLED, WORKER_OK, LEADER_OK], JobState.SUCCEEDED, '{"ok": true, "leader": 1}', 1,
                 id="completed-takes-the-leaders-summary"),
    pytest.param(jobset_obj(FAILED, 2), [KILLED, BAD, pod_obj("l2", "0", "Failed", 1, "stopped", 1)], JobState.FAILED,
                 '{"ok": false, "error": "bad"}', 3, id="failed-takes-the-bad-input-pod"),
    pytest.param(jobset_obj(FAILED, 0), [KILLED], JobState.FAILED, "killed", 1, id="failed-takes-the-last-failure"),
    pytest.param(jobset_obj([], 1), [KILLED, pod_obj("w", "1", "Running", 1), pod_obj("l", "0", "Running", 1, progress=STEP_3)],
                 JobState.ACTIVE, "killed", 1, id="restarted-and-running"),
]  # fmt: skip


@pytest.mark.parametrize(("js", "pods", "state", "result", "failed"), OBSERVED)
def test_observing_a_jobset(js: dict, pods: list[dict], state: JobState, result: str, failed: int) -> None:
    o = observe_jobset(js, pods)
    assert (o.state, o.result, o.failed_pods, o.kind) == (state, result, failed, "JobSet")
    assert (o.step, o.model, o.restarts) == ("train", "llama", js["status"]["restarts"])
    if state == JobState.ACTIVE:
        assert o.progress is not None and o.progress.step == 3
        assert o.pods == 2  # the current attempt's pods; the killed one was the first attempt's
    if state == JobState.FAILED:
        assert o.reason == "FailedJobs"


def test_observe_sees_jobsets_the_comparison_owns_with_their_pods() -> None:
    mine, other = jobset_obj(COMPLETED), jobset_obj(COMPLETED)
    other["metadata"] = {**other["metadata"], "name": "x", "ownerReferences": [{"uid": "someone-else"}]}
    seen = observe([], [LEADER_OK, WORKER_OK], OWNER.uid, [mine, other])
    assert [(o.name, o.state, o.result) for o in seen] == [("bake-train-llama", JobState.SUCCEEDED, '{"ok": true, "leader": 1}')]
    assert observe_jobset(jobset_obj(suspend=True), []).suspended
    # Between two attempts (the old pods gone, the new not yet made) a restarting group is not "a Job with no pod".
    assert (observe_jobset(jobset_obj([], 1), []).pods, observe_jobset(jobset_obj([], 0), []).pods) == (1, 0)


# --------------------------------------------------------------------------------------------- fairness

BATCHES = [
    pytest.param(4, 2, 1, 1, 8, id="one-gpu"),
    pytest.param(4, 2, 2, 1, 8, id="two-gpus-split-the-accumulation"),
    pytest.param(4, 2, 1, 2, 8, id="two-nodes-split-the-accumulation"),
    pytest.param(4, 4, 2, 2, 16, id="two-gpus-on-two-nodes"),
    pytest.param(4, 2, 2, 2, 32, id="four-processes-cannot-split-2"),
    pytest.param(2, 3, 1, 2, 12, id="two-nodes-cannot-split-3"),
]


@pytest.mark.parametrize(("batch", "accumulation", "gpus", "nodes", "effective"), BATCHES)
def test_the_effective_batch(batch: int, accumulation: int, gpus: int, nodes: int, effective: int) -> None:
    training = TrainingSpec(per_device_batch_size=batch, gradient_accumulation_steps=accumulation)
    got, how = effective_batch(training, gpus, nodes)
    assert got == effective and f"{gpus} GPUs x {nodes} nodes" in how


DEVIATIONS = [
    pytest.param({"gradientAccumulationSteps": 2}, {"nodes": 2}, [], id="equal-batch-on-two-nodes"),
    pytest.param({"gradientAccumulationSteps": 3}, {"nodes": 2}, [("llama", "24 ")], id="two-nodes-cannot-split"),
    pytest.param({"gradientAccumulationSteps": 4}, {"nodes": 2, "gpuCount": 4}, [("llama", "128 ")], id="eight-processes"),
    pytest.param({"gradientAccumulationSteps": 8}, {"nodes": 2, "gpuCount": 4}, [], id="eight-divide-8"),
]


@pytest.mark.parametrize(("training", "placement", "expected"), DEVIATIONS)
def test_an_effective_batch_that_differs_is_a_deviation(training: dict, placement: dict, expected: list) -> None:
    doc = spec(training={"perDeviceBatchSize": 4, **training})
    doc["models"][0]["placement"] = placement
    s = parsed(doc)
    got = batch_deviations(s, CONFIG)
    assert [(d.model, d.value[: len(v)]) for d, (_, v) in zip(got, expected, strict=False)] == expected
    assert len(got) == len(expected)
    for d in got:
        assert d.field == "effectiveBatch" and d.shared == str(4 * training["gradientAccumulationSteps"])
    p = plan(s, None, [PREP_OK], NOW, owner=OWNER, config=CONFIG)
    recorded = [d for d in (p.status.fairness.deviations if p.status.fairness else []) if d.field == "effectiveBatch"]
    assert recorded == got


# --------------------------------------------------------------------------------------------- the trainer's side

RENDEZVOUS = [
    pytest.param({}, (1, 0, "c10d", "localhost:0"), id="one-node"),
    pytest.param({"FTC_NODES": "1", "FTC_NODE_RANK": "0"}, (1, 0, "c10d", "localhost:0"), id="nodes-1"),
    pytest.param({"FTC_NODES": "2", "FTC_NODE_RANK": "1", "FTC_MASTER_ADDR": "js-node-0-0.js", "FTC_MASTER_PORT": "29500"},
                 (2, 1, "static", "js-node-0-0.js:29500"), id="worker-of-two"),
    pytest.param({"FTC_NODES": "4", "FTC_NODE_RANK": "0", "FTC_MASTER_ADDR": "a"}, (4, 0, "static", "a:29500"),
                 id="default-port"),
]  # fmt: skip


@pytest.mark.parametrize(("env_", "expected"), RENDEZVOUS)
def test_the_rendezvous_from_the_env(env_: dict[str, str], expected: tuple) -> None:
    from ftc_trainer.parallel import rendezvous

    r = rendezvous(env_)
    assert (r.nodes, r.node_rank, r.backend, r.endpoint) == expected
    assert r.configs == ({"rank": expected[1]} if expected[2] == "static" else {})


BAD_ENV = [
    pytest.param(
        {"FTC_NODES": "2", "FTC_NODE_RANK": "2", "FTC_MASTER_ADDR": "a"}, "FTC_NODE_RANK 2 is not a node rank", id="rank"
    ),
    pytest.param({"FTC_NODES": "2", "FTC_NODE_RANK": "0"}, r"FTC_MASTER_ADDR \(the leader", id="no-leader"),
    pytest.param({"FTC_NODES": "two"}, "FTC_NODES must be an integer", id="nodes"),
    pytest.param({"FTC_NODES": "2", "FTC_MASTER_ADDR": "a"}, "FTC_NODE_RANK must be an integer", id="no-rank"),
]


@pytest.mark.parametrize(("env_", "message"), BAD_ENV)
def test_a_wrong_rendezvous_is_named(env_: dict[str, str], message: str) -> None:
    from ftc_trainer.parallel import rendezvous

    with pytest.raises(ValueError, match=message):
        rendezvous(env_)


def test_a_worker_nodes_pod_reports_its_lowest_rank() -> None:
    from ftc_trainer.launch import pick_outcome

    assert pick_outcome({}, None, {3: "r3", 2: "r2"}) == (0, "r2")  # node 1 of 2, two GPUs each: ranks 2 and 3
    assert pick_outcome({}, None, {}) == (0, None)


def test_the_operator_watches_jobsets_once_they_are_served() -> None:
    """JobSet installed after the operator: found at a resync, its informers start, models on several nodes go."""
    import asyncio
    from types import SimpleNamespace

    from ftc_operator import handlers

    served = [False]
    watched: list[Any] = []
    kube = SimpleNamespace(jobsets_served=lambda: served[0], custom=SimpleNamespace(list_cluster_custom_object=print))
    memo = SimpleNamespace(
        kube=kube,
        namespaces=None,
        queue=SimpleNamespace(add=lambda key: None),
        cache=SimpleNamespace(watch_jobsets=watched.extend),
        reconciler=SimpleNamespace(jobset_available=False),
    )
    asyncio.run(handlers.watch_jobsets(memo))  # type: ignore[arg-type]
    assert not memo.reconciler.jobset_available and not watched
    served[0] = True
    asyncio.run(handlers.watch_jobsets(memo))  # type: ignore[arg-type]
    assert memo.reconciler.jobset_available and [(i.kind, i.selector) for i in watched] == [
        ("jobsets", "app.kubernetes.io/managed-by=ftc-operator")
    ]
    asyncio.run(handlers.watch_jobsets(memo))  # type: ignore[arg-type]
    assert len(watched) == 1  # once
