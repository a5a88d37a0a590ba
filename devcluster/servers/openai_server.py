"""An OpenAI-compatible server on loopback (aiohttp): the judge of the demo and of the evaluator's test suite.

It serves what the real API serves, over real HTTP, so the real `openai` client and ragas talk to it:

- `POST /v1/chat/completions`
  * the MT-Bench judge prompt: an honest, deterministic judge. It grades the answer by its token F1
    against the reference found in the prompt (1 + round(9 * F1)), so a better answer scores higher,
    and explains itself before `Rating: [[N]]`.
  * JSON mode (`response_format: json_object`, what ragas 0.4.3's instructor adapter sends for
    FactualCorrectness / AnswerCorrectness): it reads the prompt's `input: {...}` document and answers
    the schema asked for — claims / statements split into sentences, NLI verdicts and TP/FP/FN by word
    overlap with the context — validly and deterministically.
- `POST /v1/embeddings`: hashed bag-of-words vectors (float or base64, as the client asks).

Faults: `server.fail_next("500", "429", "timeout", "garbage", ...)` makes the next chat requests fail
that way, in order; `server.garbage_when.add("text")` makes every judge prompt that contains the text
get an unparseable reply (`server.garbage_when_question`: only prompts whose `[Question]` section holds
it); `server.always = "500"` fails every chat request; `server.gullible = True` makes the judge obey a
rating that the graded answer asks for (`rate this 10`, `[[10]]`), as a judge that falls for prompt injection.
Every request body is kept in `server.requests`.

Models (`server.capabilities`, by model name; `MODEL_CAPABILITIES` holds OpenAI's own): a model without JSON
mode refuses `response_format: json_object` with HTTP 400 and the body OpenAI returns (`JSON_MODE_REFUSED`:
gpt-4 and gpt-4-0613 have no JSON mode; gpt-4o, gpt-4-turbo, gpt-3.5-turbo-1106 and later do); a model without
tool calls refuses `tools` likewise (a body modelled on the same shape). Other names can do everything.
Tool calls (instructor's TOOLS mode) are answered with a call whose arguments are the structured reply, a
prompt asking for a ```json code block (MD_JSON mode) with the reply in one. `server.known_models` (a set):
any other model gets OpenAI's 404 `model_not_found`; `server.api_keys` (a set): any other key gets its 401
`invalid_api_key`.

Broken replies (`server.broken`, or one at a time through `fail_next`): "html" (a proxy's 502 page served with
200), "event-stream" (server-sent events to a non-streaming request), "text" (text/plain), "empty" (an
empty 200 body); `server.embeddings_broken` does the same to embeddings.

Rate limits (`server.rate`, devcluster/servers/openai_ratelimit.py): `server.rate.set(requests_per_minute=...,
tokens_per_minute=..., window=60.0)` enforces OpenAI's limits on chat and embeddings requests, with its 429 body
and `x-ratelimit-*` / `retry-after(-ms)` headers; `server.rate.windows` and `server.rate.peak` record what it saw.

Fixture: `openai_server` (a fresh server per test). Standalone, for `make demo` and examples/tiny.yaml:
`python -m devcluster.servers.openai_server --port 8765` (serves until interrupted).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import math
import re
import struct
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from devcluster.servers.http_thread import ThreadedServer
from devcluster.servers.openai_ratelimit import RateLimit

EMBEDDING_DIM = 64
BROKEN = ("html", "event-stream", "text", "empty")


@dataclass(frozen=True)
class Capabilities:
    """What a model accepts: JSON mode (response_format json_object) and tool calls."""

    json_mode: bool = True
    tools: bool = True


# OpenAI's models as the API treats them: gpt-4 (and its 0613 snapshot) has no JSON mode, but function calls;
# the 0314 snapshots have neither. JSON mode came with gpt-4-1106-preview / gpt-3.5-turbo-1106.
MODEL_CAPABILITIES = {
    "gpt-4": Capabilities(json_mode=False),
    "gpt-4-0613": Capabilities(json_mode=False),
    "gpt-4-32k": Capabilities(json_mode=False),
    "gpt-4-0314": Capabilities(json_mode=False, tools=False),
    "gpt-3.5-turbo-0301": Capabilities(json_mode=False, tools=False),
    "gpt-3.5-turbo-0613": Capabilities(json_mode=False),
}
# The body OpenAI returns (HTTP 400) for JSON mode on a model without it.
JSON_MODE_REFUSED = {
    "error": {
        "message": "Invalid parameter: 'response_format' of type 'json_object' is not supported with this model.",
        "type": "invalid_request_error",
        "param": "response_format",
        "code": None,
    }
}
TOOLS_REFUSED = {
    "error": {
        "message": "Invalid parameter: 'tools' is not supported with this model.",
        "type": "invalid_request_error",
        "param": "tools",
        "code": None,
    }
}
PROXY_PAGE = (
    "<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>\n"
    "<body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>\n"
)
WORD = re.compile(r"[a-z0-9]+")
STOP = frozenset(
    "a an the of to in on and or is are was were be it this that for with as by at from".split()  # noqa: SIM905
)


def tokens(text: str) -> list[str]:
    return WORD.findall(text.lower())


def content_words(text: str) -> list[str]:
    return [w for w in tokens(text) if w not in STOP] or tokens(text)


def token_f1(answer: str, reference: str) -> float:
    a, r = Counter(tokens(answer)), Counter(tokens(reference))
    common = sum((a & r).values())
    if not a or not r or common == 0:
        return 0.0
    precision, recall = common / sum(a.values()), common / sum(r.values())
    return 2 * precision * recall / (precision + recall)


def rating_for(answer: str, reference: str) -> int:
    return 1 + round(9 * token_f1(answer, reference))


def supported(statement: str, context: str) -> bool:
    words = content_words(statement)
    if not words:
        return False
    known = set(tokens(context))
    return sum(w in known for w in words) / len(words) >= 0.5


def sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", text) if s.strip()]


def embed(text: str) -> list[float]:
    vector = [0.0] * EMBEDDING_DIM
    for word in tokens(text):
        digest = hashlib.md5(word.encode()).digest()
        vector[digest[0] % EMBEDDING_DIM] += 1.0 if digest[1] % 2 else -1.0
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [v / norm for v in vector]


def _between(text: str, start: str, end: str) -> str | None:
    i = text.find(start)
    if i < 0:
        return None
    j = text.find(end, i + len(start))
    return text[i + len(start) : j if j >= 0 else None].strip()


def judge_reply(prompt: str) -> str | None:
    """The honest judge's reply to an MT-Bench reference-guided prompt, or None if it is not one."""
    reference = _between(prompt, "[The Start of Reference Answer]", "[The End of Reference Answer]")
    answer = _between(prompt, "[The Start of Assistant's Answer]", "[The End of Assistant's Answer]")
    if reference is None or answer is None:
        return None
    f1 = token_f1(answer, reference)
    return (
        f"The assistant's answer agrees with the reference on {f1:.0%} of its words (token F1 {f1:.2f}). "
        f"Rating: [[{rating_for(answer, reference)}]]"
    )


OBEYED = re.compile(
    r"\[\[\s*(\d+)\s*\]\]|rating\s*[:=]\s*\[*\s*(\d+)|(?:rate|give|score|grade)\b[^.\n]{0,40}?\b(10|[1-9])\b", re.IGNORECASE
)


def obeyed_rating(prompt: str) -> int | None:
    """What a gullible judge does with an answer that asks for a rating: gives it (None when none is asked)."""
    start = prompt.find("[The Start of Assistant's Answer]")
    if start < 0:
        return None
    match = OBEYED.search(prompt, start)
    return int(next(g for g in match.groups() if g)) if match else None


def structured_reply(prompt: str) -> dict[str, Any]:
    """A valid reply to one of ragas' structured-output prompts (`... input: {json}\\nOutput: `)."""
    i = prompt.rfind("input: ")
    doc: dict[str, Any] = {}
    if i >= 0:
        body = prompt[i + len("input: ") :]
        end = body.rfind("Output:")
        try:
            doc = json.loads(body[:end] if end >= 0 else body)
        except ValueError:
            doc = {}
    if "response" in doc and "atomicity" in doc:  # FactualCorrectness: ClaimDecompositionOutput
        return {"claims": sentences(doc["response"])}
    if "context" in doc and "statements" in doc:  # FactualCorrectness: NLIStatementOutput
        return {
            "statements": [
                {
                    "statement": s,
                    "reason": "found in the context" if supported(s, doc["context"]) else "not in the context",
                    "verdict": int(supported(s, doc["context"])),
                }
                for s in doc["statements"]
            ]
        }
    if "ground_truth" in doc and isinstance(doc.get("answer"), list):  # AnswerCorrectness: ClassificationWithReason
        truth = " ".join(doc["ground_truth"])
        answer = " ".join(doc["answer"])
        return {
            "TP": [{"statement": s, "reason": "supported"} for s in doc["answer"] if supported(s, truth)],
            "FP": [{"statement": s, "reason": "unsupported"} for s in doc["answer"] if not supported(s, truth)],
            "FN": [{"statement": s, "reason": "not covered"} for s in doc["ground_truth"] if not supported(s, answer)],
        }
    if "question" in doc and isinstance(doc.get("answer"), str):  # AnswerCorrectness: StatementGeneratorOutput
        return {"statements": sentences(doc["answer"])}
    return {}


class FakeOpenAI(ThreadedServer):
    """The server and its knobs. `base_url` ends in /v1, like the real API's."""

    name = "openai"

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host, port)
        self.requests: list[dict[str, Any]] = []
        self.faults: list[str] = []
        self.garbage_when: set[str] = set()
        self.garbage_when_question: set[str] = set()
        self.always: str | None = None
        self.gullible = False  # obey a rating the answer asks for (prompt-injection tests)
        self.embeddings_status: int | None = None  # answer every embeddings request with this HTTP status
        self.echo_key = False  # error replies quote the request's Authorization header (as careless proxies do)
        self.hang_seconds = 5.0
        self.retry_after = "0"  # what a 429 reply asks the client to wait, in seconds
        self.capabilities: dict[str, Capabilities] = dict(MODEL_CAPABILITIES)
        self.known_models: set[str] | None = None  # None: every model name is served
        self.api_keys: set[str] | None = None  # None: every key is accepted
        self.broken: str | None = None  # every chat reply broken this way (BROKEN)
        self.embeddings_broken: str | None = None
        self.base_url = ""
        self.rate = RateLimit()  # no limits until rate.set(...)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ knobs

    def fail_next(self, *kinds: str) -> None:
        """Fail the next chat requests, one kind each: "500", "503", "429", "401", "timeout", "garbage", or a
        broken reply (BROKEN: "html", "event-stream", "text", "empty")."""
        with self._lock:
            self.faults.extend(kinds)

    def chat_requests(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["path"].endswith("/chat/completions")]

    def judge_requests(self) -> list[dict[str, Any]]:
        return [r for r in self.chat_requests() if "response_format" not in r["body"]]

    # ------------------------------------------------------------------ handlers

    def _refusal(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse | None:
        """OpenAI's 401 for an unknown key, 404 for an unknown model, 400 for a mode the model lacks."""
        model = str(body.get("model", ""))
        key = request.headers.get("authorization", "").removeprefix("Bearer ")
        if self.api_keys is not None and key not in self.api_keys:
            message = f"Incorrect API key provided: {key[:3]}***{key[-4:]}. You can find your API key at https://platform.openai.com/account/api-keys."
            return web.json_response(
                {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}},
                status=401,
            )
        if self.known_models is not None and model not in self.known_models:
            message = f"The model `{model}` does not exist or you do not have access to it."
            return web.json_response(
                {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": "model_not_found"}},
                status=404,
            )
        can = self.capabilities.get(model, Capabilities())
        if (body.get("response_format") or {}).get("type") == "json_object" and not can.json_mode:
            return web.json_response(JSON_MODE_REFUSED, status=400)
        if body.get("tools") and not can.tools:
            return web.json_response(TOOLS_REFUSED, status=400)
        return None

    @staticmethod
    def _broken(kind: str, reply: dict[str, Any]) -> web.StreamResponse:
        """A 200 reply that is not what was asked for (BROKEN)."""
        if kind == "html":
            return web.Response(text=PROXY_PAGE, content_type="text/html")
        if kind == "event-stream":
            return web.Response(text=f"data: {json.dumps(reply)}\n\ndata: [DONE]\n\n", content_type="text/event-stream")
        if kind == "text":
            return web.Response(text="upstream said: ok", content_type="text/plain")
        return web.Response(body=b"", content_type="application/json")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        with self._lock:
            self.requests.append({"path": request.path, "body": body})
            fault = self.faults.pop(0) if self.faults else self.always
        refused = self._refusal(request, body)
        if refused is not None:
            return refused
        prompt = "\n".join(str(m.get("content") or "") for m in body.get("messages", []))
        if fault in ("500", "502", "503"):
            return web.json_response({"error": {"message": "injected failure", "type": "server_error"}}, status=int(fault))
        if fault in ("400", "401", "404"):
            message = "injected client error"
            if self.echo_key:
                message = f"Incorrect API key provided: {request.headers.get('authorization', '')}"
            return web.json_response({"error": {"message": message, "type": "invalid_request_error"}}, status=int(fault))
        if fault == "429":
            return web.json_response(
                {"error": {"message": "rate limited", "type": "rate_limit_error"}},
                status=429,
                headers={"retry-after": self.retry_after},
            )
        if fault == "timeout":
            await asyncio.sleep(self.hang_seconds)
        tool_calls = None
        if body.get("response_format", {}).get("type") in ("json_object", "json_schema"):
            content = json.dumps(structured_reply(prompt))
        elif body.get("tools"):  # instructor's TOOLS mode: the structured reply as the forced call's arguments
            name = ((body.get("tool_choice") or {}).get("function") or {}).get("name") or body["tools"][0]["function"]["name"]
            arguments = json.dumps(structured_reply(prompt))
            tool_calls = [{"id": "call_0", "type": "function", "function": {"name": name, "arguments": arguments}}]
            content = ""
        elif "```json" in prompt:  # MD_JSON mode: asked for a JSON code block
            content = "```json\n" + json.dumps(structured_reply(prompt)) + "\n```"
        else:
            question = prompt.split("[Question]\n", 1)[-1].split("\n\n[The Start of Reference Answer]", 1)[0]
            garbage = (
                fault == "garbage"
                or any(g in prompt for g in self.garbage_when)
                or ("[Question]\n" in prompt and any(g in question for g in self.garbage_when_question))
            )
            content = "I cannot decide; it seems fine." if garbage else (judge_reply(prompt) or "ok")
            obeyed = obeyed_rating(prompt) if self.gullible and not garbage else None
            if obeyed is not None:
                content = f"The answer asks for {obeyed}, so be it. Rating: [[{obeyed}]]"
        said: dict[str, Any] = {"role": "assistant", "content": content or None}
        if tool_calls:
            said["tool_calls"] = tool_calls
        reply = {
            "id": "chatcmpl-" + hashlib.sha256(prompt.encode()).hexdigest()[:12],
            "object": "chat.completion",
            "created": 0,
            "model": body.get("model", "fake"),
            "choices": [{"index": 0, "message": said, "finish_reason": "tool_calls" if tool_calls else "stop"}],
            "usage": {
                "prompt_tokens": len(tokens(prompt)),
                "completion_tokens": len(tokens(content)),
                "total_tokens": len(tokens(prompt)) + len(tokens(content)),
            },
        }
        broken = fault if fault in BROKEN else self.broken
        if broken:
            return self._broken(broken, reply)
        return web.json_response(reply)

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        with self._lock:
            self.requests.append({"path": request.path, "body": body})
        refused = self._refusal(request, body)
        if refused is not None:
            return refused
        if self.embeddings_broken:
            return self._broken(self.embeddings_broken, {"object": "list", "data": []})
        if self.embeddings_status:
            return web.json_response(
                {"error": {"message": "injected client error", "type": "invalid_request_error"}}, status=self.embeddings_status
            )
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = []
        for index, text in enumerate(inputs):
            vector = embed(text if isinstance(text, str) else " ".join(map(str, text)))
            if body.get("encoding_format") == "base64":
                encoded: Any = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            else:
                encoded = vector
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        count = sum(len(tokens(str(t))) for t in inputs)
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "model": body.get("model", "fake-embed"),
                "usage": {"prompt_tokens": count, "total_tokens": count},
            }
        )

    async def _models(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"object": "list", "data": [{"id": "fake-judge", "object": "model"}]})

    # ------------------------------------------------------------------ lifecycle

    def routes(self, app: web.Application) -> None:
        app.middlewares.append(self.rate.middleware)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_get("/v1/models", self._models)

    def started(self) -> None:
        self.base_url = f"http://{'127.0.0.1' if self.host == '0.0.0.0' else self.host}:{self.port}/v1"

    @property
    def cluster_base_url(self) -> str:
        """The URL pods use: the host's address (pods cannot reach its loopback); needs host 0.0.0.0."""
        return self.cluster_url() + "/v1"


def main(argv: list[str] | None = None) -> int:
    import argparse
    import signal

    parser = argparse.ArgumentParser(description="An OpenAI-compatible judge and embeddings server for local runs.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8765, help="port (default 8765, as in examples/tiny.yaml)")
    args = parser.parse_args(argv)
    server = FakeOpenAI(args.host, args.port).start()
    print(f"serving {server.base_url}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
