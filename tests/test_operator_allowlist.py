"""The chart's allowlists: which images (spec.images) and ServiceAccounts (placement.serviceAccountName) a
comparison may name, and how the planner refuses the others (the admission policy that backs them is tried on
the real API server in tests/test_e2e_operator.py)."""

from __future__ import annotations

import pytest
from ftc_api.spec import FineTuneComparisonSpec
from ftc_operator.comparison import parse_spec
from ftc_operator.config import OperatorConfig
from ftc_operator.planning import plan
from ftc_operator.resolve import refusals
from pydantic import ValidationError

from tests.test_operator_planning import NOW, OWNER, spec

pytestmark = pytest.mark.unit

TRAINER, EVALUATOR = "ghcr.io/ftc-project/ftc-trainer:0.1.0", "ghcr.io/ftc-project/ftc-evaluator:0.1.0"


@pytest.mark.parametrize(
    ("allowed", "image", "ok"),
    [
        pytest.param([], TRAINER, True, id="the-charts-trainer"),
        pytest.param([], EVALUATOR, True, id="the-charts-evaluator"),
        pytest.param([], "ghcr.io/ftc-project/ftc-trainer:0.2.0", False, id="another-tag"),
        pytest.param(["reg.example/ml/trainer:1"], "reg.example/ml/trainer:1", True, id="listed"),
        pytest.param(["reg.example/ml/trainer:1"], "reg.example/ml/trainer:10", False, id="listed-is-exact"),
        pytest.param(["reg.example/ml/*"], "reg.example/ml/trainer@sha256:abc", True, id="prefix"),
        pytest.param(["reg.example/ml/*"], "reg.example/mlx/trainer:1", False, id="prefix-is-a-prefix"),
        pytest.param(["reg.example/ml/*"], "evil.example/reg.example/ml/x", False, id="prefix-anchored"),
        pytest.param(["*"], "anything:latest", True, id="star-allows-all"),
    ],
)
def test_image_allowlist(allowed, image, ok):
    assert OperatorConfig(allowed_images=allowed).image_allowed(image) is ok


@pytest.mark.parametrize(
    ("values", "error"),
    [
        pytest.param({"allowedImages": ["reg/*/x"]}, r"allowedImages\[0\] 'reg/\*/x': `\*` may only end", id="star-inside"),
        pytest.param({"allowedImages": ["ok", " "]}, r"allowedImages\[1\] is empty", id="empty-image"),
        pytest.param(
            {"allowedServiceAccounts": ["ml-*"]}, r"allowedServiceAccounts\[0\] 'ml-\*': a ServiceAccount name", id="sa-star"
        ),
    ],
)
def test_bad_allowlist_entries_are_refused_naming_the_entry(values, error):
    with pytest.raises(ValidationError, match=error):
        OperatorConfig.model_validate(values)


def refused_fields(config: OperatorConfig, **extra) -> list[str]:
    return [line.split(":", 1)[0] for line in refusals(config, FineTuneComparisonSpec.model_validate(spec(**extra)))]


@pytest.mark.parametrize(
    ("config", "extra", "fields"),
    [
        pytest.param(OperatorConfig(), {}, [], id="nothing-asked"),
        pytest.param(OperatorConfig(), {"images": {"trainer": TRAINER, "evaluator": EVALUATOR}}, [], id="the-charts-images"),
        pytest.param(OperatorConfig(), {"images": {"trainer": "evil/x:1"}}, ["spec.images.trainer"], id="trainer"),
        pytest.param(
            OperatorConfig(),
            {"images": {"trainer": "evil/x:1", "evaluator": "evil/y:1"}},
            ["spec.images.trainer", "spec.images.evaluator"],
            id="both-images",
        ),
        pytest.param(OperatorConfig(allowed_images=["evil/*"]), {"images": {"evaluator": "evil/y:1"}}, [], id="allowed-image"),
        pytest.param(OperatorConfig(), {"placement": {"serviceAccountName": "ftc-step"}}, [], id="the-step-sa"),
        pytest.param(
            OperatorConfig(), {"placement": {"serviceAccountName": "admin"}}, ["spec.placement.serviceAccountName"], id="sa"
        ),
        pytest.param(
            OperatorConfig(allowed_service_accounts=["ml-a"]),
            {"placement": {"serviceAccountName": "ml-a"}},
            [],
            id="allowed-sa",
        ),
        pytest.param(
            OperatorConfig(step_service_account="ml-step"),
            {"placement": {"serviceAccountName": "ftc-step"}},
            ["spec.placement.serviceAccountName"],
            id="the-charts-step-sa-only",
        ),
    ],
)
def test_refusals_name_every_field_outside_the_allowlists(config, extra, fields):
    assert refused_fields(config, **extra) == fields


def test_a_models_own_service_account_is_checked_too():
    doc = spec()
    doc["models"][1]["placement"] = {"serviceAccountName": "kube-admin"}
    assert refusals(OperatorConfig(), FineTuneComparisonSpec.model_validate(doc)) == [
        "spec.models[1].placement.serviceAccountName: the ServiceAccount 'kube-admin' is not allowed by the operator's "
        "chart (allowed: ftc-step); name one of these, or add it to the chart value config.allowedServiceAccounts"
    ]


def test_a_refused_image_fails_the_comparison_naming_field_value_allowlist_and_setting_and_creates_nothing():
    doc = spec(images={"trainer": "evil.example/miner:1"})
    p = plan(parse_spec(doc), None, [], NOW, owner=OWNER, config=OperatorConfig())
    assert p.status.phase == "Failed" and not p.creates
    ready = p.status.conditions[0]
    assert (ready.type, ready.status, ready.reason) == ("Ready", "False", "InvalidSpec")
    assert ready.message == (
        "spec.images.trainer: the image 'evil.example/miner:1' is not allowed by the operator's chart "
        f"(allowed: {TRAINER}, {EVALUATOR}); name one of these, or add it to the chart value config.allowedImages"
    )
    # the chart's admin allows it (the operator restarts with the new config): the comparison starts, same spec
    again = plan(parse_spec(doc), p.status, [], NOW, owner=OWNER, config=OperatorConfig(allowed_images=["evil.example/*"]))
    assert [c.step for c in again.creates] == ["prepare"]
    assert again.creates[0].job["spec"]["template"]["spec"]["containers"][0]["image"] == "evil.example/miner:1"
