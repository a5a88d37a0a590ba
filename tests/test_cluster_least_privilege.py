"""Least privilege on the real API server: what the chart lets the operator's ServiceAccount do.

The chart is installed as users install it, with its defaults (namespaced: a Role in the release's namespace
only), the test step scripts and a model cache on a node directory. Impersonating the operator's ServiceAccount
(the admin may), the API server itself answers: it may create Jobs in its own namespace and nowhere else, read no
Secret, and the chart's ValidatingAdmissionPolicy admits the Jobs the operator renders while refusing a Job with
another image, ServiceAccount, volume type, host path or host namespace. A comparison naming an image outside the
chart's allowlist is refused by the operator before any Job, with a message naming the field and the chart value.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import yaml
from ftc_api.spec import FineTuneComparisonSpec
from ftc_operator.comparison import Owner
from ftc_operator.config import OperatorConfig
from ftc_operator.rendering import render_job

from devcluster.harness import OPERATOR_SA, RELEASE, Comparisons, apply_crd, start_operator, stub_values, tiny_spec, wait_for
from devcluster.kube.typed import body, present

pytestmark = pytest.mark.cluster

HOST_CACHE = "/var/cache/ftc-test-models"  # config.modelCache.hostPath: the policy must admit it (nothing mounts it here)
EVIL = "evil.example/miner:1"


@pytest.fixture
def installed(control_plane, namespace, tmp_path) -> OperatorConfig:
    """The chart with its default scope (watchNamespaces empty: the release's namespace), the stub steps and a
    model cache on a host path; the operator running. Returns the operator's config as the chart rendered it."""
    from kubernetes import client

    apply_crd(control_plane.kubectl, tmp_path)
    values = stub_values()
    values["watchNamespaces"] = []  # the chart's default, not the harness's explicit [namespace]
    values["config"]["modelCache"] = {"hostPath": HOST_CACHE}
    start_operator(control_plane, namespace, values, tmp_path)
    cm = client.CoreV1Api(control_plane.api_client()).read_namespaced_config_map(f"{RELEASE}-config", namespace)
    return OperatorConfig.model_validate(yaml.safe_load(present(cm.data)["config.yaml"]))


def as_operator(control_plane, namespace: str):
    """A BatchV1Api whose requests impersonate the operator's ServiceAccount."""
    from kubernetes import client

    api = control_plane.api_client()
    api.set_default_header("Impersonate-User", f"system:serviceaccount:{namespace}:{OPERATOR_SA}")
    return client.BatchV1Api(api)


def refusal(batch, namespace: str, job: dict[str, Any]) -> str | None:
    """The API server's message refusing `job` (a server-side dry run: admission runs, nothing is stored);
    None when it would be admitted."""
    from kubernetes.client.rest import ApiException

    try:
        batch.create_namespaced_job(namespace, job, dry_run="All")
    except ApiException as e:
        return f"{e.status}: {json.loads(e.body or '{}').get('message', e.body)}"
    return None


def test_the_operator_may_create_only_the_charts_jobs_and_only_in_its_namespaces(control_plane, namespace, installed):
    config = installed
    sa = f"system:serviceaccount:{namespace}:{OPERATOR_SA}"

    def can(*args: str) -> str:
        return control_plane.kubectl("auth", "can-i", *args, f"--as={sa}", check=False).strip()

    # RBAC: a Role in the release's namespace, nothing cluster-wide
    assert can("create", "jobs.batch", "-n", namespace) == "yes"
    assert can("create", "configmaps", "-n", namespace) == "yes"
    for other in ("kube-system", "default"):
        assert can("create", "jobs.batch", "-n", other) == "no", other
        assert can("list", "pods", "-n", other) == "no", other
    assert can("list", "jobs.batch", "--all-namespaces") == "no"
    assert can("get", "secrets", "-n", namespace) == "no"
    assert can("create", "pods", "-n", namespace) == "no"

    # The Jobs the operator renders from the chart's config are admitted (created suspended: no pod runs)
    spec = FineTuneComparisonSpec.model_validate(tiny_spec("http://127.0.0.1:9"))
    owner = Owner(name="lp", namespace=namespace, uid="00000000-0000-0000-0000-000000000000")

    def rendered(step: str, model_index: int | None = None) -> dict[str, Any]:
        model = spec.models[model_index] if model_index is not None else None
        key = "abc1" if step in ("generate", "score") else None  # the evaluation settings' key in those names
        job = render_job(owner, spec, config, step, model, key=key)
        job["metadata"].pop("ownerReferences")  # no such owner: the garbage collector would take the Job at once
        job["spec"]["suspend"] = True
        return job

    train = rendered("train", 0)
    pod = train["spec"]["template"]["spec"]
    assert {"name": "model-cache", "hostPath": {"path": HOST_CACHE, "type": "DirectoryOrCreate"}} in pod["volumes"]
    batch = as_operator(control_plane, namespace)
    evil = copy.deepcopy(train)
    evil["metadata"]["name"] = "lp-evil"
    evil["spec"]["template"]["spec"]["containers"][0]["image"] = EVIL
    # the policy is in force once the API server has loaded it (a second or two after the install)
    first = wait_for(lambda: refusal(batch, namespace, evil), 30, "the operator-jobs policy in force")
    assert first.startswith("403: ") and f"the image {EVIL} is not allowed for ftc step Jobs" in first, first
    assert "config.allowedImages" in first
    assert refusal(batch, namespace, train) is None
    jobs = (train, rendered("prepare"), rendered("generate", 1), rendered("score"))
    assert {j["spec"]["template"]["spec"]["containers"][0]["image"] for j in jobs} == {
        config.trainer_image,
        config.evaluator_image,
    }
    for job in jobs:
        batch.create_namespaced_job(namespace, job)

    # ... and a Job with anything else is refused, naming what and the chart value that would allow it
    def changed(edit) -> dict[str, Any]:
        job = copy.deepcopy(train)
        edit(job["spec"]["template"]["spec"])
        return job

    cases = {
        "init-container-image": (
            lambda p: p.setdefault("initContainers", []).append({"name": "init", "image": EVIL}),
            f"the image {EVIL} is not allowed",
        ),
        "service-account": (
            lambda p: p.update(serviceAccountName="default"),
            "the ServiceAccount default is not allowed for ftc step Jobs; allowed: ftc-step",
        ),
        "host-path-elsewhere": (
            lambda p: p["volumes"].append({"name": "host-etc", "hostPath": {"path": "/etc"}}),
            "the hostPath volume host-etc mounts /etc, not a path the chart names",
        ),
        "secret-volume": (
            lambda p: p["volumes"].append({"name": "loot", "secret": {"secretName": "ftc-s3"}}),
            "the volume loot is of a type not allowed for ftc step Jobs; allowed: configMap, emptyDir, hostPath",
        ),
        "host-network": (
            lambda p: p.update(hostNetwork=True),
            "may not use the host's network, PID or IPC namespace, nor privileged containers",
        ),
    }
    for case, (edit, message) in cases.items():
        why = refusal(batch, namespace, changed(edit))
        assert why is not None and why.startswith("403: ") and message in why, (case, why)

    # the policy binds the operator's ServiceAccount only: the admin's same Job is admitted
    from kubernetes import client

    assert client.BatchV1Api(control_plane.api_client()).create_namespaced_job(namespace, body(client.V1Job, evil), dry_run="All")
    # and outside its namespace RBAC refuses the operator before admission
    elsewhere = copy.deepcopy(evil)
    elsewhere["metadata"]["namespace"] = "default"
    why = refusal(batch, "default", elsewhere)
    assert why is not None and why.startswith("403: ") and 'cannot create resource "jobs"' in why, why

    # The operator refuses a comparison naming an image outside the allowlist, before any Job
    ftc = Comparisons(control_plane.api_client())
    doc = tiny_spec("http://127.0.0.1:9")
    doc["images"] = {"trainer": EVIL}
    ftc.create("evil", namespace, doc)
    st = ftc.wait_phase("evil", namespace, ("Failed",), timeout=60)
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert ready["message"].startswith(f"spec.images.trainer: the image '{EVIL}' is not allowed by the operator's chart")
    assert ready["message"].endswith("add it to the chart value config.allowedImages")
    assert not ftc.jobs(namespace, "evil")
