"""Spec fuzzing: thousands of specs, valid and broken, through the API models, the planner and the Job
rendering. Each spec is accepted or refused with messages that name a field; nothing raises past the
validator, and an accepted spec always plans and renders. (tests/test_cluster_crd.py sends a sample of the
same specs through `kubectl apply`.)"""

from __future__ import annotations

import copy
import datetime as dt
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[1]
BASE = yaml.safe_load((REPO / "examples" / "tiny.yaml").read_text())["spec"]

# Where a mutation lands: every field of the example, plus a few that are absent from it.
PATHS = [
    "models", "models.0", "models.0.name", "models.0.baseModel", "models.0.method", "models.0.revision",
    "models.0.chatTemplate", "models.0.loraTargetModules", "models.0.placement", "models.0.placement.gpuCount",
    "models.1.name", "models.1", "dataset", "dataset.source", "dataset.format", "dataset.split",
    "dataset.split.evalCount", "dataset.split.testCount", "dataset.split.evalFraction", "dataset.maxRows",
    "training", "training.epochs", "training.learningRate", "training.lrScheduler", "training.warmupRatio",
    "training.perDeviceBatchSize", "training.maxSeqLength", "training.lora", "training.lora.r",
    "training.lora.alpha", "training.lora.dropout", "training.quantization.computeDtype", "training.evalSteps",
    "training.seed", "training.maxSteps", "evaluation", "evaluation.metrics", "evaluation.primaryMetric",
    "evaluation.judge", "evaluation.judge.baseUrl", "evaluation.judge.model", "evaluation.judge.apiKeySecretRef",
    "evaluation.judge.concurrency", "evaluation.generation.maxNewTokens", "evaluation.bootstrapResamples",
    "evaluation.significanceLevel", "storage", "storage.bucket", "storage.prefix", "storage.endpointUrl",
    "storage.credentialsSecretRef", "placement", "placement.gpuCount", "placement.resources",
    "placement.tolerations", "placement.nodeSelector", "hub", "hub.endpoint", "images", "unknownField",
]  # fmt: skip

HOSTILE_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "..", "../../etc", "a/../b", "%2F", "ｌｌａｍａ", "llаma", "a\nb", "\x00", "-a", "A" * 300]),
    st.text(min_size=1000, max_size=3000),
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    HOSTILE_TEXT,
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=8,
)


def _set(doc: dict[str, Any], path: str, value: Any, delete: bool) -> None:
    """Set (or delete) `path` in `doc`; a path through something that is not a dict or list is skipped."""
    node: Any = doc
    keys = path.split(".")
    for key in keys[:-1]:
        if isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        elif isinstance(node, dict):
            if not isinstance(node.get(key), (dict, list)):
                node[key] = {}
            node = node[key]
        else:
            return
    last = keys[-1]
    if isinstance(node, list) and last.isdigit() and int(last) < len(node):
        if delete:
            node.pop(int(last))
        else:
            node[int(last)] = value
    elif isinstance(node, dict):
        if delete:
            node.pop(last, None)
        else:
            node[last] = value


MUTATION = st.tuples(st.sampled_from(PATHS), VALUES, st.booleans())
SPECS = st.lists(MUTATION, min_size=0, max_size=4).map(lambda mutations: _mutated(mutations))


def _mutated(mutations: list[tuple[str, Any, bool]]) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    for path, value, delete in mutations:
        _set(doc, path, value, delete)
    return doc


def check(spec: Any) -> list[str]:
    """The properties every spec must have; returns the refusal messages (empty: accepted)."""
    from ftc_api.spec import FineTuneComparisonSpec, validation_errors
    from ftc_operator.comparison import parse_spec
    from ftc_operator.config import OperatorConfig
    from ftc_operator.planning import plan
    from ftc_operator.rendering import Owner, render_configmap, render_job

    errors = validation_errors(spec) if isinstance(spec, dict) else validation_errors({"spec": spec})  # never raises
    for line in errors:
        assert line.startswith("spec"), line
        assert re.match(r'^spec((\.[A-Za-z_][A-Za-z0-9_-]*)|(\[\d+\])|(\["(?:[^"\\]|\\.)*"?\]))*: \S', line), line
    owner = Owner(name="fuzz", namespace="ns", uid="0f3a9c2e-1111-2222-3333-444455556666")
    now = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    p = plan(parse_spec(spec if isinstance(spec, dict) else {}), None, [], now, owner=owner, config=OperatorConfig())
    if errors:
        assert p.status.phase.value == "Failed" and not p.creates
        return errors
    parsed = FineTuneComparisonSpec.model_validate(spec)
    assert p.status.phase.value == "Preparing" and [c.step for c in p.creates] == ["prepare"]
    job = render_job(owner, parsed, OperatorConfig(), "prepare", None)
    cm = render_configmap(owner, "prepare", None, p.creates[0].input_json)
    for obj in (job, cm):
        name = obj["metadata"]["name"]
        assert len(name) <= 63 and name == name.lower() and name[0].isalnum() and name[-1].isalnum(), name
    for model in parsed.models:
        train = render_job(owner, parsed, OperatorConfig(), "train", model)
        assert len(train["metadata"]["name"]) <= 63
    return errors


MUTATED, ARBITRARY = 2500, 500  # examples per run of the two properties below


@pytest.mark.unit
def test_the_readme_states_how_many_specs_are_fuzzed() -> None:
    from tests.readme_table import assert_readme_figure

    assert_readme_figure("spec fuzzing", f"{MUTATED:,} mutated + {ARBITRARY:,} arbitrary per run")


@pytest.mark.unit
@settings(max_examples=MUTATED, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(SPECS)
def test_mutated_specs_are_accepted_or_refused_naming_the_field_and_accepted_ones_plan(spec: dict[str, Any]) -> None:
    check(spec)


@pytest.mark.unit
@settings(max_examples=ARBITRARY, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(VALUES)
@example({"\x1f\x07" + "\U00010000" * 6: None})  # found by hypothesis: a long quoted key was cut inside an escape
def test_anything_at_all_as_a_spec_is_refused_without_raising(spec: Any) -> None:
    errors = check(spec)
    if not isinstance(spec, dict) or not spec:
        assert errors


@pytest.mark.unit
def test_the_example_itself_is_accepted() -> None:
    assert check(copy.deepcopy(BASE)) == []


def sample_specs(n: int, seed: int = 20261201) -> list[dict[str, Any]]:
    """`n` mutated specs, the same every time (for the kubectl apply sample)."""
    import random

    rng = random.Random(seed)
    values: list[Any] = [None, True, -1, 0, 2**40, 1e308, "", "..", "ｌｌａｍａ", "a\nb", "A" * 300, [], {}, {"x": 1}, "lora"]
    out = []
    for _ in range(n):
        doc = copy.deepcopy(BASE)
        for _ in range(rng.randint(1, 3)):
            _set(doc, rng.choice(PATHS), rng.choice(values), rng.random() < 0.2)
        out.append(doc)
    return out
