"""Check the endpoints before any GPU hour: prepare's preflight against the local OpenAI server, and RAGAS driven in
the mode it found (gpt-4 has no JSON mode: its RAGAS columns came back empty, every call an HTTP 400).

The first test imports ragas (about 25 s on a 2-core machine when nothing has imported it yet; in `make test` the
metric tests pay it first) and scores one item twice: a few seconds after the import."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from ftc_api import names
from ftc_api.spec import DatasetFormat, DatasetSpec, EvaluationSpec, SplitSpec
from ftc_api.steps import EXIT_BAD_INPUT, MAX_SUMMARY_BYTES, Location, PrepareInput, endpoints_to_check
from ftc_step.storage import Storage

pytestmark = pytest.mark.ml


def _dataset(tmp_path: Path) -> Path:
    path = tmp_path / "chat.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": f"{2 * i}."}]}
        for i in range(12)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _prepare(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, local_s3, run: str, judge: dict) -> tuple[int, dict, Location]:
    from ftc_trainer.__main__ import main

    data = _dataset(tmp_path)
    loc = Location(bucket=local_s3.bucket, prefix=f"runs/{run}", endpoint_url=local_s3.endpoint_url)
    evaluation = EvaluationSpec(judge=judge, metrics=["judge", "factual_correctness", "bleu"])
    doc = PrepareInput(
        dataset=DatasetSpec(source=str(data), format=DatasetFormat.CHAT, split=SplitSpec(eval_count=2, test_count=2)),
        location=loc,
        endpoints=endpoints_to_check(evaluation),
    )
    path = tmp_path / "input.json"
    path.write_text(json.dumps(doc.to_wire()))
    log = tmp_path / "termination-log"
    monkeypatch.setenv("FTC_TERMINATION_LOG", str(log))
    code = main(["prepare", "--input", str(path), "--workdir", str(tmp_path / "work")])
    text = log.read_text()
    assert len(text.encode()) <= MAX_SUMMARY_BYTES
    return code, json.loads(text), loc


def test_gpt4_without_json_mode_gets_ragas_in_tool_mode(openai_server, local_s3, tmp_path, monkeypatch):
    from ftc_evaluator.metrics import Item, build_metrics, score_items
    from ftc_evaluator.preflight import ragas_llm, ragas_mode
    from openai import AsyncOpenAI

    judge = {"baseUrl": openai_server.base_url, "model": "gpt-4"}
    code, summary, loc = _prepare(tmp_path, monkeypatch, local_s3, "preflight-gpt4", judge)
    assert code == 0, summary
    (check,) = summary["endpoints"]
    assert check["setting"] == "evaluation.judge" and check["ok"] and check["mode"] == "tools"
    assert "'response_format' of type 'json_object' is not supported with this model" in check["refused"]["json"]
    assert len(openai_server.chat_requests()) == 2  # JSON mode refused, then tools accepted: two tiny calls
    store = Storage(endpoint_url=local_s3.endpoint_url)
    recorded = json.loads(store.read_bytes(loc.uri(names.ENDPOINTS_KEY)))
    assert recorded["endpoints"][0]["mode"] == "tools"

    # Scoring reads the mode prepare found (no call to find it again) and RAGAS scores in it.
    spec = EvaluationSpec.model_validate({"judge": judge})
    assert ragas_mode(spec.judge, store, loc.uri, {}) == ("tools", 0)
    assert len(openai_server.chat_requests()) == 2
    item = Item("Where is Paris?", "Paris is in France. It is the capital.", "Paris is in France. It is big.")
    for mode, expected in (("json", None), ("tools", 0.5)):
        before = len(openai_server.chat_requests())
        client = AsyncOpenAI(base_url=openai_server.base_url, api_key="none", max_retries=0)
        llm = ragas_llm(client, "gpt-4", mode, temperature=0.0)
        scores = asyncio.run(score_items([item], build_metrics(["factual_correctness"], llm=llm)))
        assert scores.values["factual_correctness"] == [expected], scores.errors
        sent = openai_server.chat_requests()[before:]
        assert sent and all(("tools" in r["body"]) == (mode == "tools") for r in sent)
    # The score step's own path: its RAGAS calls go out in tool mode and score.
    from ftc_evaluator.generate import Prediction, TestRow
    from ftc_evaluator.scoring import score

    rows = [TestRow(0, [], item.question, item.reference)]
    answers = {"a": [Prediction(0, item.question, item.reference, item.answer, 5, 0.1, 1)]}
    spec = EvaluationSpec.model_validate(
        {"judge": judge, "metrics": ["factual_correctness"], "primaryMetric": "factual_correctness"}
    )
    before = len(openai_server.chat_requests())
    scored = asyncio.run(score(spec, answers, rows, store=store, uri=loc.uri, env={}))
    assert scored.values["a"]["factual_correctness"] == [0.5] and not scored.metric_errors
    assert all("tools" in r["body"] for r in openai_server.chat_requests()[before:])
    # Another judge than the one prepare checked (the spec changed after training): the mode is asked again.
    other = EvaluationSpec.model_validate({"judge": {"baseUrl": openai_server.base_url, "model": "gpt-4-0314"}})
    assert ragas_mode(other.judge, store, loc.uri, {}) == ("md_json", 3)


@pytest.mark.parametrize(
    "setup, status, words",
    [
        pytest.param({"broken": "html"}, 200, ["not a chat completion: HTML page", "502 Bad Gateway"], id="proxy-page"),
        pytest.param({"broken": "event-stream"}, 200, ["not a chat completion: event stream"], id="event-stream"),
        pytest.param({"known_models": {"gpt-4o"}}, 404, ["does not exist", "check evaluation.judge.model"], id="unknown-model"),
    ],
)
def test_a_judge_that_cannot_serve_fails_prepare_before_anything_else(
    openai_server, local_s3, tmp_path, monkeypatch, setup, status, words
):
    for name, value in setup.items():
        setattr(openai_server, name, value)
    code, summary, loc = _prepare(tmp_path, monkeypatch, local_s3, f"preflight-{status}", {"baseUrl": openai_server.base_url})
    assert code == EXIT_BAD_INPUT
    who = f"evaluation.judge (chat endpoint {openai_server.base_url}, model 'gpt-4')"
    assert summary["error"].startswith(f"{who}: HTTP {status}: ")
    for word in words:
        assert word in summary["error"]
    assert summary["endpoints"][0]["ok"] is False
    assert not Storage(endpoint_url=local_s3.endpoint_url).exists(loc.uri("data/manifest.json"))  # nothing was prepared
