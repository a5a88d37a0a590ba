"""The base every API model shares: camelCase on the wire, snake_case in Python, unknown fields refused."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

API_GROUP = "ftc.dev"
API_VERSION = "v1alpha1"
KIND = "FineTuneComparison"
PLURAL = "finetunecomparisons"
SINGULAR = "finetunecomparison"
SHORT_NAMES = ["ftc"]

# A Kubernetes resource quantity ("4", "16Gi", 500m) or a bare number.
Quantity = Annotated[int | str, Field(json_schema_extra={"x-kubernetes-int-or-string": True})]


def cel_rules(*rules: tuple[str, str]) -> dict[str, Any]:
    """`json_schema_extra` holding CEL validation rules (rule, message) for the generated CRD."""
    return {"x-kubernetes-validations": [{"rule": rule, "message": message} for rule, message in rules]}


class ApiModel(BaseModel):
    """Base of every API model: camelCase aliases, snake_case attributes, extra fields forbidden."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """Dump as the JSON document the API server and the images exchange (camelCase, no nulls)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def to_json(self) -> str:
        """Dump as compact JSON text (camelCase, no nulls)."""
        return self.model_dump_json(by_alias=True, exclude_none=True)
