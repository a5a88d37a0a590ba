"""The CRD is generated from the pydantic models; the committed copies must match, and document every field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ftc_api.crd import CRD_FILENAME, build_crd, missing_descriptions, render_crd

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]
COPIES = [ROOT / "crds" / CRD_FILENAME, ROOT / "helm" / "ftc" / "crds" / CRD_FILENAME]


@pytest.mark.parametrize("path", COPIES, ids=lambda p: str(p.relative_to(ROOT)))
def test_committed_crd_matches_the_models(path: Path) -> None:
    assert path.exists(), f"{path} is missing: run `make crds`"
    assert path.read_text() == render_crd(), f"{path} is stale: run `make crds`"


def schema() -> dict:
    return build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_every_field_has_a_description() -> None:
    assert missing_descriptions(schema()) == []


def test_missing_descriptions_finds_an_undocumented_field() -> None:
    assert missing_descriptions({"properties": {"a": {"type": "object", "properties": {"b": {"type": "string"}}}}}) == [
        "a",
        "a.b",
    ]


def test_schema_is_structural() -> None:
    """No $ref, no anyOf/oneOf outside int-or-string, and every node has a type (or int-or-string)."""

    def walk(node: dict, path: str) -> None:
        assert "$ref" not in node and "oneOf" not in node and "anyOf" not in node, path
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        for name, prop in node.get("properties", {}).items():
            walk(prop, f"{path}.{name}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                walk(node[key], f"{path}[{key}]")

    walk(schema(), "")


def test_crd_shape() -> None:
    crd = build_crd()
    assert crd["metadata"]["name"] == "finetunecomparisons.ftc.dev"
    assert crd["spec"]["names"]["shortNames"] == ["ftc"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = version["additionalPrinterColumns"]
    assert [c["name"] for c in columns] == ["Phase", "Models", "Progress", "Winner", "Reason", "Message", "Age"]
    assert columns[2]["jsonPath"] == ".status.progress" and "priority" not in columns[2]  # where each model is
    # the first condition that is not True: what the comparison waits on (Unschedulable...) or why it failed
    assert columns[4]["jsonPath"] == '.status.conditions[?(@.status!="True")].reason'
    assert columns[5]["priority"] == 1  # the message with -o wide only
    rules = [r["rule"] for r in schema()["properties"]["spec"]["x-kubernetes-validations"]]
    assert any("exists_one" in r for r in rules)
    frozen = [r["fieldPath"] for r in schema()["x-kubernetes-validations"]]  # everything but spec.evaluation
    assert ".spec.training" in frozen and ".spec.evaluation" not in frozen


def test_quantities_accept_ints_and_strings() -> None:
    resources = schema()["properties"]["spec"]["properties"]["placement"]["properties"]["resources"]
    assert resources["properties"]["limits"]["additionalProperties"] == {"x-kubernetes-int-or-string": True}


def test_render_is_stable_yaml() -> None:
    assert render_crd() == render_crd()
    assert yaml.safe_load(render_crd())["kind"] == "CustomResourceDefinition"


def test_each_field_description_starts_with_its_json_name() -> None:
    """Kubeflow style: `kubectl explain` text opens with the field's wire name, so aliases and docs agree."""
    wrong = []

    def walk(node: dict, path: str) -> None:
        for name, prop in node.get("properties", {}).items():
            if not prop.get("description", "").startswith(f"{name}:"):
                wrong.append(f"{path}.{name}")
            walk(prop, f"{path}.{name}")
            for key in ("items", "additionalProperties"):
                if isinstance(prop.get(key), dict):
                    walk(prop[key], f"{path}.{name}[]")

    for top in ("spec", "status"):
        walk(schema()["properties"][top], top)
    assert wrong == []
