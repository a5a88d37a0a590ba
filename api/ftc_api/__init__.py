"""ftc's API: the FineTuneComparison spec and status, and the step documents. pydantic only."""

import os
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("ftc")  # the installed distribution (a development checkout)
except PackageNotFoundError:  # the images copy the packages in and set FTC_VERSION from their build argument
    __version__ = os.environ.get("FTC_VERSION", "0+unknown")

from . import names, overfitting, spec, status, steps  # noqa: E402
from .base import API_GROUP, API_VERSION, KIND, PLURAL, ApiModel  # noqa: E402
from .spec import FineTuneComparisonSpec, validation_errors  # noqa: E402
from .status import FineTuneComparisonStatus, Phase  # noqa: E402
from .steps import (  # noqa: E402
    EvaluateInput,
    EvaluateResult,
    PrepareInput,
    PrepareResult,
    TrainInput,
    TrainResult,
)

__all__ = [
    "__version__",
    "names",
    "overfitting",
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
