"""Benchmark: judge + RAGAS LLM calls under a rate-limited OpenAI-compatible server, with nothing missing.

    python -m bench.ratelimit_bench [--items 16] [--window 1.0] [--out bench/eval.json]

The local server (devcluster/servers/openai_server.py) enforces a new OpenAI account's limits on gpt-4 (10,000
tokens and 500 requests per minute), its "minute" shrunk to `--window` seconds so the run takes seconds, not
the tens of minutes the same calls need on the real account. Two models x `--items` answers are scored with the
judge, answer_correctness and factual_correctness (OpenAI embeddings on the same endpoint) through
`ftc_evaluator.scoring.score`, twice:

- `limiter`: evaluation.judge.tokensPerMinute / requestsPerMinute set to the account's limits;
- `headers only`: no client-side limit; every 429 is waited out as its headers say.

Each arm records the LLM calls (judge and RAGAS), retries, 429s, missing scores, seconds, the windows it spanned
and the most tokens the server held in one sliding window. The figures go into `rate_limits` of bench/eval.json;
the file's other figures are kept.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

TPM, RPM = 10_000, 500  # a new (tier 1) OpenAI account's gpt-4 limits

FACTS = [
    ("What is the capital of France?", "Paris is the capital of France."),
    ("What colour is the sky?", "The sky is blue on a clear day."),
    ("How many legs has a spider?", "A spider has eight legs."),
    ("What do bees make?", "Bees make honey and wax."),
    ("Where does the sun rise?", "The sun rises in the east."),
    ("What is ice?", "Ice is frozen water."),
    ("What is the largest planet?", "Jupiter is the largest planet in the solar system."),
    ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet."),
]


def arm(items: int, window: float, limiter: bool) -> dict[str, Any]:
    """One scoring run against a fresh rate-limited server."""
    from ftc_api.spec import EmbeddingsSpec, EvaluationSpec, JudgeSpec, Metric
    from ftc_evaluator.generate import Prediction, TestRow
    from ftc_evaluator.scoring import score
    from ftc_step.storage import Storage

    from devcluster.servers.openai_server import FakeOpenAI

    server = FakeOpenAI().start()
    server.rate.set(requests_per_minute=RPM, tokens_per_minute=TPM, window=window)
    limits = {"requests_per_minute": RPM, "tokens_per_minute": TPM} if limiter else {}
    spec = EvaluationSpec(
        metrics=[Metric.JUDGE, Metric.ANSWER_CORRECTNESS, Metric.FACTUAL_CORRECTNESS],
        judge=JudgeSpec(base_url=server.base_url, model="gpt-4-turbo", concurrency=8, **limits),
        embeddings=EmbeddingsSpec(provider="openai", base_url=server.base_url, model="text-embedding-3-small"),
    )
    facts = [FACTS[i % len(FACTS)] for i in range(items)]
    facts = [(f"{q} (item {i})", r) for i, (q, r) in enumerate(facts)]  # distinct prompts: no cache hit
    rows = [TestRow(i, [{"role": "user", "content": q}], q, r) for i, (q, r) in enumerate(facts)]
    answers = {
        "good": [Prediction(i, q, r, r, 8, 0.0, 1) for i, (q, r) in enumerate(facts)],
        "poor": [Prediction(i, q, r, "I am not sure about that.", 6, 0.0, 1) for i, (q, r) in enumerate(facts)],
    }
    env = {"FTC_RATE_LIMIT_WINDOW_SECONDS": str(window), "FTC_JUDGE_BACKOFF_SECONDS": "0.05"}
    with tempfile.TemporaryDirectory() as tmp:
        started = time.monotonic()
        scored = asyncio.run(score(spec, answers, rows, store=Storage(), uri=lambda *p: str(Path(tmp, *p)), env=env))
        seconds = time.monotonic() - started
    server.stop()
    judge, ragas = scored.judges[0], scored.ragas
    assert ragas is not None
    missing = {
        metric: sum(v is None for model in answers for v in scored.values[model][metric])
        for metric in ("judge", "answer_correctness", "factual_correctness")
    }
    return {
        "client_limits": limits or None,
        "items_scored": {metric: 2 * items - n for metric, n in missing.items()},
        "missing": sum(missing.values()),
        "judge_calls": judge.calls,
        "ragas_calls": ragas.calls,
        "retries": judge.retries + ragas.retries,
        "responses_429": server.rate.rejected(),
        "call_seconds_held_back": round(judge.waited_seconds + ragas.waited_seconds, 2),  # summed over calls
        "seconds": round(seconds, 2),
        "windows": len(server.rate.windows),
        "real_minutes_equivalent": round(seconds / window, 1),
        "peak_tokens_in_a_window": server.rate.peak["tokens"],
        "peak_requests_in_a_window": server.rate.peak["requests"],
        "tokens_charged": sum(w["tokens"] for w in server.rate.windows.values()),
        "never_exceeded": server.rate.peak["tokens"] <= TPM and server.rate.peak["requests"] <= RPM,
        "metric_errors": scored.metric_errors,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=16, help="answers per model (default 16)")
    parser.add_argument("--window", type=float, default=1.0, help='the server\'s "minute", in seconds (default 1)')
    parser.add_argument("--out", default="bench/eval.json", help="the JSON to add `rate_limits` to (default bench/eval.json)")
    args = parser.parse_args(argv)
    arm(2, args.window, True)  # warm-up: imports and first-call costs
    results = {"limiter": arm(args.items, args.window, True), "headers only": arm(args.items, args.window, False)}
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.exists() else {}
    doc["rate_limits"] = {
        "benchmark": "judge + RAGAS LLM calls under a rate-limited OpenAI-compatible server (python -m bench.ratelimit_bench)",
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "settings": {
            "server_limits": {"tokens_per_minute": TPM, "requests_per_minute": RPM},
            "minute_seconds": args.window,
            "models": 2,
            "items_per_model": args.items,
            "metrics": ["judge", "answer_correctness", "factual_correctness"],
            "embeddings": "openai provider on the judge's endpoint (shares its limiter)",
        },
        "results": results,
        "zero_missing": all(r["missing"] == 0 for r in results.values()),
    }
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc["rate_limits"], indent=1))
    return 0 if doc["rate_limits"]["zero_missing"] else 1


if __name__ == "__main__":
    sys.exit(main())
