"""The one entry point of every step (prepare, train, evaluate): its edges, the same in both images.

A step image's ``__main__`` is a parser and a ``main`` that describes its step (:class:`Step`) and hands it to
:func:`run_step`, which

1. makes stdout and stderr redact this process's credentials, then sets up logging (``FTC_LOG_LEVEL``);
2. turns SIGTERM into :class:`~ftc_step.runtime.Terminated`;
3. reads and validates the input document; a missing, unreadable or invalid one fails at once, the message
   naming the file and, for an invalid one, the fields (``model.method: Input should be 'lora' or 'qlora'``);
4. for a step placed on GPUs, checks that it sees them (:mod:`ftc_step.devices`: GPU or nothing);
5. runs the body, and maps how it ended to the exit code and the summary in the termination log:

=====================================  ==================  =====================================================
the body                               exit code           summary
=====================================  ==================  =====================================================
returned a result                      0 (1 if not ok)     the result
raised ``StepError(retryable=False)``  2 EXIT_BAD_INPUT    the error's partial result, or the step's failure
raised ``StepError(retryable=True)``   1 EXIT_FAILED       the same
was stopped (SIGTERM: ``Terminated``)  1 EXIT_FAILED       the step's failure: the pod is retried (train resumes)
raised anything else                   1 EXIT_FAILED       the step's failure, ``TypeName: message``
handed the step over (``HandedOver``)  the code it gives   written by whoever took it over (the torchrun agent)
=====================================  ==================  =====================================================

Steps 3 and 4 fail as bad input (exit 2). The Job's podFailurePolicy fails the Job at once on exit 2 and
retries exit 1 up to its backoffLimit. Heavy imports (torch) happen only for a step that asks for GPUs.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from ftc_api.steps import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK
from pydantic import BaseModel, ValidationError

from .errors import StepError
from .runtime import Terminated, input_path, redact_output, stop_on_sigterm, write_summary

log = logging.getLogger("ftc.step")

In = TypeVar("In", bound=BaseModel)
Out = TypeVar("Out", bound=BaseModel)

LOG_LEVEL_ENV = "FTC_LOG_LEVEL"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
MAX_FIELD_ERRORS = 5  # fields named in an invalid document's message


@dataclass(frozen=True)
class HandedOver:
    """What a body returns when it passed the step on to processes that write the summary themselves (the
    trainer's torchrun agent): the exit code to end with."""

    code: int


@dataclass(frozen=True)
class Step(Generic[In, Out]):
    """One step as :func:`run_step` runs it."""

    name: str
    """The step's name in messages: ``prepare``, ``train`` or ``evaluate``."""
    input_model: type[In]
    """The input document's model (``PrepareInput``, ``TrainInput``, ``EvaluateInput``)."""
    body: Callable[[In], Out | HandedOver]
    """The step itself: the validated input in, the result out; raises ``StepError`` for what it can name."""
    failure: Callable[[str, Any], Out]
    """A failed result from the error message and the raw document (None when it could not be read)."""
    needs_gpu: bool = False
    """Check GPU or nothing before the body (``FTC_GPUS``, set by the operator for a step placed on GPUs)."""
    summary: Callable[[Out], BaseModel] | None = None
    """What of the result goes to the termination log (default: all of it, trimmed generically)."""


def run_step(step: Step[In, Out], explicit_input: str | None = None, *, log_level: str | None = None) -> int:
    """Run `step` on the input document at `explicit_input` (else $FTC_STEP_INPUT, else /etc/ftc/input.json),
    write its summary and return the exit code (see the module docstring)."""
    redact_output()  # before logging holds sys.stderr: no credential reaches the pod's log
    level = (log_level or os.environ.get(LOG_LEVEL_ENV) or "INFO").upper()
    logging.basicConfig(level=level, format=LOG_FORMAT)
    stop_on_sigterm()
    path = input_path(explicit_input)
    raw: Any = None
    try:
        raw = read_document(path, step.name)
        inp = validate_input(step.input_model, raw, path, step.name)
        if step.needs_gpu:
            check_gpu()
        outcome = step.body(inp)
    except StepError as err:
        log.error("%s failed: %s", step.name, err)
        partial: Out = err.result if err.result is not None else step.failure(str(err), raw)  # the same model
        result = partial.model_copy(update={"ok": False, "error": str(err)})
        code = EXIT_FAILED if err.retryable else EXIT_BAD_INPUT
    except Terminated as err:  # the pod is being stopped: retryable (a train step resumes from its checkpoint)
        log.warning("%s stopped: %s", step.name, err)
        result, code = step.failure(str(err), raw), EXIT_FAILED
    except Exception as err:  # an unexpected failure still gets a summary
        log.exception("%s failed", step.name)
        result, code = step.failure(f"{type(err).__name__}: {err}", raw), EXIT_FAILED
    else:
        if isinstance(outcome, HandedOver):
            return outcome.code
        result, code = outcome, (EXIT_OK if getattr(outcome, "ok", False) else EXIT_FAILED)
    write_summary(step.summary(result) if step.summary is not None else result)
    return code


def read_document(path: Path, step: str) -> Any:
    """The input document at `path` as parsed JSON; a StepError (bad input) when it is missing or not JSON."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError as err:
        raise StepError(f"input document {path} not found") from err
    except OSError as err:
        raise StepError(f"cannot read the input document {path}: {err}") from err
    try:
        return json.loads(text)
    except ValueError as err:
        raise StepError(f"invalid {step} input {path}: not JSON: {err}") from err


def validate_input(model: type[In], raw: Any, path: Path, step: str) -> In:
    """`raw` validated as `model`; a StepError (bad input) naming each invalid field when it is not one."""
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise StepError(f"invalid {step} input {path}: {field_errors(err)}") from err


def field_errors(err: ValidationError, limit: int = MAX_FIELD_ERRORS) -> str:
    """`field.path: what is wrong` for the first `limit` errors, joined by '; '."""
    parts = []
    for e in err.errors()[:limit]:
        loc = ".".join(str(p) for p in e.get("loc", ()))
        parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
    more = len(err.errors()) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def check_gpu(env: Mapping[str, str] | None = None) -> None:
    """GPU or nothing: a StepError (bad input) when the step was placed on more GPUs than CUDA sees; what the
    step sees is logged when it may run on the CPU anyway (FTC_ALLOW_CPU, a local cluster's fake GPUs)."""
    import torch

    from .devices import describe, driver_version, gpu_problem, requested_gpus

    env = os.environ if env is None else env
    problem = gpu_problem(torch, env)
    if problem:
        raise StepError(problem)
    if requested_gpus(env) and not torch.cuda.is_available():
        log.warning("running a GPU step on the CPU (allowed): %s", describe(torch, env, driver_version()))
