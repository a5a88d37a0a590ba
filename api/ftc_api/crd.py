"""Generate the FineTuneComparison CRD from the pydantic models (`make crds`).

The pydantic JSON schema is turned into a Kubernetes structural schema: `$ref`s inlined, `title`s
dropped, `Optional[X]` unwrapped to X, int-or-string quantities marked, CEL rules kept, and every
property given a description (a field's own description wins over its class docstring).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from .base import API_GROUP, API_VERSION, KIND, PLURAL, SHORT_NAMES, SINGULAR
from .spec import FineTuneComparisonSpec
from .status import FineTuneComparisonStatus

CRD_FILENAME = f"{API_GROUP}_{PLURAL}.yaml"

# Which spec fields are frozen, and when (docs/api.md#what-may-change-after-the-start). Every top-level spec field
# but `evaluation` is frozen once the comparison has left Pending, unless it failed before its data was prepared
# (status.dataManifestUri is set by the prepare step's success and kept from then on): until then no artefact
# depends on the spec, so a spec the operator refused, a wrong dataset or a missing `hub` can be fixed in place.
# `evaluation` may always change: the planner reruns the scoring (and the generation when the answers' settings
# changed) and records the change in status.fairness.evaluationChanges.
MUTABLE_AFTER_START = ("evaluation",)
_EDITABLE = (
    "!has(oldSelf.status) || !has(oldSelf.status.phase) || oldSelf.status.phase == 'Pending'"
    " || (oldSelf.status.phase == 'Failed' && !has(oldSelf.status.dataManifestUri))"
)
# Why each frozen field is frozen (a spec field missing here fails `make crds`: decide, then add it).
FROZEN_BECAUSE = {
    "models": "the models were staged and are trained (or training) from it",
    "dataset": "the data was prepared from it and the models are trained on it",
    "training": "the models are trained (or training) under these settings, and the fairness hash covers them",
    "storage": "the run's data, adapters and checkpoints are stored under it",
    "placement": "the steps ran (or run) under it, and training's GPU count changes the effective batch",
    "images": "the steps ran (or run) with these images, recorded in status.fairness.software",
    "hub": "the base models were staged from it (status.models[].baseModelRevision)",
}
FROZEN_SUFFIX = (
    "; spec.evaluation may still change (it reruns only the evaluation); for other settings create a new FineTuneComparison"
)


def frozen_rules() -> list[dict[str, str]]:
    """One CEL transition rule per frozen spec field, its message naming the field and why it is frozen."""
    rules = []
    for name, field in FineTuneComparisonSpec.model_fields.items():
        alias = field.alias or name
        if alias in MUTABLE_AFTER_START:
            continue
        why = FROZEN_BECAUSE[alias]
        new, old = f"self.spec.{alias}", f"oldSelf.spec.{alias}"
        same = (
            f"{new} == {old}"
            if field.is_required() or field.default_factory is not None
            else (f"(has({new}) ? has({old}) && {new} == {old} : !has({old}))")
        )
        rules.append(
            {
                "rule": f"{_EDITABLE} || {same}",
                "message": f"spec.{alias} is frozen once the data is prepared: {why}{FROZEN_SUFFIX}",
                "fieldPath": f".spec.{alias}",
                "reason": "FieldValueForbidden",
            }
        )
    return rules


_DROP = {"title", "discriminator"}


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    """Inline `$ref`s and normalise one schema node, recursively."""
    if isinstance(node, list):
        return [_resolve(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = copy.deepcopy(defs[node.pop("$ref").split("/")[-1]])
        own_description = node.pop("description", None)
        target.update({k: v for k, v in node.items() if k not in _DROP})
        if own_description:
            target["description"] = own_description
        node = target
    if "anyOf" in node:
        variants = [v for v in node["anyOf"] if v.get("type") != "null"]
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        if rest.pop("x-kubernetes-int-or-string", None) or _is_int_or_string(variants):
            node = {**rest, "x-kubernetes-int-or-string": True}
        elif len(variants) == 1:
            inner = _resolve(variants[0], defs)
            description = rest.pop("description", None) or inner.get("description")
            node = {**inner, **rest}
            if description:
                node["description"] = description
        else:
            raise ValueError(f"cannot express a union in a structural schema: {node}")
    if "allOf" in node and len(node["allOf"]) == 1:
        inner = _resolve(node.pop("allOf")[0], defs)
        node = {**inner, **node}
    if node.get("x-kubernetes-int-or-string"):
        node.pop("anyOf", None)
        node.pop("type", None)
    if "const" in node:
        node["enum"] = [node.pop("const")]
    for bound, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if isinstance(node.get(exclusive), int | float) and not isinstance(node.get(exclusive), bool):
            node[bound] = node.pop(exclusive)  # JSON Schema 2020 -> OpenAPI v3.0: a number becomes a flag
            node[exclusive] = True
    if "default" in node and node["default"] is None:
        node.pop("default")
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "properties":
            out[key] = {name: _resolve(prop, defs) for name, prop in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _resolve(value, defs)
        elif key == "default" and isinstance(value, dict):
            out[key] = {}  # the API server then fills the nested defaults in
        else:
            out[key] = value
    if out.get("type") == "object" and "additionalProperties" in out and out["additionalProperties"] is False:
        out.pop("additionalProperties")  # structural schemas prune unknown fields instead
    return out


def _is_int_or_string(variants: list[dict[str, Any]]) -> bool:
    return sorted(v.get("type", "") for v in variants) == ["integer", "string"]


def structural_schema(model: type) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of a pydantic model, by alias."""
    raw = model.model_json_schema(by_alias=True, mode="validation")  # type: ignore[attr-defined]
    defs = raw.pop("$defs", {})
    schema = _resolve(raw, defs)
    if "description" not in schema and model.__doc__:
        schema["description"] = " ".join(model.__doc__.split())
    return schema


def default_empty_objects(schema: dict[str, Any]) -> dict[str, Any]:
    """Give every optional object whose fields are all optional `default: {}`, so the API server fills in
    the nested defaults (it only defaults inside objects that are present)."""
    required = set(schema.get("required", []))
    for name, prop in schema.get("properties", {}).items():
        if prop.get("type") == "object" and "properties" in prop:
            default_empty_objects(prop)
            if name not in required and not prop.get("required"):
                prop.setdefault("default", {})
    return schema


def build_crd() -> dict[str, Any]:
    """The complete CustomResourceDefinition document."""
    spec_schema = default_empty_objects(structural_schema(FineTuneComparisonSpec))
    status_schema = structural_schema(FineTuneComparisonStatus)
    root = {
        "type": "object",
        "description": "FineTuneComparison runs a fair LoRA/QLoRA fine-tuning bake-off between models: the dataset is "
        "prepared once, every model is fine-tuned under the same hyperparameters, all are evaluated on held-out data "
        "(RAGAS metrics and an LLM judge), and the verdict lands in status.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "APIVersion defines the versioned schema of this object."},
            "kind": {"type": "string", "description": "Kind is the REST resource this object represents."},
            "metadata": {"type": "object"},  # the API server forbids anything more here
            "spec": spec_schema,
            "status": status_schema,
        },
        "x-kubernetes-validations": frozen_rules(),
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{API_GROUP}",
            "labels": {"app.kubernetes.io/name": "ftc", "app.kubernetes.io/part-of": "ftc"},
        },
        "spec": {
            "group": API_GROUP,
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "categories": ["ftc"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {
                            "name": "Phase",
                            "type": "string",
                            "jsonPath": ".status.phase",
                            "description": "Phase of the comparison.",
                        },
                        {
                            "name": "Models",
                            "type": "string",
                            "jsonPath": ".status.modelsDone",
                            "description": "Trained models over total.",
                        },
                        {
                            "name": "Progress",
                            "type": "string",
                            "jsonPath": ".status.progress",
                            "description": "Where each model is: percentage and time left while it trains, its queue "
                            "state (Queued, Admitted, Preempted), done or Failed; N/M trained after training.",
                        },
                        {
                            "name": "Winner",
                            "type": "string",
                            "jsonPath": ".status.winner",
                            "description": "Winning model, or tie.",
                        },
                        {
                            "name": "Reason",
                            "type": "string",
                            "jsonPath": '.status.conditions[?(@.status!="True")].reason',
                            "description": "Reason of the first condition that is not True: what the comparison waits "
                            "on or why it failed (JobRunning, Unschedulable, JobFailed...).",
                        },
                        {
                            "name": "Message",
                            "type": "string",
                            "priority": 1,
                            "jsonPath": '.status.conditions[?(@.status!="True")].message',
                            "description": "Message of that condition (for Unschedulable, the scheduler's).",
                        },
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


# YAML 1.1 readers (go-yaml in kubectl) take these bare words for booleans; PyYAML does not quote them all.
_YAML11_BOOLS = {"y", "Y", "n", "N", "yes", "Yes", "YES", "no", "No", "NO", "on", "On", "ON", "off", "Off", "OFF"}


class _CrdDumper(yaml.SafeDumper):
    def represent_str(self, data: str) -> yaml.ScalarNode:
        style = "'" if data in _YAML11_BOOLS else None
        return self.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_CrdDumper.add_representer(str, _CrdDumper.represent_str)


def render_crd() -> str:
    """The CRD as YAML text, byte-stable for the drift test (field names like `n` quoted for YAML 1.1)."""
    header = "# Generated by `make crds` from api/ftc_api (pydantic models). Do not edit.\n"
    return header + yaml.dump(build_crd(), Dumper=_CrdDumper, sort_keys=False, width=120)


def missing_descriptions(schema: dict[str, Any], path: str = "") -> list[str]:
    """Paths of schema properties that have no description (the CRD must document every field)."""
    missing = []
    for name, prop in schema.get("properties", {}).items():
        here = f"{path}.{name}" if path else name
        if not prop.get("description") and here != "metadata":
            missing.append(here)
        missing += missing_descriptions(prop, here)
        for key in ("items", "additionalProperties"):
            sub = prop.get(key)
            if isinstance(sub, dict) and sub.get("type") == "object":
                missing += missing_descriptions(sub, f"{here}[]")
    return missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate the FineTuneComparison CRD from the API models.")
    parser.add_argument("--write", nargs="*", default=[], help="files to write (default: print to stdout)")
    parser.add_argument("--check", nargs="*", default=[], help="files that must equal the generated CRD")
    args = parser.parse_args(argv)
    text = render_crd()
    stale = [p for p in args.check if not Path(p).exists() or Path(p).read_text() != text]
    for path in args.write:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    if not args.write and not args.check:
        sys.stdout.write(text)
    if stale:
        print(f"out of date (run `make crds`): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
