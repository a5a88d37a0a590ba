"""The evaluation endpoints: the local OpenAI server's per-model refusals and broken replies, the reply
classification (ftc_step.endpoints.classify_reply) and the preflight check of one endpoint against the server."""

from __future__ import annotations

import json

import pytest
import requests
from ftc_api.spec import EvaluationSpec
from ftc_api.steps import EndpointRef, endpoints_to_check
from ftc_step.endpoints import (
    CONTENT_TYPE,
    EMPTY,
    EVENT_STREAM,
    HTML,
    NOT_COMPLETION,
    NOT_EMBEDDINGS,
    NOT_JSON,
    check_endpoint,
    classify_reply,
    json_object,
)

pytestmark = pytest.mark.unit

COMPLETION = json.dumps({"object": "chat.completion", "choices": [{"message": {"content": "hi"}}]})


@pytest.mark.parametrize(
    "content_type, body, kind, expected",
    [
        pytest.param("application/json", COMPLETION, "chat", None, id="completion"),
        pytest.param("application/json; charset=utf-8", COMPLETION.encode(), "chat", None, id="completion-bytes"),
        pytest.param(None, COMPLETION, "chat", None, id="completion-no-content-type"),
        pytest.param("application/json", "", "chat", EMPTY, id="empty"),
        pytest.param("application/json", "  \n", "chat", EMPTY, id="blank"),
        pytest.param("text/event-stream", "data: " + COMPLETION + "\n\n", "chat", EVENT_STREAM, id="event-stream"),
        pytest.param("application/json", "data: {}\n\ndata: [DONE]", "chat", EVENT_STREAM, id="sse-mislabelled"),
        pytest.param("text/html; charset=utf-8", "<html><body>502</body></html>", "chat", HTML, id="html"),
        pytest.param("application/json", "<!DOCTYPE html><html>", "chat", HTML, id="html-mislabelled"),
        pytest.param("text/plain", "ok", "chat", CONTENT_TYPE, id="text-plain"),
        pytest.param("application/json", "{not json", "chat", NOT_JSON, id="not-json"),
        pytest.param("application/json", '{"object": "list", "data": []}', "chat", NOT_COMPLETION, id="other-shape"),
        pytest.param("application/json", "[1, 2]", "chat", NOT_COMPLETION, id="array"),
        pytest.param("application/json", '{"object": "list", "data": []}', "embeddings", None, id="embeddings"),
        pytest.param("application/json", COMPLETION, "embeddings", NOT_EMBEDDINGS, id="embeddings-other-shape"),
    ],
)
def test_classify_reply(content_type, body, kind, expected):
    assert classify_reply(content_type, body, kind) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        pytest.param('{"ok": true}', {"ok": True}, id="bare"),
        pytest.param('Here:\n```json\n{"ok": true}\n```', {"ok": True}, id="code-block"),
        pytest.param('```\n{"a": 1}\n```', {"a": 1}, id="unlabelled-block"),
        pytest.param("no json here", None, id="none"),
        pytest.param("[1]", None, id="not-an-object"),
        pytest.param(None, None, id="null"),
    ],
)
def test_json_object(text, expected):
    assert json_object(text) == expected


def _chat(server, model, **extra):
    body = {"model": model, "messages": [{"role": "user", "content": "Return the JSON object {}."}], **extra}
    return requests.post(server.base_url + "/chat/completions", json=body, timeout=10)


@pytest.mark.parametrize("model", ["gpt-4", "gpt-4-0613", "gpt-4-0314"])
def test_server_refuses_json_mode_as_openai_does(openai_server, model):
    reply = _chat(openai_server, model, response_format={"type": "json_object"})
    assert reply.status_code == 400
    assert reply.json() == {
        "error": {
            "message": "Invalid parameter: 'response_format' of type 'json_object' is not supported with this model.",
            "type": "invalid_request_error",
            "param": "response_format",
            "code": None,
        }
    }


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4-turbo", "gpt-3.5-turbo-1106", "fake-judge"])
def test_server_accepts_json_mode_where_the_model_has_it(openai_server, model):
    reply = _chat(openai_server, model, response_format={"type": "json_object"})
    assert reply.status_code == 200
    assert isinstance(json.loads(reply.json()["choices"][0]["message"]["content"]), dict)


def test_server_answers_tool_calls_and_refuses_them_without_tools(openai_server):
    tool = {"type": "function", "function": {"name": "Answer", "parameters": {"type": "object"}}}
    reply = _chat(openai_server, "gpt-4", tools=[tool], tool_choice={"type": "function", "function": {"name": "Answer"}})
    call = reply.json()["choices"][0]["message"]["tool_calls"][0]
    assert call["function"]["name"] == "Answer" and json.loads(call["function"]["arguments"]) == {}
    refused = _chat(openai_server, "gpt-4-0314", tools=[tool])
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "tools"


def test_server_unknown_model_and_key(openai_server):
    openai_server.known_models = {"gpt-4o"}
    reply = _chat(openai_server, "gpt-5x")
    assert reply.status_code == 404 and reply.json()["error"]["code"] == "model_not_found"
    openai_server.api_keys = {"sk-right"}
    reply = _chat(openai_server, "gpt-4o")
    assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    "broken, expected", [("html", HTML), ("event-stream", EVENT_STREAM), ("text", CONTENT_TYPE), ("empty", EMPTY)]
)
def test_server_broken_replies_are_classified(openai_server, broken, expected):
    openai_server.broken = broken
    reply = _chat(openai_server, "gpt-4o")
    assert reply.status_code == 200
    assert classify_reply(reply.headers.get("content-type"), reply.content) == expected
    openai_server.broken = None
    openai_server.fail_next(broken)  # one broken reply, then whole ones again
    assert classify_reply(*(lambda r: (r.headers.get("content-type"), r.content))(_chat(openai_server, "gpt-4o"))) == expected
    assert classify_reply(*(lambda r: (r.headers.get("content-type"), r.content))(_chat(openai_server, "gpt-4o"))) is None


# ---------------------------------------------------------------------------------------------- the preflight


def judge_ref(server, model, structured=True, key_env=None):
    return EndpointRef(
        setting="evaluation.judge", kind="chat", base_url=server.base_url, model=model, structured=structured, api_key_env=key_env
    )


@pytest.mark.parametrize(
    "model, mode, calls",
    [
        pytest.param("gpt-4o", "json", 1, id="json-mode"),
        pytest.param("gpt-4", "tools", 2, id="gpt-4-tools"),
        pytest.param("gpt-4-0314", "md_json", 3, id="neither-md-json"),
    ],
)
def test_preflight_finds_the_mode_the_model_accepts(openai_server, model, mode, calls):
    check = check_endpoint(judge_ref(openai_server, model), {})
    assert check.ok and check.mode == mode and check.status == 200
    assert len(openai_server.chat_requests()) == calls
    if mode != "json":
        assert "'response_format' of type 'json_object' is not supported" in check.refused["json"]


def test_preflight_of_a_plain_judge_makes_one_plain_call(openai_server):
    check = check_endpoint(judge_ref(openai_server, "gpt-4", structured=False), {})
    assert check.ok and check.mode is None
    (request,) = openai_server.chat_requests()
    assert "response_format" not in request["body"] and "tools" not in request["body"]


@pytest.mark.parametrize(
    "setup, status, words",
    [
        pytest.param({"known_models": {"gpt-4o"}}, 404, ["unknown model", "gpt-5x", "check evaluation.judge.model"], id="model"),
        pytest.param({"api_keys": {"sk-right"}}, 401, ["key was refused", "check evaluation.judge.apiKeySecretRef"], id="key"),
        pytest.param({"broken": "html"}, 200, ["not a chat completion: HTML page", "502 Bad Gateway"], id="html"),
        pytest.param({"broken": "event-stream"}, 200, ["not a chat completion: event stream"], id="event-stream"),
        pytest.param({"broken": "empty"}, 200, ["not a chat completion: empty body"], id="empty"),
        pytest.param({"always": "503"}, 503, ["server error"], id="server-error"),
    ],
)
def test_preflight_names_setting_endpoint_and_status(openai_server, setup, status, words):
    for name, value in setup.items():
        setattr(openai_server, name, value)
    check = check_endpoint(judge_ref(openai_server, "gpt-5x", key_env="KEY"), {"KEY": "sk-wrong-0000"})
    assert not check.ok and check.status == status and check.error is not None
    assert check.error.startswith(f"evaluation.judge (chat endpoint {openai_server.base_url}, model 'gpt-5x'): HTTP {status}: ")
    for word in words:
        assert word in check.error
    assert check.retryable == (status >= 500)
    assert len(openai_server.chat_requests()) == 1  # one call tells: no mode is tried after a refusal of them all


def test_preflight_unreachable_is_retryable():
    ref = EndpointRef(setting="evaluation.judge", kind="chat", base_url="http://127.0.0.1:9/v1", model="m")
    check = check_endpoint(ref, {})
    assert not check.ok and check.retryable and check.status is None and check.error is not None
    assert "no HTTP reply" in check.error and "check evaluation.judge.baseUrl" in check.error


def test_preflight_of_embeddings(openai_server):
    ref = EndpointRef(setting="evaluation.embeddings", kind="embeddings", base_url=openai_server.base_url, model="e")
    assert check_endpoint(ref, {}).ok
    openai_server.embeddings_broken = "html"
    check = check_endpoint(ref, {})
    assert check.error is not None
    assert not check.ok and "evaluation.embeddings" in check.error and "not an embeddings list: HTML page" in check.error


def test_endpoints_to_check_follow_the_metrics():
    judge = {"baseUrl": "http://j/v1", "model": "gpt-4", "apiKeySecretRef": {"name": "s", "key": "k"}}
    emb = {"provider": "openai", "baseUrl": "http://e/v1", "model": "text-embedding-3-small"}
    extra = [{"baseUrl": "http://x/v1", "model": "other"}]
    full = endpoints_to_check(EvaluationSpec.model_validate({"judge": judge, "extraJudges": extra, "embeddings": emb}))
    assert [(r.setting, r.structured, r.api_key_env) for r in full] == [
        ("evaluation.judge", True, "FTC_JUDGE_API_KEY"),
        ("evaluation.extraJudges[0]", False, "FTC_JUDGE_API_KEY"),  # no key of its own: the main judge's
        ("evaluation.embeddings", False, None),
    ]
    only_judge = endpoints_to_check(
        EvaluationSpec.model_validate({"judge": judge, "metrics": ["judge", "bleu"], "embeddings": emb})
    )
    assert [(r.setting, r.structured) for r in only_judge] == [("evaluation.judge", False)]
    no_api = endpoints_to_check(
        EvaluationSpec.model_validate({"metrics": ["bleu", "semantic_similarity"], "primaryMetric": "bleu"})
    )
    assert no_api == []


def test_the_operator_hands_prepare_the_endpoints_and_their_keys():
    from ftc_api.spec import FineTuneComparisonSpec
    from ftc_api.steps import PrepareInput
    from ftc_operator.comparison import Owner
    from ftc_operator.config import OperatorConfig
    from ftc_operator.rendering import render_job
    from ftc_operator.step_inputs import location, prepare_input

    spec = FineTuneComparisonSpec.model_validate(
        {
            "models": [{"name": "a", "baseModel": "x"}, {"name": "b", "baseModel": "y"}],
            "dataset": {"source": "s3://b/data.jsonl"},
            "storage": {"bucket": "ftc"},
            "evaluation": {
                "judge": {"baseUrl": "https://judge.example/v1", "apiKeySecretRef": {"name": "openai", "key": "api-key"}},
                "embeddings": {
                    "provider": "openai",
                    "baseUrl": "https://emb.example/v1",
                    "model": "e",
                    "apiKeySecretRef": {"name": "emb", "key": "k"},
                },
            },
        }
    )
    owner = Owner(name="c", namespace="ns", uid="uid-1")
    inp = prepare_input(spec, OperatorConfig(), location(spec, owner))
    assert inp == PrepareInput.model_validate_json(inp.model_dump_json(by_alias=True))  # the document round-trips
    assert [(e.setting, e.model, e.structured, e.api_key_env) for e in inp.endpoints] == [
        ("evaluation.judge", "gpt-4", True, "FTC_JUDGE_API_KEY"),
        ("evaluation.embeddings", "e", False, "FTC_EMBEDDINGS_API_KEY"),
    ]
    env = {
        e["name"]: e
        for e in render_job(owner, spec, OperatorConfig(), "prepare")["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["FTC_JUDGE_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "openai", "key": "api-key"}
    assert env["FTC_EMBEDDINGS_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "emb", "key": "k"}
