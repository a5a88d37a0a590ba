"""ftc under real Kueue (v0.17.0, installed with its own chart by the `kueue` session fixture) on the local cluster.

One comparison (one tiny model, the real trainer slowed to 0.3 s per optimizer step so the test can act mid-run)
in a namespace with the LocalQueue `ftc-queue` of the 8-GPU ClusterQueue `ftc-cq`:

1. a Job holding the whole GPU quota is admitted first: the model shows `Queued` with Kueue's own message and the
   Trained condition's reason (the REASON column) is `Queued`;
2. the holder goes: Kueue admits the train Job, which runs (`Running`);
3. a higher-priority Job (WorkloadPriorityClass ftc-high) needing every GPU arrives: Kueue preempts the train
   Job; ftc shows `Preempted` (the model Pending, not Failed; the Job's failed count stays 0: no retry consumed);
4. the urgent Job goes: Kueue readmits the train Job, whose pod resumes from the checkpoint the trainer saved on
   SIGTERM; the comparison succeeds with a continuous loss history, and the steps lost are measured.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from devcluster import steps
from devcluster.harness import Comparisons, start_operator, tiny_spec, wait_for
from devcluster.kube.typed import body, present
from tests.test_e2e_real import assets_in_s3, crd, judge_secret, real_values  # noqa: F401 - fixtures

pytestmark = pytest.mark.cluster

RESTRICTED = {
    "allowPrivilegeEscalation": False,
    "runAsNonRoot": True,
    "runAsUser": 65532,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
DELAY = "0.3"  # seconds per optimizer step: 40 steps last at least 12 s


def gpu_job(name: str, gpus: int, priority: str | None = None) -> dict[str, Any]:
    """A queued Job whose pause pod holds `gpus` fake GPUs (someone else's workload in the same ClusterQueue)."""
    labels = {"kueue.x-k8s.io/queue-name": "ftc-queue"}
    if priority:
        labels["kueue.x-k8s.io/priority-class"] = priority
    return {
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "suspend": True,
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "terminationGracePeriodSeconds": 1,
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    "containers": [
                        {
                            "name": "c",
                            "image": "registry.k8s.io/pause:3.10",
                            "resources": {
                                "limits": {"nvidia.com/gpu": str(gpus)},
                                "requests": {"cpu": "10m", "memory": "16Mi"},
                            },
                            "securityContext": RESTRICTED,
                        }
                    ],
                }
            },
        },
    }


def workload_of(api: Any, namespace: str, job: str) -> dict[str, Any] | None:
    from kubernetes import client

    items: dict[str, Any] = client.CustomObjectsApi(api).list_namespaced_custom_object(  # type: ignore[assignment]
        "kueue.x-k8s.io", "v1beta2", namespace, "workloads"
    )
    return next((w for w in items["items"] if any(o["name"] == job for o in w["metadata"].get("ownerReferences", []))), None)


def admitted(api: Any, namespace: str, job: str) -> bool:
    wl = workload_of(api, namespace, job) or {}
    return any(c["type"] == "Admitted" and c["status"] == "True" for c in (wl.get("status") or {}).get("conditions", []))


def model(status: dict[str, Any]) -> dict[str, Any]:
    return (status.get("models") or [{}])[0]


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), {})


def test_queued_then_admitted_then_preempted_then_resumed_to_success(
    control_plane,
    queue_namespace,
    crd,  # noqa: F811
    tmp_path,
    assets_in_s3,  # noqa: F811
    openai_server,
    judge_secret,  # noqa: F811
):
    from ftc_api.steps import LossPoint
    from kubernetes import client

    ns = queue_namespace
    started = time.monotonic()
    values = real_values()
    values["config"].update(steps.chart_values()["config"])
    values["config"]["train"] = {"command": steps.command("slow_train.py"), "args": ["train"]}
    values["config"]["extraEnv"]["FTC_SLOW_STEP_DELAY"] = DELAY
    start_operator(control_plane, ns, values, tmp_path)
    api = control_plane.api_client()
    batch = client.BatchV1Api(api)
    ftc = Comparisons(api)
    seen: list[str] = []  # every distinct queue state the model went through, in order

    def status() -> dict[str, Any]:
        st = ftc.status("kq", ns)
        state = (model(st).get("queue") or {}).get("state")
        if state and (not seen or seen[-1] != state):
            seen.append(state)
        return st

    # 1. the quota is taken: the model waits with Kueue's message
    # as high as the comparison's ftc-low: Kueue (withinClusterQueue: LowerPriority) must not preempt it for ftc
    batch.create_namespaced_job(ns, body(client.V1Job, gpu_job("quota-holder", 8, priority="ftc-low")))
    wait_for(lambda: admitted(api, ns, "quota-holder"), 60, "the quota holder admitted")
    spec = tiny_spec(assets_in_s3.cluster_endpoint_url, openai_server.cluster_base_url, models=("tiny-llama",))
    spec["training"].update({"maxSteps": 40, "saveSteps": 1000, "evalSteps": 20})  # no checkpoint but the SIGTERM one
    spec["placement"].update({"queueName": "ftc-queue", "workloadPriorityClassName": "ftc-low"})
    ftc.create("kq", ns, spec)
    train_job = "kq-train-tiny-llama"

    def queued() -> dict[str, Any] | None:
        st = status()
        q = model(st).get("queue") or {}
        return st if q.get("state") == "Queued" and "insufficient unused quota" in (q.get("message") or "") else None

    st = wait_for(queued, 600, "the model Queued with Kueue's message", interval=0.5)
    assert model(st)["phase"] == "Pending", model(st)
    assert condition(st, "Trained")["reason"] == "Queued", st["conditions"]
    assert "nvidia.com/gpu" in condition(st, "Trained")["message"]
    job = batch.read_namespaced_job(train_job, ns)
    assert present(job.spec).suspend is True  # Kueue holds it: created suspended, not yet admitted
    assert present(job.metadata).labels == {**(present(job.metadata).labels or {}), "kueue.x-k8s.io/priority-class": "ftc-low"}
    queued_at = time.monotonic()

    # 2. the quota frees: admitted, running
    batch.delete_namespaced_job("quota-holder", ns, propagation_policy="Foreground")
    freed_at = time.monotonic()
    progress: list[int] = []

    def training() -> dict[str, Any] | None:
        st = status()
        step = (model(st).get("progress") or {}).get("step") or 0
        if step:
            progress.append(step)
        return st if (model(st).get("queue") or {}).get("state") == "Running" and step >= 8 else None

    st = wait_for(training, 600, "the model Running past step 8", interval=0.5)
    first_wait = model(st)["queue"]["queuedSeconds"]
    # the wait began before the test saw it Queued and ended after the holder went (Kueue's 1 s timestamps)
    assert first_wait >= freed_at - queued_at - 2, (model(st)["queue"], freed_at - queued_at)

    # 3. a higher-priority workload needs every GPU: Kueue preempts the train Job
    batch.create_namespaced_job(ns, body(client.V1Job, gpu_job("urgent", 8, priority="ftc-high")))
    preempted_at = time.monotonic()

    pod_views: set[str] = set()  # what the train pod looked like while Kueue stopped it (for the report)
    stopped: dict[str, Any] = {}  # the preempted pod's own summary, when the test sees it before the pod is gone

    def preempted() -> dict[str, Any] | None:
        st = status()
        for pod in ftc.pods(ns, "kq", "train"):
            conds = ",".join(sorted(f"{c.type}={c.status}" for c in present(pod.status).conditions or []))
            deleting = present(pod.metadata).deletion_timestamp is not None
            pod_views.add(f"{present(pod.status).phase} deleting={deleting} [{conds}]")
            for cs in present(pod.status).container_statuses or []:
                term = cs.state.terminated if cs.state else None
                if term and term.message and term.message.startswith("{") and not stopped:
                    stopped.update(json.loads(term.message), exitCode=term.exit_code)
        return st if (model(st).get("queue") or {}).get("state") == "Preempted" else None

    st = wait_for(preempted, 120, "the model Preempted", interval=0.3)
    steps_before = max(progress)
    assert model(st)["phase"] == "Pending" and st["phase"] == "Training", model(st)
    assert condition(st, "Trained")["reason"] == "Preempted", st["conditions"]

    def urgent_admitted() -> bool:
        preempted()  # keeps recording the stopping train pod
        return admitted(api, ns, "urgent")

    wait_for(urgent_admitted, 300, "the urgent Job admitted once the train pod is gone", interval=0.3)
    preemption_seconds = time.monotonic() - preempted_at
    st = status()
    assert model(st)["queue"]["state"] == "Preempted" and model(st)["queue"]["preemptions"] == 1, model(st)["queue"]
    assert (present(batch.read_namespaced_job(train_job, ns).status).failed or 0) == 0  # no retry consumed

    # 4. the urgent Job goes: readmitted, resumed from the SIGTERM checkpoint, succeeded
    batch.delete_namespaced_job("urgent", ns, propagation_policy="Foreground")

    def finished() -> dict[str, Any] | None:
        st = status()
        return st if st.get("phase") in ("Succeeded", "Failed") else None

    st = wait_for(finished, 900, "the comparison finished", interval=0.5)
    assert st["phase"] == "Succeeded", json.dumps(st, indent=1)[:4000]
    m = model(st)
    train = m["train"]
    assert m["queue"]["state"] == "Finished" and m["queue"]["preemptions"] == 1, m["queue"]
    assert m["queue"]["queuedSeconds"] > first_wait, m["queue"]  # the wait after the preemption is added
    assert seen[:2] == ["Queued", "Running"] or seen[:3] == ["Queued", "Admitted", "Running"], seen
    assert "Preempted" in seen and seen[-1] == "Finished", seen
    resumed = train["resumedFromStep"]
    assert resumed is not None and resumed >= 8, train
    steps_lost = max(0, steps_before - resumed)
    assert steps_lost <= 1, (steps_before, resumed)  # at most the step in flight when the SIGTERM came
    assert (present(batch.read_namespaced_job(train_job, ns).status).failed or 0) == 0
    s3 = assets_in_s3.client()
    bucket, key = train["metricsUri"].removeprefix("s3://").split("/", 1)
    history = [LossPoint.model_validate(p) for p in json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())]
    assert [p.step for p in history if p.train_loss is not None] == list(range(1, 41))  # continuous: each step once
    print(
        f"kueue e2e: states {seen}; first wait {first_wait:.1f}s, queued in all {m['queue']['queuedSeconds']:.1f}s, "
        f"train {train.get('trainSeconds')}s; preempted at progress step {steps_before}, resumed from {resumed} "
        f"(steps lost {steps_lost}); preemption to quota released {preemption_seconds:.1f}s; "
        f"the train pod meanwhile: {sorted(pod_views)}; its summary: {stopped}; "
        f"test {time.monotonic() - started:.0f}s"
    )
    Path(tmp_path / "kueue-e2e.json").write_text(json.dumps({"seen": seen, "queue": m["queue"], "stepsLost": steps_lost}))
