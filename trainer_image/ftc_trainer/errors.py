"""The error a step raises for bad input: its message is the step's `error`, written to the termination log."""

from __future__ import annotations

from typing import Any


class StepError(Exception):
    """Bad input or an impossible request; the message names the problem and, where it helps, the fix.

    The step exits with EXIT_BAD_INPUT (the Job fails at once) unless `retryable`: a failed upload may
    succeed on the Job's next try, a missing dataset will not."""

    def __init__(self, message: str, *, retryable: bool = False, result: Any = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.result = result  # a partial result summary to report with the error (for example memory estimates)
