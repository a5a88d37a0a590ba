"""The kubernetes client's models, typed for mypy (no kubernetes import here: callers import it lazily).

- `body(V1Secret, manifest)`: a dict manifest (the API's camelCase JSON) as the client's model. The client's
  methods run pydantic's `validate_call`, which turns a dict body into that model anyway (unknown keys are
  refused either way), so this sends exactly what passing the dict sent; it only lets mypy check the call.
- `present(obj.status)`: a field the client's models type as optional although the API server always
  sets it on an object it returns (`metadata`, `spec`, `status`, ...); it fails loudly where it is missing.
- `custom_object(answer)`: a CustomObjectsApi answer, which the client types `object` (it is the parsed JSON).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar, cast

if TYPE_CHECKING:
    from pydantic import BaseModel

M = TypeVar("M", bound="BaseModel")
T = TypeVar("T")


def body(model: type[M], manifest: Mapping[str, Any]) -> M:
    """`manifest` as the client's `model`: what the client's `validate_call` makes of a dict body."""
    return model.model_validate(manifest)


def present(value: T | None, what: str = "a field the API server sets") -> T:
    """`value`, which must be set (the client's models type it as optional)."""
    if value is None:
        raise ValueError(f"{what} is missing")
    return value


def custom_object(answer: object) -> dict[str, Any]:
    """A CustomObjectsApi answer (a custom object or a list of them) as the JSON object it is."""
    return cast("dict[str, Any]", answer)
