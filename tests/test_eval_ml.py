"""The evaluate step for real on the CPU: the trainer prepares the tiny dataset and trains tiny models into
S3 (MinIO on loopback); the evaluator answers the held-out set, scores with RAGAS metrics and the honest
loopback judge, and names the winner — or `tie` for two identical models."""

from __future__ import annotations

import json
import os
import time

import pytest
from ftc_api.spec import (
    EvaluationSpec,
    GenerationSpec,
    JudgeSpec,
    LoraSpec,
    Method,
    Metric,
    SplitSpec,
    TrainingSpec,
)
from ftc_api.steps import (
    EvaluatedModel,
    EvaluateInput,
    EvaluateResult,
    GenerateInput,
    Location,
    ModelRef,
    PrepareInput,
    ScoreInput,
    TrainInput,
)

pytestmark = pytest.mark.ml

TEST_ROWS = 40


def training(steps: int) -> TrainingSpec:
    return TrainingSpec(
        max_steps=steps,
        per_device_batch_size=16,
        gradient_accumulation_steps=1,
        learning_rate=5e-3,
        warmup_ratio=0.0,
        lr_scheduler="constant",
        eval_steps=max(1, steps // 3),
        save_steps=10_000,
        logging_steps=max(1, steps // 6),
        gradient_checkpointing=False,
        max_seq_length=96,
        lora=LoraSpec(r=16, alpha=32, dropout=0.0),
    )


@pytest.fixture(scope="module")
def trained(tiny_s3, tmp_path_factory):
    """data/ prepared once; `strong` trained for 120 steps (LoRA), `weak` for two (QLoRA), on tiny-llama."""
    from ftc_api.spec import DatasetSpec
    from ftc_trainer.prepare import run_prepare
    from ftc_trainer.train import run_train

    location = Location(bucket=tiny_s3.bucket, prefix="eval-ml/default/bakeoff-0123abcd", endpoint_url=tiny_s3.endpoint_url)
    refs = {
        "strong": ModelRef(name="strong", base_model=tiny_s3.llama, method=Method.LORA),
        "weak": ModelRef(name="weak", base_model=tiny_s3.llama, method=Method.QLORA),  # evaluated on a 4-bit NF4 base
    }
    prepared = run_prepare(
        PrepareInput(
            dataset=DatasetSpec(source=tiny_s3.dataset, split=SplitSpec(eval_count=24, test_count=TEST_ROWS)),
            location=location,
            models=list(refs.values()),
            training=training(2),
        ),
        workdir=tmp_path_factory.mktemp("prepare"),
    )
    assert prepared.ok, prepared.error
    results = {}
    for name, steps in (("strong", 120), ("weak", 2)):
        started = time.monotonic()
        results[name] = run_train(
            TrainInput(model=refs[name], training=training(steps), location=location),
            workdir=tmp_path_factory.mktemp(f"train-{name}"),
        )
        assert results[name].ok, results[name].error
        print(f"trained {name}: {steps} steps in {time.monotonic() - started:.1f}s")
    return location, refs, results


def evaluated(ref: ModelRef, result, name: str | None = None) -> EvaluatedModel:
    model = ref.model_copy(update={"name": name}) if name else ref
    return EvaluatedModel(
        model=model,
        adapter_uri=result.best_adapter_uri,
        final_adapter_uri=result.adapter_uri,
        metrics_uri=result.metrics_uri,
        train=result,
    )


def spec(server, metrics: list[Metric], judge_model: str = "fake-judge") -> EvaluationSpec:
    return EvaluationSpec(
        metrics=metrics,
        primary_metric=Metric.JUDGE,
        judge=JudgeSpec(base_url=server.base_url, model=judge_model, concurrency=8),
        generation=GenerationSpec(max_new_tokens=20),
        bootstrap_resamples=1000,
    )


def test_the_better_trained_model_wins_with_a_significant_p_value(trained, openai_server, tmp_path, monkeypatch):
    """As the operator runs it: one generate step per model, then the score step (which loads no model); the
    one-step evaluation of the same input then gives the same scores, reusing those answers and judgments."""
    from ftc_evaluator import generate as generation
    from ftc_evaluator.run import evaluate, generate, score
    from ftc_step.storage import Storage

    location, refs, results = trained
    monkeypatch.setenv("FTC_JUDGE_API_KEY", "test-key")
    inp = EvaluateInput(
        models=[evaluated(refs["weak"], results["weak"]), evaluated(refs["strong"], results["strong"])],
        evaluation=spec(openai_server, [Metric.JUDGE, Metric.ROUGE, Metric.CHRF, Metric.STRING_SIMILARITY, Metric.EXACT_MATCH]),
        location=location,
        title="strong vs weak",
    )
    started = time.monotonic()
    for model in inp.models:
        gen = generate(GenerateInput(model=model, evaluation=inp.evaluation, location=location), workdir=tmp_path / "gen")
        assert gen.ok and gen.model == model.model.name and gen.answers == TEST_ROWS, gen
        assert gen.predictions_uri == location.uri("eval", gen.model, "predictions.jsonl")
        assert gen.reused or gen.devices == "cpu"

    def no_model(*args, **kwargs):
        raise AssertionError("the score step loaded a model")

    monkeypatch.setattr(generation, "load_model", no_model)
    result = score(ScoreInput.model_validate(inp.model_dump(exclude={"step"})), workdir=tmp_path / "score")
    print(f"generated and scored in {time.monotonic() - started:.1f}s")
    assert result.ok, result.error
    one_step = evaluate(inp, workdir=tmp_path / "one-step")  # the answers exist: it loads no model either
    assert one_step.models == result.models and one_step.pairwise == result.pairwise
    assert (one_step.winner, one_step.p_value, one_step.judge_missing) == (result.winner, result.p_value, 0)
    assert result.winner == "strong"
    assert result.p_value is not None and result.p_value < 0.01
    by_model = {m.model: {s.metric: s for s in m.scores} for m in result.models}
    strong, weak = by_model["strong"]["judge"], by_model["weak"]["judge"]
    assert strong.mean is not None and weak.mean is not None and strong.ci_low is not None and weak.ci_high is not None
    assert strong.mean > weak.mean
    assert strong.ci_low > weak.ci_high  # not even the intervals overlap
    assert strong.n == weak.n == TEST_ROWS and strong.missing == weak.missing == 0
    strong_rouge, weak_rouge = by_model["strong"]["rouge"].mean, by_model["weak"]["rouge"].mean
    assert strong_rouge is not None and weak_rouge is not None and strong_rouge > weak_rouge
    assert result.judge_calls == 2 * TEST_ROWS and result.judge_missing == 0

    store = Storage.for_location(location)
    assert result.scores_uri is not None and result.report_uri is not None
    scores = json.loads(store.read_text(result.scores_uri))
    assert scores["winner"] == "strong" and set(scores["pairwise"]) >= {"judge", "rouge"}
    predictions = store.read_text(location.uri("eval", "strong", "predictions.jsonl")).splitlines()
    assert len(predictions) == TEST_ROWS
    row = json.loads(predictions[0])
    assert {"prompt", "reference", "answer", "tokens", "latency"} <= set(row)
    html = store.read_text(result.report_uri)
    assert "<svg" in html and 'id="scores"' in html and "strong" in html
    # the judge saw no model names
    assert not any('"strong"' in json.dumps(r["body"]) for r in openai_server.judge_requests())


def test_two_identical_models_tie_and_a_rerun_reuses_predictions_and_judgments(trained, openai_server, tmp_path):
    from ftc_evaluator.run import evaluate
    from ftc_step.storage import Storage

    location, refs, results = trained
    inp = EvaluateInput(
        models=[
            evaluated(refs["strong"], results["strong"], name="twin-a"),
            evaluated(refs["strong"], results["strong"], name="twin-b"),
        ],
        # A judge model of its own: no judgment cached by another test can answer for it.
        evaluation=spec(openai_server, [Metric.JUDGE, Metric.BLEU], judge_model="fake-judge-twins"),
        location=location,
    )
    before = len(openai_server.judge_requests())
    result = evaluate(inp, workdir=tmp_path / "first")
    assert result.ok, result.error
    assert result.winner == "tie"
    assert result.p_value == pytest.approx(1.0)
    calls = len(openai_server.judge_requests())
    assert result.judge_calls > 0 and calls > before  # the first run really judged

    again = evaluate(inp, workdir=tmp_path / "second")  # a restarted pod: nothing is paid or generated twice
    assert again.winner == "tie" and again.judge_calls == 0
    assert len(openai_server.judge_requests()) == calls
    assert again.scores_uri is not None
    scores = json.loads(Storage.for_location(location).read_text(again.scores_uri))
    assert all(m["generation"].get("reused") for m in scores["models"])


def test_judge_failures_end_in_retries_and_missing_counts_never_in_made_up_scores(trained, openai_server, tmp_path):
    from ftc_evaluator.run import evaluate
    from ftc_step.storage import Storage

    location, refs, results = trained
    openai_server.hang_seconds = 3.0
    openai_server.fail_next("500", "503", "429", "timeout", "garbage")  # transient: retried, then judged
    openai_server.garbage_when_question.add(" plus ")  # never parseable: every addition question stays unjudged
    evaluation = spec(openai_server, [Metric.JUDGE, Metric.ROUGE])
    evaluation.judge = JudgeSpec(
        # 6 attempts an item: more than the 5 injected transient faults, so however the concurrent requests
        # meet them, no item can use up its attempts on transient faults alone (the counts below are exact).
        base_url=openai_server.base_url,
        model="strict-judge",
        concurrency=4,
        max_retries=5,
        timeout_seconds=1,
    )
    evaluation.extra_judges = [JudgeSpec(base_url=openai_server.base_url, model="second-judge", max_retries=0)]
    inp = EvaluateInput(
        models=[evaluated(refs["weak"], results["weak"]), evaluated(refs["strong"], results["strong"])],
        evaluation=evaluation,
        location=location,
    )
    result = evaluate(inp, workdir=tmp_path, env=dict(os.environ, FTC_JUDGE_BACKOFF_SECONDS="0.05"))
    assert result.ok, result.error

    store = Storage.for_location(location)
    test_rows = [json.loads(line) for line in store.read_text(location.uri("data", "test.jsonl")).splitlines()]
    additions = sum(" plus " in row["messages"][-2]["content"] for row in test_rows)
    assert additions > 0
    judged = {m.model: next(s for s in m.scores if s.metric == "judge") for m in result.models}
    for score in judged.values():
        assert (score.n, score.missing) == (TEST_ROWS - additions, additions)
    assert result.judge_missing == 2 * additions
    assert result.winner == "strong"

    assert result.scores_uri is not None and result.report_uri is not None
    scores = json.loads(store.read_text(result.scores_uri))
    main, second = scores["judges"]
    assert main["model"] == "strict-judge" and main["missing"] == 2 * additions
    # addition prompts: unparseable, attempt after attempt (a transient fault may take the place of one)
    assert main["errors"]["unparseable"] >= 2 * 6 * additions - 5
    assert {"500", "503", "timeout"} <= set(main["errors"]) and main["rate_limited"] == 1  # the 429: waited out
    assert main["retries"] >= 2 * 5 * additions
    agreement = scores["judgeAgreement"][0]
    assert agreement["judge"] == "second-judge" and agreement["spearman"] == pytest.approx(1.0) and agreement["kappa"] == 1.0
    assert scores["models"][0]["judgeMissingReasons"] == {"gave up after 6 attempts": additions}
    report = store.read_text(result.report_uri)
    assert f"{additions} missing" in report


def test_judge_budget_stops_judging_and_says_so(trained, openai_server, tmp_path):
    from ftc_evaluator.run import evaluate

    location, refs, results = trained
    evaluation = spec(openai_server, [Metric.JUDGE])
    evaluation.judge = JudgeSpec(base_url=openai_server.base_url, model="budget-judge")
    evaluation.max_judge_calls = 30
    inp = EvaluateInput(
        models=[evaluated(refs["weak"], results["weak"]), evaluated(refs["strong"], results["strong"])],
        evaluation=evaluation,
        location=location,
    )
    result = evaluate(inp, workdir=tmp_path)
    assert result.ok, result.error
    assert result.judge_budget_exhausted and result.judge_calls == 30
    assert result.judge_missing == 2 * TEST_ROWS - 30
    missing = {m.model: m.scores[0].missing for m in result.models}
    assert missing["weak"] == missing["strong"]  # models interleaved item by item: the budget hits both alike
    assert "maxJudgeCalls" in (tmp_path / "index.html").read_text()


def test_cli_with_ragas_metrics_writes_a_small_summary(trained, openai_server, tmp_path):
    import subprocess
    import sys

    location, refs, results = trained
    evaluation = spec(
        openai_server,
        [
            Metric.JUDGE,
            Metric.ANSWER_CORRECTNESS,
            Metric.FACTUAL_CORRECTNESS,
            Metric.SEMANTIC_SIMILARITY,
            Metric.BLEU,
            Metric.ROUGE,
            Metric.CHRF,
            Metric.STRING_SIMILARITY,
            Metric.EXACT_MATCH,
        ],
    )
    evaluation.test_sample_size = 16
    inp = EvaluateInput(
        models=[evaluated(refs["weak"], results["weak"]), evaluated(refs["strong"], results["strong"])],
        evaluation=evaluation,
        location=location,
        checkpoint="final",
    )
    document = tmp_path / "input.json"
    document.write_text(inp.to_json())
    log = tmp_path / "termination-log"
    env = dict(os.environ, FTC_TERMINATION_LOG=str(log), FTC_JUDGE_API_KEY="k", HF_HUB_OFFLINE="1", RAGAS_DO_NOT_TRACK="true")
    done = subprocess.run(
        [sys.executable, "-m", "ftc_evaluator", "--input", str(document), "--workdir", str(tmp_path / "work")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = log.read_text()
    assert len(text.encode()) <= 4096
    result = EvaluateResult.model_validate_json(text)
    assert result.ok and result.winner in ("strong", "tie")
    strong = {s.metric: s for s in next(m for m in result.models if m.model == "strong").scores}
    weak = {s.metric: s for s in next(m for m in result.models if m.model == "weak").scores}
    assert all(m.checkpoint == "final" for m in result.models)
    for metric in ("answer_correctness", "factual_correctness", "semantic_similarity", "rouge"):
        assert strong[metric].n == 16 and strong[metric].missing == 0, metric
        strong_mean, weak_mean = strong[metric].mean, weak[metric].mean
        assert strong_mean is not None and weak_mean is not None and strong_mean >= weak_mean, metric
    json_requests = [r for r in openai_server.chat_requests() if "response_format" in r["body"]]
    assert json_requests  # ragas' LLM metrics went to the judge endpoint over HTTP


def test_a_model_failing_in_evaluation_fails_the_step_unless_excluding_it_is_asked_for(trained, openai_server, tmp_path):
    from ftc_evaluator.run import evaluate
    from ftc_step.errors import StepError

    location, refs, results = trained
    ghost = EvaluatedModel(
        model=ModelRef(name="ghost", base_model=refs["strong"].base_model, method=Method.LORA),
        adapter_uri=location.uri("models", "ghost", "adapter-best"),
    )
    inp = EvaluateInput(
        models=[evaluated(refs["weak"], results["weak"]), ghost, evaluated(refs["strong"], results["strong"])],
        failed_models={"crashed": "train step failed: CUDA out of memory"},
        evaluation=spec(openai_server, [Metric.JUDGE]),
        location=location,
    )
    with pytest.raises(StepError, match="a model failed in evaluation: ghost: .*excludeFailedModels") as refused:
        evaluate(inp, workdir=tmp_path / "default")  # no win by forfeit unless asked for
    assert refused.value.retryable  # the Job tries again: the cause may be transient

    inp.evaluation.exclude_failed_models = True
    result = evaluate(inp, workdir=tmp_path)
    assert result.ok, result.error
    assert [m.model for m in result.models] == ["weak", "strong"]
    assert result.winner == "strong"
    assert set(result.failed_models) == {"crashed", "ghost"}
    assert "no manifest" in result.failed_models["ghost"] or "nothing under" in result.failed_models["ghost"]
    report = (tmp_path / "index.html").read_text()
    assert "CUDA out of memory" in report and "ghost" in report


@pytest.mark.parametrize("kind, method", [("tiny-llama", "lora"), ("tiny-mixtral", "qlora")])
def test_sampling_is_seeded_and_batching_does_not_change_greedy_answers(tiny_assets, kind, method):
    from ftc_api.spec import QuantizationSpec
    from ftc_evaluator.generate import answer_rows, load_model, read_test_rows

    rows, _ = read_test_rows(tiny_assets.chat.read_text().splitlines())
    rows = rows[:12]
    loaded = load_model(tiny_assets.model(kind), None, method=method, quantization=QuantizationSpec())

    def answers(**settings) -> list[str]:
        predictions, _ = answer_rows(loaded, rows, GenerationSpec(max_new_tokens=12, **settings))
        return [p.answer for p in predictions]

    assert answers(batch_size=1) == answers(batch_size=0)  # left padding: a batch answers like one prompt alone
    sampled = answers(do_sample=True, temperature=1.5, seed=7, batch_size=4)
    assert sampled == answers(do_sample=True, temperature=1.5, seed=7, batch_size=4)
    assert sampled != answers(do_sample=True, temperature=1.5, seed=8, batch_size=4)


def test_a_judge_that_rejects_the_key_fails_the_step_as_bad_input(trained, openai_server, tmp_path, monkeypatch, capfd):
    import signal

    from ftc_evaluator.__main__ import main

    location, refs, results = trained
    inp = EvaluateInput(
        models=[evaluated(refs["strong"], results["strong"], name="a"), evaluated(refs["strong"], results["strong"], name="b")],
        evaluation=spec(openai_server, [Metric.JUDGE], judge_model="fake-judge-rejected"),
        location=location,
    )
    path = tmp_path / "input.json"
    path.write_text(inp.to_json())
    openai_server.always = "401"
    openai_server.echo_key = True  # the refusal quotes the key it refused
    canary = "sk-canary-refused-0b9e"
    monkeypatch.setenv("FTC_JUDGE_API_KEY", canary)
    summary = tmp_path / "termination-log"
    monkeypatch.setenv("FTC_TERMINATION_LOG", str(summary))
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        code = main(["--input", str(path), "--workdir", str(tmp_path / "work")])
    finally:
        signal.signal(signal.SIGTERM, sigterm)  # main() installs the step's own handler

    assert code == 2  # bad input: the Job fails at once instead of retrying
    result = EvaluateResult.model_validate_json(summary.read_text())
    assert not result.ok
    assert f"the judge at {openai_server.base_url} rejected model 'fake-judge-rejected' with HTTP 401" in (result.error or "")
    assert "Bearer [redacted]" in (result.error or "")  # the server's message is kept, the key is not
    from tests.readme_table import assert_readme_figure

    assert_readme_figure("a refused judge or embeddings key or model", "—")
    out, err = capfd.readouterr()
    assert canary not in summary.read_text() and canary not in out and canary not in err
