"""The step kernel's entry point (ftc_step.entry): one input-document reading, one GPU check and one mapping
from how a step's body ended to the exit code and the summary, for every step of both images."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from ftc_api.steps import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK
from ftc_step.entry import HandedOver, Step, run_step
from ftc_step.errors import StepError
from ftc_step.runtime import Terminated
from pydantic import BaseModel

pytestmark = pytest.mark.unit


class DemoInput(BaseModel):
    name: str
    count: int


class DemoResult(BaseModel):
    ok: bool
    error: str | None = None
    name: str = "unknown"
    count: int | None = None


def failure(error: str, raw: Any) -> DemoResult:
    """As the train step does: the failed result names what the raw document names, when it can be read."""
    return DemoResult(ok=False, error=error, name=str(raw.get("name")) if isinstance(raw, dict) else "unknown")


def raises(err: BaseException) -> Callable[[DemoInput], DemoResult]:
    def body(inp: DemoInput) -> DemoResult:
        raise err

    return body


def records(ran: list[DemoInput]) -> Callable[[DemoInput], DemoResult]:
    """A body that succeeds, keeping each input it is run with in `ran`."""

    def body(inp: DemoInput) -> DemoResult:
        ran.append(inp)
        return DemoResult(ok=True)

    return body


@pytest.fixture
def step_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A termination log in tmp_path, no GPU asked for, and SIGTERM's handler put back after the step."""
    monkeypatch.setenv("FTC_TERMINATION_LOG", str(tmp_path / "termination-log"))
    monkeypatch.delenv("FTC_GPUS", raising=False)
    monkeypatch.delenv("FTC_ALLOW_CPU", raising=False)
    before = signal.getsignal(signal.SIGTERM)
    yield tmp_path
    signal.signal(signal.SIGTERM, before)


def run(tmp_path: Path, body: Callable[[DemoInput], Any], doc: Any = None, **step: Any) -> tuple[int, dict | None]:
    path = tmp_path / "input.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps({"name": "m", "count": 2} if doc is None else doc))
    code = run_step(Step("demo", DemoInput, body, failure=failure, **step), str(path))
    log = tmp_path / "termination-log"
    return code, (json.loads(log.read_text()) if log.exists() else None)


@pytest.mark.parametrize(
    ("body", "code", "summary"),
    [
        pytest.param(
            lambda inp: DemoResult(ok=True, name=inp.name, count=inp.count),
            EXIT_OK,
            {"ok": True, "name": "m", "count": 2},
            id="result",
        ),
        pytest.param(lambda inp: DemoResult(ok=False, error="half done"), EXIT_FAILED, {"ok": False}, id="result-not-ok"),
        pytest.param(raises(StepError("no such dataset")), EXIT_BAD_INPUT, {"error": "no such dataset"}, id="bad-input"),
        pytest.param(raises(StepError("S3 is down", retryable=True)), EXIT_FAILED, {"error": "S3 is down"}, id="retryable"),
        pytest.param(
            raises(StepError("too big", result=DemoResult(ok=True, name="m", count=7))),
            EXIT_BAD_INPUT,
            {"ok": False, "error": "too big", "count": 7},
            id="partial-result-kept",
        ),
        pytest.param(
            raises(Terminated("received SIGTERM: the pod is being stopped")),
            EXIT_FAILED,
            {"ok": False, "error": "received SIGTERM: the pod is being stopped", "name": "m"},
            id="terminated-is-retried",
        ),
        pytest.param(raises(KeyError("x")), EXIT_FAILED, {"ok": False, "error": "KeyError: 'x'", "name": "m"}, id="unexpected"),
        pytest.param(lambda inp: HandedOver(EXIT_BAD_INPUT), EXIT_BAD_INPUT, None, id="handed-over-writes-nothing"),
    ],
)
def test_how_the_body_ends_gives_the_exit_code_and_summary(
    step_env: Path, body: Callable[[DemoInput], Any], code: int, summary: dict | None
) -> None:
    got_code, got = run(step_env, body)
    assert got_code == code
    if summary is None:
        assert got is None
    else:
        assert got is not None and summary.items() <= got.items(), got


@pytest.mark.parametrize(
    ("doc", "error"),
    [
        pytest.param(None, r"input document .*missing\.json not found", id="missing"),
        pytest.param("{not json", r"invalid demo input .*: not JSON: ", id="not-json"),
        pytest.param({"name": "m", "count": "many"}, r"invalid demo input .*: count: Input should be", id="bad-field"),
        pytest.param({"name": "m"}, r"invalid demo input .*: count: Field required", id="missing-field"),
    ],
)
def test_a_bad_input_document_fails_at_once_naming_the_field(step_env: Path, doc: Any, error: str) -> None:
    import re

    ran: list[DemoInput] = []
    path = step_env / ("missing.json" if doc is None else "input.json")
    if doc is not None:
        path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    code = run_step(Step("demo", DemoInput, records(ran), failure=failure), str(path))
    summary = json.loads((step_env / "termination-log").read_text())
    assert code == EXIT_BAD_INPUT and summary["ok"] is False and not ran
    assert re.search(error, summary["error"]), summary["error"]
    if isinstance(doc, dict):
        assert summary["name"] == "m"  # the failure still names what the raw document names


def test_a_step_placed_on_gpus_it_cannot_see_fails_as_bad_input(step_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTC_GPUS", "64")  # more than any machine running this test has
    ran: list[DemoInput] = []
    code, summary = run(step_env, records(ran), needs_gpu=True)
    assert code == EXIT_BAD_INPUT and summary is not None and not ran
    assert "this step was placed on 64 GPU(s) but sees" in summary["error"] and summary["name"] == "m"

    code, _ = run(step_env, lambda inp: DemoResult(ok=True), needs_gpu=False)  # a CPU step is not checked
    assert code == EXIT_OK
    monkeypatch.setenv("FTC_ALLOW_CPU", "1")  # a local cluster's fake GPUs
    code, _ = run(step_env, lambda inp: DemoResult(ok=True), needs_gpu=True)
    assert code == EXIT_OK


def test_the_summary_hook_trims_what_is_written(step_env: Path) -> None:
    trim = lambda r: r.model_copy(update={"count": None})  # noqa: E731
    code, summary = run(step_env, lambda inp: DemoResult(ok=True, count=5), summary=trim)
    assert code == EXIT_OK and summary is not None and "count" not in summary


def test_credentials_are_redacted_from_the_summary(step_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "sk-entry-canary-5f1e"
    monkeypatch.setenv("FTC_JUDGE_API_KEY", secret)
    code, summary = run(step_env, raises(StepError(f"the judge refused key {secret}")))
    assert code == EXIT_BAD_INPUT and summary is not None
    assert secret not in json.dumps(summary) and "[redacted]" in summary["error"]
