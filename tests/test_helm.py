"""The Helm chart: lints, renders, least-privilege RBAC, and a config the operator accepts."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from ftc_api.spec import FineTuneComparisonSpec
from ftc_operator.config import OperatorConfig
from ftc_operator.rendering import Owner, render_job

from devcluster import steps
from tests.test_operator_rendering import restricted_violations

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "ftc"


def helm_binary() -> Path:
    """The pinned helm, built with the control plane (cached) when missing."""
    from devcluster.kube.control_plane import build_binaries

    return build_binaries() / "helm"


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
        ("batch", "jobs", "get"),
        ("batch", "jobs", "list"),
        ("batch", "jobs", "watch"),
        ("batch", "jobs", "create"),
        ("batch", "jobs", "delete"),
        ("", "configmaps", "create"),
        ("", "configmaps", "get"),
        ("", "pods", "list"),
        ("", "pods", "watch"),
        ("", "events", "create"),
        ("", "events", "get"),
        ("", "events", "patch"),
    }


@pytest.mark.parametrize("replicas", [1, 2])
def test_several_replicas_elect_a_leader_over_a_lease_in_the_release_namespace(helm, replicas):
    docs = template(helm, "--set", f"replicas={replicas}")
    deploy = by_kind(docs, "Deployment")[0]
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]}
    assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}
    leader = [r for r in by_kind(docs, "Role") if r["metadata"]["name"].endswith("-operator-leader")]
    if replicas == 1:
        assert "--leader-elect" not in container["args"] and not leader
        assert deploy["spec"]["strategy"]["type"] == "Recreate"
        return
    assert "--leader-elect" in container["args"] and "--lease-name=t-ftc-operator" in container["args"]
    assert deploy["spec"]["strategy"]["type"] == "RollingUpdate"
    assert leader[0]["metadata"]["namespace"] == "ftc-system"
    lease_rule = {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update"]}
    assert leader[0]["rules"] == [lease_rule]


def test_step_service_account_may_patch_only_pods(helm):
    docs = template(helm, "--set", "stepServiceAccount.namespaces={team-a}")
    roles = [r for r in by_kind(docs, "Role") if r["metadata"]["name"] == "ftc-step"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["ftc-system", "team-a"]
    assert roles[0]["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["patch"]}]
    # ... narrowed by admission to its own pod's progress annotation (tests/test_e2e_operator.py tries the rest)
    policy = by_kind(docs, "ValidatingAdmissionPolicy")[0]
    users = policy["spec"]["matchConditions"][0]["expression"]
    assert "'system:serviceaccount:ftc-system:ftc-step', 'system:serviceaccount:team-a:ftc-step'" in users
    assert by_kind(docs, "ValidatingAdmissionPolicyBinding")[0]["spec"] == {
        "policyName": policy["metadata"]["name"],
        "validationActions": ["Deny"],
    }


def test_watch_namespaces_use_namespaced_roles(helm):
    docs = template(helm, "--set", "watchNamespaces={a,b}")
    assert not by_kind(docs, "ClusterRole")
    assert sorted(r["metadata"]["namespace"] for r in by_kind(docs, "RoleBinding") if "operator" in r["metadata"]["name"]) == [
        "a",
        "b",
    ]
    args = by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=a" in args and "--all-namespaces" not in args


def config_of(docs: list[dict]) -> OperatorConfig:
    return OperatorConfig.model_validate(yaml.safe_load(by_kind(docs, "ConfigMap")[0]["data"]["config.yaml"]))


@pytest.mark.parametrize(
    ("args", "health", "metrics"),
    [
        pytest.param((), 8080, 9090, id="defaults"),
        pytest.param(("--set", "livenessPort=8181", "--set", "metrics.port=9191"), 8181, 9191, id="ports-set"),
    ],
)
def test_deployment_probes_ports_and_metrics_service(helm, args, health, metrics):
    docs = template(helm, *args)
    c = by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    assert f"--liveness=http://0.0.0.0:{health}/healthz" in c["args"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"health": health, "metrics": metrics}
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["image"] == "ghcr.io/ftc-project/ftc-operator:0.1.0"
    service = by_kind(docs, "Service")[0]
    assert service["spec"]["ports"] == [{"name": "metrics", "port": metrics, "targetPort": "metrics"}]
    assert service["metadata"]["annotations"]["prometheus.io/port"] == str(metrics)
    assert config_of(docs).metrics_port == metrics


def test_metrics_off_means_no_port_and_no_service(helm):
    docs = template(helm, "--set", "metrics.port=0")
    c = by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    assert [p["name"] for p in c["ports"]] == ["health"]
    assert not by_kind(docs, "Service")
    assert config_of(docs).metrics_port == 0


def test_operator_deployment_meets_restricted(helm):
    pod = by_kind(template(helm), "Deployment")[0]["spec"]["template"]["spec"]
    assert restricted_violations(pod) == []
    assert pod["automountServiceAccountToken"] is True  # the operator needs its token
    assert pod["securityContext"]["runAsUser"] == 65532
    assert next(v for v in pod["volumes"] if v["name"] == "tmp") == {"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}}


def test_step_pods_rendered_from_the_charts_config_meet_restricted(helm, tmp_path):
    values = tmp_path / "values.yaml"
    test_steps = steps.chart_values()["config"]
    values.write_text(
        yaml.safe_dump({"config": {"train": {"tmpSizeLimit": "1Ti", "command": steps.command("stub.py")}, **test_steps}})
    )
    config = config_of(template(helm, "-f", str(values)))
    assert (config.prepare.tmp_size_limit, config.train.tmp_size_limit, config.evaluate.tmp_size_limit) == (
        "20Gi",
        "1Ti",
        "200Gi",
    )
    assert config.train.args == ["train"]  # the file's train settings merge with the chart's
    assert config.train.command == ["python", "/ftc-test/stub.py"]
    spec = FineTuneComparisonSpec.model_validate(
        {
            "models": [{"name": "a", "baseModel": "x"}, {"name": "b", "baseModel": "y"}],
            "dataset": {"source": "s3://ftc/d.jsonl"},
            "storage": {"bucket": "ftc"},
            "evaluation": {"judge": {"baseUrl": "https://judge.example/v1"}},
        }
    )
    owner = Owner(name="c", namespace="ns", uid="u")
    for step, model in (("prepare", None), ("train", spec.models[0]), ("evaluate", None)):
        pod = render_job(owner, spec, config, step, model)["spec"]["template"]["spec"]
        assert restricted_violations(pod) == [], step
        assert pod["volumes"][-1] == {"name": "ftc-test", "configMap": {"name": "ftc-test-steps"}}
        assert pod["containers"][0]["volumeMounts"][-1] == {"name": "ftc-test", "mountPath": "/ftc-test", "readOnly": True}


@pytest.mark.parametrize(
    ("step", "doc"),
    [
        pytest.param("prepare", {"dataset": {"source": "s3://b/d"}, "models": [{"name": "a"}]}, id="prepare"),
        pytest.param("train", {"model": {"name": "a"}}, id="train"),
        pytest.param("evaluate", {"models": [{"model": {"name": "a"}}, {"model": {"name": "b"}}]}, id="evaluate"),
    ],
)
def test_the_stub_step_script_runs_alone_from_its_configmap(tmp_path, step, doc):
    """The ConfigMap's scripts, written out as a pod would see them, run with nothing from tests on the path."""
    import json
    import re
    import sys

    from ftc_api.steps import EvaluateResult, PrepareResult, StepResult, TrainResult

    cm = steps.step_scripts_configmap("team-a")
    assert (cm["metadata"]["name"], cm["metadata"]["namespace"]) == ("ftc-test-steps", "team-a")
    assert sorted(cm["data"]) == ["slow_train.py", "stub.py"]
    mount = tmp_path / "ftc-test"
    mount.mkdir()
    for name, text in cm["data"].items():
        assert not re.search(r"^\s*(from|import) tests\b", text, re.M), name
        (mount / name).write_text(text)
    (tmp_path / "input.json").write_text(json.dumps({"step": step, "location": {"bucket": "b", "prefix": "p"}, **doc}))
    env = {"FTC_STEP_INPUT": str(tmp_path / "input.json"), "FTC_TERMINATION_LOG": str(tmp_path / "log"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, str(mount / "stub.py")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    result_types: dict[str, type[StepResult]] = {"prepare": PrepareResult, "train": TrainResult, "evaluate": EvaluateResult}
    result = result_types[step].model_validate_json((tmp_path / "log").read_text())
    assert result.ok


def test_chart_step_security_defaults_are_the_operators(helm):
    config = config_of(template(helm))
    defaults = OperatorConfig()
    assert config.pod_security_context == defaults.pod_security_context
    assert config.security_context == defaults.security_context
    steps = ("prepare", "train", "evaluate")
    assert [config.step(s).tmp_size_limit for s in steps] == [defaults.step(s).tmp_size_limit for s in steps]


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


def test_model_cache_from_values(helm):
    docs = template(helm, "--set", "config.modelCache.claimName=ftc-model-cache", "--set", "config.modelCache.maxSize=500Gi")
    config = OperatorConfig.model_validate(yaml.safe_load(by_kind(docs, "ConfigMap")[0]["data"]["config.yaml"]))
    assert config.model_cache is not None
    assert (config.model_cache.claim_name, config.model_cache.max_size) == ("ftc-model-cache", "500Gi")
    default = OperatorConfig.model_validate(yaml.safe_load(by_kind(template(helm), "ConfigMap")[0]["data"]["config.yaml"]))
    assert default.model_cache is None
