"""Chat templates and tokenisation with labels on the response tokens only.

A conversation is rendered with the model's chat template (the per-model `chatTemplate`, else the
tokenizer's own, else `DEFAULT_CHAT_TEMPLATE`). Assistant turns are located by rendering each prefix
with `add_generation_prompt=True`: the text an assistant turn adds after its generation prompt
(its content and end-of-turn marker) is the response. Tokens that cover any character of a response are
trained on — including a SentencePiece token like "▁The" whose leading space the template put at the end
of the prompt — and every other prompt, system and template token is labelled -100.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ftc_step.errors import StepError
from ftc_step.loading import prepare_tokenizer

IGNORE_INDEX = -100


def apply_template(tokenizer: Any, override: str | None = None) -> str:
    """Set the tokenizer's chat template (override > own > default) and a pad token; returns which was used.
    The evaluator prepares its tokenizer with the same function (ftc_step.loading)."""
    return prepare_tokenizer(tokenizer, override)


class TemplateRenderError(StepError):
    """The chat template refuses a conversation (for example older Mistral Instruct templates on a `system`
    turn): deterministic, so the step fails as bad input (exit 2) instead of being retried."""


def render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as err:  # jinja2's TemplateError, or raise_exception() called by the template
        roles = ", ".join(m.get("role", "?") for m in messages)
        raise TemplateRenderError(
            f"the chat template cannot render a conversation with the turns [{roles}]: {type(err).__name__}: {err}; "
            "set the model's chatTemplate to one that accepts them (or drop those turns from the dataset)"
        ) from err


def response_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant responses."""
    text = render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:i], generation_prompt=True)
        upto = render(tokenizer, messages[: i + 1])
        if not (upto.startswith(prompt) and text.startswith(upto)):
            raise StepError(
                "the chat template does not render conversations prefix by prefix, so the response tokens cannot be "
                "located; set the model's chatTemplate"
            )
        if len(upto) > len(prompt):
            spans.append((len(prompt), len(upto)))
    return text, spans


def encode(tokenizer: Any, messages: list[dict[str, str]], max_length: int) -> dict[str, list[int]]:
    """input_ids, attention_mask and labels (-100 outside responses), cut to `max_length` tokens."""
    text, spans = response_spans(tokenizer, messages)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        # A token is a response token when it covers any of the response's characters (a token straddling the
        # boundary carries the answer's first word, so the model must learn to produce it).
        inside = [any(start < b and end > a for a, b in spans) for start, end in enc["offset_mapping"]]
    else:  # slow tokenizers have no offsets: tokenise the pieces one by one
        ids, inside, cursor = [], [], 0
        for a, b in [*spans, (len(text), len(text))]:
            for piece, flag in ((text[cursor:a], False), (text[a:b], True)):
                if piece:
                    piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
                    ids += piece_ids
                    inside += [flag] * len(piece_ids)
            cursor = b
    ids, inside = ids[:max_length], inside[:max_length]
    labels = [t if flag else IGNORE_INDEX for t, flag in zip(ids, inside, strict=True)]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def count_tokens(tokenizer: Any, conversations: Iterable[dict[str, Any]]) -> int:
    """Tokens of the rendered conversations (uncut)."""
    total = 0
    for row in conversations:
        total += len(tokenizer(render(tokenizer, row["messages"]), add_special_tokens=False)["input_ids"])
    return total
