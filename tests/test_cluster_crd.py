"""The generated CRD on a real API server: bad specs are refused at apply, the spec (but spec.evaluation)
freezes once the data is prepared, and `kubectl explain` documents the API."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from ftc_api.crd import CRD_FILENAME

from tests.fixtures.cluster import Cluster, wait_for

pytestmark = pytest.mark.cluster
CRD = Path(__file__).resolve().parents[1] / "crds" / CRD_FILENAME


@pytest.fixture
def crd(control_plane: Cluster) -> Cluster:
    control_plane.kubectl("apply", "-f", str(CRD))
    jsonpath = "jsonpath={.status.conditions[?(@.type=='Established')].status}"
    wait_for(
        lambda: control_plane.kubectl("get", "crd/finetunecomparisons.ftc.dev", "-o", jsonpath) == "True",
        60,
        "the CRD to be established",
    )
    return control_plane


def comparison(name: str, **spec: Any) -> dict[str, Any]:
    body = {
        "models": [{"name": "a", "baseModel": "/m/a"}, {"name": "b", "baseModel": "/m/b"}],
        "dataset": {"source": "s3://ftc/data.jsonl"},
        "storage": {"bucket": "ftc"},
        "evaluation": {"judge": {"baseUrl": "https://judge.example/v1"}},
    }
    body.update(spec)
    return {"apiVersion": "ftc.dev/v1alpha1", "kind": "FineTuneComparison", "metadata": {"name": name}, "spec": body}


def apply(cluster: Cluster, namespace: str, doc: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    kubectl = str(Path(cluster.bin_dir) / "kubectl")
    return subprocess.run(
        [kubectl, "--kubeconfig", str(cluster.kubeconfig), "-n", namespace, "apply", "-f", "-"],
        input=yaml.safe_dump(doc),
        capture_output=True,
        text=True,
        timeout=60,
    )


REFUSED = [
    (
        "duplicate-names",
        {"models": [{"name": "a", "baseModel": "x"}, {"name": "a", "baseModel": "z"}]},
        "model names must be unique",
    ),
    ("fractions", {"dataset": {"source": "x", "split": {"evalFraction": 0.6, "testFraction": 0.5}}}, "below 1"),
    ("fraction-and-count", {"dataset": {"source": "x", "split": {"testFraction": 0.1, "testCount": 5}}}, "not both"),
    ("bad-method", {"models": [{"name": "a", "baseModel": "x", "method": "full"}]}, "spec.models[0].method"),
    ("bad-name", {"models": [{"name": "Big_Model", "baseModel": "x"}]}, "spec.models[0].name"),
    ("primary-unmeasured", {"evaluation": {"metrics": ["bleu"], "primaryMetric": "judge"}}, "primaryMetric must be one of"),
    ("no-storage", {"storage": None}, "spec.storage"),
    ("no-judge-named", {"evaluation": {"metrics": ["judge", "bleu"]}}, "ftc has no default judge"),
    ("no-evaluation-at-all", {"evaluation": None}, "ftc has no default judge"),
    ("prefix-escapes", {"storage": {"bucket": "ftc", "prefix": "runs/../other-team"}}, "spec.storage.prefix"),
    ("prefix-encoded-slash", {"storage": {"bucket": "ftc", "prefix": "runs%2F..%2Fx"}}, "spec.storage.prefix"),
    ("model-name-look-alike", {"models": [{"name": "llаma", "baseModel": "x"}]}, "spec.models[0].name"),  # Cyrillic а
]


@pytest.mark.parametrize(("spec", "message"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_bad_specs_are_refused_at_apply(crd: Cluster, namespace: str, spec: dict[str, Any], message: str) -> None:
    doc = comparison("bad", **spec)
    doc["spec"] = {k: v for k, v in doc["spec"].items() if v is not None}
    result = apply(crd, namespace, doc)
    assert result.returncode != 0, result.stdout
    assert message in result.stderr, result.stderr


def test_good_spec_gets_defaults_from_the_schema(crd: Cluster, namespace: str) -> None:
    result = apply(crd, namespace, comparison("good"))
    assert result.returncode == 0, result.stderr
    stored = json.loads(crd.kubectl("-n", namespace, "get", "ftc", "good", "-o", "json"))
    assert stored["spec"]["training"]["epochs"] == 2
    assert stored["spec"]["models"][0]["method"] == "qlora"
    assert stored["spec"]["training"]["lora"]["r"] == 16
    assert stored["spec"]["evaluation"]["judge"]["model"] == "gpt-4"


def test_spec_is_frozen_once_the_data_is_prepared_but_evaluation_may_change(crd: Cluster, namespace: str) -> None:
    """One CEL transition rule per frozen field: the refusal names the field; spec.evaluation stays editable (the
    operator reruns only the evaluation); before the data is prepared a failed comparison's spec may be fixed."""

    def status(doc: dict[str, Any]) -> None:
        patch = json.dumps({"status": doc})
        crd.kubectl("-n", namespace, "patch", "ftc", "frozen", "--subresource=status", "--type=merge", "-p", patch)
        wanted = doc["phase"]
        wait_for(
            lambda: crd.kubectl("-n", namespace, "get", "ftc", "frozen", "-o", "jsonpath={.status.phase}") == wanted,
            30,
            f"status phase {wanted}",
        )

    judge = {"baseUrl": "https://judge.example/v1", "model": "gpt-4o-mini"}
    assert apply(crd, namespace, comparison("frozen")).returncode == 0
    # While Pending the spec may still change.
    assert apply(crd, namespace, comparison("frozen", training={"epochs": 3})).returncode == 0
    # Failed before its data was prepared (an invalid spec, a failed prepare): nothing depends on the spec yet.
    status({"phase": "Failed"})
    assert apply(crd, namespace, comparison("frozen", training={"epochs": 5})).returncode == 0
    # Once the data is prepared every field but spec.evaluation is frozen, each refusal naming its field.
    status({"phase": "Training", "dataManifestUri": "s3://ftc/x/data/manifest.json"})
    result = apply(crd, namespace, comparison("frozen", training={"epochs": 4}))
    assert result.returncode != 0
    assert "spec.training is frozen once the data is prepared: the models are trained" in result.stderr, result.stderr
    print(result.stderr)  # the wording docs/api.md quotes
    result = apply(crd, namespace, comparison("frozen", training={"epochs": 5}, hub={"endpoint": "https://hub.example"}))
    assert result.returncode != 0 and "spec.hub is frozen once the data is prepared" in result.stderr, result.stderr
    changed = comparison("frozen", training={"epochs": 5}, evaluation={"judge": judge})
    assert apply(crd, namespace, changed).returncode == 0
    status({"phase": "Failed", "dataManifestUri": "s3://ftc/x/data/manifest.json"})  # failed after: still frozen
    result = apply(crd, namespace, comparison("frozen", dataset={"source": "s3://ftc/other.jsonl"}, evaluation={"judge": judge}))
    assert result.returncode != 0 and "spec.dataset is frozen" in result.stderr, result.stderr


def test_kubectl_explain_documents_the_api(crd: Cluster) -> None:
    def explained() -> str:
        return crd.kubectl("explain", "ftc.spec.training.lora", check=False)

    wait_for(lambda: "rank of the LoRA update matrices" in explained(), 60, "kubectl explain to know the CRD")
    status = crd.kubectl("explain", "ftc.status.models")
    assert "overfitting" in status and "tokensPerSecond" in status
    assert "evaluationChanges" in crd.kubectl("explain", "ftc.status.fairness")


def test_printer_columns(crd: Cluster, namespace: str) -> None:
    assert apply(crd, namespace, comparison("columns")).returncode == 0
    header = crd.kubectl("-n", namespace, "get", "ftc").splitlines()[0].split()
    assert header == ["NAME", "PHASE", "MODELS", "PROGRESS", "WINNER", "REASON", "AGE"]
    wide = crd.kubectl("-n", namespace, "get", "ftc", "-o", "wide").splitlines()[0].split()
    assert wide == ["NAME", "PHASE", "MODELS", "PROGRESS", "WINNER", "REASON", "MESSAGE", "AGE"]
    # The Reason column is the first condition that is not True (the API server evaluates the filter).
    conditions = [
        {"type": "Ready", "status": "True", "reason": "Valid", "message": "ok", "lastTransitionTime": "2026-12-03T00:00:00Z"},
        {"type": "Trained", "status": "Unknown", "reason": "Unschedulable", "message": "0/2 nodes are available",
         "lastTransitionTime": "2026-12-03T00:00:00Z"},
    ]  # fmt: skip
    crd.kubectl("-n", namespace, "patch", "ftc", "columns", "--subresource=status", "--type=merge",
                "-p", json.dumps({"status": {"phase": "Training", "conditions": conditions}}))  # fmt: skip
    row = crd.kubectl("-n", namespace, "get", "ftc", "columns", "-o", "wide").splitlines()[1]
    assert "Unschedulable" in row and "0/2 nodes are available" in row and "Valid" not in row, row


def test_a_sample_of_fuzzed_specs_through_kubectl_apply(crd: Cluster, namespace: str) -> None:
    """Each is accepted or refused with a message naming a field; none that the API server accepts makes the
    planner fail (tests/test_api_fuzz.py `check`: it plans, and renders when the API models accept it too)."""
    from tests.readme_table import assert_readme_figure
    from tests.test_api_fuzz import check, sample_specs

    accepted = refused = 0
    specs = sample_specs(30)
    for i, spec in enumerate(specs):
        proc = apply(crd, namespace, {"apiVersion": "ftc.dev/v1alpha1", "kind": "FineTuneComparison",
                                      "metadata": {"name": f"fuzz-{i}"}, "spec": spec})  # fmt: skip
        if proc.returncode == 0:
            accepted += 1
            check(spec)  # raises if the planner or the rendering fails on it
        else:
            refused += 1
            assert "spec." in proc.stderr or "spec:" in proc.stderr, (spec, proc.stderr)
    print(f"kubectl apply of {len(specs)} fuzzed specs: {accepted} accepted, {refused} refused")
    assert accepted and refused
    assert_readme_figure("a fuzzed sample through `kubectl apply`", f"{len(specs)} specs")
