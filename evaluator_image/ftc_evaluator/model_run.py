"""What the evaluation learns about one model as it goes: the adapter chosen, its answers, its loss history."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ftc_api.steps import EvaluatedModel

from .generate import Prediction


@dataclass(frozen=True)
class AdapterChoice:
    """Which adapter a model is evaluated with, and why."""

    uri: str
    checkpoint: str  # best | final
    note: str = ""


@dataclass
class ModelRun:
    """What the evaluation learned about one model."""

    spec: EvaluatedModel
    adapter: AdapterChoice | None = None
    predictions: list[Prediction] = field(default_factory=list)
    generation: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    reused: bool = False
    key: str | None = None  # the predictions' cache key (run.generation_key)

    @property
    def name(self) -> str:
        return self.spec.model.name

    @property
    def chosen(self) -> AdapterChoice:
        """The adapter evaluated (set once generation started)."""
        if self.adapter is None:
            raise RuntimeError(f"{self.name}: no adapter chosen yet")
        return self.adapter
