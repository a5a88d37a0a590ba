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


def named(docs: list[dict], name: str) -> dict:
    return next(d for d in docs if d["metadata"]["name"] == name)


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


OPERATOR_RULES = {
    # Exactly what kube.py and kopf's watches use (the e2e tests run the operator with these rules); nothing on Secrets.
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
    ("jobset.x-k8s.io", "jobsets", "get"),  # where JobSet is installed: train steps on several nodes
    ("jobset.x-k8s.io", "jobsets", "list"),
    ("jobset.x-k8s.io", "jobsets", "watch"),
    ("jobset.x-k8s.io", "jobsets", "create"),
    ("jobset.x-k8s.io", "jobsets", "delete"),
    ("kueue.x-k8s.io", "workloads", "list"),  # where Kueue is installed: why a queued step Job waits
    ("kueue.x-k8s.io", "workloads", "watch"),
}


def granted(role: dict) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def operator_grants(docs: list[dict]) -> dict[str, set[tuple[str, str, str]]]:
    """What the operator's ServiceAccount (t-ftc in ftc-system) may do, by namespace ("*": cluster-wide), from
    the rendered Roles, ClusterRoles and their bindings."""
    roles = {
        (d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d
        for d in docs
        if d["kind"] in ("Role", "ClusterRole")
    }
    out: dict[str, set[tuple[str, str, str]]] = {}
    for b in (d for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        if {"kind": "ServiceAccount", "name": "t-ftc", "namespace": "ftc-system"} not in b["subjects"]:
            continue
        ns = b["metadata"].get("namespace")
        role = roles[(b["roleRef"]["kind"], ns if b["roleRef"]["kind"] == "Role" else None, b["roleRef"]["name"])]
        out.setdefault(ns or "*", set()).update(granted(role))
    return out


@pytest.mark.parametrize(
    ("args", "grants", "scope"),
    [
        pytest.param((), {"ftc-system": OPERATOR_RULES}, ["--namespace=ftc-system"], id="default-the-release-namespace"),
        pytest.param(
            ("--set", "watchNamespaces={team-a,team-b}"),
            {"team-a": OPERATOR_RULES, "team-b": OPERATOR_RULES},
            ["--namespace=team-a", "--namespace=team-b"],
            id="named-namespaces",
        ),
        pytest.param(("--set", "watchAnyNamespace=true"), {"*": OPERATOR_RULES}, ["--all-namespaces"], id="cluster-wide-opt-in"),
        pytest.param(
            ("--set", "replicas=2"),
            {"ftc-system": OPERATOR_RULES | {("coordination.k8s.io", "leases", v) for v in ("get", "create", "update")}},
            ["--namespace=ftc-system"],
            id="leader-election",
        ),
    ],
)
def test_operator_rbac_is_least_privilege_namespaced_by_default_and_never_touches_secrets(helm, args, grants, scope):
    docs = template(helm, *args)
    assert operator_grants(docs) == grants
    assert bool(by_kind(docs, "ClusterRole")) == ("*" in grants)
    container = by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    assert [a for a in container["args"] if a.startswith(("--namespace", "--all-namespaces"))] == scope
    # the step ServiceAccount exists wherever the operator runs steps (and in the release's namespace)
    step_accounts = sorted(
        d["metadata"]["namespace"] for d in by_kind(docs, "ServiceAccount") if d["metadata"]["name"] == "ftc-step"
    )
    assert step_accounts == sorted({"ftc-system", *(ns for ns in grants if ns != "*")})


def test_named_namespaces_and_cluster_wide_together_are_refused(helm):
    proc = subprocess.run(
        [str(helm), "template", "t", str(CHART), "--set", "watchAnyNamespace=true", "--set", "watchNamespaces={a}"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "set either watchNamespaces (a Role in each) or watchAnyNamespace (a ClusterRole), not both" in proc.stderr


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
    policy = named(by_kind(docs, "ValidatingAdmissionPolicy"), "t-ftc-ftc-system-step-pods")
    users = policy["spec"]["matchConditions"][0]["expression"]
    assert "'system:serviceaccount:ftc-system:ftc-step', 'system:serviceaccount:team-a:ftc-step'" in users
    assert named(by_kind(docs, "ValidatingAdmissionPolicyBinding"), "t-ftc-ftc-system-step-pods")["spec"] == {
        "policyName": policy["metadata"]["name"],
        "validationActions": ["Deny"],
    }


def config_of(docs: list[dict]) -> OperatorConfig:
    return OperatorConfig.model_validate(yaml.safe_load(by_kind(docs, "ConfigMap")[0]["data"]["config.yaml"]))


def job_policy(docs: list[dict]) -> dict[str, str]:
    """The operator-jobs policy's variables (CEL expressions) by name, its match condition under "user", and
    its validations joined under "validations"."""
    policy = named(by_kind(docs, "ValidatingAdmissionPolicy"), "t-ftc-ftc-system-operator-jobs")
    binding = named(by_kind(docs, "ValidatingAdmissionPolicyBinding"), "t-ftc-ftc-system-operator-jobs")
    assert binding["spec"] == {"policyName": "t-ftc-ftc-system-operator-jobs", "validationActions": ["Deny"]}
    spec = policy["spec"]
    assert spec["failurePolicy"] == "Fail"
    assert spec["matchConstraints"]["resourceRules"] == [
        {"apiGroups": ["batch"], "apiVersions": ["v1"], "operations": ["CREATE", "UPDATE"], "resources": ["jobs"]},
        {
            "apiGroups": ["jobset.x-k8s.io"],
            "apiVersions": ["v1alpha2"],
            "operations": ["CREATE", "UPDATE"],
            "resources": ["jobsets"],
        },
    ]
    out = {v["name"]: v["expression"] for v in spec["variables"]}
    out["user"] = spec["matchConditions"][0]["expression"]
    out["validations"] = "\n".join(v["expression"] for v in spec["validations"])
    return out


@pytest.mark.parametrize(
    ("args", "images", "accounts", "types", "host_paths"),
    [
        pytest.param(
            (),
            ["ghcr.io/ftc-project/ftc-trainer:0.1.0", "ghcr.io/ftc-project/ftc-evaluator:0.1.0"],
            ["ftc-step"],
            "has(v.configMap) || has(v.emptyDir))",
            [],
            id="defaults",
        ),
        pytest.param(
            ("--set", "config.allowedImages={reg.example/ml/*}", "--set", "config.allowedServiceAccounts={ml-a,ml-b}"),
            ["ghcr.io/ftc-project/ftc-trainer:0.1.0", "ghcr.io/ftc-project/ftc-evaluator:0.1.0", "reg.example/ml/*"],
            ["ftc-step", "ml-a", "ml-b"],
            "has(v.configMap) || has(v.emptyDir))",
            [],
            id="allowlists",
        ),
        pytest.param(
            ("--set", "config.modelCache.hostPath=/var/cache/ftc", "--set", "stepServiceAccount.name=steps"),
            ["ghcr.io/ftc-project/ftc-trainer:0.1.0", "ghcr.io/ftc-project/ftc-evaluator:0.1.0"],
            ["steps"],
            "has(v.configMap) || has(v.emptyDir) || has(v.hostPath))",
            ["/var/cache/ftc"],
            id="model-cache-on-a-host-path",
        ),
        pytest.param(
            ("--set", "config.modelCache.claimName=cache", "--set", "jobPolicy.allowedVolumeTypes={emptyDir}"),
            ["ghcr.io/ftc-project/ftc-trainer:0.1.0", "ghcr.io/ftc-project/ftc-evaluator:0.1.0"],
            ["ftc-step"],
            "has(v.emptyDir) || has(v.persistentVolumeClaim))",
            [],
            id="model-cache-on-a-claim",
        ),
    ],
)
def test_job_policy_allows_the_charts_images_accounts_and_volumes(helm, args, images, accounts, types, host_paths):
    import json

    policy = job_policy(template(helm, *args))
    assert policy["user"] == "request.userInfo.username == 'system:serviceaccount:ftc-system:t-ftc'"
    assert (json.loads(policy["images"]), json.loads(policy["serviceAccounts"])) == (images, accounts)
    assert json.loads(policy["hostPaths"]) == host_paths
    assert f"variables.volumes.all(v, {types}" in policy["validations"]
    # and the operator refuses the same images and ServiceAccounts before the API server would
    config = config_of(template(helm, *args))
    assert (config.images_allowed(), config.service_accounts_allowed()) == (images, accounts)


def test_job_policy_allows_the_extra_volumes_types_and_host_paths(helm, tmp_path):
    import json

    values = tmp_path / "values.yaml"
    extra = [{"name": "ca", "configMap": {"name": "ca"}}, {"name": "nvme", "hostPath": {"path": "/mnt/nvme"}}]
    values.write_text(yaml.safe_dump({"config": {"extraVolumes": extra}}))
    policy = job_policy(template(helm, "-f", str(values)))
    assert "variables.volumes.all(v, has(v.configMap) || has(v.emptyDir) || has(v.hostPath))" in policy["validations"]
    assert json.loads(policy["hostPaths"]) == ["/mnt/nvme"]


def test_job_policy_off_and_a_bad_volume_type_refused(helm):
    assert not [d for d in template(helm, "--set", "jobPolicy.enabled=false") if d["metadata"]["name"].endswith("operator-jobs")]
    proc = subprocess.run(
        [str(helm), "template", "t", str(CHART), "--set", "jobPolicy.allowedVolumeTypes={has(x)}"], capture_output=True, text=True
    )
    assert proc.returncode != 0 and '"has(x)" is not a volume type' in proc.stderr


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
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["startupProbe"]["periodSeconds"] == 1  # Ready within a second of kopf serving, not a readiness period
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
    for step, model in (("prepare", None), ("train", spec.models[0]), ("generate", spec.models[0]), ("score", None)):
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
        pytest.param("generate", {"model": {"model": {"name": "a"}}}, id="generate"),
        pytest.param("score", {"models": [{"model": {"name": "a"}}, {"model": {"name": "b"}}]}, id="score"),
    ],
)
def test_the_stub_step_script_runs_alone_from_its_configmap(tmp_path, step, doc):
    """The ConfigMap's scripts, written out as a pod would see them, run with nothing from tests on the path."""
    import json
    import re
    import sys

    from ftc_api.steps import EvaluateResult, GenerateResult, PrepareResult, StepResult, TrainResult

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
    result_types: dict[str, type[StepResult]] = {
        "prepare": PrepareResult,
        "train": TrainResult,
        "generate": GenerateResult,
        "score": EvaluateResult,
        "evaluate": EvaluateResult,
    }
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


@pytest.mark.parametrize(
    ("args", "label", "product"),
    [
        pytest.param((), "nvidia.com/gpu.product", "NVIDIA-A100-SXM4-80GB", id="default-nvidia"),
        pytest.param(("--set", "config.gpuLabelPreset=gke"), "cloud.google.com/gke-accelerator", "nvidia-a100-80gb", id="gke"),
        pytest.param(("--set", "config.gpuLabelPreset=eks"), "karpenter.k8s.aws/instance-gpu-name", "a100", id="eks"),
        pytest.param(
            ("--set", "config.gpuLabelPreset=gke", "--set", "config.placement.gpuProduct=nvidia-l4"),
            "cloud.google.com/gke-accelerator",
            "nvidia-l4",
            id="gke-other-gpu",
        ),
    ],
)
def test_the_gpu_label_preset_value_selects_the_product_label_of_train_pods(helm, args, label, product):
    from ftc_operator.rendering import pod_placement

    docs = template(helm, *args)
    config = OperatorConfig.model_validate(yaml.safe_load(by_kind(docs, "ConfigMap")[0]["data"]["config.yaml"]))
    assert (config.placement.gpu_product_label, config.placement.gpu_product) == (label, product)
    assert config.unschedulable_deadline_seconds == 1800  # the chart's value, documented beside it
    spec = FineTuneComparisonSpec.model_validate(yaml.safe_load((REPO / "examples" / "tiny.yaml").read_text())["spec"])
    assert pod_placement(config, spec, "train", spec.models[0])["nodeSelector"] == {label: product}
