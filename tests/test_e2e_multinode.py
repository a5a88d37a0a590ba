"""Training on two nodes through JobSet on the local cluster, with the REAL trainer: two fake-A100 nodes (gpu-node-0
and gpu-node-1), JobSet v0.12.0 and Kueue v0.17.0 installed (the session's `kueue` fixture), CoreDNS resolving the
leader pod's name, gloo on the CPU.

One comparison trains the same tiny Llama twice: `one` as one process accumulating 2 micro-batches per step, `two` on
2 nodes (a JobSet of one pod per node, each process accumulating 1). Kueue admits the JobSet as one workload; the
pods land on different nodes and meet on the leader's DNS name. Mid-run one worker pod is killed: JobSet restarts the
group, which resumes from the last checkpoint. The comparison ends Succeeded like an undisturbed one, `two`'s loss
history has every step once, and it learns what `one` learns (the parallel tests' tolerance).

The train split is a multiple of perDeviceBatchSize x processes (208 rows = 52 micro-batches of 4, 26 per node).
Otherwise an epoch's last micro-batches do not split evenly over the ranks, and accelerate (`even_batches`) fills the
short rank's with rows from the epoch's start while one process trains the short batch as it is: the histories part
from the first epoch end on (measured on the CPU: 7.7e-3 at the first step of epoch 2, 2.5e-2 within 30 steps, with or
without a restart). That, with the point logged after the preemption's extra point (its mean covers fewer steps than
one's), and not the restart, made the 1.6 % seen here before with 214 rows. The checkpoint holds the worker's RNG state
too (the leader gathers and uploads it): with dropout on, a resumed worker draws the masks it would have drawn.
"""

from __future__ import annotations

import json
import time
from typing import Any, cast

import pytest
from ftc_api.steps import LossPoint

from devcluster.harness import Comparisons, start_operator, tiny_spec, wait_for
from tests.test_e2e_real import assets_in_s3, crd, judge_secret, real_values, step_logs  # noqa: F401  (fixtures)
from tests.test_train_parallel import TRAIN_LOSS_TOLERANCE

pytestmark = pytest.mark.cluster

JOBSET = "mn-train-two"  # rendering.jobset_name("mn", "two")
# The tiny model trains ~6 steps/s here: 300 steps give the kill (after the leader reported step KILL_AT, past the
# first checkpoint) time to land mid-run.
STEPS, SAVE, KILL_AT = 300, 25, 30


@pytest.fixture
def second_gpu_node(control_plane):
    """gpu-node-1 beside gpu-node-0 for the test's length (JobSet's pods need one node each)."""
    took = control_plane.add_node("gpu-node-1")
    try:
        yield took
    finally:
        control_plane.remove_node("gpu-node-1")


def jobset_pods(core: Any, namespace: str) -> list[Any]:
    return core.list_namespaced_pod(namespace, label_selector=f"jobset.sigs.k8s.io/jobset-name={JOBSET}").items


def history(s3, uri: str) -> list[LossPoint]:
    bucket, key = uri.removeprefix("s3://").split("/", 1)
    return [LossPoint.model_validate(p) for p in json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())]


def test_two_nodes_through_jobset_learn_what_one_process_learns_and_survive_a_killed_worker(
    control_plane,
    kueue,
    queue_namespace,
    second_gpu_node,
    crd,  # noqa: F811
    assets_in_s3,  # noqa: F811
    openai_server,
    judge_secret,  # noqa: F811
    tmp_path,
):
    from kubernetes import client

    started = time.monotonic()
    namespace = queue_namespace
    start_operator(control_plane, namespace, real_values(), tmp_path)  # after JobSet is served: it watches JobSets
    spec = tiny_spec(assets_in_s3.cluster_endpoint_url, openai_server.cluster_base_url)
    llama = "s3://ftc/assets/models/tiny-llama"
    spec["models"] = [
        {"name": "one", "baseModel": llama, "method": "lora"},
        {"name": "two", "baseModel": llama, "method": "lora", "placement": {"nodes": 2}},
    ]
    spec["training"].update(
        maxSteps=STEPS, gradientAccumulationSteps=2, perDeviceBatchSize=4, evalSteps=50, saveSteps=SAVE, loggingSteps=5,
        processGroupTimeoutSeconds=60,
    )  # fmt: skip
    spec["dataset"]["split"]["testCount"] = 22  # 254 usable rows - 24 eval - 22 test: 208, a multiple of 4 x 2 nodes
    spec["placement"]["queueName"] = "ftc-queue"  # Kueue admits the JobSet as one workload of 2 pods
    ftc = Comparisons(control_plane.api_client())
    ftc.create("mn", namespace, spec)
    api = control_plane.api_client()
    core = client.CoreV1Api(api)
    custom = client.CustomObjectsApi(api)

    def leader_past_a_checkpoint() -> Any:
        st = ftc.status("mn", namespace)
        assert st.get("phase") not in ("Failed", "Succeeded"), json.dumps(st, indent=1)
        two: dict[str, Any] = next((m for m in st.get("models", []) if m["name"] == "two"), {})
        return (two.get("progress") or {}).get("step", 0) >= KILL_AT and jobset_pods(core, namespace)

    try:
        wait_for(leader_past_a_checkpoint, 900, "the 2-node model past its first checkpoint", interval=1)
    except (TimeoutError, AssertionError):
        raise AssertionError(step_logs(control_plane, namespace)[-12000:]) from None
    pods = jobset_pods(core, namespace)
    assert len(pods) == 2 and len({p.spec.node_name for p in pods}) == 2, [(p.metadata.name, p.spec.node_name) for p in pods]
    workloads: list[dict] = cast(dict, custom.list_namespaced_custom_object("kueue.x-k8s.io", "v1beta2", namespace, "workloads"))[
        "items"
    ]
    mine = [w for w in workloads if any(o["kind"] == "JobSet" and o["name"] == JOBSET for o in w["metadata"]["ownerReferences"])]
    assert len(mine) == 1 and sum(ps["count"] for ps in mine[0]["spec"]["podSets"]) == 2, mine  # one gang of 2 pods
    worker = next(p for p in pods if p.metadata.annotations["batch.kubernetes.io/job-completion-index"] == "1")
    killed_at = time.monotonic()
    core.delete_namespaced_pod(worker.metadata.name, namespace, grace_period_seconds=0)  # killed: no time to save

    def restarted() -> bool:
        js = cast(dict, custom.get_namespaced_custom_object("jobset.x-k8s.io", "v1alpha2", namespace, "jobsets", JOBSET))
        return int((js.get("status") or {}).get("restarts") or 0) >= 1

    wait_for(restarted, 300, "JobSet restarting the group")
    try:
        st = ftc.wait_phase("mn", namespace, ("Succeeded", "Failed"), timeout=1200)
    except TimeoutError:
        raise AssertionError(step_logs(control_plane, namespace)[-12000:]) from None
    assert st["phase"] == "Succeeded", json.dumps(st, indent=1) + step_logs(control_plane, namespace)[-12000:]
    models = {m["name"]: m for m in st["models"]}
    assert models["two"]["phase"] == models["one"]["phase"] == "Trained"
    assert models["two"]["jobName"] == JOBSET
    train_two = models["two"]["train"]
    resumed = train_two.get("resumedFromStep") or 0
    assert SAVE <= resumed < STEPS, train_two  # the new group resumed from a checkpoint
    assert (train_two["processes"], train_two["totalSteps"]) == (2, STEPS)
    assert not any(d["field"] == "effectiveBatch" for d in st["fairness"]["deviations"])  # 4 x 2 both ways
    assert st["dataCounts"]["train"] % (4 * 2) == 0, st["dataCounts"]  # every epoch splits evenly over the 2 nodes

    s3 = assets_in_s3.client()
    checkpoints = train_two["metricsUri"].removesuffix("metrics.json") + "checkpoints/"
    bucket, key = checkpoints.removeprefix("s3://").split("/", 1)
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=key).get("Contents", [])
    rng = {o["Key"].removeprefix(key) for o in listed if "/rng_state_" in o["Key"]}
    assert f"step-{resumed}/rng_state_1.pth" in rng, sorted(rng)  # the worker's, written on the other node
    one, two = history(s3, models["one"]["train"]["metricsUri"]), history(s3, train_two["metricsUri"])
    trained = [p for p in two if p.train_loss is not None]
    steps = [p.step for p in trained]
    # Every step once: the history continues across the restart. A SIGTERM (JobSet recreating the group; the worker
    # deleted with grace 0 got one too: seen, both ranks stopped after step 57 and its checkpoint held both RNG states)
    # makes every rank stop after the same step and the leader log and save it: at most that one extra point.
    logged = set(range(5, STEPS + 1, 5))
    assert steps == sorted(set(steps)) and logged <= set(steps) and len(set(steps) - logged) <= 1, steps
    one_at = {p.step: p for p in one if p.train_loss is not None}
    assert sorted(one_at) == sorted(logged)
    # A logged train loss is the mean since the previous log: the point after the extra one averages fewer steps
    # than one's (seen: 4.8246 over steps 58-60 against 4.8333 over 56-60), so only equal windows are compared.
    shorter = [b.step for prev, b in zip([0, *steps], trained, strict=False) if b.step in one_at and b.step - prev != 5]
    assert len(shorter) == len(set(steps) - logged), (shorter, steps)
    compared = [b for prev, b in zip([0, *steps], trained, strict=False) if b.step in one_at and b.step - prev == 5]
    assert any(b.step > resumed for b in compared)
    for b in compared:
        a = one_at[b.step]
        # Before the restart and after it: one process's losses, to the parallel tests' train tolerance.
        assert b.train_loss == pytest.approx(a.train_loss, rel=TRAIN_LOSS_TOLERANCE), (a, b)
    print(
        f"two nodes through JobSet: {time.monotonic() - started:.0f} s in all, killed at "
        f"{killed_at - started:.0f} s, resumed from step {train_two['resumedFromStep']}, {len(compared)} points compared, "
        f"{train_two.get('trainSeconds')} s training"
    )
