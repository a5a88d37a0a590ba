"""Kueue and JobSet in the local cluster, installed as users install them, and the queues ftc runs under.

Both come from their Go modules (``sigs.k8s.io/kueue`` v0.17.0, ``sigs.k8s.io/jobset`` v0.12.0, pinned in
``devcluster/scripts/versions.env``): ``devcluster/scripts/build-addons.sh`` builds the controllers and their local
images (:data:`~devcluster.kube.addons.KUEUE_IMAGE`, :data:`~devcluster.kube.addons.JOBSET_IMAGE`: the upstream
names), which the nodes load like ftc's own; this module ``helm upgrade --install``s each project's **own chart**
from the module zip (``charts/kueue``, ``charts/jobset``; ``go mod download -json`` finds it) with the cluster's helm:

- webhooks on, certificates from the controllers' internal certificate management (no cert-manager);
- the local image, ``imagePullPolicy: IfNotPresent`` (there is no registry), the controller on the CPU node,
  small CPU requests (the nodes share 2 cores);
- Kueue integrations ``batch/job`` and ``jobset.x-k8s.io/jobset`` only, ``manageJobsWithoutQueueName: false``
  (a Job without the ``kueue.x-k8s.io/queue-name`` label is left alone: without a queue, ftc works as before),
  and its webhooks skip ``kube-system`` and the add-ons' namespaces (``managedJobsNamespaceSelector``).

An install is done when the webhooks really serve: server-side dry-run creates of a queued Job (through
Kueue's Job webhooks), of a LocalQueue and of a JobSet succeed.

:meth:`Addons.apply_queues` then creates what ftc's queued Jobs run under (``kueue.x-k8s.io/v1beta2``):

- ResourceFlavor ``default-flavor`` (no node labels: CPU steps) and ``fake-a100`` (the A100 nodes' product
  label, their ``nvidia.com/gpu=present:NoSchedule`` taint, and a toleration for it);
- ClusterQueue ``ftc-cq``: two resource groups, cpu 64, memory 256Gi and ephemeral-storage 10Ti in
  ``default-flavor`` (every step; the CPU steps, prepare and score, carry the queue label too; the GPU steps
  request their scratch disk) and 8 ``nvidia.com/gpu`` in ``fake-a100`` (so Kueue's message on a waiting
  Workload names the A100 flavor alone); ``BestEffortFIFO``; preemption ``withinClusterQueue: LowerPriority``;
- ClusterQueue ``ftc-cq-strict``: the same quotas and preemption, ``StrictFIFO`` (a head that does not fit blocks
  the workloads behind it), for runs that check admission order (priority, then creation);
- WorkloadPriorityClasses ``ftc-low`` (100) and ``ftc-high`` (1000).

:meth:`Addons.create_local_queue` puts the LocalQueue ``ftc-queue`` (pointing at ``ftc-cq``, or another name and
ClusterQueue) into a namespace.

    addons = Addons(bin_dir, kubeconfig)
    if not addons.installed():
        addons.install()                     # timings in addons.timings
    addons.create_local_queue("my-namespace")
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from devcluster.kube.addons import JOBSET_IMAGE, JOBSET_VERSION, KUEUE_IMAGE, KUEUE_VERSION
from devcluster.kube.control_plane import wait_for

KUEUE_MODULE = "sigs.k8s.io/kueue"
JOBSET_MODULE = "sigs.k8s.io/jobset"
KUEUE_NAMESPACE = "kueue-system"
JOBSET_NAMESPACE = "jobset-system"
KUEUE_RELEASE = "kueue"
JOBSET_RELEASE = "jobset"

# The Kueue API ftc and the tests use: v1beta2 is v0.17's storage version (v1beta1 is served, deprecated).
KUEUE_GROUP = "kueue.x-k8s.io"
KUEUE_API_VERSION = "v1beta2"
KUEUE_API = f"{KUEUE_GROUP}/{KUEUE_API_VERSION}"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
JOBSET_API = "jobset.x-k8s.io/v1alpha2"

CLUSTER_QUEUE = "ftc-cq"
LOCAL_QUEUE = "ftc-queue"
# The same quotas admitted in strict order (StrictFIFO: a head that does not fit blocks every workload behind it),
# for runs whose admission order is checked against priority, then creation (the many-comparisons test).
STRICT_CLUSTER_QUEUE = "ftc-cq-strict"
STRICT_LOCAL_QUEUE = "ftc-queue-strict"
BEST_EFFORT_FIFO, STRICT_FIFO = "BestEffortFIFO", "StrictFIFO"
GPU_FLAVOR = "fake-a100"
CPU_FLAVOR = "default-flavor"
GPU_QUOTA = 8
CPU_QUOTA = "64"
MEMORY_QUOTA = "256Gi"
# ftc's GPU steps request ephemeral-storage (the base models' size on disk): a resource the ClusterQueue does not
# cover leaves a Workload pending ("resource ephemeral-storage unavailable in ClusterQueue").
EPHEMERAL_STORAGE_QUOTA = "10Ti"
PRIORITY_CLASSES = {"ftc-low": 100, "ftc-high": 1000}

GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_PRODUCT = "NVIDIA-A100-SXM4-80GB"
GPU_TAINT = {"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}
CONTROLLER_NODE = "cpu-node-0"


class AddonError(RuntimeError):
    """Kueue or JobSet could not be found or installed; the message says which and why."""


# --- pure planning ---------------------------------------------------------------------------------


def split_image(image: str) -> tuple[str, str]:
    """``registry/path/name:tag`` -> (repository, tag); a port in the registry is not a tag."""
    slash, colon = image.rfind("/"), image.rfind(":")
    if colon <= slash:
        raise ValueError(f"image {image!r} has no tag")
    return image[:colon], image[colon + 1 :]


def kueue_manager_config(namespace: str = KUEUE_NAMESPACE, skip: tuple[str, ...] = ("kube-system", JOBSET_NAMESPACE)) -> dict:
    """Kueue's Configuration (``config.kueue.x-k8s.io/v1beta2``): the chart's default with the integrations
    narrowed to batch/job and JobSet, Jobs without a queue label left alone, no webhook calls for Jobs in
    ``namespace`` and ``skip``."""
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "health": {"healthProbeBindAddress": ":8081"},
        "metrics": {"bindAddress": ":8443"},
        "webhook": {"port": 9443},
        "leaderElection": {"leaderElect": True, "resourceName": "c1f6bfd2.kueue.x-k8s.io"},
        "controller": {
            "groupKindConcurrency": {
                "Job.batch": 5,
                "Pod": 5,
                "Workload.kueue.x-k8s.io": 5,
                "LocalQueue.kueue.x-k8s.io": 1,
                "ClusterQueue.kueue.x-k8s.io": 1,
                "ResourceFlavor.kueue.x-k8s.io": 1,
            }
        },
        "clientConnection": {"qps": 50, "burst": 100},
        "manageJobsWithoutQueueName": False,
        "managedJobsNamespaceSelector": {
            "matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": [*skip, namespace]}]
        },
        "internalCertManagement": {"enable": True},
        "integrations": {"frameworks": ["batch/job", "jobset.x-k8s.io/jobset"]},
    }


def kueue_values(image: str = KUEUE_IMAGE, node: str = CONTROLLER_NODE) -> dict:
    """Values for Kueue's own chart (charts/kueue of the module)."""
    repository, tag = split_image(image)
    return {
        "controllerManager": {
            "manager": {
                "image": {"repository": repository, "tag": tag, "pullPolicy": "IfNotPresent"},
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "1", "memory": "512Mi"}},
            },
            "nodeSelector": {"kubernetes.io/hostname": node},
        },
        "managerConfig": {"controllerManagerConfigYaml": yaml.safe_dump(kueue_manager_config(), sort_keys=False)},
    }


def jobset_values(image: str = JOBSET_IMAGE, node: str = CONTROLLER_NODE) -> dict:
    """Values for JobSet's own chart (charts/jobset of the module)."""
    repository, tag = split_image(image)
    return {
        "image": {"repository": repository, "tag": tag, "pullPolicy": "IfNotPresent"},
        "controller": {
            "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"cpu": "1", "memory": "512Mi"}},
            "nodeSelector": {"kubernetes.io/hostname": node},
        },
    }


def cluster_queue_manifest(name: str, strategy: str, gpu_quota: int = GPU_QUOTA) -> dict:
    """A ClusterQueue of ftc's quotas (see the module docstring) with the queueing strategy `strategy`."""
    if strategy not in (BEST_EFFORT_FIFO, STRICT_FIFO):
        raise ValueError(f"strategy must be {BEST_EFFORT_FIFO} or {STRICT_FIFO}, got {strategy!r}")
    return {
        "apiVersion": KUEUE_API,
        "kind": "ClusterQueue",
        "metadata": {"name": name},
        "spec": {
            "namespaceSelector": {},
            "queueingStrategy": strategy,
            # cpu and memory from one pool (every step), GPUs from the A100 flavor alone: a GPU pod gets both
            # flavors' node labels, a CPU pod (prepare, score) only the empty default-flavor's.
            "resourceGroups": [
                {
                    "coveredResources": ["cpu", "memory", "ephemeral-storage"],
                    "flavors": [
                        {
                            "name": CPU_FLAVOR,
                            "resources": [
                                {"name": "cpu", "nominalQuota": CPU_QUOTA},
                                {"name": "memory", "nominalQuota": MEMORY_QUOTA},
                                {"name": "ephemeral-storage", "nominalQuota": EPHEMERAL_STORAGE_QUOTA},
                            ],
                        }
                    ],
                },
                {
                    "coveredResources": [GPU_RESOURCE],
                    "flavors": [{"name": GPU_FLAVOR, "resources": [{"name": GPU_RESOURCE, "nominalQuota": gpu_quota}]}],
                },
            ],
            "preemption": {"withinClusterQueue": "LowerPriority", "reclaimWithinCohort": "Never"},
        },
    }


def queue_manifests(gpu_quota: int = GPU_QUOTA, priority_classes: dict[str, int] | None = None) -> list[dict]:
    """ResourceFlavors, the ClusterQueues and the WorkloadPriorityClasses (see the module docstring)."""
    classes = PRIORITY_CLASSES if priority_classes is None else priority_classes

    toleration = {"key": GPU_TAINT["key"], "operator": "Equal", "value": GPU_TAINT["value"], "effect": GPU_TAINT["effect"]}
    return [
        {"apiVersion": KUEUE_API, "kind": "ResourceFlavor", "metadata": {"name": CPU_FLAVOR}, "spec": {}},
        {
            "apiVersion": KUEUE_API,
            "kind": "ResourceFlavor",
            "metadata": {"name": GPU_FLAVOR},
            "spec": {"nodeLabels": {GPU_PRODUCT_LABEL: GPU_PRODUCT}, "nodeTaints": [GPU_TAINT], "tolerations": [toleration]},
        },
        cluster_queue_manifest(CLUSTER_QUEUE, BEST_EFFORT_FIFO, gpu_quota),
        cluster_queue_manifest(STRICT_CLUSTER_QUEUE, STRICT_FIFO, gpu_quota),
        *(
            {
                "apiVersion": KUEUE_API,
                "kind": "WorkloadPriorityClass",
                "metadata": {"name": name},
                "value": value,
                "description": f"ftc: {name.removeprefix('ftc-')} priority",
            }
            for name, value in classes.items()
        ),
    ]


def local_queue_manifest(namespace: str, name: str = LOCAL_QUEUE, cluster_queue: str = CLUSTER_QUEUE) -> dict:
    return {
        "apiVersion": KUEUE_API,
        "kind": "LocalQueue",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"clusterQueue": cluster_queue},
    }


def _probe_job(namespace: str) -> dict:
    """A suspended, queued Job for a server-side dry run (it passes Kueue's Job webhooks; nothing is stored)."""
    container = {"name": "probe", "image": KUEUE_IMAGE, "resources": {"requests": {"cpu": "1m"}}}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "ftc-kueue-probe", "namespace": namespace, "labels": {QUEUE_LABEL: LOCAL_QUEUE}},
        "spec": {"suspend": True, "template": {"spec": {"restartPolicy": "Never", "containers": [container]}}},
    }


def _probe_jobset(namespace: str) -> dict:
    pod = {"restartPolicy": "Never", "containers": [{"name": "probe", "image": JOBSET_IMAGE}]}
    return {
        "apiVersion": JOBSET_API,
        "kind": "JobSet",
        "metadata": {"name": "ftc-jobset-probe", "namespace": namespace},
        "spec": {"replicatedJobs": [{"name": "w", "replicas": 1, "template": {"spec": {"template": {"spec": pod}}}}]},
    }


# --- module sources --------------------------------------------------------------------------------


def module_dir(module: str, version: str) -> Path:
    """The extracted module (``go mod download -json``: instant when the module cache has it)."""
    go = shutil.which("go") or "/usr/local/go/bin/go"
    env = {**os.environ, "GOWORK": "off", "GOFLAGS": "-mod=mod", "GO111MODULE": "on", "GOTOOLCHAIN": "local"}
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            [go, "mod", "download", "-json", f"{module}@{version}"], cwd=tmp, env=env, capture_output=True, text=True, timeout=600
        )
    try:
        info = json.loads(proc.stdout)
    except json.JSONDecodeError:
        info = {}
    if proc.returncode != 0 or "Dir" not in info:
        raise AddonError(f"go mod download {module}@{version} failed: {info.get('Error') or proc.stderr.strip()}")
    return Path(info["Dir"])


def chart_dir(module: str, version: str, chart: str) -> Path:
    path = module_dir(module, version) / "charts" / chart
    if not (path / "Chart.yaml").is_file():
        raise AddonError(f"{module}@{version} has no chart at charts/{chart}")
    return path


# --- installing ------------------------------------------------------------------------------------


@dataclass
class Addons:
    """Installs Kueue and JobSet into the cluster of ``kubeconfig`` with the cluster's ``kubectl`` and ``helm``."""

    bin_dir: Path
    kubeconfig: Path
    log: Callable[[str], None] = print
    timings: dict[str, float] = field(default_factory=dict)

    def run(self, tool: str, *args: str, input: str | None = None, timeout: float = 120, check: bool = True) -> str:
        proc = subprocess.run(
            [str(self.bin_dir / tool), "--kubeconfig", str(self.kubeconfig), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AddonError(f"{tool} {' '.join(args)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc.stdout

    def kubectl(self, *args: str, input: str | None = None, timeout: float = 120, check: bool = True) -> str:
        return self.run("kubectl", *args, input=input, timeout=timeout, check=check)

    def apply(self, manifests: list[dict]) -> None:
        """``kubectl apply --server-side`` (idempotent)."""
        doc = "\n---\n".join(json.dumps(m) for m in manifests)
        self.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=ftc-devcluster", "-f", "-", input=doc)

    def _dry_run(self, manifest: dict) -> bool:
        self.kubectl("create", "--dry-run=server", "-o", "name", "-f", "-", input=json.dumps(manifest), timeout=30)
        return True

    def helm_install(self, release: str, chart: Path, namespace: str, values: dict, timeout: float = 300) -> None:
        # The namespace enforces the `restricted` Pod Security Standard, like the test namespaces.
        labels = {"pod-security.kubernetes.io/enforce": "restricted"}
        self.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace, "labels": labels}}])
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            yaml.safe_dump(values, f)
        try:
            self.run("helm", "upgrade", "--install", release, str(chart), "-n", namespace, "-f", f.name, timeout=timeout)
        finally:
            os.unlink(f.name)

    def wait_deployment(self, namespace: str, name: str, timeout: float) -> None:
        try:
            self.kubectl(
                "rollout", "status", f"deployment/{name}", "-n", namespace, f"--timeout={int(timeout)}s", timeout=timeout + 10
            )
        except (AddonError, subprocess.TimeoutExpired) as e:
            pods = self.kubectl("get", "pods", "-n", namespace, "-o", "wide", check=False)
            events = self.kubectl("get", "events", "-n", namespace, "--sort-by=.lastTimestamp", check=False)
            raise AddonError(f"deployment {namespace}/{name} not ready: {e}\n{pods}\n{events[-3000:]}") from e

    def install_jobset(self, timeout: float = 300) -> None:
        chart = chart_dir(JOBSET_MODULE, JOBSET_VERSION, "jobset")
        self.helm_install(JOBSET_RELEASE, chart, JOBSET_NAMESPACE, jobset_values(), timeout)

    def install_kueue(self, timeout: float = 300) -> None:
        chart = chart_dir(KUEUE_MODULE, KUEUE_VERSION, "kueue")
        self.helm_install(KUEUE_RELEASE, chart, KUEUE_NAMESPACE, kueue_values(), timeout)

    def wait_serving(self, timeout: float = 300) -> None:
        """Both controllers ready and their webhooks answering server-side dry runs (namespace default)."""
        self.wait_deployment(JOBSET_NAMESPACE, "jobset-controller", timeout)  # the chart names it RELEASE-controller
        self.wait_deployment(KUEUE_NAMESPACE, "kueue-controller-manager", timeout)
        wait_for(lambda: self._dry_run(_probe_jobset("default")), timeout, "JobSet's webhooks to serve", interval=1)
        wait_for(lambda: self._dry_run(_probe_job("default")), timeout, "Kueue's Job webhooks to serve", interval=1)
        lq = local_queue_manifest("default", "ftc-probe")
        wait_for(lambda: self._dry_run(lq), timeout, "Kueue's LocalQueue API to serve", interval=1)

    def _active(self, kind: str, name: str, namespace: str | None = None) -> bool:
        where = ["-n", namespace] if namespace else []
        jsonpath = "jsonpath={.status.conditions[?(@.type=='Active')].status}"
        return self.kubectl("get", f"{kind}.{KUEUE_GROUP}", name, *where, "-o", jsonpath) == "True"

    def apply_queues(self, timeout: float = 60) -> None:
        """The flavors, the ClusterQueue and the priority classes; waits until the ClusterQueue is Active."""
        self.apply(queue_manifests())
        wait_for(
            lambda: all(self._active("clusterqueues", cq) for cq in (CLUSTER_QUEUE, STRICT_CLUSTER_QUEUE)),
            timeout,
            f"ClusterQueues {CLUSTER_QUEUE} and {STRICT_CLUSTER_QUEUE} Active",
            interval=0.5,
        )

    def create_local_queue(
        self, namespace: str, name: str = LOCAL_QUEUE, timeout: float = 30, cluster_queue: str = CLUSTER_QUEUE
    ) -> None:
        """The LocalQueue ``name`` in ``namespace`` pointing at ``cluster_queue``; waits until it is Active."""
        self.apply([local_queue_manifest(namespace, name, cluster_queue)])
        wait_for(
            lambda: self._active("localqueues", name, namespace), timeout, f"LocalQueue {namespace}/{name} Active", interval=0.3
        )

    def installed(self) -> bool:
        """Both releases deployed and the ClusterQueue Active (a reused cluster needs no second install)."""
        releases = json.loads(self.run("helm", "list", "-A", "-o", "json", check=False) or "[]")
        deployed = {r["name"] for r in releases if r.get("status") == "deployed"}
        if not {KUEUE_RELEASE, JOBSET_RELEASE} <= deployed:
            return False
        try:
            return self._active("clusterqueues", CLUSTER_QUEUE)
        except AddonError:
            return False

    def install(self, timeout: float = 300) -> dict[str, float]:
        """JobSet, then Kueue (its JobSet integration needs JobSet's CRD), waited until their webhooks serve, then
        the queues. Returns (and adds to ``timings``) the seconds of each part."""
        t0 = time.monotonic()
        self.install_jobset(timeout)
        t1 = time.monotonic()
        self.install_kueue(timeout)
        t2 = time.monotonic()
        self.wait_serving(timeout)
        t3 = time.monotonic()
        self.apply_queues()
        t4 = time.monotonic()
        timings = {
            "helm_jobset_s": t1 - t0,
            "helm_kueue_s": t2 - t1,
            "serving_s": t3 - t2,
            "queues_s": t4 - t3,
            "total_s": t4 - t0,
        }
        self.timings.update(timings)
        self.log(
            f"Kueue {KUEUE_VERSION} and JobSet {JOBSET_VERSION} installed in {t4 - t0:.1f}s (webhooks served at {t3 - t0:.1f}s)"
        )
        return timings
