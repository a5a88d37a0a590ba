"""Harness self-checks: the dev platform's local cluster (devcluster/) behaves like a real one. These test
Kubernetes and the harness, not ftc: real kubelets run containers from the project's images, schedule GPUs,
enforce limits and the restricted Pod Security Standard, collect garbage, delete.

Each test gets a fresh namespace (restricted); waits poll with a timeout, never sleep.
"""

from __future__ import annotations

import functools
import json
import re

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from devcluster.kube.images import BASE_IMAGE
from devcluster.kube.typed import present
from tests.fixtures.cluster import Cluster, wait_for

pytestmark = pytest.mark.cluster

A100 = "NVIDIA-A100-SXM4-80GB"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
IMAGE = BASE_IMAGE  # Debian bookworm minbase with python3, built locally (no registry is reachable)
RESTRICTED_CONTAINER = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}
RESTRICTED_POD = {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532, "seccompProfile": {"type": "RuntimeDefault"}}


def shell(script: str, name: str = "main", **extra) -> dict:
    """A container running ``sh -c script`` in the base image, meeting the restricted standard."""
    return {"name": name, "image": IMAGE, "command": ["sh", "-c", script], "securityContext": RESTRICTED_CONTAINER, **extra}


def pod_spec(*containers: dict, gpus: int = 0, gpu_node: bool = False, tolerate: bool = True, **extra) -> dict:
    spec: dict = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": 5,
        "securityContext": RESTRICTED_POD,
        "automountServiceAccountToken": False,
        "containers": list(containers),
        **extra,
    }
    if gpu_node:
        spec["nodeSelector"] = {"nvidia.com/gpu.product": A100}
    if tolerate and gpu_node:
        spec["tolerations"] = [GPU_TOLERATION]
    if gpus:
        spec["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}}
    return spec


def job(name: str, spec: dict, backoff_limit: int = 0, owner: dict | None = None) -> dict:
    meta: dict = {"name": name}
    if owner:
        meta["ownerReferences"] = [owner]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": {"backoffLimit": backoff_limit, "template": {"spec": spec}},
    }


def job_condition(batch: client.BatchV1Api, namespace: str, name: str, type_: str):
    """The Job's condition of ``type_`` when it is True, else None."""
    status = present(batch.read_namespaced_job_status(name, namespace).status)
    return next((c for c in status.conditions or [] if c.type == type_ and c.status == "True"), None)


def job_pods(core: client.CoreV1Api, namespace: str, name: str) -> list:
    return core.list_namespaced_pod(namespace, label_selector=f"job-name={name}").items


def scheduled_condition(core: client.CoreV1Api, namespace: str, name: str):
    pod = core.read_namespaced_pod(name, namespace)
    return next((c for c in present(pod.status).conditions or [] if c.type == "PodScheduled"), None)


def pod_gone(core: client.CoreV1Api, namespace: str, name: str) -> bool:
    try:
        core.read_namespaced_pod(name, namespace)
    except ApiException as e:
        return e.status == 404
    return False


@pytest.fixture
def api(control_plane: Cluster):
    return control_plane.api_client()


@pytest.fixture
def core(api) -> client.CoreV1Api:
    return client.CoreV1Api(api)


@pytest.fixture
def batch(api) -> client.BatchV1Api:
    return client.BatchV1Api(api)


def test_gpu_job_lands_on_gpu_node_completes_and_reports_its_termination_message(
    control_plane: Cluster, namespace: str, core, batch
):
    result = {"model": "tiny-llama", "train_loss": 1.25}
    script = (
        "echo training; echo host=$(cat /proc/sys/kernel/hostname); cat /proc/self/cgroup; "
        f"echo '{json.dumps(result)}' > /dev/termination-log"
    )
    batch.create_namespaced_job(namespace, job("train", pod_spec(shell(script), gpus=1, gpu_node=True)))

    wait_for(lambda: job_condition(batch, namespace, "train", "Complete"), 60, "Job train Complete")

    [pod] = job_pods(core, namespace, "train")
    assert pod.spec.node_name == control_plane.gpu_node
    terminated = pod.status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.reason) == (0, "Completed")
    assert terminated.container_id.startswith("containerd://")
    assert json.loads(terminated.message) == result
    log = control_plane.pod_log(namespace, pod.metadata.name, "main")
    assert "training" in log
    # A container of its own: the pod's hostname (UTS namespace) and a memory cgroup under the GPU node's kubepods.
    assert f"host={pod.metadata.name}" in log
    assert re.search(rf"memory:/ftc-{control_plane.gpu_node}/kubepods/\S*pod{pod.metadata.uid}/", log), log


def test_pod_asking_for_more_gpus_than_any_node_has_stays_pending_unschedulable(namespace: str, core):
    core.create_namespaced_pod(
        namespace, {"metadata": {"name": "greedy"}, "spec": pod_spec(shell("true"), gpus=9, gpu_node=True)}
    )

    cond = wait_for(
        lambda: (c := scheduled_condition(core, namespace, "greedy")) and c.reason == "Unschedulable" and c,
        30,
        "PodScheduled=False/Unschedulable",
    )
    assert cond.status == "False"
    assert "Insufficient nvidia.com/gpu" in cond.message
    pod = core.read_namespaced_pod("greedy", namespace)
    assert (pod.status.phase, pod.spec.node_name) == ("Pending", None)


def test_pods_without_the_gpu_toleration_never_land_on_the_gpu_node(control_plane: Cluster, namespace: str, core):
    for i in range(3):
        core.create_namespaced_pod(namespace, {"metadata": {"name": f"plain-{i}"}, "spec": pod_spec(shell("true"))})
    pinned = pod_spec(shell("true"), gpu_node=True, tolerate=False)
    core.create_namespaced_pod(namespace, {"metadata": {"name": "pinned"}, "spec": pinned})

    def node_of(name: str) -> str | None:
        return core.read_namespaced_pod(name, namespace).spec.node_name

    for i in range(3):
        node = wait_for(functools.partial(node_of, f"plain-{i}"), 30, f"plain-{i} bound")
        assert node == control_plane.cpu_node
    cond = wait_for(
        lambda: (c := scheduled_condition(core, namespace, "pinned")) and c.reason == "Unschedulable" and c,
        30,
        "pinned pod Unschedulable",
    )
    assert "had untolerated taint" in cond.message
    assert core.read_namespaced_pod("pinned", namespace).spec.node_name is None


def test_deleting_the_owner_garbage_collects_the_jobs_it_owns(namespace: str, core, batch):
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "comparison"}, "data": {"k": "v"}})
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "comparison", "uid": owner.metadata.uid}
    for name in ("train-a", "train-b"):
        batch.create_namespaced_job(namespace, job(name, pod_spec(shell("sleep 300")), owner=ref))
    wait_for(lambda: len(core.list_namespaced_pod(namespace).items) == 2, 30, "two Job pods")

    core.delete_namespaced_config_map("comparison", namespace)

    wait_for(lambda: not batch.list_namespaced_job(namespace).items, 60, "owned Jobs garbage-collected")
    wait_for(lambda: not core.list_namespaced_pod(namespace).items, 60, "their pods deleted")


def test_job_whose_container_fails_is_marked_failed_after_its_backoff_limit(control_plane: Cluster, namespace: str, core, batch):
    container = shell(
        "echo 'loading shard'; echo 'CUDA out of memory' >&2; exit 3", terminationMessagePolicy="FallbackToLogsOnError"
    )
    batch.create_namespaced_job(namespace, job("doomed", pod_spec(container), backoff_limit=1))

    cond = wait_for(lambda: job_condition(batch, namespace, "doomed", "Failed"), 90, "Job doomed Failed")

    assert cond.reason == "BackoffLimitExceeded"
    assert batch.read_namespaced_job_status("doomed", namespace).status.failed == 2
    pods = job_pods(core, namespace, "doomed")
    assert len(pods) == 2 and all(p.status.phase == "Failed" for p in pods)
    terminated = pods[0].status.container_statuses[0].state.terminated
    assert terminated.exit_code == 3 and terminated.reason == "Error"
    assert "CUDA out of memory" in terminated.message  # the log tail, as FallbackToLogsOnError gives it


def test_deleting_a_running_pod_stops_its_process(control_plane: Cluster, namespace: str, core):
    # ($$ would be an escaped "$" in Kubernetes' $(VAR) expansion; read our pid from /proc instead)
    script = (
        "read -r pid _ < /proc/self/stat; echo pid=$pid; trap 'echo got SIGTERM; exit 0' TERM; while true; do sleep 0.1; done"
    )
    core.create_namespaced_pod(namespace, {"metadata": {"name": "worker"}, "spec": pod_spec(shell(script))})
    wait_for(lambda: core.read_namespaced_pod("worker", namespace).status.phase == "Running", 30, "worker Running")
    match = wait_for(lambda: re.search(r"pid=(\d+)", control_plane.pod_log(namespace, "worker", "main")), 10, "pid")

    core.delete_namespaced_pod("worker", namespace)

    # It exits on SIGTERM at once, long before the 5 s grace period would end in a SIGKILL.
    wait_for(lambda: pod_gone(core, namespace, "worker"), 4, "pod worker removed within the grace period")
    assert match


def test_on_failure_restarts_the_container_in_place(namespace: str, core):
    script = "n=$(cat /scratch/count 2>/dev/null || echo 0); echo $((n+1)) > /scratch/count; [ $n -ge 1 ]"
    container = shell(script, volumeMounts=[{"name": "scratch", "mountPath": "/scratch"}])
    spec = pod_spec(container, restartPolicy="OnFailure", volumes=[{"name": "scratch", "emptyDir": {}}])
    core.create_namespaced_pod(namespace, {"metadata": {"name": "flaky"}, "spec": spec})

    wait_for(lambda: core.read_namespaced_pod("flaky", namespace).status.phase == "Succeeded", 30, "flaky Succeeded")

    status = core.read_namespaced_pod("flaky", namespace).status.container_statuses[0]
    assert status.restart_count == 1  # the first run failed (count 0), the restart in the same pod succeeded
    assert status.state.terminated.exit_code == 0


def test_pod_sees_its_env_volumes_and_reaches_the_api_server_as_its_service_account(
    control_plane: Cluster, namespace: str, core, s3_server
):
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "spec"}, "data": {"spec.json": '{"epochs": 2}'}})
    # In-cluster access as client libraries do it: the `kubernetes` Service (kube-proxy leads it to the API
    # server), the projected token and CA.
    probe = (
        "import os, ssl, urllib.request, urllib.error\n"
        "sa = '/var/run/secrets/kubernetes.io/serviceaccount'\n"
        "ctx = ssl.create_default_context(cafile=f'{sa}/ca.crt')\n"
        "ns = open(f'{sa}/namespace').read()\n"
        "host, port = os.environ['KUBERNETES_SERVICE_HOST'], os.environ['KUBERNETES_SERVICE_PORT']\n"
        "url = f'https://{host}:{port}/api/v1/namespaces/{ns}/configmaps'\n"
        "req = urllib.request.Request(url, headers={'Authorization': 'Bearer ' + open(f'{sa}/token').read()})\n"
        "try:\n    urllib.request.urlopen(req, context=ctx)\n"
        "except urllib.error.HTTPError as e:\n    print(e.code, e.read().decode())\n"
    )
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "probe"}, "data": {"probe.py": probe}})
    script = "cat /etc/ftc/spec.json; echo; echo key=$AWS_ACCESS_KEY_ID pod=$POD_NAME node=$NODE; python3 /probe/probe.py"
    container = shell(
        script,
        env=[
            {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "ftc-s3", "key": "AWS_ACCESS_KEY_ID"}}},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        ],
        volumeMounts=[
            {"name": "spec", "mountPath": "/etc/ftc", "readOnly": True},
            {"name": "probe", "mountPath": "/probe", "readOnly": True},
        ],
    )
    volumes = [{"name": "spec", "configMap": {"name": "spec"}}, {"name": "probe", "configMap": {"name": "probe"}}]
    spec = pod_spec(container, volumes=volumes, automountServiceAccountToken=True)
    core.create_namespaced_pod(namespace, {"metadata": {"name": "env"}, "spec": spec})

    wait_for(lambda: core.read_namespaced_pod("env", namespace).status.phase == "Succeeded", 30, "env Succeeded")

    out = control_plane.pod_log(namespace, "env", "main")
    assert '{"epochs": 2}' in out
    assert f"key={s3_server.access_key_id} pod=env node={control_plane.cpu_node}" in out
    # in-pod code authenticates as the pod's ServiceAccount, so RBAC applies
    assert "403" in out
    assert f'\\"system:serviceaccount:{namespace}:default\\" cannot list resource \\"configmaps\\"' in out


def test_init_container_runs_first_and_env_comes_from_secrets_and_config_maps(
    control_plane: Cluster, namespace: str, core, s3_server
):
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "knobs"}, "data": {"epochs": "2"}})
    scratch = [{"name": "scratch", "mountPath": "/work"}]
    init = shell("echo prepared > /work/ready", name="prepare", volumeMounts=scratch)
    main = shell(
        "cat /work/ready; echo key=$S3_AWS_ACCESS_KEY_ID epochs=$EPOCHS",
        volumeMounts=scratch,
        envFrom=[{"secretRef": {"name": "ftc-s3"}, "prefix": "S3_"}],
        env=[{"name": "EPOCHS", "valueFrom": {"configMapKeyRef": {"name": "knobs", "key": "epochs"}}}],
    )
    spec = pod_spec(main, initContainers=[init], volumes=[{"name": "scratch", "emptyDir": {}}])
    core.create_namespaced_pod(namespace, {"metadata": {"name": "staged"}, "spec": spec})

    wait_for(lambda: core.read_namespaced_pod("staged", namespace).status.phase == "Succeeded", 30, "staged Succeeded")

    pod = core.read_namespaced_pod("staged", namespace)
    assert pod.status.init_container_statuses[0].state.terminated.exit_code == 0
    out = control_plane.pod_log(namespace, "staged", "main")
    assert "prepared" in out and f"key={s3_server.access_key_id} epochs=2" in out


def test_pod_past_its_active_deadline_is_killed_and_failed(namespace: str, core):
    spec = pod_spec(shell("sleep 300"), activeDeadlineSeconds=2)
    core.create_namespaced_pod(namespace, {"metadata": {"name": "slow"}, "spec": spec})

    pod = wait_for(lambda: (p := core.read_namespaced_pod("slow", namespace)).status.phase == "Failed" and p, 30, "slow Failed")
    assert pod.status.reason == "DeadlineExceeded"


def test_missing_secret_keeps_the_container_waiting_until_it_exists(namespace: str, core):
    env = [{"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "judge", "key": "api-key"}}}]
    core.create_namespaced_pod(namespace, {"metadata": {"name": "judged"}, "spec": pod_spec(shell("true", env=env))})

    def waiting_reason():
        statuses = core.read_namespaced_pod("judged", namespace).status.container_statuses or []
        return statuses[0].state.waiting.reason if statuses and statuses[0].state.waiting else None

    wait_for(lambda: waiting_reason() == "CreateContainerConfigError", 30, "CreateContainerConfigError")
    assert core.read_namespaced_pod("judged", namespace).status.phase == "Pending"

    core.create_namespaced_secret(namespace, {"metadata": {"name": "judge"}, "stringData": {"api-key": "k"}})

    wait_for(lambda: core.read_namespaced_pod("judged", namespace).status.phase == "Succeeded", 30, "judged Succeeded")


def test_a_process_ignoring_sigterm_is_killed_after_the_grace_period(control_plane: Cluster, namespace: str, core):
    script = "read -r pid _ < /proc/self/stat; echo pid=$pid; trap '' TERM; while true; do sleep 0.1; done"
    core.create_namespaced_pod(namespace, {"metadata": {"name": "stubborn"}, "spec": pod_spec(shell(script))})
    match = wait_for(lambda: re.search(r"pid=(\d+)", control_plane.pod_log(namespace, "stubborn", "main")), 30, "pid")

    core.delete_namespaced_pod("stubborn", namespace, grace_period_seconds=1)

    wait_for(lambda: pod_gone(core, namespace, "stubborn"), 30, "pod stubborn removed")
    assert match


def test_pod_over_its_memory_limit_is_oom_killed(control_plane: Cluster, namespace: str, core):
    container = shell(
        "python3 -c 'b = bytearray(200 * 2**20); print(len(b))'", resources={"limits": {"memory": "64Mi", "cpu": "500m"}}
    )
    core.create_namespaced_pod(namespace, {"metadata": {"name": "hog"}, "spec": pod_spec(container)})

    pod = wait_for(lambda: (p := core.read_namespaced_pod("hog", namespace)).status.phase == "Failed" and p, 60, "hog Failed")
    terminated = pod.status.container_statuses[0].state.terminated
    assert (terminated.reason, terminated.exit_code) == ("OOMKilled", 137)


def test_a_pod_that_breaks_the_restricted_standard_is_refused(namespace: str, core):
    root = shell("id", securityContext={"runAsUser": 0, "allowPrivilegeEscalation": True})
    spec = pod_spec(root)
    spec.pop("securityContext")

    with pytest.raises(ApiException) as refused:
        core.create_namespaced_pod(namespace, {"metadata": {"name": "rooted"}, "spec": spec})

    assert refused.value.status == 403
    message = json.loads(present(refused.value.body))["message"]
    assert 'violates PodSecurity "restricted:latest"' in message
    assert "allowPrivilegeEscalation != false" in message and "runAsUser=0" in message


def test_nodes_are_real_kubelets_on_containerd(control_plane: Cluster):
    out = control_plane.kubectl("get", "nodes", "-o", "json")
    nodes = {n["metadata"]["name"]: n for n in json.loads(out)["items"]}
    assert set(nodes) == {control_plane.gpu_node, control_plane.cpu_node}
    for node in nodes.values():
        info = node["status"]["nodeInfo"]
        assert info["kubeletVersion"] == "v1.34.4"
        assert info["containerRuntimeVersion"].startswith("containerd://")
    gpu = nodes[control_plane.gpu_node]
    assert gpu["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    assert gpu["metadata"]["labels"]["nvidia.com/gpu.product"] == A100
    assert {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"} in gpu["spec"]["taints"]
    assert "nvidia.com/gpu" not in nodes[control_plane.cpu_node]["status"]["allocatable"]
    wide = control_plane.kubectl("get", "nodes", "-o", "wide")
    assert wide.count("containerd://") == 2, wide


def test_kubectl_exec_runs_in_the_container(control_plane: Cluster, namespace: str, core):
    core.create_namespaced_pod(namespace, {"metadata": {"name": "shell"}, "spec": pod_spec(shell("sleep 60"))})
    wait_for(lambda: core.read_namespaced_pod("shell", namespace).status.phase == "Running", 30, "shell Running")

    out = control_plane.kubectl("exec", "-n", namespace, "shell", "--", "sh", "-c", "id -u; cat /proc/sys/kernel/hostname")

    assert out.split() == ["65532", "shell"]


def test_pods_resolve_services_by_name_and_reach_s3_through_its_service_name(
    control_plane: Cluster, namespace: str, core, s3_server
):
    # CoreDNS (kube-system/kube-dns) is every kubelet's clusterDNS; S3 runs on the host and has the Service name
    # s3.ftc-host (a Service without selector, an EndpointSlice to the host's address), which pods are handed.
    assert s3_server.cluster_endpoint_url == "http://s3.ftc-host.svc.cluster.local"
    s3_ip = core.read_namespaced_service("s3", "ftc-host").spec.cluster_ip
    api_ip = core.read_namespaced_service("kubernetes", "default").spec.cluster_ip
    probe = (
        "import socket, urllib.request, urllib.error\n"
        "print('resolv.conf:', ' | '.join(open('/etc/resolv.conf').read().splitlines()))\n"
        "names = ['kubernetes.default.svc.cluster.local', 'kubernetes.default', 's3.ftc-host.svc.cluster.local', 's3.ftc-host']\n"
        "for name in names:\n"
        "    print('resolved', name, socket.gethostbyname(name))\n"
        f"url = '{s3_server.cluster_endpoint_url}'\n"
        "with urllib.request.urlopen(url + '/minio/health/live', timeout=10) as r:\n"
        "    print('health', r.status, r.headers.get('Server'))\n"
        "try:\n    urllib.request.urlopen(url + '/ftc?list-type=2', timeout=10)\n"
        "except urllib.error.HTTPError as e:\n    print('unsigned list', e.code, 'AccessDenied' in e.read().decode())\n"
    )
    script = 'python3 -c "$PROBE"'
    spec = pod_spec(shell(script, env=[{"name": "PROBE", "value": probe}]))
    core.create_namespaced_pod(namespace, {"metadata": {"name": "dns"}, "spec": spec})

    wait_for(lambda: core.read_namespaced_pod("dns", namespace).status.phase in ("Succeeded", "Failed"), 60, "dns done")

    out = control_plane.pod_log(namespace, "dns", "main")
    assert core.read_namespaced_pod("dns", namespace).status.phase == "Succeeded", out
    assert f"nameserver {control_plane.dns_ip}" in out and f"search {namespace}.svc.cluster.local" in out, out
    for name, ip in [
        ("kubernetes.default.svc.cluster.local", api_ip),
        ("kubernetes.default", api_ip),  # through the search path
        ("s3.ftc-host.svc.cluster.local", s3_ip),
        ("s3.ftc-host", s3_ip),
    ]:
        assert f"resolved {name} {ip}\n" in out, out
    # MinIO answers through the Service: healthy, and it refuses an unsigned listing as S3 does
    assert "health 200 MinIO" in out, out
    assert "unsigned list 403 True" in out, out


def test_a_second_gpu_node_joins_like_the_first_its_pods_resolve_names_and_it_leaves(
    control_plane: Cluster, namespace: str, core
):
    # gpu-node-1 (for multi-node training) is started on demand: its first start on a machine imports the step
    # images into its own containerd (minutes); later starts, and a multi-node test after this one, take seconds.
    took = control_plane.add_node("gpu-node-1")
    try:
        node = core.read_node("gpu-node-1")
        assert node.status.allocatable["nvidia.com/gpu"] == "8", took
        assert node.metadata.labels["nvidia.com/gpu.product"] == A100
        assert any(t.key == "nvidia.com/gpu" and t.effect == "NoSchedule" for t in node.spec.taints)
        # A GPU pod pinned there runs and resolves a Service through the cluster DNS (JobSet pods find their
        # leader by name)
        script = "python3 -c \"import socket; print('resolved', socket.gethostbyname('kubernetes.default'))\""
        spec = pod_spec(shell(script), gpus=1, gpu_node=True)
        spec["nodeSelector"]["kubernetes.io/hostname"] = "gpu-node-1"
        core.create_namespaced_pod(namespace, {"metadata": {"name": "second"}, "spec": spec})
        wait_for(lambda: core.read_namespaced_pod("second", namespace).status.phase == "Succeeded", 60, "second Succeeded")
        api_ip = core.read_namespaced_service("kubernetes", "default").spec.cluster_ip
        assert f"resolved {api_ip}" in control_plane.pod_log(namespace, "second", "main")
    finally:
        control_plane.remove_node("gpu-node-1")
    assert "gpu-node-1" not in {n.metadata.name for n in core.list_node().items}
