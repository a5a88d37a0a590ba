"""The comparison being reconciled, read from its API object into models. Pure: a dict in, models out.

`read_comparison` is the one place that turns the comparison's JSON into what the planner takes: its
identity (`Owner`), its spec (parsed, or the errors that refuse it: `InvalidSpec`), the status it last
recorded and the retry its ``ftc.dev/retry`` annotation asks for. The planner never sees a dict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ftc_api.base import API_GROUP, API_VERSION, KIND
from ftc_api.spec import FineTuneComparisonSpec, validation_errors
from ftc_api.status import FineTuneComparisonStatus
from ftc_api.steps import RETRY_ANNOTATION
from pydantic import ValidationError


@dataclass(frozen=True)
class Owner:
    """The comparison that owns the rendered objects."""

    name: str
    namespace: str
    uid: str
    generation: int = 1

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": f"{API_GROUP}/{API_VERSION}",
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": False,
        }


@dataclass(frozen=True)
class InvalidSpec:
    """A spec the API models refuse: every problem as a `field.path: message` line."""

    errors: tuple[str, ...]


def parse_spec(doc: dict[str, Any]) -> FineTuneComparisonSpec | InvalidSpec:
    """The spec as a model, or the errors that refuse it (never raises on a dict)."""
    try:
        return FineTuneComparisonSpec.model_validate(doc)
    except ValidationError:
        return InvalidSpec(tuple(validation_errors(doc)))


def parse_status(doc: dict[str, Any] | None) -> FineTuneComparisonStatus | None:
    """The recorded status as a model (an empty one when none is recorded); None when it does not parse."""
    try:
        return FineTuneComparisonStatus.model_validate(doc or {})
    except ValidationError:
        return None


@dataclass(frozen=True)
class Comparison:
    """What the planner takes of one comparison object."""

    owner: Owner
    spec: FineTuneComparisonSpec | InvalidSpec
    status: FineTuneComparisonStatus | None  # None: the recorded status does not parse
    retry: str | None  # the ftc.dev/retry annotation


def read_comparison(obj: dict[str, Any]) -> Comparison:
    """The comparison object (as the API server returns it) as models."""
    meta = obj["metadata"]
    owner = Owner(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"], generation=meta.get("generation", 1))
    return Comparison(
        owner=owner,
        spec=parse_spec(obj.get("spec") or {}),
        status=parse_status(obj.get("status")),
        retry=(meta.get("annotations") or {}).get(RETRY_ANNOTATION),
    )
