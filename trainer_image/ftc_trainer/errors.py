"""The error a step raises for bad input: its message is the step's `error`, written to the termination log."""

from __future__ import annotations


class StepError(Exception):
    """Bad input or an impossible request; the message names the problem and, where it helps, the fix."""
