"""The structured-output mode RAGAS' LLM metrics run in (see ftc_step.endpoints and docs/evaluation.md).

Prepare's preflight found the first mode the judge model accepts (JSON mode, tool calls, or a JSON code block in
plain text) and recorded it in data/endpoints.json. Scoring reads it there when the judge is still the one
checked (same base URL and model: evaluation.* may change after training); otherwise it asks the endpoint
again, the same way (at most three tiny calls). A judge that accepts none fails the step, naming the setting,
the endpoint and the HTTP status.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

from ftc_api import names
from ftc_api.spec import JudgeSpec
from ftc_api.steps import JUDGE_API_KEY_ENV, EndpointCheck, EndpointRef
from ftc_step.errors import StepError

log = logging.getLogger(__name__)

JUDGE_SETTING = "evaluation.judge"


def ragas_llm(client: Any, model: str, mode: str = "json", **model_args: Any) -> Any:
    """ragas' LLM over the async OpenAI `client` in `mode`: `json` is what ragas' llm_factory builds (instructor's
    Mode.JSON, `response_format: json_object`); `tools` and `md_json` the same InstructorLLM over instructor's
    Mode.TOOLS (a forced function call) or Mode.MD_JSON (plain text asked for a ```json code block)."""
    import instructor
    from ragas.llms import llm_factory
    from ragas.llms.base import InstructorLLM, InstructorModelArgs

    if mode == "json":
        return llm_factory(model, client=client, **model_args)
    modes = {"tools": instructor.Mode.TOOLS, "md_json": instructor.Mode.MD_JSON}
    if mode not in modes:
        raise ValueError(f"unknown structured-output mode {mode!r} (json, tools or md_json)")
    patched = instructor.from_openai(client, mode=modes[mode])
    return InstructorLLM(client=patched, model=model, provider="openai", model_args=InstructorModelArgs(), **model_args)


def recorded_mode(doc: Mapping[str, Any], judge: JudgeSpec) -> str | None:
    """Pure. The mode data/endpoints.json (`doc`) records for this judge, or None when it checked another one."""
    for entry in doc.get("endpoints") or []:
        check = EndpointCheck.model_validate(entry)
        if check.setting == JUDGE_SETTING and check.base_url == judge.base_url and check.model == judge.model:
            return check.mode
    return None


def ragas_mode(judge: JudgeSpec, store: Any, uri: Callable[..., str], env: Mapping[str, str]) -> tuple[str, int]:
    """The mode for `judge` (see the module docstring) and the calls it took to learn it (0: prepare's record; the
    caller counts them with the RAGAS calls); raises StepError when it accepts none."""
    from ftc_step.endpoints import check_endpoint

    try:
        doc = json.loads(store.read_bytes(uri(names.ENDPOINTS_KEY)))
    except Exception as err:  # not there (a run prepared before the preflight, or a local run): ask again
        log.info("no preflight record (%s): asking the judge which mode it accepts", type(err).__name__)
        doc = {}
    mode = recorded_mode(doc, judge) if isinstance(doc, dict) else None
    if mode:
        log.info("RAGAS LLM metrics run in %s mode (prepare's preflight)", mode)
        return mode, 0
    ref = EndpointRef(
        setting=JUDGE_SETTING, kind="chat", base_url=judge.base_url or "", model=judge.model,
        api_key_env=JUDGE_API_KEY_ENV, structured=True, timeout_seconds=judge.timeout_seconds,
    )  # fmt: skip
    check = check_endpoint(ref, env)
    if not check.ok:
        raise StepError(check.error or f"{JUDGE_SETTING}: unusable", retryable=check.retryable)
    log.info("RAGAS LLM metrics run in %s mode (asked now)", check.mode or "json")
    calls = len(check.refused) + (check.mode is not None)  # one call per mode tried
    return check.mode or "json", calls  # a 429 left it unknown: JSON mode, as ragas does by itself
