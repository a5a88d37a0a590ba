"""Pure parts of the evaluator: test rows, adaptive batching, adapter choice, the summary's size, the CLI's
bad-input path, and the contract with the trainer (chat template, modules kept out of 4-bit)."""

from __future__ import annotations

import json

import pytest
from ftc_api.spec import CheckpointChoice, EvaluationSpec, JudgeSpec, Method, Metric, QuantizationSpec
from ftc_api.steps import (
    EvaluatedModel,
    EvaluatedModelResult,
    EvaluateInput,
    EvaluateResult,
    Location,
    MetricScore,
    ModelRef,
    PairwiseTest,
    TrainResult,
)
from ftc_evaluator.generate import generate_adaptive, is_oom, read_test_rows, row_from_json, sample_rows
from ftc_evaluator.run import checkpoint_choice, choose_adapter, fit_summary

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "doc, question, reference, prompt_roles",
    [
        pytest.param(
            {"id": "a", "messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]},
            "Hi?",
            "Hello.",
            ["user"],
            id="chat",
        ),
        pytest.param(
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "1+1?"},
                    {"role": "assistant", "content": "2"},
                    {"role": "user", "content": "2+2?"},
                    {"role": "assistant", "content": "4"},
                ]
            },
            "[system]\nBe brief.\n\n[user]\n1+1?\n\n[assistant]\n2\n\n[user]\n2+2?",
            "4",
            ["system", "user", "assistant", "user"],
            id="multi-turn-question-is-the-conversation",
        ),
        pytest.param({"instruction": "Add.", "input": "1 and 2", "output": "3"}, "Add.\n\n1 and 2", "3", ["user"], id="alpaca"),
        pytest.param(
            {"conversations": [{"from": "human", "value": "Hey"}, {"from": "gpt", "value": "Yo"}]},
            "Hey",
            "Yo",
            ["user"],
            id="sharegpt",
        ),
    ],
)
def test_test_rows(doc, question, reference, prompt_roles):
    row = row_from_json(0, doc)
    assert row is not None, doc
    assert (row.question, row.reference, [m["role"] for m in row.messages]) == (question, reference, prompt_roles)


@pytest.mark.parametrize(
    "doc",
    [
        pytest.param({"messages": [{"role": "user", "content": "Hi?"}]}, id="no-assistant"),
        pytest.param({"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": " "}]}, id="empty"),
        pytest.param({"messages": [{"role": "assistant", "content": "Hello."}]}, id="no-user"),
        pytest.param([1, 2], id="not-an-object"),
    ],
)
def test_rows_without_a_reference_are_skipped(doc):
    assert row_from_json(0, doc) is None


def test_read_test_rows_counts_skipped_lines():
    lines = [json.dumps({"instruction": "a", "output": "b"}), "{broken", "", json.dumps({"messages": []})]
    rows, skipped = read_test_rows(lines)
    assert len(rows) == 1 and skipped == 2


def test_sample_is_seeded_and_keeps_order():
    rows, _ = read_test_rows(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) for i in range(50))
    sample = sample_rows(rows, 10, seed=3)
    assert sample == sample_rows(rows, 10, seed=3) != sample_rows(rows, 10, seed=4)
    assert [r.index for r in sample] == sorted(r.index for r in sample)
    assert sample_rows(rows, None, 3) == rows == sample_rows(rows, 500, 3)


class FakeOOM(RuntimeError):
    pass


FakeOOM.__name__ = "OutOfMemoryError"


def test_adaptive_batching_halves_on_oom_and_keeps_the_order():
    seen = []

    def generate(prompts):
        seen.append(len(prompts))
        if len(prompts) > 5:
            raise FakeOOM("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [(p.upper(), len(p)) for p in prompts]

    prompts = [f"prompt {'x' * (i % 7)}{i}" for i in range(23)]
    outputs, stats = generate_adaptive(prompts, generate, batch_size=0)
    assert [o[0] for o in outputs] == [p.upper() for p in prompts]
    assert seen[:3] == [23, 11, 5]  # auto starts at 64 (here: all 23 prompts), then halves the failed batch
    assert stats.oom_halvings == 2 and stats.batch_size == 5 and stats.answers == 23
    assert all(o[3] <= 5 for o in outputs)


def test_adaptive_batching_gives_up_at_batch_size_one_and_passes_other_errors():
    def always_oom(prompts):
        raise FakeOOM("out of memory")

    with pytest.raises(FakeOOM):
        generate_adaptive(["a", "b"], always_oom, batch_size=2)

    def broken(prompts):
        raise ValueError("bad prompt")

    with pytest.raises(ValueError, match="bad prompt"):
        generate_adaptive(["a"], broken, batch_size=8)
    assert is_oom(RuntimeError("CUDA error: out of memory")) and not is_oom(ValueError("x"))


@pytest.mark.parametrize(
    ("settings", "on_gpu", "shardable", "expected"),
    [
        (None, True, False, ("nf4", True, "bfloat16", "uint8")),
        (
            QuantizationSpec(quant_type="fp4", double_quant=False, compute_dtype="float16"),
            True,
            False,
            ("fp4", False, "float16", "uint8"),
        ),
        (QuantizationSpec(), False, False, ("nf4", True, "float32", "uint8")),  # the CPU computes in fp32
        (QuantizationSpec(), True, True, ("nf4", True, "bfloat16", "bfloat16")),  # FSDP shards float storage
    ],
)
def test_one_4bit_recipe_for_both_images(settings, on_gpu, shardable, expected):
    from ftc_step.loading import quantization_config
    from ftc_step.modeling import NOT_QUANTISED

    config = quantization_config(settings, on_gpu, shardable)
    got = (
        config.bnb_4bit_quant_type,
        config.bnb_4bit_use_double_quant,
        config.bnb_4bit_compute_dtype,
        config.bnb_4bit_quant_storage,
    )
    assert tuple(str(v).removeprefix("torch.") for v in got) == tuple(str(v) for v in expected)
    assert config.llm_int8_skip_modules == list(NOT_QUANTISED) == ["lm_head", "gate", "router", "shared_expert_gate"]


LOCATION = Location(bucket="b", prefix="ftc/ns/run-12345678")


def evaluated(best: str | None = "s3://b/best", final: str | None = "s3://b/final") -> EvaluatedModel:
    train = TrainResult(ok=True, model="m", adapter_uri="s3://b/final", best_adapter_uri=best)
    return EvaluatedModel(
        model=ModelRef(name="m", base_model="x", method=Method.LORA),
        adapter_uri=best or "s3://b/final",
        final_adapter_uri=final,
        train=train,
    )


@pytest.mark.parametrize(
    "model, choice, uri, checkpoint",
    [
        pytest.param(evaluated(), CheckpointChoice.BEST, "s3://b/best", "best", id="best"),
        pytest.param(evaluated(), CheckpointChoice.FINAL, "s3://b/final", "final", id="final"),
        pytest.param(evaluated(best=None), CheckpointChoice.BEST, "s3://b/final", "final", id="no-best-falls-back"),
    ],
)
def test_choose_adapter(model, choice, uri, checkpoint):
    adapter = choose_adapter(model, choice)
    assert (adapter.uri, adapter.checkpoint) == (uri, checkpoint)


def test_checkpoint_choice_prefers_the_operators_explicit_value():
    spec = EvaluationSpec(checkpoint=CheckpointChoice.FINAL)
    implicit = EvaluateInput(models=[evaluated()], evaluation=spec, location=LOCATION)
    explicit = EvaluateInput(models=[evaluated()], evaluation=spec, location=LOCATION, checkpoint=CheckpointChoice.BEST)
    assert checkpoint_choice(implicit) == CheckpointChoice.FINAL
    assert checkpoint_choice(explicit) == CheckpointChoice.BEST


def test_summary_of_eight_models_fits_the_termination_message():
    from ftc_step.runtime import compact_summary

    metrics = [m.value for m in Metric]
    models = [
        EvaluatedModelResult(
            model=f"model-with-a-long-name-{i}",
            checkpoint="best",
            scores=[MetricScore(metric=m, mean=0.123456, ci_low=0.1, ci_high=0.2, n=1000, missing=3) for m in metrics],
        )
        for i in range(8)
    ]
    pairwise = [
        PairwiseTest(a=f"model-{i}", b=f"model-{j}", mean_diff=0.1, ci_low=0.0, ci_high=0.2, p_value=0.01, p_adjusted=0.2, n=1000)
        for i in range(8)
        for j in range(i + 1, 8)
    ]
    result = EvaluateResult(
        ok=True,
        models=models,
        primary_metric="judge",
        winner="model-with-a-long-name-3",
        p_value=0.001,
        pairwise=pairwise,
        scores_uri=LOCATION.uri("eval/scores.json"),
        report_uri=LOCATION.uri("report/index.html"),
    )
    fitted = fit_summary(result)
    text = compact_summary(fitted)
    assert len(text.encode()) <= 4096
    parsed = EvaluateResult.model_validate_json(text)
    assert parsed.winner == "model-with-a-long-name-3" and len(parsed.models) == 8
    assert all(any(s.metric == "judge" for s in m.scores) for m in parsed.models)


def test_small_summary_is_left_alone():
    result = EvaluateResult(ok=True, models=[EvaluatedModelResult(model="a", checkpoint="best")], winner="a")
    assert fit_summary(result) == result


def test_cli_reports_a_bad_input_document(tmp_path, monkeypatch):
    from ftc_evaluator.__main__ import main

    bad = tmp_path / "input.json"
    bad.write_text(json.dumps({"step": "evaluate", "models": []}))
    log = tmp_path / "termination-log"
    monkeypatch.setenv("FTC_TERMINATION_LOG", str(log))
    assert main(["--input", str(bad)]) == 2
    summary = json.loads(log.read_text())
    assert summary["ok"] is False
    assert summary["error"].startswith(f"invalid evaluate input {bad}: ")  # the fields that are wrong, by name
    assert "models: List should have at least 1 item" in summary["error"] and "evaluation: Field required" in summary["error"]


@pytest.mark.parametrize(
    ("step", "document", "message"),
    [
        pytest.param(None, {"step": "score", "models": []}, "invalid score input", id="score-by-its-document"),
        pytest.param(None, {"step": "generate", "model": {}}, "invalid generate input", id="generate-by-its-document"),
        pytest.param("score", {"step": "evaluate"}, "invalid score input", id="the-argument-wins"),
    ],
)
def test_cli_runs_the_step_its_argument_or_document_names(tmp_path, monkeypatch, step, document, message):
    from ftc_evaluator.__main__ import main

    bad = tmp_path / "input.json"
    bad.write_text(json.dumps(document))
    log = tmp_path / "termination-log"
    monkeypatch.setenv("FTC_TERMINATION_LOG", str(log))
    assert main([*([step] if step else []), "--input", str(bad)]) == 2
    summary = json.loads(log.read_text())
    assert summary["ok"] is False and summary["error"].startswith(message)
    assert summary["step"] == ("generate" if "generate" in message else "evaluate")  # GenerateResult / EvaluateResult


@pytest.mark.parametrize(
    ("weights_gib", "parallelism", "model_gpus", "gpu_gib", "visible", "devices"),
    [
        pytest.param(3.9, "single", 1, 80, 2, "cuda:0", id="4-bit-llama-on-one-of-two"),
        pytest.param(13.5, "single", 1, 80, 1, "cuda:0", id="one-gpu"),
        pytest.param(90.0, "single", 2, 80, 2, "auto", id="bf16-mixtral-spread"),
        pytest.param(40.0, "fsdp", 2, 80, 2, "auto", id="fsdp-shards-are-halves"),
        pytest.param(20.0, "fsdp", 2, 80, 2, "cuda:0", id="fsdp-whole-fits-one"),
        pytest.param(77.0, "single", 1, 80, 2, "auto", id="no-headroom-left"),
        pytest.param(None, None, 2, 80, 2, "auto", id="unknown-spreads"),
        pytest.param(3.9, "single", 1, 80, 0, "cpu", id="no-gpu"),
    ],
)
def test_a_model_that_fits_one_gpu_answers_on_one(weights_gib, parallelism, model_gpus, gpu_gib, visible, devices):
    from ftc_evaluator.generate import inference_devices, inference_weights_gib

    assert inference_devices(inference_weights_gib(weights_gib, parallelism, model_gpus), gpu_gib, visible) == devices


def test_judge_spec_maps_onto_the_judge_config():
    from ftc_evaluator.judge import JudgeConfig

    spec = JudgeSpec(base_url="http://127.0.0.1:1/v1", model="m", concurrency=3, max_retries=2, timeout_seconds=5)
    config = JudgeConfig.from_spec(spec, "key")
    assert (config.model, config.concurrency, config.max_retries, config.timeout_seconds, config.api_key) == ("m", 3, 2, 5, "key")


def test_flagged_items_are_named_by_their_test_index():
    from ftc_evaluator.generate import TestRow
    from ftc_evaluator.judge import Judgment
    from ftc_evaluator.outcome import flagged_items

    rows = [TestRow(i, [], f"q{i}", "r") for i in (4, 9, 12)]
    judgments: dict[str, list[Judgment | None]] = {
        "a": [Judgment(5.0, flags=("directive",)), None, Judgment(3.0)],
        "b": [Judgment(5.0), Judgment(None, error="x", flags=("rating-format",)), Judgment(2.0)],
    }
    assert flagged_items(judgments, rows) == {"a": {4: ("directive",)}, "b": {9: ("rating-format",)}}
