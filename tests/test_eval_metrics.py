"""RAGAS metrics through the real ragas 0.4.3 code against the loopback OpenAI-compatible server: the
structured-output (JSON mode) replies it gets are valid, better answers score higher, empty answers score
0, a failing endpoint leaves items missing, and cached LLM scores are not paid for twice."""

from __future__ import annotations

import asyncio

import pytest
from ftc_api.spec import EmbeddingsSpec
from ftc_evaluator.judge import MemoryCache
from ftc_evaluator.metrics import Item, build_metrics, make_embeddings, make_llm, score_items

pytestmark = pytest.mark.unit

QUESTION = "What is the capital of France?"
REFERENCE = "The capital of France is Paris. It lies on the Seine."
ANSWERS = [REFERENCE, "The capital of France is Paris.", "Bananas are yellow.", ""]


def items() -> list[Item]:
    return [Item(QUESTION, REFERENCE, answer) for answer in ANSWERS]


@pytest.fixture
def llm_and_embeddings(openai_server):
    llm = make_llm(openai_server.base_url, "fake-judge", "key", max_retries=1, timeout=5)
    embeddings = make_embeddings(EmbeddingsSpec(provider="openai", base_url=openai_server.base_url, model="fake-embed"), "key")
    return llm, embeddings


def test_every_metric_ranks_answers_by_agreement_with_the_reference(llm_and_embeddings):
    llm, embeddings = llm_and_embeddings
    names = ["answer_correctness", "factual_correctness", "semantic_similarity", "bleu", "rouge", "chrf"]
    names += ["string_similarity", "exact_match"]
    scored = asyncio.run(score_items(items(), build_metrics(names, llm=llm, embeddings=embeddings)))
    assert scored.errors == {}
    for name in names:
        exact, partial, wrong, empty = scored.values[name]
        assert exact is not None and partial is not None and wrong is not None, (name, scored.values[name])
        assert exact == pytest.approx(1.0, abs=1e-6), name
        assert empty == 0.0, name
        assert exact >= partial >= wrong, name
    for name in ("answer_correctness", "factual_correctness", "semantic_similarity", "rouge", "chrf"):
        exact, partial, wrong, _ = scored.values[name]
        assert partial is not None and wrong is not None, (name, scored.values[name])
        assert partial > wrong, name


def test_llm_metric_scores_are_cached(openai_server, llm_and_embeddings):
    llm, _ = llm_and_embeddings
    metrics = build_metrics(["factual_correctness"], llm=llm)
    cache = MemoryCache()
    first = asyncio.run(score_items(items(), metrics, cache=cache, scorer="fake-judge"))
    calls = len(openai_server.chat_requests())
    assert calls > 0 and len(cache.data) == 3  # the empty answer scores 0 without a call
    second = asyncio.run(score_items(items(), metrics, cache=cache, scorer="fake-judge"))
    assert second.values == first.values
    assert len(openai_server.chat_requests()) == calls


def test_a_failing_endpoint_leaves_items_missing_not_scored(openai_server, llm_and_embeddings):
    llm, _ = llm_and_embeddings
    openai_server.always = "500"
    scored = asyncio.run(score_items(items(), build_metrics(["factual_correctness"], llm=llm)))
    assert scored.values["factual_correctness"] == [None, None, None, 0.0]
    assert sum(scored.errors["factual_correctness"].values()) == 3


@pytest.mark.parametrize(
    ("where", "status", "hint"),
    [
        ("embeddings", 401, "evaluation.embeddings.apiKeySecretRef"),
        ("embeddings", 404, "evaluation.embeddings.model"),
        ("judge", "401", "evaluation.judge.apiKeySecretRef"),
    ],
)
def test_a_refused_key_or_model_stops_scoring_naming_the_setting(openai_server, llm_and_embeddings, where, status, hint):
    from ftc_evaluator.judge import JudgeRejected

    llm, embeddings = llm_and_embeddings
    if where == "embeddings":
        openai_server.embeddings_status = status
        metrics = build_metrics(["semantic_similarity"], embeddings=embeddings)
    else:
        openai_server.always = status
        metrics = build_metrics(["factual_correctness"], llm=llm)
    with pytest.raises(JudgeRejected) as caught:
        asyncio.run(score_items(items(), metrics))
    message = str(caught.value)
    assert hint in message and f"HTTP {status}" in message and openai_server.base_url in message, message


def test_metrics_that_need_a_judge_or_embeddings_say_so():
    with pytest.raises(ValueError, match="needs the judge endpoint"):
        build_metrics(["factual_correctness"])
    with pytest.raises(ValueError, match="needs an embedding model"):
        build_metrics(["semantic_similarity"])


def test_the_packaged_embedding_model_is_found_offline():
    from pathlib import Path

    from ftc_evaluator.metrics import local_embedding_path

    path = Path(local_embedding_path("all-MiniLM-L6-v2"))
    assert (path / "config.json").exists() and (path / "model.safetensors").exists()
    assert local_embedding_path("sentence-transformers/all-MiniLM-L6-v2") == str(path)
