"""The evaluation endpoints, checked before any GPU hour, and replies that are not what they claim to be.

`classify_reply` (pure) names a reply that is not a chat completion (or an embeddings list) at all: an empty
body, an event stream answering a request that asked for none, a proxy's HTML page, another content type,
text that is not JSON, JSON of another shape. Both the preflight here and the evaluator's judge use it, so
such an endpoint is named for what it answers instead of as "empty".

`check_endpoint` calls one endpoint (`ftc_api.steps.EndpointRef`) with tiny requests (a few tokens each):
a refused key (401/403), an unknown model (404), an unreachable host or a broken reply fails the check
with the setting, the endpoint and the HTTP status named. For the endpoint RAGAS' LLM metrics use it then
finds the first structured-output mode the model accepts (`RAGAS_MODES`: JSON mode, forced tool calls,
plain text holding a JSON code block); none fails the check too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ftc_api.steps import RAGAS_MODES, EndpointCheck, EndpointRef

# What a reply is when it is not what was asked for (classify_reply).
EMPTY = "empty body"
EVENT_STREAM = "event stream"
HTML = "HTML page"
CONTENT_TYPE = "wrong content type"
NOT_JSON = "not JSON"
NOT_COMPLETION = "not a chat completion"
NOT_EMBEDDINGS = "not an embeddings list"
BROKEN_REPLIES = (EMPTY, EVENT_STREAM, HTML, CONTENT_TYPE, NOT_JSON, NOT_COMPLETION, NOT_EMBEDDINGS)

_JSON_BLOCK = re.compile(r"```(?:json)?\s*(\{.*?\})\s*```", re.DOTALL)


def classify_reply(content_type: str | None, body: bytes | str, kind: str = "chat") -> str | None:
    """Pure. None when `body` (a 2xx reply's) is a chat completion (`kind` chat: a JSON object with a `choices`
    list) or an embeddings list (`kind` embeddings: with a `data` list); else what it is, one of BROKEN_REPLIES."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    stripped = text.lstrip()
    ctype = (content_type or "").split(";")[0].strip().lower()
    if not stripped:
        return EMPTY
    if ctype == "text/event-stream" or stripped.startswith(("data:", "event:")):
        return EVENT_STREAM
    if ctype in ("text/html", "application/xhtml+xml") or stripped[:15].lower().startswith(("<!doctype html", "<html")):
        return HTML
    if ctype and not ctype.endswith("json"):
        return CONTENT_TYPE
    try:
        doc = json.loads(text)
    except ValueError:
        return NOT_JSON
    if kind == "embeddings":
        return None if isinstance(doc, dict) and isinstance(doc.get("data"), list) else NOT_EMBEDDINGS
    return None if isinstance(doc, dict) and isinstance(doc.get("choices"), list) else NOT_COMPLETION


def describe_reply(what: str, content_type: str | None, body: bytes | str, limit: int = 80) -> str:
    """`what` (from classify_reply) with the content type and the body's start, for a message."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    start = " ".join(text.split())[:limit]
    ctype = (content_type or "no content type").split(";")[0].strip()
    return f"{what} ({ctype}" + (f": {start!r})" if start else ")")


def json_object(text: str | None) -> dict[str, Any] | None:
    """The JSON object `text` is, or holds in a ```json code block; None when neither."""
    if not text:
        return None
    for candidate in (text, *(m.group(1) for m in _JSON_BLOCK.finditer(text))):
        try:
            doc = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(doc, dict):
            return doc
    return None


# ---------------------------------------------------------------------------------------------- the probes

PROBE_SYSTEM = "You answer with JSON only."
PROBE_USER = 'Return the JSON object {"ok": true}.'
PROBE_TOOL = {
    "type": "function",
    "function": {
        "name": "Answer",
        "description": "Say whether you can answer.",
        "parameters": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    },
}


def probe_body(model: str, mode: str | None) -> dict[str, Any]:
    """The chat request that tries `mode` (None: a plain chat call), a few tokens long."""
    user = PROBE_USER + (" Put it in a ```json code block." if mode == "md_json" else "")
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "system", "content": PROBE_SYSTEM}, {"role": "user", "content": user}],
        "max_tokens": 32,
        "temperature": 0,
    }
    if mode == "json":
        body["response_format"] = {"type": "json_object"}
    elif mode == "tools":
        body["tools"] = [PROBE_TOOL]
        body["tool_choice"] = {"type": "function", "function": {"name": "Answer"}}
    return body


def answered_in_mode(doc: dict[str, Any], mode: str | None) -> bool:
    """Whether a chat completion answers in `mode`: JSON content (json), a tool call with JSON arguments (tools),
    JSON in the content or a code block (md_json); any message for a plain call."""
    try:
        message = doc["choices"][0]["message"]
    except (KeyError, IndexError, TypeError):
        return False
    if mode is None:
        return isinstance(message, dict)
    if mode == "tools":
        calls = message.get("tool_calls") or []
        return bool(calls) and json_object((calls[0].get("function") or {}).get("arguments")) is not None
    content = message.get("content")
    if mode == "json":
        try:
            return isinstance(json.loads(content or ""), dict)
        except ValueError:
            return False
    return json_object(content) is not None


@dataclass(frozen=True)
class Reply:
    """What one request got: the HTTP status (None: no reply), the content type and body, or the error."""

    status: int | None
    content_type: str | None = None
    body: bytes = b""
    error: str | None = None  # a connection failure or timeout


Post = Callable[[str, dict[str, Any], dict[str, str], float], Reply]


def post_json(url: str, body: dict[str, Any], headers: dict[str, str], timeout: float) -> Reply:
    """POST `body` as JSON (requests); a connection failure or timeout is a Reply with `error` set."""
    import requests

    try:
        r = requests.post(url, json=body, headers=headers, timeout=timeout)
    except requests.Timeout:
        return Reply(None, error=f"no reply within {timeout:g}s")
    except requests.RequestException as err:
        return Reply(None, error=f"unreachable: {type(err).__name__}")
    return Reply(r.status_code, r.headers.get("content-type"), r.content)


def _error_message(reply: Reply) -> str:
    """The `error.message` of an OpenAI-style error body, else the body's start."""
    try:
        doc = json.loads(reply.body)
        message = doc["error"]["message"] if isinstance(doc.get("error"), dict) else doc.get("error") or doc.get("message")
        if message:
            return " ".join(str(message).split())[:200].rstrip(".")
    except (ValueError, AttributeError, TypeError):
        pass
    return describe_reply(classify_reply(reply.content_type, reply.body) or "reply", reply.content_type, reply.body)


def _is_json(body: bytes) -> bool:
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


def check_endpoint(ref: EndpointRef, env: Mapping[str, str], post: Post = post_json) -> EndpointCheck:
    """Call `ref` once (a structured endpoint: once per mode until one is accepted) and say what it can do."""
    key = env.get(ref.api_key_env) if ref.api_key_env else None
    headers = {"Authorization": f"Bearer {key or 'none'}"}
    base = ref.base_url.rstrip("/")
    check = EndpointCheck(setting=ref.setting, base_url=ref.base_url, model=ref.model, ok=False)
    who = f"{ref.setting} ({ref.kind} endpoint {ref.base_url}, model {ref.model!r})"

    def fail(reply: Reply, why: str, hint: str, retryable: bool = False) -> EndpointCheck:
        status = f"HTTP {reply.status}" if reply.status is not None else "no HTTP reply"
        check.status, check.retryable = reply.status, retryable
        check.error = f"{who}: {status}: {why}; check {hint}"
        return check

    def refused(reply: Reply) -> EndpointCheck | None:
        """The failure `reply` means for every mode alike, or None when it may be this mode only."""
        if reply.status is None:
            return fail(reply, reply.error or "unreachable", f"{ref.setting}.baseUrl", retryable=True)
        if reply.status in (401, 403):
            return fail(reply, f"the key was refused: {_error_message(reply)}", f"{ref.setting}.apiKeySecretRef")
        if reply.status == 404:
            if _is_json(reply.body):  # an API's error: the URL is right, the model is not
                return fail(reply, f"unknown model: {_error_message(reply)}", f"{ref.setting}.model")
            return fail(reply, f"no API at this URL: {_error_message(reply)}", f"{ref.setting}.baseUrl")
        if reply.status == 408 or reply.status >= 500:
            return fail(reply, f"server error: {_error_message(reply)}", f"{ref.setting}.baseUrl", retryable=True)
        if 200 <= reply.status < 300:
            broken = classify_reply(reply.content_type, reply.body, ref.kind)
            if broken is not None:
                what = describe_reply(broken, reply.content_type, reply.body)
                return fail(
                    reply,
                    f"the reply is not {'a chat completion' if ref.kind == 'chat' else 'an embeddings list'}: {what}",
                    f"{ref.setting}.baseUrl",
                )
        return None

    if ref.kind == "embeddings":
        reply = post(f"{base}/embeddings", {"model": ref.model, "input": ["ftc preflight"]}, headers, ref.timeout_seconds)
        failed = refused(reply)
        if failed is not None:
            return failed
        if reply.status != 200:
            return fail(reply, _error_message(reply), f"{ref.setting}.model")
        check.ok, check.status = True, reply.status
        return check

    for mode in RAGAS_MODES if ref.structured else (None,):
        reply = post(f"{base}/chat/completions", probe_body(ref.model, mode), headers, ref.timeout_seconds)
        if reply.status == 429:  # the key and the model are fine; the mode stays unknown (the evaluator asks again)
            check.ok, check.status = True, 429
            check.refused[mode or "chat"] = "rate limited (HTTP 429): not checked"
            return check
        failed = refused(reply)
        if failed is not None:
            return failed
        if reply.status != 200:
            if mode is None or not 400 <= (reply.status or 0) < 500:
                return fail(reply, _error_message(reply), f"{ref.setting}.model")
            check.refused[mode] = f"HTTP {reply.status}: {_error_message(reply)}"
            continue
        if not answered_in_mode(json.loads(reply.body), mode):
            check.refused[mode or "chat"] = "accepted, but the reply holds no JSON object"
            continue
        check.ok, check.status, check.mode = True, reply.status, mode
        return check
    tried = "; ".join(f"{mode}: {why}" for mode, why in check.refused.items())
    return fail(
        reply,
        f"the model answers in none of the structured-output modes RAGAS' LLM metrics need ({tried})",
        f"{ref.setting}.model (a model with JSON mode or tool calls, for answer_correctness and factual_correctness)",
    )


def check_endpoints(refs: list[EndpointRef], env: Mapping[str, str], post: Post = post_json) -> list[EndpointCheck]:
    """`check_endpoint` on each, in order."""
    return [check_endpoint(ref, env, post) for ref in refs]
