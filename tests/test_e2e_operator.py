"""The operator end to end on the real control plane, with stubbed steps (fast, deterministic).

The chart is installed with `helm install` (CRD, RBAC, step ServiceAccount, config, the operator
Deployment from the locally built image), so a missing RBAC verb fails these tests; every pod runs in a
container on the real nodes, in a namespace that enforces the restricted Pod Security Standard. The stub
step (devcluster/steps/stub.py, mounted from a ConfigMap into the step images) writes canned results to the
termination message. tests/test_e2e_real.py runs the real trainer and evaluator.
"""

from __future__ import annotations

import base64
import json
import random
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from ftc_api.spec import FineTuneComparisonSpec
from ftc_operator.eval_settings import generation_key, scoring_key

from devcluster.harness import (
    Comparisons,
    Operator,
    apply_crd,
    normalized_status,
    secret_leaks,
    start_operator,
    stub_values,
    tiny_spec,
    wait_for,
)
from devcluster.kube.images import built_images
from devcluster.kube.typed import body, present
from tests.readme_table import assert_readme_figure

pytestmark = pytest.mark.cluster

CANARY = "canary-7c1e0f-DO-NOT-LEAK"
# The stub scores a model 5 + 4 * unit(sha256(its name)) on the judge, n=10, p=0.01 (devcluster/steps/stub.py):
# tiny-mixtral 8.22 beats tiny-llama 7.05 and, with b left out, a 8.17 beats c 5.73. These must win, never the other.
STUB_WINNER = "tiny-mixtral"
MIN_KILLS = 10  # operator pods deleted while the chaos comparison runs


@pytest.fixture(scope="module")
def crd(control_plane):
    apply_crd(control_plane.kubectl)


@pytest.fixture
def api(control_plane):
    return control_plane.api_client()


@pytest.fixture
def ftc(api) -> Comparisons:
    return Comparisons(api)


@pytest.fixture
def judge_secret(api, namespace):
    from kubernetes import client

    key = base64.b64encode(CANARY.encode()).decode()
    client.CoreV1Api(api).create_namespaced_secret(
        namespace, body(client.V1Secret, {"metadata": {"name": "ftc-judge"}, "data": {"api-key": key}})
    )


@pytest.fixture
def operator(control_plane, namespace, crd, tmp_path, request) -> Operator:
    return start_operator(control_plane, namespace, stub_values(**getattr(request, "param", {})), tmp_path)


@dataclass
class FaultRun:
    """The fault tests' shared operator (stub steps of FAULT_SECONDS each, live progress) in their own namespace,
    and the undisturbed reference run "calm" each faulted run must end exactly like (run once for all of them)."""

    namespace: str
    operator: Operator
    calm: dict[str, Any]


# Long enough steps for three control-plane restarts within one train step and ten operator kills in one run
# (a replacement operator pod is Ready in ~4 s: the chart's startupProbe polls each second).
FAULT_SECONDS = 25


@pytest.fixture(scope="module")
def fault_run(control_plane, s3_server, crd, tmp_path_factory) -> Iterator[FaultRun]:
    """A namespace like the `namespace` fixture's, the judge's Secret, the operator, and the "calm" run."""
    from kubernetes import client

    from devcluster.kube.control_plane import wait_for_service_account

    api = control_plane.api_client()
    core = client.CoreV1Api(api)
    name = f"faults-{uuid.uuid4().hex[:6]}"
    labels = {"ftc.example.com/test": "true", "pod-security.kubernetes.io/enforce": "restricted"}
    core.create_namespace(body(client.V1Namespace, {"metadata": {"name": name, "labels": labels}}))
    try:
        s3_server.create_secret(api, name)
        wait_for_service_account(api, name)
        key = base64.b64encode(CANARY.encode()).decode()
        core.create_namespaced_secret(name, body(client.V1Secret, {"metadata": {"name": "ftc-judge"}, "data": {"api-key": key}}))
        t0 = time.monotonic()
        operator = start_operator(
            control_plane, name, stub_values(seconds=FAULT_SECONDS, progress=True), tmp_path_factory.mktemp("faults")
        )
        t1 = time.monotonic()
        ftc = Comparisons(api)
        ftc.create("calm", name, tiny_spec(s3_server.cluster_endpoint_url))
        calm = ftc.wait_phase("calm", name, ("Succeeded", "Failed"), timeout=300)
        assert calm["phase"] == "Succeeded", calm
        print(f"fault tests' operator Available in {t1 - t0:.1f}s, calm run {time.monotonic() - t1:.1f}s")
        yield FaultRun(name, operator, calm)
    finally:
        core.delete_namespace(name)


def metric_values(text: str) -> dict[str, float]:
    """Prometheus text as {name{labels}: value}, labels sorted."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            if "{" in key:
                name, labels = key[:-1].split("{", 1)
                key = name + "{" + ",".join(sorted(labels.split(","))) + "}"
            out[key] = float(value)
    return out


def one_job_per_step(ftc, namespace, name, models):
    """prepare, a train and a generate Job per model, one score Job; generate and score named with their settings
    keys (of the comparison's spec as the API server holds it)."""
    parsed = FineTuneComparisonSpec.model_validate(ftc.get(name, namespace)["spec"])
    gen, score = generation_key(parsed), scoring_key(parsed)
    jobs = sorted(j.metadata.name for j in ftc.jobs(namespace, name))
    expected = [f"{name}-prepare", f"{name}-score-{score}", *(f"{name}-{s}-{m}" for m in models for s in ("train", "generate"))]
    assert jobs == sorted(n if "-generate-" not in n else f"{n}-{gen}" for n in expected)


def test_stubbed_comparison_succeeds_as_the_charts_service_account(ftc, operator, namespace, s3_server, judge_secret):
    t0 = time.monotonic()
    ftc.create("tiny", namespace, tiny_spec(s3_server.cluster_endpoint_url))
    st = ftc.wait_phase("tiny", namespace, ("Succeeded", "Failed"), timeout=180)
    assert st["phase"] == "Succeeded", st
    assert st["winner"] == STUB_WINNER
    assert st["modelsDone"] == "2/2"
    assert st["reportUri"].endswith("/report/index.html")
    assert st["fairness"]["hash"] and st["fairness"]["datasetSha256"]
    assert [d["field"] for d in st["fairness"]["deviations"]] == ["method", "method"]
    # The record names the images the pods ran: containerd's imageID of an imported image is its config digest,
    # the Id the local build gave it (devcluster/scripts/build-images.sh).
    built = built_images()
    software = st["fairness"]["software"]
    assert software["trainerImageIds"] == [built[software["trainerImage"]]["id"]], software
    assert software["evaluatorImageIds"] == [built[software["evaluatorImage"]]["id"]], software
    for m in st["models"]:
        assert m["phase"] == "Trained"
        assert m["scores"][0]["ciLow"] < m["scores"][0]["mean"] < m["scores"][0]["ciHigh"]
        assert m["train"]["finalTrainLoss"] > 0 and m["train"]["overfitting"]["verdict"] in ("ok", "overfitting", "unknown")
        assert m["tokenCounts"]["train"] > 0
    conds = {c["type"]: c for c in st["conditions"]}
    assert {t: conds[t]["status"] for t in conds} == {
        "Ready": "True",
        "Prepared": "True",
        "Trained": "True",
        "Evaluated": "True",
        "Succeeded": "True",
    }
    assert all(c["observedGeneration"] == 1 for c in st["conditions"])
    one_job_per_step(ftc, namespace, "tiny", ["tiny-llama", "tiny-mixtral"])
    generated, scored = ftc.evaluation_pods(namespace, "tiny")  # GPUs held only while answers are generated
    assert len(generated) == 2 and all(g.gpus == 1 and g.finished for g in generated) and scored[0].gpus == 0
    assert all(g.finished and scored[0].started and g.finished <= scored[0].started for g in generated)
    reasons = ftc.event_reasons(namespace, "tiny", lambda r: "PhaseSucceeded" in r)
    assert reasons.count("JobCreated") == 6
    metrics = operator.metrics()
    assert 'ftc_jobs_created_total{step="train"} 2.0' in metrics
    assert "ftc_reconcile_duration_seconds_count" in metrics
    # Reconciles read from the watches: Jobs and pods are listed by the informers (once, or again after a
    # watch expired), never per reconcile, and the comparison is read only when the watch has not shown it.
    sample = metric_values(metrics)
    reconciles = sample["ftc_reconcile_duration_seconds_count"]
    assert reconciles >= 5, metrics
    assert sample.get('ftc_api_requests_total{resource="jobs",verb="list"}', 0) <= 2, metrics
    assert sample.get('ftc_api_requests_total{resource="pods",verb="list"}', 0) <= 2, metrics
    assert sample.get('ftc_api_requests_total{resource="finetunecomparisons",verb="get"}', 0) <= 2, metrics
    print(f"stubbed comparison succeeded in {time.monotonic() - t0:.1f}s")

    # deleting the comparison deletes its Jobs and ConfigMaps (ownerReferences), even with the operator down
    operator.scale(0)
    ftc.delete("tiny", namespace)
    wait_for(lambda: not ftc.jobs(namespace) and not ftc.configmaps(namespace), 90, "garbage collection of Jobs and ConfigMaps")


@pytest.mark.parametrize("operator", [dict(fail=("b",))], indirect=True, ids=["stub"])
def test_failed_model_is_left_out_and_reported(ftc, operator, namespace, s3_server, judge_secret):
    ftc.create("three", namespace, tiny_spec(s3_server.cluster_endpoint_url, models=("a", "b", "c")))
    st = ftc.wait_phase("three", namespace, ("Succeeded", "Failed"), timeout=180)
    assert st["phase"] == "Succeeded"
    models = {m["name"]: m for m in st["models"]}
    assert models["b"]["phase"] == "Failed"
    assert "told to fail" in models["b"]["message"]
    assert st["modelsDone"] == "2/3"
    assert "left out: b" in next(c["message"] for c in st["conditions"] if c["type"] == "Trained")
    assert st["winner"] == "a"


@pytest.mark.parametrize("operator", [dict(oom=("b",))], indirect=True, ids=["stub"])
def test_a_train_pod_over_its_memory_limit_is_reported_oom_killed(ftc, operator, namespace, s3_server, judge_secret):
    spec = tiny_spec(s3_server.cluster_endpoint_url, models=("a", "b", "c"))
    spec["models"][1]["placement"] = {"resources": {"limits": {"memory": "256Mi"}}}
    ftc.create("hog", namespace, spec)
    st = ftc.wait_phase("hog", namespace, ("Succeeded", "Failed"), timeout=240)
    b = next(m for m in st["models"] if m["name"] == "b")
    assert b["phase"] == "Failed"
    assert "OOMKilled (exit code 137, memory limit 256Mi)" in b["message"], b["message"]
    assert "OOMKilled" in next(c["message"] for c in st["conditions"] if c["type"] == "Trained")


@pytest.mark.parametrize("operator", [dict(fail=("a", "b"))], indirect=True, ids=["stub"])
def test_too_few_models_fails_with_a_clear_condition(ftc, operator, namespace, s3_server, judge_secret):
    ftc.create("two", namespace, tiny_spec(s3_server.cluster_endpoint_url, models=("a", "b")))
    st = ftc.wait_phase("two", namespace, ("Succeeded", "Failed"), timeout=180)
    assert st["phase"] == "Failed"
    trained = next(c for c in st["conditions"] if c["type"] == "Trained")
    assert (trained["status"], trained["reason"]) == ("False", "TooFewModelsTrained")
    assert not [j for j in ftc.jobs(namespace, "two") if "-generate-" in j.metadata.name or "-score-" in j.metadata.name]


def test_bad_spec_is_refused_at_apply(control_plane, crd, namespace, tmp_path):
    from devcluster.harness import comparison

    spec = tiny_spec("http://127.0.0.1:1")
    spec["dataset"]["split"] = {"evalFraction": 0.6, "testFraction": 0.5}
    spec["models"][1]["name"] = spec["models"][0]["name"]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(comparison("bad", namespace, spec)))
    with pytest.raises(RuntimeError, match=r"spec\.dataset\.split: .*evalFraction \+ testFraction must be below 1") as err:
        control_plane.kubectl("apply", "-f", str(path))
    assert "model names must be unique" in str(err.value)
    assert control_plane.kubectl("get", "ftc", "-n", namespace, "-o", "name") == ""


def test_missing_secret_is_reported(ftc, operator, namespace, s3_server, judge_secret):
    spec = tiny_spec(s3_server.cluster_endpoint_url)
    spec["storage"]["credentialsSecretRef"] = {"name": "no-such-secret"}
    ftc.create("nosecret", namespace, spec)

    def ready_false():
        conds = {c["type"]: c for c in ftc.status("nosecret", namespace).get("conditions", [])}
        ready = conds.get("Ready", {})
        return ready if ready.get("reason") == "SecretNotFound" else None

    ready = wait_for(ready_false, 60, "Ready=False SecretNotFound")
    assert ready["status"] == "False" and "no-such-secret" in ready["message"]
    ftc.event_reasons(namespace, "nosecret", lambda r: "SecretNotFound" in r)


@pytest.mark.parametrize("operator", [dict(progress=True, seconds=3)], indirect=True, ids=["stub"])
def test_no_secret_value_leaks_and_progress_is_live(ftc, api, operator, namespace, s3_server, judge_secret):

    ftc.create("canary", namespace, tiny_spec(s3_server.cluster_endpoint_url))
    seen: list[dict[str, Any]] = []  # status.models[].progress

    def progress_seen():
        st = ftc.status("canary", namespace)
        seen.extend(m["progress"] for m in st.get("models", []) if m.get("progress"))
        return seen

    wait_for(progress_seen, 120, "live progress in status.models[].progress")
    assert seen[0]["totalSteps"] == 3
    st = ftc.wait_phase("canary", namespace, ("Succeeded", "Failed"), timeout=180)
    assert st["phase"] == "Succeeded"
    secrets = [CANARY, s3_server.secret_access_key, s3_server.access_key_id]
    assert not secret_leaks(api, namespace, st, secrets, operator_log=operator.log())


def test_chaos_delete_the_operator_pod_at_random_points(ftc, fault_run, s3_server):
    """Delete the operator's pod (grace period 0) ≥10 times at random moments while the comparison runs; the
    Deployment replaces it each time, and the comparison ends like the undisturbed one ("calm", of fault_run)."""
    namespace, operator, calm = fault_run.namespace, fault_run.operator, fault_run.calm
    spec = tiny_spec(s3_server.cluster_endpoint_url)
    operator.wait_healthy()
    rng = random.Random(7)
    ftc.create("chaos", namespace, spec)
    phases_at_kill = []
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        time.sleep(rng.uniform(0.05, 1.5))
        operator.kill()
        phase = ftc.status("chaos", namespace).get("phase") or "Pending"
        phases_at_kill.append(phase)
        if phase in ("Succeeded", "Failed"):
            break
        operator.wait_healthy()  # the replacement pod passes its readiness probe
    chaos = ftc.wait_phase("chaos", namespace, ("Succeeded", "Failed"), timeout=240)
    mid_run = [p for p in phases_at_kill if p not in ("Succeeded", "Failed")]
    assert len(mid_run) >= MIN_KILLS, f"only {len(mid_run)} kills while the comparison ran: {phases_at_kill}"
    assert_readme_figure("the operator's pod deleted at random moments", f"≥ {MIN_KILLS} kills per run")
    assert len(set(mid_run)) >= 2, f"every kill landed in one phase: {phases_at_kill}"
    one_job_per_step(ftc, namespace, "chaos", ["tiny-llama", "tiny-mixtral"])
    a, b = normalized_status(calm), normalized_status(chaos)
    assert json.dumps(a, sort_keys=True).replace("calm", "X") == json.dumps(b, sort_keys=True).replace("chaos", "X")
    print(f"chaos: {operator.kills} operator pods deleted ({len(mid_run)} mid-run, in {sorted(set(mid_run))})")


def test_a_repeated_event_is_one_event_whose_count_goes_up(ftc, api, crd, namespace, s3_server):
    import datetime as dt

    from ftc_operator.kube import Kube

    obj = ftc.create("noisy", namespace, tiny_spec(s3_server.cluster_endpoint_url))
    kube = Kube(api)
    for _ in range(3):
        kube.event(obj, "Warning", "SecretNotFound", 'secret "judge" not found', dt.datetime.now(dt.UTC))
    kube.event(obj, "Normal", "JobCreated", "created Job noisy-prepare", dt.datetime.now(dt.UTC))

    events = ftc.events(namespace, "noisy")
    assert sorted((e.reason, e.count) for e in events) == [("JobCreated", 1), ("SecretNotFound", 3)]


def test_a_name_held_by_another_object_blocks_until_it_goes(ftc, api, operator, namespace, s3_server, judge_secret):
    from kubernetes import client

    core = client.CoreV1Api(api)
    # A stale input ConfigMap under the name the new comparison's prepare step needs, owned by nobody.
    core.create_namespaced_config_map(
        namespace, body(client.V1ConfigMap, {"metadata": {"name": "held-prepare"}, "data": {"input.json": "{}"}})
    )
    ftc.create("held", namespace, tiny_spec(s3_server.cluster_endpoint_url))

    def blocked():
        conds = {c["type"]: c for c in ftc.status("held", namespace).get("conditions", [])}
        return conds.get("Prepared", {}).get("reason") == "NameTaken" and conds["Prepared"]

    prepared = wait_for(blocked, 60, "Prepared=Unknown NameTaken")
    assert f"ConfigMap {namespace}/held-prepare exists and has no controller owner" in prepared["message"]
    assert not ftc.jobs(namespace, "held")  # no Job ran on an input that is not this comparison's
    ftc.event_reasons(namespace, "held", lambda r: "NameTaken" in r)
    core.delete_namespaced_config_map("held-prepare", namespace)
    st = ftc.wait_phase("held", namespace, ("Succeeded", "Failed"), timeout=180)
    assert st["phase"] == "Succeeded", st
    owner = present(present(core.read_namespaced_config_map("held-prepare", namespace).metadata).owner_references)[0]
    assert owner.name == "held" and owner.uid == ftc.get("held", namespace)["metadata"]["uid"]


def test_two_replicas_one_reconciles_and_the_other_takes_over_when_the_leader_dies(
    control_plane, namespace, crd, tmp_path, ftc, api, s3_server, judge_secret
):
    from kubernetes import client

    values = stub_values(seconds=10)
    values["replicas"] = 2
    print(f"{time.strftime('%T')} installing two replicas")
    operator = start_operator(control_plane, namespace, values, tmp_path)
    coordination, core = client.CoordinationV1Api(api), client.CoreV1Api(api)

    def holder():
        lease = coordination.read_namespaced_lease(f"{operator.release}-operator", namespace)
        return present(lease.spec).holder_identity

    try:
        leader = wait_for(holder, 60, "a replica holding the Lease")
    except TimeoutError as e:
        raise AssertionError(f"{e}\n{operator.log()[-6000:]}") from None
    assert leader in [p.metadata.name for p in operator.pods()]
    print(f"{time.strftime('%T')} leader {leader}")
    spec = tiny_spec(s3_server.cluster_endpoint_url)
    ftc.create("calm2", namespace, spec)
    calm = ftc.wait_phase("calm2", namespace, ("Succeeded", "Failed"), timeout=240)
    follower_log = operator._pod_log(next(p.metadata.name for p in operator.pods() if p.metadata.name != leader))
    assert "calm2" not in follower_log and "campaigns for the Lease" in follower_log  # the follower did nothing

    print(f"{time.strftime('%T')} calm2 {calm['phase']}")
    ftc.create("failover", namespace, spec)
    wait_for(lambda: ftc.status("failover", namespace).get("phase") == "Training", 120, "failover Training")
    t0 = time.monotonic()
    core.delete_namespaced_pod(leader, namespace, grace_period_seconds=0)
    new = wait_for(lambda: (h := holder()) != leader and h, 60, "another replica holding the Lease")
    took_over = time.monotonic() - t0
    print(f"{time.strftime('%T')} {new} holds the Lease")
    st = ftc.wait_phase("failover", namespace, ("Succeeded", "Failed"), timeout=240)
    print(f"{time.strftime('%T')} failover {st['phase']}")
    assert new != leader and took_over < 30, (new, took_over)
    one_job_per_step(ftc, namespace, "failover", ["tiny-llama", "tiny-mixtral"])
    a, b = normalized_status(calm), normalized_status(st)
    assert json.dumps(a, sort_keys=True).replace("calm2", "X") == json.dumps(b, sort_keys=True).replace("failover", "X")
    print(f"leader {leader} deleted; {new} took over in {took_over:.1f}s")


def test_a_train_pods_token_may_change_only_its_own_progress_annotation(api, operator, namespace):
    """The step ServiceAccount may patch pods (RBAC cannot say which); the chart's ValidatingAdmissionPolicy
    lets a token bound to a pod change that pod's `ftc.dev/progress` annotation and nothing else."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    core = client.CoreV1Api(api)
    restricted = {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }

    def pod(name: str) -> Any:  # never scheduled (no node has the label): only the API object matters
        return core.create_namespaced_pod(
            namespace,
            body(
                client.V1Pod,
                {
                    "metadata": {"name": name, "labels": {"app": name}, "annotations": {"keep": "1"}},
                    "spec": {
                        "serviceAccountName": "ftc-step",
                        "automountServiceAccountToken": False,
                        "nodeSelector": {"ftc.dev/no-such-node": "x"},
                        "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10", "securityContext": restricted}],
                    },
                },
            ),
        )

    own = pod("own")
    pod("other")
    bound = {"kind": "Pod", "apiVersion": "v1", "name": own.metadata.name, "uid": own.metadata.uid}
    request = body(
        client.AuthenticationV1TokenRequest, {"spec": {"audiences": [], "expirationSeconds": 600, "boundObjectRef": bound}}
    )
    token = present(core.create_namespaced_service_account_token("ftc-step", namespace, request).status).token
    conf = client.Configuration()
    conf.host, conf.ssl_ca_cert = api.configuration.host, api.configuration.ssl_ca_cert
    conf.api_key = {"authorization": f"Bearer {token}"}
    as_step = client.CoreV1Api(client.ApiClient(conf))

    as_step.patch_namespaced_pod("own", namespace, {"metadata": {"annotations": {"ftc.dev/progress": '{"step": 1}'}}})
    own_meta = present(core.read_namespaced_pod("own", namespace).metadata)
    assert present(own_meta.annotations)["ftc.dev/progress"] == '{"step": 1}'
    refused: list[tuple[str, dict[str, Any], str]] = [  # (pod, patch, why it is refused)
        ("own", {"metadata": {"labels": {"app": "relabelled"}}}, "only its ftc.dev/progress"),
        ("own", {"metadata": {"annotations": {"other": "x"}}}, "only its ftc.dev/progress"),
        ("own", {"metadata": {"annotations": {"keep": None}}}, "only its ftc.dev/progress"),
        ("own", {"spec": {"containers": [{"name": "c", "image": "registry.k8s.io/pause:evil"}]}}, "only its ftc.dev/progress"),
        ("other", {"metadata": {"annotations": {"ftc.dev/progress": "{}"}}}, "only the pod it is bound to"),
    ]
    for name, patch, why in refused:
        with pytest.raises(ApiException) as err:
            as_step.patch_namespaced_pod(name, namespace, patch)
        assert err.value.status in (403, 422) and why in str(err.value.body), (patch, err.value.body)
    after = core.read_namespaced_pod("own", namespace)
    labels, containers = present(after.metadata).labels, present(after.spec).containers
    assert labels == {"app": "own"} and containers[0].image == "registry.k8s.io/pause:3.10"
    assert "ftc.dev/progress" not in (present(core.read_namespaced_pod("other", namespace).metadata).annotations or {})


def _train_pods(core, namespace: str, name: str) -> list:
    return core.list_namespaced_pod(namespace, label_selector=f"ftc.dev/comparison={name},ftc.dev/step=train").items


def _running_train_pods(core, namespace: str, name: str):
    def check() -> list:
        pods = _train_pods(core, namespace, name)
        return pods if len(pods) == 2 and all(p.status.phase == "Running" for p in pods) else []

    return wait_for(check, 120, f"{name}'s two train pods running", interval=0.2)


def test_control_plane_crashes_and_a_lost_node_mid_run_lose_nothing(control_plane, ftc, api, fault_run, s3_server):
    """Each run ends exactly like the undisturbed one ("calm", of fault_run), with one Job per step:
    - "storm": etcd killed while it prepares; the API server, then the GPU node's containerd, then its kubelet
      killed while its train pods run (each started again, as a supervisor would): the train pods live on;
    - "lost": the GPU node's machine dies while its train pods run (kubelet, containerd and containers at
      once). Once the node is NotReady an admin marks it out of service (the documented step for a node
      that is gone: `kubectl taint nodes NODE node.kubernetes.io/out-of-service=nodeshutdown:NoExecute`);
      the lost pods are force-deleted, counted as disruptions (not failures), and the Jobs' replacement
      pods run when the node is back."""
    from kubernetes import client

    core = client.CoreV1Api(api)
    gpu = control_plane.gpu_node
    namespace, calm = fault_run.namespace, fault_run.calm
    spec = tiny_spec(s3_server.cluster_endpoint_url)
    fault_run.operator.wait_healthy()

    ftc.create("storm", namespace, spec)
    out: dict[str, float] = {}
    wait_for(lambda: ftc.status("storm", namespace).get("phase") == "Preparing", 60, "storm Preparing", interval=0.2)
    out["etcd"] = control_plane.restart("etcd")
    running = _running_train_pods(core, namespace, "storm")
    assert {p.spec.node_name for p in running} == {gpu}
    for component in ("kube-apiserver", f"containerd-{gpu}", f"kubelet-{gpu}"):
        out[component] = control_plane.restart(component)
    storm = ftc.wait_phase("storm", namespace, ("Succeeded", "Failed"), timeout=300)
    print(f"restarted (seconds out): {json.dumps({k: round(v, 1) for k, v in out.items()})}")
    assert storm["phase"] == "Succeeded", storm
    finished = _train_pods(core, namespace, "storm")
    assert sorted(p.metadata.uid for p in finished) == sorted(p.metadata.uid for p in running)  # the same pods
    assert all(p.status.container_statuses[0].restart_count == 0 for p in finished)

    ftc.create("lost", namespace, spec)
    lost_pods = _running_train_pods(core, namespace, "lost")
    t0 = time.monotonic()
    control_plane.power_off(gpu)
    try:

        def not_ready() -> bool:
            conds = present(core.read_node(gpu).status).conditions or []
            return any(c.type == "Ready" and c.status != "True" for c in conds)

        wait_for(not_ready, 120, f"{gpu} NotReady", interval=0.5)
        not_ready_after = time.monotonic() - t0
        taint = {"key": "node.kubernetes.io/out-of-service", "value": "nodeshutdown", "effect": "NoExecute"}
        node = core.read_node(gpu)
        core.patch_node(gpu, {"spec": {"taints": [*(t.to_dict() for t in present(node.spec).taints or []), taint]}})
        gone = {p.metadata.uid for p in lost_pods}
        wait_for(
            lambda: not gone & {p.metadata.uid for p in _train_pods(core, namespace, "lost")}, 180, "the lost pods force-deleted"
        )
        assert ftc.status("lost", namespace)["phase"] == "Training"  # not failed: the Jobs replace the pods
    finally:
        node = core.read_node(gpu)
        kept = [t.to_dict() for t in present(node.spec).taints or [] if t.key != "node.kubernetes.io/out-of-service"]
        core.patch_node(gpu, {"spec": {"taints": kept}})
        control_plane.power_on(gpu)
    lost = ftc.wait_phase("lost", namespace, ("Succeeded", "Failed"), timeout=300)
    print(f"lost node: NotReady after {not_ready_after:.0f}s, back after {time.monotonic() - t0:.0f}s")
    assert lost["phase"] == "Succeeded", lost
    replaced = _train_pods(core, namespace, "lost")
    assert not gone & {p.metadata.uid for p in replaced}
    for name, st in (("storm", storm), ("lost", lost)):
        one_job_per_step(ftc, namespace, name, ["tiny-llama", "tiny-mixtral"])
        a, b = normalized_status(calm), normalized_status(st)
        assert json.dumps(a, sort_keys=True).replace("calm", "X") == json.dumps(b, sort_keys=True).replace(name, "X")
    assert_readme_figure("etcd killed while a comparison prepares", f"{len(out)} crashes per run")
    assert_readme_figure("the GPU node's machine dies", f"{len(gone)} pods lost")


def _condition(st: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in st["conditions"] if c["type"] == type_)


def _wait_generation(ftc, namespace: str, name: str, generation: int, phases: tuple[str, ...], timeout: float) -> dict[str, Any]:
    """The status once it reflects spec generation `generation` and its phase is one of `phases`."""

    def check():
        st = ftc.status(name, namespace)
        return st if st.get("observedGeneration") == generation and st.get("phase") in phases else None

    try:
        return wait_for(check, timeout, f"{namespace}/{name} at generation {generation} in {phases}", interval=0.5)
    except TimeoutError as e:
        raise TimeoutError(f"{e}; last status: {json.dumps(ftc.status(name, namespace))[:3000]}") from None


def test_a_wrong_judge_is_fixed_in_the_spec_and_an_inconclusive_run_is_retried_without_retraining(
    control_plane, ftc, operator, namespace, s3_server, judge_secret
):
    """The user names a judge model the endpoint does not serve: the comparison fails in evaluation, saying so. They
    fix `spec.evaluation.judge.model` in place (training's fields are refused, naming the field): only the scoring
    reruns, and the fairness record keeps training's hash and lists the change. Then the judge is down for every
    item (the stub's "judge-down" key): the evaluation is inconclusive; once it is back, `ftc.dev/retry` scores it.
    Last, the judge refuses the key (401): scoring fails as bad input and the comparison ends Failed; the user fixes
    the Secret and runs `kubectl annotate ftc NAME ftc.dev/retry=...`: only that scoring reruns.
    No prepare, train or generate Job runs twice. (The 401 stage was its own test, with a comparison of its own.)"""
    from kubernetes import client

    from devcluster.steps.stub import DOWN_KEY, REJECTED_KEY, UNKNOWN_JUDGE_MODEL

    core = client.CoreV1Api(ftc.core.api_client)
    kubectl = control_plane.kubectl

    def patch(name: str, spec_patch: dict[str, Any]) -> None:  # as a user would: kubectl patch --type=merge
        kubectl("patch", "ftc", name, "-n", namespace, "--type=merge", "-p", json.dumps({"spec": spec_patch}))

    t0 = time.monotonic()
    spec = tiny_spec(s3_server.cluster_endpoint_url)
    spec["evaluation"]["judge"]["model"] = UNKNOWN_JUDGE_MODEL
    ftc.create("fix", namespace, spec)
    failed = _wait_generation(ftc, namespace, "fix", 1, ("Succeeded", "Failed"), 180)
    assert failed["phase"] == "Failed", failed
    evaluated = _condition(failed, "Evaluated")
    assert evaluated["status"] == "False" and f"evaluation.judge.model {UNKNOWN_JUDGE_MODEL!r}" in evaluated["message"]

    def jobs() -> dict[str, tuple[str, str]]:  # name -> (step, uid)
        return {j.metadata.name: (j.metadata.labels["ftc.dev/step"], j.metadata.uid) for j in ftc.jobs(namespace, "fix")}

    first = jobs()
    # What the artefacts depend on is frozen, and the API server says which field and why.
    with pytest.raises(RuntimeError, match=r"spec\.training is frozen once the data is prepared: the models are trained"):
        patch("fix", {"training": {"epochs": 3}})
    assert "evaluationChanges" in kubectl("explain", "ftc.status.fairness")

    judge = {"baseUrl": spec["evaluation"]["judge"]["baseUrl"], "model": "judge"}  # the local judge's own model
    patch("fix", {"evaluation": {"judge": judge}})
    fixed = _wait_generation(ftc, namespace, "fix", 2, ("Succeeded", "Failed"), 180)
    assert fixed["phase"] == "Succeeded" and fixed["winner"] == STUB_WINNER, fixed
    second = jobs()
    assert {n: v for n, v in second.items() if n in first} == first  # nothing that ran was run again
    new = sorted(second[n][0] for n in set(second) - set(first))
    assert new in (["score"], ["evaluate"]), new  # only the scoring, under a new name (its settings' key)
    assert fixed["fairness"]["hash"] == failed["fairness"]["hash"]  # what training held equal
    assert fixed["fairness"]["evaluationHash"] != failed["fairness"]["evaluationHash"]
    [change] = fixed["fairness"]["evaluationChanges"]
    assert (change["generation"], change["fields"], change["rerun"]) == (2, ["evaluation.judge"], "scoring")
    ftc.event_reasons(namespace, "fix", lambda r: "EvaluationChanged" in r)

    # The judge goes down: a rescoring (another judge temperature) is inconclusive, then a retry scores it.
    core.patch_namespaced_secret("ftc-judge", namespace, {"stringData": {"api-key": DOWN_KEY}})
    patch("fix", {"evaluation": {"judge": {"temperature": 0.5}}})
    down = _wait_generation(ftc, namespace, "fix", 3, ("Succeeded", "Failed"), 180)
    assert down["phase"] == "Failed" and _condition(down, "Succeeded")["reason"] == "Inconclusive", down
    core.patch_namespaced_secret("ftc-judge", namespace, {"stringData": {"api-key": CANARY}})
    kubectl("annotate", "ftc", "fix", "-n", namespace, "ftc.dev/retry=judge-back", "--overwrite")

    def retried():
        st = ftc.status("fix", namespace)
        return st if st.get("retry") == "judge-back" and st.get("phase") in ("Succeeded", "Failed") else None

    done = wait_for(retried, 180, "the retry scored", interval=0.5)
    assert done["phase"] == "Succeeded" and done["winner"] == STUB_WINNER, done
    third = jobs()
    assert {n: v for n, v in third.items() if v[0] not in ("score", "evaluate")} == {
        n: v for n, v in first.items() if v[0] not in ("score", "evaluate")
    }  # prepare, train and generate ran once for all of it
    assert done["fairness"]["hash"] == failed["fairness"]["hash"]
    reasons = ftc.event_reasons(namespace, "fix", lambda r: "Retrying" in r)
    assert "PhasePending" not in reasons  # a retry never sets the phase back to Pending (that would unfreeze the spec)

    # The judge refuses the key (401) while another rescoring runs: it fails as bad input; the key fixed, a retry
    # reruns that scoring only.
    t401 = time.monotonic()
    core.patch_namespaced_secret("ftc-judge", namespace, {"stringData": {"api-key": REJECTED_KEY}})
    patch("fix", {"evaluation": {"judge": {"temperature": 0.7}}})
    refused = _wait_generation(ftc, namespace, "fix", 4, ("Succeeded", "Failed"), 180)
    assert refused["phase"] == "Failed", refused
    evaluated = _condition(refused, "Evaluated")
    assert evaluated["status"] == "False" and "401" in evaluated["message"], evaluated
    uids = {n: uid for n, (_, uid) in jobs().items()}
    core.patch_namespaced_secret("ftc-judge", namespace, {"stringData": {"api-key": CANARY}})
    kubectl("annotate", "ftc", "fix", "-n", namespace, "ftc.dev/retry=fixed-the-key", "--overwrite")

    def fixed_key():
        st = ftc.status("fix", namespace)
        return st if st.get("retry") == "fixed-the-key" and st.get("phase") in ("Succeeded", "Failed") else None

    rescored = wait_for(fixed_key, 180, "the retry after the key was fixed", interval=0.5)
    assert rescored["phase"] == "Succeeded" and rescored["winner"] == STUB_WINNER, rescored
    assert rescored["fairness"] == refused["fairness"]  # same data, same models, same settings
    after = {n: uid for n, (_, uid) in jobs().items()}
    assert sorted(after) == sorted(uids)
    score_now = f"fix-score-{scoring_key(FineTuneComparisonSpec.model_validate(ftc.get('fix', namespace)['spec']))}"
    assert [n for n in after if after[n] != uids[n]] == [score_now]  # prepare, train, generate and older scorings ran once
    assert [m["phase"] for m in rescored["models"]] == ["Trained", "Trained"]

    def retrying_twice() -> bool:  # one Event per message, its count going up (see the repeated-event test)
        return sum(e.count or 1 for e in ftc.events(namespace, "fix") if e.reason == "Retrying") >= 2

    wait_for(retrying_twice, 30, "a Retrying Event for each retry")
    print(f"wrong judge, judge down: {t401 - t0:.1f}s; the 401 stage: {time.monotonic() - t401:.1f}s")
