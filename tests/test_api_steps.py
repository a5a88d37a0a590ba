"""The step documents survive a JSON round trip; summaries fit a termination message; the overfitting verdict."""

from __future__ import annotations

import json

import pytest
from ftc_api.overfitting import overfitting_verdict
from ftc_api.spec import DatasetSpec, EvaluationSpec, Method, OverfittingSpec, TrainingSpec
from ftc_api.steps import (
    MAX_SUMMARY_BYTES,
    EvaluatedModel,
    EvaluateInput,
    GenerateInput,
    GenerateResult,
    Location,
    LossPoint,
    ModelRef,
    PreparedModel,
    PrepareInput,
    PrepareResult,
    ScoreInput,
    TrainInput,
    TrainResult,
)
from ftc_step.runtime import compact_summary, read_input

pytestmark = pytest.mark.unit
LOC = Location(bucket="ftc", prefix="ftc/ns/demo-0f3a9c2e", endpoint_url="http://127.0.0.1:9000")
MODEL = ModelRef(name="llama2", base_model="s3://ftc/assets/tiny-llama", method=Method.QLORA)

DOCS = {
    "prepare": PrepareInput(dataset=DatasetSpec(source="s3://ftc/data.jsonl"), location=LOC, models=[MODEL]),
    "train": TrainInput(model=MODEL, training=TrainingSpec(max_steps=5), location=LOC),
    "evaluate": EvaluateInput(
        models=[EvaluatedModel(model=MODEL, adapter_uri=LOC.uri("models/llama2/adapter-best"))],
        evaluation=EvaluationSpec(),
        location=LOC,
    ),
    "generate": GenerateInput(
        model=EvaluatedModel(model=MODEL, adapter_uri=LOC.uri("models/llama2/adapter-best")),
        evaluation=EvaluationSpec(),
        location=LOC,
    ),
    "score": ScoreInput(
        models=[EvaluatedModel(model=MODEL, adapter_uri=LOC.uri("models/llama2/adapter-best"))],
        evaluation=EvaluationSpec(),
        location=LOC,
        failed_models={"mixtral": "evaluation failed: generate Job x failed"},
    ),
}


@pytest.mark.parametrize("doc", DOCS.values(), ids=DOCS.keys())
def test_step_documents_round_trip(doc, tmp_path) -> None:
    path = tmp_path / "input.json"
    path.write_text(doc.to_json())
    assert read_input(type(doc), path) == doc
    assert "baseModel" in path.read_text() or "dataset" in path.read_text()


def test_a_generate_summary_is_small() -> None:
    result = GenerateResult(ok=True, model="llama2", predictions_uri=LOC.uri("eval/llama2/predictions.jsonl"), answers=400)
    assert len(result.to_json().encode()) < 512 and json.loads(compact_summary(result)) == result.to_wire()


def test_location_uris() -> None:
    assert LOC.uri("data/train.jsonl") == "s3://ftc/ftc/ns/demo-0f3a9c2e/data/train.jsonl"
    assert LOC.key("/models/x/") == "ftc/ns/demo-0f3a9c2e/models/x"


def test_a_huge_summary_is_cut_to_fit() -> None:
    result = PrepareResult(ok=False, error="x" * 10_000, examples={"duplicate": ["row " * 200] * 50})
    text = compact_summary(result)
    assert len(text.encode()) <= MAX_SUMMARY_BYTES
    assert json.loads(text)["ok"] is False


def test_a_summary_too_big_even_when_trimmed_is_still_valid_json() -> None:
    models = [PreparedModel(name=f"model-{i}", error="cannot read the config: " + "y" * 900) for i in range(8)]
    result = PrepareResult(ok=False, error="z" * 5000, models=models, counts={"read": 10})
    text = compact_summary(result)
    doc = json.loads(text)  # never cut in the middle of a token
    assert len(text.encode()) <= MAX_SUMMARY_BYTES
    assert doc["ok"] is False and doc["truncated"] is True and doc["error"].startswith("zzz")


def test_a_small_summary_is_kept_whole() -> None:
    result = TrainResult(ok=True, model="llama2", best_eval_loss=1.25)
    assert json.loads(compact_summary(result)) == result.to_wire()


def history(evals: list[float], trains: list[float]) -> list[LossPoint]:
    return [LossPoint(step=(i + 1) * 10, train_loss=t, eval_loss=e) for i, (e, t) in enumerate(zip(evals, trains, strict=True))]


@pytest.mark.parametrize(
    ("evals", "trains", "verdict"),
    [
        ([2.0, 1.5, 1.3, 1.2], [2.1, 1.6, 1.3, 1.1], "ok"),
        ([2.0, 1.5, 1.6, 1.8], [2.1, 1.4, 1.0, 0.6], "overfitting"),
        ([2.0, 1.5, 1.6, 1.5], [2.1, 1.4, 1.0, 0.9], "ok"),
        ([2.0, 1.5, 1.6, 1.7], [2.1, 1.4, 1.6, 1.8], "ok"),
        ([3.0, 2.9, 2.9, 2.9], [2.0, 1.5, 1.0, 0.5], "overfitting"),
        ([2.0], [2.1], "unknown"),
    ],
    ids=["falling", "rising-after-min", "one-rise-below-patience", "both-rising", "gap", "too-few"],
)
def test_overfitting_verdict(evals, trains, verdict) -> None:
    result = overfitting_verdict(history(evals, trains), OverfittingSpec(patience=2, gap_threshold=1.0))
    assert result.verdict == verdict, result.reason
    if verdict == "overfitting":
        assert result.min_eval_loss is not None and result.reason


def test_a_summary_and_the_output_streams_carry_no_credential(monkeypatch, capfd) -> None:
    import sys

    from ftc_api.steps import TrainResult
    from ftc_step.runtime import redact_output

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3-canary-secret-0a1b")
    monkeypatch.setenv("FTC_JUDGE_API_KEY_2", "sk-canary-second-judge")
    monkeypatch.setenv("HF_TOKEN", "hf_canary_token")
    monkeypatch.setenv("FTC_JUDGE_API_KEY", "none")  # the placeholder of "no key" is not a secret to hunt for
    leaky = TrainResult(ok=False, model="m", error="403 for https://x?token=hf_canary_token (key s3-canary-secret-0a1b)")
    text = compact_summary(leaky)
    assert "hf_canary_token" not in text and "s3-canary-secret-0a1b" not in text
    assert json.loads(text)["error"] == "403 for https://x?token=[redacted] (key [redacted])"
    redact_output()
    print("judge said: bad key sk-canary-second-judge")
    print("traceback ... Authorization: Bearer hf_canary_token", file=sys.stderr)
    out, err = capfd.readouterr()
    assert out == "judge said: bad key [redacted]\n" and err == "traceback ... Authorization: Bearer [redacted]\n"
