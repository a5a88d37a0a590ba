"""The renderer: placement precedence, names, secretKeyRef-only credentials, labels, failure policy."""

from __future__ import annotations

import json
from typing import Any

import pytest
from ftc_api.spec import FineTuneComparisonSpec, Placement
from ftc_operator.comparison import Owner
from ftc_operator.config import OperatorConfig, load_config
from ftc_operator.observe import JobState, observe, observe_job
from ftc_operator.rendering import render_configmap, render_job
from ftc_operator.resolve import effective_placement

pytestmark = pytest.mark.unit

OWNER = Owner(name="bake", namespace="ns", uid="uid-1")
CONFIG = OperatorConfig()


def make_spec(**extra) -> FineTuneComparisonSpec:
    doc = {
        "models": [{"name": "llama", "baseModel": "meta-llama/Llama-2-7b-hf"}, {"name": "mixtral", "baseModel": "x"}],
        "dataset": {"source": "s3://b/data.jsonl"},
        "storage": {"bucket": "ftc", "endpointUrl": "http://127.0.0.1:9000", "credentialsSecretRef": {"name": "s3-creds"}},
        "evaluation": {"judge": {"baseUrl": "https://judge.example/v1", "apiKeySecretRef": {"name": "openai", "key": "api-key"}}},
    }
    for key, value in extra.items():
        doc[key] = value
    return FineTuneComparisonSpec.model_validate(doc)


def pod(job: dict) -> dict:
    return job["spec"]["template"]["spec"]


def container(job: dict) -> dict:
    return pod(job)["containers"][0]


def env(job: dict) -> dict:
    return {e["name"]: e for e in container(job)["env"]}


# --------------------------------------------------------------------------------------------- placement


PRECEDENCE = [
    pytest.param({}, None, "NVIDIA-A100-SXM4-80GB", 1, None, id="chart-defaults"),
    pytest.param(
        {"placement": {"gpuProduct": "NVIDIA-H100-80GB-HBM3", "gpuCount": 2}},
        None,
        "NVIDIA-H100-80GB-HBM3",
        2,
        None,
        id="comparison",
    ),
    pytest.param(
        {"placement": {"gpuProduct": "H100", "gpuCount": 2, "queueName": "team-a"}},
        {"gpuCount": 4, "priorityClassName": "high"},
        "H100",
        4,
        "team-a",
        id="model-over-comparison",
    ),
]


@pytest.mark.parametrize(("comparison", "model", "product", "gpus", "queue"), PRECEDENCE)
def test_placement_precedence_model_then_comparison_then_chart(comparison, model, product, gpus, queue):
    spec = make_spec(**comparison)
    if model:
        spec.models[0].placement = Placement.model_validate(model)
    job = render_job(OWNER, spec, CONFIG, "train", spec.models[0])
    assert pod(job)["nodeSelector"]["nvidia.com/gpu.product"] == product
    assert container(job)["resources"]["limits"]["nvidia.com/gpu"] == str(gpus)
    assert job["metadata"]["labels"].get("kueue.x-k8s.io/queue-name") == queue
    assert pod(job)["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    if model and "priorityClassName" in model:
        assert pod(job)["priorityClassName"] == "high"
    # the other model is not affected by the first one's override
    other = render_job(OWNER, spec, CONFIG, "train", spec.models[1])
    assert container(other)["resources"]["limits"]["nvidia.com/gpu"] == str(comparison.get("placement", {}).get("gpuCount", 1))


def test_chart_defaults_come_from_the_config_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("placement:\n  gpuProduct: L4\n  gpuCount: 1\n  gpuProductLabel: cloud.google.com/gke-accelerator\n")
    config = load_config(path)
    job = render_job(OWNER, make_spec(), config, "evaluate")
    assert pod(job)["nodeSelector"] == {"cloud.google.com/gke-accelerator": "L4"}
    assert "tolerations" not in pod(job)  # the file replaced the default placement


def test_prepare_runs_on_cpu():
    spec = make_spec(placement={"gpuCount": 4, "nodeSelector": {"pool": "gpu"}})
    job = render_job(OWNER, spec, CONFIG, "prepare")
    assert "nvidia.com/gpu" not in json.dumps(container(job).get("resources", {}))
    assert "nodeSelector" not in pod(job)
    assert "tolerations" not in pod(job)


def test_effective_placement_fieldwise():
    spec = make_spec(placement={"queueName": "q"})
    spec.models[0].placement = Placement.model_validate({"gpuMemoryGib": 40})
    p = effective_placement(CONFIG, spec, spec.models[0])
    assert (p.queue_name, p.gpu_memory_gib, p.gpu_count) == ("q", 40, 1)


# --------------------------------------------------------------------------------------------- names and labels


@pytest.mark.parametrize("name", ["bake", "a" * 63, "x" * 200, "very-long-comparison-name-" * 9])
@pytest.mark.parametrize("step", ["prepare", "train", "evaluate"])
def test_names_and_label_values_fit_63(name, step):
    owner = Owner(name=name, namespace="ns", uid="u")
    spec = make_spec(models=[{"name": "m" * 40, "baseModel": "x"}, {"name": "n" * 40, "baseModel": "x"}])
    model = spec.models[0] if step == "train" else None
    job = render_job(owner, spec, CONFIG, step, model)
    cm = render_configmap(owner, step, model.name if model else None, "{}")
    assert len(job["metadata"]["name"]) <= 63
    assert job["metadata"]["name"] == cm["metadata"]["name"] == pod(job)["volumes"][0]["configMap"]["name"]
    for value in job["metadata"]["labels"].values():
        assert len(value) <= 63
    assert job["metadata"]["annotations"]["ftc.dev/comparison-name"] == name


def test_names_of_two_models_differ_even_when_truncated():
    owner = Owner(name="c" * 60, namespace="ns", uid="u")
    spec = make_spec(models=[{"name": "model-a", "baseModel": "x"}, {"name": "model-b", "baseModel": "x"}])
    a, b = (render_job(owner, spec, CONFIG, "train", m)["metadata"]["name"] for m in spec.models)
    assert a != b


def test_labels_and_owner_reference():
    spec = make_spec()
    job = render_job(OWNER, spec, CONFIG, "train", spec.models[1])
    assert job["metadata"]["labels"] == {
        "app.kubernetes.io/name": "ftc",
        "app.kubernetes.io/instance": "bake",
        "app.kubernetes.io/component": "train",
        "app.kubernetes.io/managed-by": "ftc-operator",
        "ftc.dev/comparison": "bake",
        "ftc.dev/step": "train",
        "ftc.dev/model": "mixtral",
    }
    assert job["spec"]["template"]["metadata"]["labels"] == job["metadata"]["labels"]
    ref = job["metadata"]["ownerReferences"][0]
    assert (ref["kind"], ref["uid"], ref["controller"]) == ("FineTuneComparison", "uid-1", True)


# --------------------------------------------------------------------------------------------- secrets, env, policy


@pytest.mark.parametrize("step", ["prepare", "train", "generate", "score", "evaluate"])
def test_credentials_only_through_secret_key_refs(step):
    spec = make_spec()
    job = render_job(OWNER, spec, CONFIG, step, spec.models[0] if step in ("train", "generate") else None)
    e = env(job)
    assert e["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"}
    assert e["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "s3-creds", "key": "AWS_SECRET_ACCESS_KEY"}
    assert e["AWS_ENDPOINT_URL"]["value"] == "http://127.0.0.1:9000"
    assert e["FTC_STEP_INPUT"]["value"] == "/etc/ftc/input.json"
    assert e["FTC_POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert e["FTC_POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    if step in ("prepare", "score", "evaluate"):  # prepare's preflight calls it once; generate never
        assert e["FTC_JUDGE_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "openai", "key": "api-key"}
    else:
        assert "FTC_JUDGE_API_KEY" not in e
    for var in container(job)["env"]:
        if "KEY" in var["name"]:
            assert "value" not in var, var
    assert "envFrom" not in container(job)
    assert not any("secret" in v for v in pod(job)["volumes"])


@pytest.mark.parametrize("step", ["prepare", "train", "generate", "score", "evaluate"])
def test_the_steps_deadline_reaches_its_pod(step):
    """The score step ends its rate-limit waits before the Job's deadline (scoring.deadline_from)."""
    spec = make_spec()
    job = render_job(OWNER, spec, CONFIG, step, spec.models[0] if step in ("train", "generate") else None)
    assert job["spec"]["activeDeadlineSeconds"] > 0
    assert env(job)["FTC_STEP_DEADLINE_SECONDS"]["value"] == str(job["spec"]["activeDeadlineSeconds"])


GRACE = [
    pytest.param({}, None, "train", 300, id="train-default"),
    pytest.param({"placement": {"terminationGracePeriodSeconds": 120}}, None, "train", 120, id="comparison"),
    pytest.param({"placement": {"terminationGracePeriodSeconds": 120}}, 900, "train", 900, id="model-wins"),
    pytest.param({"placement": {"terminationGracePeriodSeconds": 120}}, None, "generate", None, id="generate-unset"),
    pytest.param({}, None, "prepare", None, id="prepare-unset"),
]


@pytest.mark.parametrize(("extra", "model_grace", "step", "grace"), GRACE)
def test_a_train_pod_has_the_grace_period_of_its_preemption_checkpoint(extra, model_grace, step, grace):
    """A SIGTERM'd trainer saves and uploads the step in flight's checkpoint within the pod's grace period, which
    it reads from FTC_TERMINATION_GRACE_SECONDS (the torchrun agent waits that long for its workers)."""
    spec = make_spec(**extra)
    if model_grace is not None:
        spec.models[0].placement = Placement(termination_grace_period_seconds=model_grace)
    job = render_job(OWNER, spec, CONFIG, step, spec.models[0] if step in ("train", "generate") else None)
    assert pod(job).get("terminationGracePeriodSeconds") == grace
    assert env(job).get("FTC_TERMINATION_GRACE_SECONDS", {}).get("value") == (str(grace) if grace else None)


def test_no_credentials_secret_means_pod_identity():
    spec = make_spec(storage={"bucket": "ftc"})
    assert "AWS_ACCESS_KEY_ID" not in env(render_job(OWNER, spec, CONFIG, "prepare"))


def test_job_policy_and_container():
    spec = make_spec(placement={"activeDeadlineSeconds": 600})
    job = render_job(OWNER, spec, CONFIG, "train", spec.models[0])
    assert job["spec"]["backoffLimit"] == CONFIG.train.backoff_limit
    assert job["spec"]["activeDeadlineSeconds"] == 600
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert rules[1]["action"] == "FailJob" and rules[1]["onExitCodes"]["values"] == [2]
    c = container(job)
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert c["volumeMounts"] == [
        {"name": "input", "mountPath": "/etc/ftc", "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    assert pod(job)["restartPolicy"] == "Never"
    assert pod(job)["serviceAccountName"] == "ftc-step"
    assert c["image"] == CONFIG.trainer_image and c["args"] == ["train"]
    assert container(render_job(OWNER, spec, CONFIG, "evaluate"))["args"] == []
    assert container(render_job(OWNER, spec, CONFIG, "evaluate"))["image"] == CONFIG.evaluator_image
    # Only the train pod (progress annotation) gets a ServiceAccount token.
    assert pod(job)["automountServiceAccountToken"] is True
    assert pod(render_job(OWNER, spec, CONFIG, "prepare"))["automountServiceAccountToken"] is False
    assert pod(render_job(OWNER, spec, CONFIG, "evaluate"))["automountServiceAccountToken"] is False


def test_configmap_holds_input_json_and_is_owned():
    cm = render_configmap(OWNER, "prepare", None, '{"step":"prepare"}')
    assert cm["data"] == {"input.json": '{"step":"prepare"}'}
    assert cm["metadata"]["ownerReferences"][0]["uid"] == "uid-1"


# --------------------------------------------------------------------------------------------- pod security

# Volume types the `restricted` Pod Security Standard allows.
RESTRICTED_VOLUME_TYPES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def restricted_violations(pod_spec: dict) -> list[str]:
    """What in `pod_spec` the `restricted` Pod Security Standard refuses, plus ftc's own rules (a read-only
    root filesystem and a sized emptyDir at /tmp). Empty when the pod passes. Pure."""
    out: list[str] = []
    psc = pod_spec.get("securityContext") or {}
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        if pod_spec.get(host):
            out.append(f"{host} is set")
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    for name, volume in volumes.items():
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            out.append(f"volume {name} is of a forbidden type {sorted(kinds - RESTRICTED_VOLUME_TYPES)}")
    if psc.get("runAsUser") == 0:
        out.append("pod runAsUser is 0")
    for c in pod_spec.get("initContainers", []) + pod_spec.get("containers", []):
        sc = c.get("securityContext") or {}
        where = f"container {c['name']}"
        if sc.get("privileged"):
            out.append(f"{where} is privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{where} does not set allowPrivilegeEscalation: false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{where} does not drop ALL capabilities")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(f"{where} adds capabilities {caps['add']}")
        if sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
            out.append(f"{where} is not runAsNonRoot")
        if sc.get("runAsUser") == 0:
            out.append(f"{where} runAsUser is 0")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{where} seccompProfile is {seccomp}")
        if any(port.get("hostPort") for port in c.get("ports", [])):
            out.append(f"{where} uses a hostPort")
        if sc.get("readOnlyRootFilesystem") is not True:
            out.append(f"{where} root filesystem is writable")
        tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
        tmp_dir = (volumes.get(tmp[0]["name"]) or {}).get("emptyDir") if tmp else None
        if tmp_dir is None or not tmp_dir.get("sizeLimit"):
            out.append(f"{where} has no emptyDir with a sizeLimit at /tmp")
    return out


def _step_job(step: str, config: OperatorConfig = CONFIG) -> dict:
    spec = make_spec()
    return render_job(OWNER, spec, config, step, spec.models[0] if step == "train" else None)


@pytest.mark.parametrize("step", ["prepare", "train", "evaluate"])
def test_every_step_pod_meets_restricted(step):
    p = pod(_step_job(step))
    assert restricted_violations(p) == []
    assert p["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "fsGroup": 65532,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert p["containers"][0]["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _with(path: str, value: object):
    """A mutation of a rendered pod spec: set the dotted `path` (containers.0.x) to `value`."""

    def mutate(p: dict) -> None:
        *parents, last = path.split(".")
        node: Any = p
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        node[int(last) if isinstance(node, list) else last] = value

    return mutate


@pytest.mark.parametrize(
    ("mutate", "violation"),
    [
        pytest.param(_with("hostNetwork", True), "hostNetwork is set", id="host-network"),
        pytest.param(
            _with("volumes.1", {"name": "tmp", "hostPath": {"path": "/"}}), "forbidden type ['hostPath']", id="host-path"
        ),
        pytest.param(_with("containers.0.securityContext.privileged", True), "is privileged", id="privileged"),
        pytest.param(
            _with("containers.0.securityContext.allowPrivilegeEscalation", True), "allowPrivilegeEscalation", id="escalation"
        ),
        pytest.param(_with("containers.0.securityContext.capabilities", {}), "drop ALL", id="capabilities"),
        pytest.param(_with("securityContext.runAsNonRoot", False), "not runAsNonRoot", id="root"),
        pytest.param(
            _with("securityContext.seccompProfile", {"type": "Unconfined"}), "seccompProfile is Unconfined", id="seccomp"
        ),
        pytest.param(_with("containers.0.securityContext.readOnlyRootFilesystem", False), "writable", id="writable-root"),
        pytest.param(_with("volumes.1.emptyDir", {}), "no emptyDir with a sizeLimit", id="unsized-tmp"),
    ],
)
def test_the_restricted_checker_catches(mutate, violation):
    p = pod(_step_job("train"))
    mutate(p)
    assert any(violation in v for v in restricted_violations(p)), restricted_violations(p)


@pytest.mark.parametrize(
    ("step", "default", "configured"),
    [
        pytest.param("prepare", "20Gi", {"prepare": {"args": ["prepare"], "tmpSizeLimit": "5Gi"}}, id="prepare"),
        pytest.param("train", "200Gi", {"train": {"args": ["train"], "tmpSizeLimit": "500Gi"}}, id="train"),
        pytest.param("evaluate", "200Gi", {"evaluate": {"tmpSizeLimit": "300Gi"}}, id="evaluate"),
    ],
)
def test_tmp_size_limit_per_step(step, default, configured):
    def tmp(job: dict) -> dict:
        return next(v for v in pod(job)["volumes"] if v["name"] == "tmp")

    assert tmp(_step_job(step)) == {"name": "tmp", "emptyDir": {"sizeLimit": default}}
    config = OperatorConfig.model_validate(configured)
    assert tmp(_step_job(step, config))["emptyDir"]["sizeLimit"] == next(iter(configured.values()))["tmpSizeLimit"]


def test_security_contexts_come_from_the_config():
    config = OperatorConfig.model_validate(
        {
            "podSecurityContext": {"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": None, "supplementalGroups": [44]},
            "securityContext": {"capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}},
        }
    )
    p = pod(_step_job("evaluate", config))
    assert p["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "supplementalGroups": [44],
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert p["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}
    assert restricted_violations(p) == []


EXTRA = {
    "extraVolumes": [
        {"name": "ftc-test", "configMap": {"name": "ftc-test-steps"}},
        {"name": "ca", "secret": {"secretName": "corp-ca"}},
    ],
    "extraVolumeMounts": [
        {"name": "ftc-test", "mountPath": "/ftc-test", "readOnly": True},
        {"name": "ca", "mountPath": "/etc/ssl/corp", "readOnly": True},
    ],
}


@pytest.mark.parametrize("step", ["prepare", "train", "evaluate"])
def test_extra_volumes_and_mounts_reach_every_step_pod(step):
    config = OperatorConfig.model_validate(EXTRA)
    job = _step_job(step, config)
    assert pod(job)["volumes"][2:] == EXTRA["extraVolumes"]
    assert container(job)["volumeMounts"][2:] == EXTRA["extraVolumeMounts"]
    assert [v["name"] for v in pod(job)["volumes"][:2]] == ["input", "tmp"]
    assert restricted_violations(pod(job)) == []
    container(job)["volumeMounts"][2]["readOnly"] = False  # the rendered Job is a copy, not the config's lists
    assert config.extra_volume_mounts[0]["readOnly"] is True


def _env(job: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(job)["env"] if "value" in e}


@pytest.mark.parametrize(
    ("cache", "step", "volume", "max_bytes", "restricted"),
    [
        pytest.param(None, "train", None, None, True, id="none"),
        pytest.param(
            {"claimName": "models"}, "train", {"persistentVolumeClaim": {"claimName": "models"}}, None, True, id="pvc-train"
        ),
        pytest.param(
            {"claimName": "models", "maxSize": "500Gi"},
            "evaluate",
            {"persistentVolumeClaim": {"claimName": "models"}},
            str(500 * 2**30),
            True,
            id="pvc-evaluate-bounded",
        ),
        pytest.param({"claimName": "models"}, "prepare", None, None, True, id="prepare-loads-no-model"),
        pytest.param(
            {"hostPath": "/var/lib/ftc/models"},
            "train",
            {"hostPath": {"path": "/var/lib/ftc/models", "type": "DirectoryOrCreate"}},
            None,
            False,
            id="hostpath-not-restricted",
        ),
    ],
)
def test_model_cache_volume(cache, step, volume, max_bytes, restricted):
    config = OperatorConfig.model_validate({"modelCache": cache} if cache else {})
    job = _step_job(step, config)
    volumes = {v["name"]: {k: x for k, x in v.items() if k != "name"} for v in pod(job)["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container(job)["volumeMounts"]}
    env = _env(job)
    assert volumes.get("model-cache") == volume
    if volume is None:
        assert "model-cache" not in mounts and "FTC_MODEL_CACHE_DIR" not in env
    else:
        assert mounts["model-cache"] == env["FTC_MODEL_CACHE_DIR"] == "/var/cache/ftc/models"
    assert env.get("FTC_MODEL_CACHE_MAX_BYTES") == max_bytes
    assert (restricted_violations(pod(job)) == []) is restricted


@pytest.mark.parametrize(
    ("cache", "message"),
    [
        pytest.param({}, "exactly one of claimName", id="neither"),
        pytest.param({"claimName": "a", "hostPath": "/x"}, "exactly one of claimName", id="both"),
        pytest.param({"hostPath": "relative"}, "hostPath", id="relative-host-path"),
        pytest.param({"claimName": ""}, "claimName", id="empty-claim"),
    ],
)
def test_model_cache_bad_config_is_refused(cache, message):
    with pytest.raises(ValueError, match=message):
        OperatorConfig.model_validate({"modelCache": cache})


def test_extra_volumes_cannot_take_the_model_cache_name_or_path():
    with pytest.raises(ValueError, match="the step pod's own volume"):
        OperatorConfig.model_validate({"extraVolumes": [{"name": "model-cache", "emptyDir": {}}]})
    with pytest.raises(ValueError, match="the step pod's own mount"):
        OperatorConfig.model_validate(
            {
                "extraVolumes": [{"name": "a", "emptyDir": {}}],
                "extraVolumeMounts": [{"name": "a", "mountPath": "/var/cache/ftc/models"}],
            }
        )


def test_extra_volumes_from_the_config_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(
        "extraVolumes:\n  - {name: cache, persistentVolumeClaim: {claimName: hf}}\n"
        "extraVolumeMounts:\n  - {name: cache, mountPath: /tmp/hf}\n"
    )
    job = render_job(OWNER, make_spec(), load_config(path), "prepare")
    assert pod(job)["volumes"][-1] == {"name": "cache", "persistentVolumeClaim": {"claimName": "hf"}}
    assert container(job)["volumeMounts"][-1] == {"name": "cache", "mountPath": "/tmp/hf"}


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        pytest.param({"extraVolumes": [{"configMap": {"name": "x"}}]}, r"extraVolumes\[0\] has no `name`", id="volume-no-name"),
        pytest.param(
            {"extraVolumes": [{"name": "a", "emptyDir": {}}, {"name": ""}]}, r"extraVolumes\[1\] has no `name`", id="empty-name"
        ),
        pytest.param(
            {"extraVolumes": [{"name": "tmp", "emptyDir": {}}]},
            r"extraVolumes\[0\]: the name 'tmp' is the step pod",
            id="reserved",
        ),
        pytest.param(
            {"extraVolumes": [{"name": "a", "emptyDir": {}}, {"name": "a", "emptyDir": {}}]}, r"'a' is used twice", id="duplicate"
        ),
        pytest.param({"extraVolumeMounts": [{"mountPath": "/x"}]}, r"extraVolumeMounts\[0\] has no `name`", id="mount-no-name"),
        pytest.param(
            {"extraVolumes": [{"name": "a", "emptyDir": {}}], "extraVolumeMounts": [{"name": "a"}]},
            r"extraVolumeMounts\[0\] \(a\) needs an absolute `mountPath`",
            id="mount-no-path",
        ),
        pytest.param(
            {"extraVolumes": [{"name": "a", "emptyDir": {}}], "extraVolumeMounts": [{"name": "a", "mountPath": "/etc/ftc"}]},
            r"/etc/ftc is the step pod's own mount",
            id="mount-over-input",
        ),
        pytest.param(
            {"extraVolumeMounts": [{"name": "missing", "mountPath": "/x"}]},
            r"mounts 'missing', which is not a volume of extraVolumes \(volumes: none\)",
            id="mount-unknown-volume",
        ),
        pytest.param({"extraVolumes": [["name", "a"]]}, r"extraVolumes\.0", id="not-a-mapping"),
        pytest.param({"podSecurityContext": {"runAsUser": -1}}, r"podSecurityContext\.runAsUser", id="negative-uid"),
        pytest.param({"securityContext": {"privileged": True}}, r"securityContext\.privileged", id="unknown-field"),
        pytest.param({"train": {"tmpSizeLimit": None}}, r"train\.tmpSizeLimit", id="no-tmp-size"),
    ],
)
def test_bad_pod_settings_get_clear_errors(doc, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        OperatorConfig.model_validate(doc)


# --------------------------------------------------------------------------------------------- observation


def _pod(name, phase, job="bake-train-llama", message=None, annotations=None, waiting=None, created="2026-01-01T00:00:00Z"):
    state = {"terminated": {"exitCode": 0, "message": message}} if message is not None else {}
    if waiting:
        state = {"waiting": waiting}
    return {
        "metadata": {
            "name": name,
            "creationTimestamp": created,
            "annotations": annotations or {},
            "ownerReferences": [{"kind": "Job", "name": job}],
        },
        "status": {"phase": phase, "containerStatuses": [{"name": "step", "state": state}]},
    }


def _job(conds=(), failed=0):
    return {
        "metadata": {
            "name": "bake-train-llama",
            "labels": {"ftc.dev/step": "train", "ftc.dev/model": "llama"},
            "ownerReferences": [{"uid": "uid-1"}],
        },
        "status": {
            "conditions": [{"type": t, "status": "True", "reason": r, "message": m} for t, r, m in conds],
            "failed": failed,
        },
    }


def test_observe_succeeded_job_reads_termination_message():
    o = observe_job(_job([("Complete", "Completed", "")]), [_pod("p1", "Succeeded", message='{"ok":true}')])
    assert (o.state, o.result, o.model, o.step) == (JobState.SUCCEEDED, '{"ok":true}', "llama", "train")


def test_observe_failed_job_reason_and_last_failed_pod():
    pods = [
        _pod("p1", "Failed", message="first", created="2026-01-01T00:00:00Z"),
        _pod("p2", "Failed", message="second", created="2026-01-01T00:01:00Z"),
    ]
    o = observe_job(_job([("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")], failed=2), pods)
    assert (o.state, o.reason, o.result, o.failed_pods) == (JobState.FAILED, "BackoffLimitExceeded", "second", 2)


def test_observe_active_job_progress_and_waiting():
    prog = json.dumps({"step": 3, "totalSteps": 9, "trainLoss": 2.5})
    pods = [
        _pod("p1", "Running", annotations={"ftc.dev/progress": prog}),
        _pod("p2", "Pending", waiting={"reason": "CreateContainerConfigError", "message": 'secret "s" not found'}),
    ]
    o = observe_job(_job(), pods)
    assert o.state == JobState.ACTIVE
    assert o.progress is not None
    assert o.progress.step == 3 and o.progress.train_loss == 2.5
    assert o.waiting[0].reason == "CreateContainerConfigError"


def test_observe_ignores_garbage_progress_and_foreign_jobs():
    o = observe_job(_job(), [_pod("p1", "Running", annotations={"ftc.dev/progress": "{not json"})])
    assert o.progress is None
    foreign = _job()
    foreign["metadata"]["ownerReferences"] = [{"uid": "other"}]
    assert observe([foreign], [], "uid-1") == []


# --------------------------------------------------------------------------------------------- examples


@pytest.mark.parametrize("path", ["examples/llama2-vs-mixtral.yaml", "examples/tiny.yaml", "examples/smollm2.yaml"])
def test_examples_are_valid_specs(path):
    from pathlib import Path

    import yaml
    from ftc_api.spec import validation_errors

    doc = yaml.safe_load((Path(__file__).resolve().parents[1] / path).read_text())
    assert doc["apiVersion"] == "ftc.dev/v1alpha1" and doc["kind"] == "FineTuneComparison"
    assert validation_errors(doc["spec"]) == []


def _failed_pod(reason: str, exit_code: int, limits: dict | None) -> dict:
    container = {"name": "step", **({"resources": {"limits": limits}} if limits is not None else {})}
    return {
        "metadata": {"name": "p", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"containers": [container]},
        "status": {
            "phase": "Failed",
            "containerStatuses": [{"state": {"terminated": {"reason": reason, "exitCode": exit_code}}}],
        },
    }


@pytest.mark.parametrize(
    "reason, code, limits, expected",
    [
        ("OOMKilled", 137, {"memory": "64Mi"}, "OOMKilled (exit code 137, memory limit 64Mi)"),
        ("OOMKilled", 137, None, "OOMKilled (exit code 137)"),
        ("DeadlineExceeded", 137, {"memory": "1Gi"}, "DeadlineExceeded (exit code 137)"),
        ("Error", 1, {"memory": "1Gi"}, None),
    ],
)
def test_observed_job_says_how_the_last_failed_pod_ended(reason, code, limits, expected):
    job = {"metadata": {"name": "j", "labels": {"ftc.dev/step": "train"}}, "status": {"failed": 1}}
    assert observe_job(job, [_failed_pod(reason, code, limits)]).pod_failure == expected


@pytest.mark.parametrize("allow", [False, True])
def test_gpu_steps_are_told_how_many_gpus_they_asked_for(allow):
    config = OperatorConfig(allow_cpu_execution=allow)
    spec = make_spec(placement={"gpuCount": 2})
    for step, model in (("train", spec.models[0]), ("evaluate", None)):
        values = {k: e.get("value") for k, e in env(render_job(OWNER, spec, config, step, model)).items()}
        assert values["FTC_GPUS"] == "2"
        assert values.get("FTC_ALLOW_CPU") == ("1" if allow else None)
    prepare = env(render_job(OWNER, spec, config, "prepare"))
    assert "FTC_GPUS" not in prepare and "FTC_ALLOW_CPU" not in prepare


@pytest.mark.parametrize(("gpus", "shared_memory"), [(1, False), (2, True), (8, True)])
def test_a_train_pod_on_several_gpus_gets_shared_memory_for_its_processes(gpus, shared_memory):
    spec = make_spec(placement={"gpuCount": gpus})
    job = render_job(OWNER, spec, OperatorConfig(), "train", spec.models[0])
    mounts = {m["mountPath"]: m["name"] for m in container(job)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod(job)["volumes"]}
    assert ("/dev/shm" in mounts) == shared_memory
    if shared_memory:
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    evaluate = render_job(OWNER, spec, OperatorConfig(), "evaluate")  # one process: the default is enough
    assert all(m["mountPath"] != "/dev/shm" for m in container(evaluate)["volumeMounts"])


@pytest.mark.parametrize(
    "scratch, request_, size_limit",
    [
        (None, None, "200Gi"),  # nothing known: the chart's limit, no request
        (13.5, "18Gi", "200Gi"),  # Llama-2-7B in bf16: 13.5 GiB on disk
        (180.0, "217Gi", "217Gi"),  # Mixtral 8x7B in fp16 and more: the limit grows to the request
    ],
)
def test_the_base_models_size_on_disk_becomes_an_ephemeral_storage_request(scratch, request_, size_limit):
    spec = make_spec()
    job = render_job(OWNER, spec, CONFIG, "train", spec.models[0], scratch)
    assert container(job).get("resources", {}).get("requests", {}).get("ephemeral-storage") == request_
    tmp = next(v for v in pod(job)["volumes"] if v["name"] == "tmp")
    assert tmp["emptyDir"]["sizeLimit"] == size_limit


def test_only_the_prepare_pod_gets_the_hub_endpoint_and_token():
    spec = make_spec(hub={"endpoint": "https://hub.internal", "tokenSecretRef": {"name": "hf", "key": "token"}})
    jobs = {
        "prepare": render_job(OWNER, spec, CONFIG, "prepare", None),
        "train": render_job(OWNER, spec, CONFIG, "train", spec.models[0]),
        "evaluate": render_job(OWNER, spec, CONFIG, "evaluate", None),
    }
    prep = {e["name"]: e for e in container(jobs["prepare"])["env"]}
    assert prep["HF_ENDPOINT"]["value"] == "https://hub.internal"
    assert prep["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    for step in ("train", "evaluate"):
        names = {e["name"] for e in container(jobs[step])["env"]}
        assert not names & {"HF_TOKEN", "HF_ENDPOINT"}, step


@pytest.mark.parametrize(
    ("model_gpus", "comparison_gpus", "expected"),
    [(None, 1, 1), (2, 1, 2), (1, 4, 1), (8, 2, 8)],
    ids=["comparison", "model-trained-on-two", "model-narrower", "model-on-eight"],
)
def test_a_generate_pod_has_its_models_gpus_and_the_score_pod_none(model_gpus, comparison_gpus, expected):
    spec = make_spec(placement={"gpuCount": comparison_gpus, "nodeSelector": {"pool": "gpu"}})
    if model_gpus:
        spec.models[1].placement = Placement.model_validate({"gpuCount": model_gpus})
    job = render_job(OWNER, spec, CONFIG, "generate", spec.models[1], key="0123abcd")
    assert container(job)["resources"]["limits"]["nvidia.com/gpu"] == str(expected)
    assert env(job)["FTC_GPUS"]["value"] == str(expected)  # GPU or nothing checks that many
    assert job["metadata"]["name"].endswith("-generate-" + spec.models[1].name + "-0123abcd")
    score = render_job(OWNER, spec, CONFIG, "score", None, scratch_gib=None, key="89abcdef")
    assert "nvidia.com/gpu" not in json.dumps(score) and "FTC_GPUS" not in env(score)
    assert "nodeSelector" not in pod(score) and "tolerations" not in pod(score)  # a CPU node
    assert container(score)["resources"] == CONFIG.score.resources.to_wire()  # type: ignore[union-attr]
    assert container(score)["image"] == CONFIG.evaluator_image and pod(score)["automountServiceAccountToken"] is False


def test_every_credential_a_step_receives_is_one_the_step_redacts():
    """Steps redact the values of `is_credential_env` variables from their summary and logs: every variable
    the renderer fills from a Secret must be one of them."""
    from ftc_api.steps import is_credential_env

    ref = {"name": "s", "key": "k"}
    spec = make_spec(
        hub={"tokenSecretRef": ref},
        evaluation={
            "judge": {"baseUrl": "https://judge.example/v1", "apiKeySecretRef": ref},
            "extraJudges": [{"baseUrl": "https://a.example/v1", "model": "a", "apiKeySecretRef": ref}] * 2,
            "embeddings": {"provider": "openai", "baseUrl": "https://e.example/v1", "apiKeySecretRef": ref},
        },
    )
    from_secrets = set()
    for step in ("prepare", "train", "evaluate"):
        job = render_job(OWNER, spec, CONFIG, step, spec.models[0] if step == "train" else None)
        from_secrets |= {e["name"] for e in container(job)["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert from_secrets == {
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN",
        "FTC_JUDGE_API_KEY", "FTC_JUDGE_API_KEY_1", "FTC_JUDGE_API_KEY_2", "FTC_EMBEDDINGS_API_KEY",
    }  # fmt: skip
    assert all(is_credential_env(name) for name in from_secrets)
    assert not any(is_credential_env(n) for n in ("FTC_JUDGE_API_KEY_X", "AWS_ENDPOINT_URL", "HF_ENDPOINT", "HF_HOME"))
