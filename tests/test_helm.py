"""The Helm chart: lints, renders, least-privilege RBAC, and a config the operator accepts."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from ftc_operator.config import OperatorConfig

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "ftc"


def helm_binary() -> Path:
    from tests.cluster.control_plane import read_versions

    path = Path.home() / ".cache" / "ftc" / f"k8s-{read_versions()['K8S_VERSION']}" / "bin" / "helm"
    if not path.exists():
        subprocess.run(["bash", str(REPO / "scripts" / "build-control-plane.sh")], check=True, capture_output=True, timeout=3600)
    return path


@pytest.fixture(scope="module")
def helm() -> Path:
    return helm_binary()


def template(helm: Path, *args: str) -> list[dict]:
    out = subprocess.run(
        [str(helm), "template", "t", str(CHART), "-n", "ftc-system", *args], capture_output=True, text=True, check=True
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def test_helm_lint(helm):
    proc = subprocess.run([str(helm), "lint", "--strict", str(CHART)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_rendered_config_is_a_valid_operator_config(helm):
    docs = template(helm)
    cm = by_kind(docs, "ConfigMap")[0]
    config = OperatorConfig.model_validate(yaml.safe_load(cm["data"]["config.yaml"]))
    assert config.placement.gpu_product == "NVIDIA-A100-SXM4-80GB"
    assert config.step_service_account == "ftc-step"
    assert config.train.args == ["train"]


def test_values_override_placement_and_images(helm):
    docs = template(helm, "--set", "config.placement.queueName=team-a", "--set", "config.trainerImage=reg/t:1")
    config = OperatorConfig.model_validate(yaml.safe_load(by_kind(docs, "ConfigMap")[0]["data"]["config.yaml"]))
    assert (config.placement.queue_name, config.trainer_image) == ("team-a", "reg/t:1")


def test_operator_rbac_is_least_privilege_and_never_touches_secrets(helm):
    docs = template(helm)
    rules = by_kind(docs, "ClusterRole")[0]["rules"]
    granted = {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    # Exactly what kube.py and kopf's watches use (the e2e tests run the operator with these rules); nothing on Secrets.
    assert granted == {
        ("ftc.dev", "finetunecomparisons", "get"),
        ("ftc.dev", "finetunecomparisons", "list"),
        ("ftc.dev", "finetunecomparisons", "watch"),
        ("ftc.dev", "finetunecomparisons/status", "update"),
        ("batch", "jobs", "list"),
        ("batch", "jobs", "watch"),
        ("batch", "jobs", "create"),
        ("", "configmaps", "create"),
        ("", "pods", "list"),
        ("", "pods", "watch"),
        ("", "events", "create"),
    }


def test_step_service_account_may_patch_only_pods(helm):
    docs = template(helm, "--set", "stepServiceAccount.namespaces={team-a}")
    roles = [r for r in by_kind(docs, "Role") if r["metadata"]["name"] == "ftc-step"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["ftc-system", "team-a"]
    assert roles[0]["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["patch"]}]


def test_watch_namespaces_use_namespaced_roles(helm):
    docs = template(helm, "--set", "watchNamespaces={a,b}")
    assert not by_kind(docs, "ClusterRole")
    assert sorted(r["metadata"]["namespace"] for r in by_kind(docs, "RoleBinding") if "operator" in r["metadata"]["name"]) == [
        "a",
        "b",
    ]
    args = by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=a" in args and "--all-namespaces" not in args


def test_deployment_probes_and_security(helm):
    dep = by_kind(template(helm), "Deployment")[0]
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["image"] == "ghcr.io/ftc-project/ftc-operator:0.1.0"


def test_no_secret_unless_asked(helm):
    assert not by_kind(template(helm), "Secret")
    docs = template(helm, "--set", "judge.createSecret=true", "--set", "judge.apiKey=sk-x")
    assert by_kind(docs, "Secret")[0]["stringData"] == {"api-key": "sk-x"}


def test_chart_crd_matches_generated_crd():
    assert (CHART / "crds" / "ftc.dev_finetunecomparisons.yaml").read_text() == (
        REPO / "crds" / "ftc.dev_finetunecomparisons.yaml"
    ).read_text()


def test_numeric_extra_env_from_set_becomes_strings(helm):
    docs = template(helm, "--set", "config.extraEnv.OMP_NUM_THREADS=1", "--set", "config.extraEnv.DEBUG=true")
    config = OperatorConfig.model_validate(yaml.safe_load(by_kind(docs, "ConfigMap")[0]["data"]["config.yaml"]))
    assert config.extra_env == {"OMP_NUM_THREADS": "1", "DEBUG": "true"}
