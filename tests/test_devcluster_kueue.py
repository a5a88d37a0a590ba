"""The Kueue and JobSet install of the local cluster (devcluster/kube/kueue.py), rendered through their own charts
from the Go modules with `helm template`: the local images, no pulls, controllers on the CPU node, Kueue's
configuration (Jobs without a queue untouched, only the Job and JobSet integrations), and the queues' shape."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from devcluster.kube import kueue as kq
from tests.test_helm import helm_binary

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def helm() -> Path:
    return helm_binary()


def template(helm: Path, module: str, version: str, chart: str, values: dict, tmp_path: Path) -> list[dict]:
    path = tmp_path / f"{chart}-values.yaml"
    path.write_text(yaml.safe_dump(values))
    proc = subprocess.run(
        [str(helm), "template", chart, str(kq.chart_dir(module, version, chart)), "-n", f"{chart}-system", "-f", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    # The CRDs are most of Kueue's output (megabytes of schema) and nothing here reads them: not parsed.
    texts = [t for t in proc.stdout.split("\n---\n") if "\nkind: CustomResourceDefinition" not in t]
    return [d for t in texts if (d := yaml.load(t, Loader=yaml.CSafeLoader))]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    [doc] = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return doc


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        ("registry.k8s.io/kueue/kueue:v0.17.0", ("registry.k8s.io/kueue/kueue", "v0.17.0")),
        ("localhost:5000/jobset:v0.12.0", ("localhost:5000/jobset", "v0.12.0")),
        ("busybox:1", ("busybox", "1")),
    ],
)
def test_split_image(image: str, expected: tuple[str, str]):
    assert kq.split_image(image) == expected


@pytest.mark.parametrize("image", ["localhost:5000/jobset", "kueue"])
def test_an_image_without_a_tag_is_refused(image: str):
    with pytest.raises(ValueError, match="has no tag"):
        kq.split_image(image)


def test_kueue_chart_renders_the_local_image_on_the_cpu_node_with_queued_jobs_only(helm: Path, tmp_path: Path):
    docs = template(helm, kq.KUEUE_MODULE, kq.KUEUE_VERSION, "kueue", kq.kueue_values(), tmp_path)
    pod = one(docs, "Deployment", "kueue-controller-manager")["spec"]["template"]["spec"]
    [manager] = pod["containers"]
    assert (manager["image"], manager["imagePullPolicy"]) == (kq.KUEUE_IMAGE, "IfNotPresent")
    assert pod["nodeSelector"] == {"kubernetes.io/hostname": kq.CONTROLLER_NODE}
    assert manager["resources"]["requests"] == {"cpu": "100m", "memory": "128Mi"}
    config = yaml.safe_load(one(docs, "ConfigMap", "kueue-manager-config")["data"]["controller_manager_config.yaml"])
    assert config["manageJobsWithoutQueueName"] is False
    assert config["integrations"]["frameworks"] == ["batch/job", "jobset.x-k8s.io/jobset"]
    assert config["internalCertManagement"]["enable"] is True
    # Webhooks on; the Job webhook skips the system and add-on namespaces (the chart copies the selector).
    webhooks = {w["name"]: w for w in one(docs, "MutatingWebhookConfiguration")["webhooks"]}
    skipped = webhooks["mjob.kb.io"]["namespaceSelector"]["matchExpressions"][0]
    assert (skipped["operator"], set(skipped["values"])) == ("NotIn", {"kube-system", "kueue-system", "jobset-system"})
    assert webhooks["mjob.kb.io"]["failurePolicy"] == "Fail"
    assert not [d for d in docs if d["kind"] in ("Issuer", "Certificate")]  # no cert-manager: internal certificates


def test_jobset_chart_renders_the_local_image_on_the_cpu_node(helm: Path, tmp_path: Path):
    docs = template(helm, kq.JOBSET_MODULE, kq.JOBSET_VERSION, "jobset", kq.jobset_values(), tmp_path)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    [controller] = pod["containers"]
    assert (controller["image"], controller["imagePullPolicy"]) == (kq.JOBSET_IMAGE, "IfNotPresent")
    assert pod["nodeSelector"] == {"kubernetes.io/hostname": kq.CONTROLLER_NODE}
    assert {w["name"] for w in one(docs, "ValidatingWebhookConfiguration")["webhooks"]} >= {
        "validate-jobset-x-k8s-io-v1alpha2-jobset.x-k8s.io"
    }


def test_the_cluster_queue_holds_8_gpus_in_the_a100_flavor_and_preempts_lower_priority():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in kq.queue_manifests()}
    assert all(d["apiVersion"] == "kueue.x-k8s.io/v1beta2" for d in docs.values())
    cq = docs["ClusterQueue", kq.CLUSTER_QUEUE]["spec"]
    quotas = {
        (f["name"], r["name"]): r["nominalQuota"]
        for group in cq["resourceGroups"]
        for f in group["flavors"]
        for r in f["resources"]
    }
    assert quotas == {
        (kq.CPU_FLAVOR, "cpu"): "64",
        (kq.CPU_FLAVOR, "memory"): "256Gi",
        (kq.CPU_FLAVOR, "ephemeral-storage"): "10Ti",  # ftc's GPU steps request their scratch disk
        (kq.GPU_FLAVOR, "nvidia.com/gpu"): 8,
    }
    assert cq["preemption"]["withinClusterQueue"] == "LowerPriority"
    a100 = docs["ResourceFlavor", kq.GPU_FLAVOR]["spec"]
    assert a100["nodeLabels"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert a100["tolerations"][0] | {"operator": "Equal"} == {
        "key": "nvidia.com/gpu",
        "operator": "Equal",
        "value": "present",
        "effect": "NoSchedule",
    }
    assert {name: d["value"] for (kind, name), d in docs.items() if kind == "WorkloadPriorityClass"} == {
        "ftc-low": 100,
        "ftc-high": 1000,
    }
