"""ftc's API: the FineTuneComparison spec and status, and the step documents. pydantic only."""

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
