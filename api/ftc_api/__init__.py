"""ftc's API: the FineTuneComparison spec and status, and the step documents. pydantic only."""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("ftc")  # the installed distribution: the images' and the operator's own version
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

from . import names, overfitting, runtime, spec, status, steps  # noqa: E402
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
