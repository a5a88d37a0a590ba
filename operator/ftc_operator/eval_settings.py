"""Which evaluation settings decide the answers and which decide only their scoring. Pure.

Evaluation runs in two kinds of step: one generation Job per model (on that model's GPUs: answers to the test
items) and one scoring Job (on a CPU: metrics, judge, statistics, report). A changed `spec.evaluation` after
training reruns only what it invalidates: the generation settings (decoding, which checkpoint, which test items)
invalidate answers; every other evaluation setting only the scoring. Job names carry `settings_key` of the part
they depend on, so a change gives new Job names and the planner creates them (level-triggered, no bookkeeping).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ftc_api.spec import EvaluationSpec, FineTuneComparisonSpec

# EvaluationSpec fields that change the answers themselves (the test-row sample is drawn with `seed`).
GENERATION_FIELDS: tuple[str, ...] = ("generation", "checkpoint", "test_sample_size", "seed")


def generation_settings(evaluation: EvaluationSpec) -> dict[str, Any]:
    """The evaluation settings the answers depend on (camelCase, defaults included)."""
    doc = evaluation.model_dump(mode="json", by_alias=True, include=set(GENERATION_FIELDS))
    return dict(sorted(doc.items()))


def scoring_settings(evaluation: EvaluationSpec) -> dict[str, Any]:
    """Every evaluation setting (the scoring depends on the answers too, so on all of them)."""
    return evaluation.model_dump(mode="json", by_alias=True)


def settings_key(doc: dict[str, Any], length: int = 8) -> str:
    """A short, stable hash of a settings document (for Job names and cache keys)."""
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:length]


def generation_key(spec: FineTuneComparisonSpec) -> str:
    return settings_key(generation_settings(spec.evaluation))


def scoring_key(spec: FineTuneComparisonSpec) -> str:
    return settings_key(scoring_settings(spec.evaluation))


def changed_fields(old: EvaluationSpec, new: EvaluationSpec) -> list[str]:
    """The camelCase paths under `spec.evaluation` whose values differ (for the fairness record and messages)."""
    a = old.model_dump(mode="json", by_alias=True)
    b = new.model_dump(mode="json", by_alias=True)
    return sorted(f"evaluation.{k}" for k in set(a) | set(b) if a.get(k) != b.get(k))
