"""Real Kueue v0.17.0 and JobSet v0.12.0 in the local cluster (the ``kueue`` and ``queue_namespace`` fixtures,
devcluster/kube/kueue.py): Kueue admits a queued Job onto a fake A100 and leaves unqueued Jobs alone, keeps a Job
over the quota suspended with its own message on the Workload, and the JobSet controller turns a JobSet into Jobs
and pods. These test the platform ftc runs on, not ftc.
"""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client

from devcluster.kube import kueue as kq
from devcluster.kube.typed import body, custom_object, present
from tests.fixtures.cluster import Cluster, wait_for
from tests.test_harness_kubernetes import RESTRICTED_POD, job_condition, job_pods, shell

pytestmark = pytest.mark.cluster

JOBSET_GROUP, JOBSET_VERSION = kq.JOBSET_API.split("/")


def queued_job(
    name: str, script: str, gpus: int = 0, priority: str | None = "ftc-low", queue: str | None = kq.LOCAL_QUEUE
) -> dict:
    """A Job as Kueue expects it: created suspended with the queue label (and a priority class). No GPU node
    selector or toleration of its own: the ResourceFlavor adds them when Kueue admits it."""
    labels = {kq.QUEUE_LABEL: queue} if queue else {}
    if priority:
        labels[kq.PRIORITY_LABEL] = priority
    container = shell(script)
    if gpus:
        container["resources"] = {"limits": {kq.GPU_RESOURCE: str(gpus)}}
    pod = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": 1,
        "securityContext": RESTRICTED_POD,
        "automountServiceAccountToken": False,
        "containers": [container],
    }
    spec = {"suspend": bool(queue), "backoffLimit": 0, "template": {"spec": pod}}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "labels": labels}, "spec": spec}


def create_job(batch: client.BatchV1Api, namespace: str, manifest: dict) -> None:
    batch.create_namespaced_job(namespace, body(client.V1Job, manifest))


def suspended(batch: client.BatchV1Api, namespace: str, name: str) -> bool:
    return bool(present(batch.read_namespaced_job(name, namespace).spec).suspend)


def workload_of(api, namespace: str, job: str) -> dict[str, Any]:
    """The Workload Kueue created for the Job (by owner reference); {} while there is none."""
    custom = client.CustomObjectsApi(api)
    objs = custom_object(custom.list_namespaced_custom_object(kq.KUEUE_GROUP, kq.KUEUE_API_VERSION, namespace, "workloads"))
    for wl in objs["items"]:
        if any(o.get("kind") == "Job" and o.get("name") == job for o in wl["metadata"].get("ownerReferences", [])):
            return wl
    return {}


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    """The condition of ``type_`` ({} when absent)."""
    return next((c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == type_), {})


def pending_message(api, namespace: str, job: str) -> str | None:
    """Kueue's message on the Workload while it waits for quota (QuotaReserved False), once it names a flavor."""
    c = condition(workload_of(api, namespace, job), "QuotaReserved")
    return c["message"] if c.get("status") == "False" and "flavor" in c["message"] else None


def test_kueue_admits_a_queued_job_onto_a_gpu_node_and_leaves_unqueued_jobs_alone(
    control_plane: Cluster, kueue: kq.Addons, queue_namespace: str
):
    api = control_plane.api_client()
    batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
    ns = queue_namespace
    create_job(batch, ns, queued_job("train", "echo trained", gpus=1))
    create_job(batch, ns, queued_job("plain", "echo plain", queue=None, priority=None))

    def admitted() -> dict[str, Any]:
        wl = workload_of(api, ns, "train")
        return wl if condition(wl, "Admitted").get("status") == "True" else {}

    wl = wait_for(admitted, 60, "the Workload of Job train Admitted")
    assert wl["spec"]["queueName"] == kq.LOCAL_QUEUE
    assert (wl["spec"]["priorityClassRef"]["name"], wl["spec"]["priority"]) == ("ftc-low", 100)
    assert wl["status"]["admission"]["clusterQueue"] == kq.CLUSTER_QUEUE
    [podset] = wl["status"]["admission"]["podSetAssignments"]
    assert podset["flavors"] == {kq.GPU_RESOURCE: kq.GPU_FLAVOR}

    wait_for(lambda: job_condition(batch, ns, "train", "Complete"), 60, "Job train Complete")
    [pod] = job_pods(core, ns, "train")
    spec = present(pod.spec)
    # Kueue unsuspended it with the flavor's node label and toleration: it ran on a fake A100 node.
    assert (spec.node_selector or {}).get(kq.GPU_PRODUCT_LABEL) == kq.GPU_PRODUCT
    gpu_nodes = {
        present(n.metadata).name for n in core.list_node(label_selector=f"{kq.GPU_PRODUCT_LABEL}={kq.GPU_PRODUCT}").items
    }
    assert spec.node_name in gpu_nodes, (spec.node_name, gpu_nodes)
    assert control_plane.pod_log(ns, present(pod.metadata).name or "") == "trained\n"

    # Without the queue label (manageJobsWithoutQueueName: false) Kueue leaves a Job alone: no Workload, it just runs.
    wait_for(lambda: job_condition(batch, ns, "plain", "Complete"), 60, "Job plain Complete")
    assert workload_of(api, ns, "plain") == {}


def test_a_job_over_the_quota_stays_suspended_with_kueues_message(control_plane: Cluster, kueue: kq.Addons, queue_namespace: str):
    api = control_plane.api_client()
    batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
    ns = queue_namespace
    create_job(batch, ns, queued_job("hold", "sleep 600", gpus=6))
    wait_for(lambda: not suspended(batch, ns, "hold"), 60, "Job hold admitted (unsuspended)")

    create_job(batch, ns, queued_job("wait", "echo ran", gpus=4))
    create_job(batch, ns, queued_job("huge", "echo ran", gpus=9))
    wait_msg = wait_for(lambda: pending_message(api, ns, "wait"), 60, "Kueue's message on the Workload of Job wait")
    huge_msg = wait_for(lambda: pending_message(api, ns, "huge"), 60, "Kueue's message on the Workload of Job huge")
    # Kueue's own words (its flavor assigner), quoted in docs/local-cluster.md for the operator's queue status.
    assert wait_msg == (
        "couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu in flavor fake-a100, 2 more needed"
    )
    assert huge_msg == (
        "couldn't assign flavors to pod set main: insufficient quota for nvidia.com/gpu in flavor fake-a100, "
        "previously considered podsets requests (0) + current podset request (9) > maximum capacity (8)"
    )
    assert condition(workload_of(api, ns, "wait"), "QuotaReserved")["reason"] == "Pending"
    for name in ("wait", "huge"):
        assert suspended(batch, ns, name)
        assert job_pods(core, ns, name) == []

    # Quota freed: the waiting Job is admitted and runs; the one over the whole quota never is.
    batch.delete_namespaced_job("hold", ns, propagation_policy="Background")
    wait_for(lambda: job_condition(batch, ns, "wait", "Complete"), 90, "Job wait Complete once hold is gone")
    assert suspended(batch, ns, "huge")


def test_the_jobset_controller_turns_a_jobset_into_jobs_and_pods(control_plane: Cluster, kueue: kq.Addons, namespace: str):
    api = control_plane.api_client()
    custom, batch, core = client.CustomObjectsApi(api), client.BatchV1Api(api), client.CoreV1Api(api)
    script = 'echo "worker $JOB_COMPLETION_INDEX on $(cat /proc/sys/kernel/hostname)"'
    template = queued_job("x", script, queue=None, priority=None)["spec"]
    template.pop("suspend")
    template.update(completionMode="Indexed", completions=1, parallelism=1)
    jobset = {
        "apiVersion": kq.JOBSET_API,
        "kind": "JobSet",
        "metadata": {"name": "tiny"},
        "spec": {"replicatedJobs": [{"name": "workers", "replicas": 2, "template": {"spec": template}}]},
    }
    custom.create_namespaced_custom_object(JOBSET_GROUP, JOBSET_VERSION, namespace, "jobsets", jobset)

    def completed() -> bool:
        js = custom_object(custom.get_namespaced_custom_object(JOBSET_GROUP, JOBSET_VERSION, namespace, "jobsets", "tiny"))
        return condition(js, "Completed").get("status") == "True"

    wait_for(completed, 90, "JobSet tiny Completed")
    children = batch.list_namespaced_job(namespace, label_selector="jobset.sigs.k8s.io/jobset-name=tiny").items
    jobs = sorted(present(j.metadata).name or "" for j in children)
    assert jobs == ["tiny-workers-0", "tiny-workers-1"]
    for name in jobs:
        [pod] = job_pods(core, namespace, name)
        # JobSet gives each pod a stable hostname: <jobset>-<replicatedJob>-<job index>-<pod index>
        assert control_plane.pod_log(namespace, present(pod.metadata).name or "") == f"worker 0 on {name}-0\n"
