"""ftc's API: the FineTuneComparison spec and status, and the step documents. pydantic only."""

from . import names, overfitting, runtime, spec, status, steps
from .base import API_GROUP, API_VERSION, KIND, PLURAL, ApiModel
from .spec import FineTuneComparisonSpec, validation_errors
from .status import FineTuneComparisonStatus, Phase
from .steps import (
    EvaluateInput,
    EvaluateResult,
    PrepareInput,
    PrepareResult,
    TrainInput,
    TrainResult,
)

__all__ = [
    "names",
    "overfitting",
    "runtime",
    "spec",
    "status",
    "steps",
    "API_GROUP",
    "API_VERSION",
    "KIND",
    "PLURAL",
    "ApiModel",
    "EvaluateInput",
    "EvaluateResult",
    "FineTuneComparisonSpec",
    "FineTuneComparisonStatus",
    "Phase",
    "PrepareInput",
    "PrepareResult",
    "TrainInput",
    "TrainResult",
    "validation_errors",
]
