"""Kubernetes names: deterministic, within 63 characters, unique when truncated."""

from __future__ import annotations

import re

import pytest
from ftc_api.names import fit, run_prefix, step_name

pytestmark = pytest.mark.unit
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@pytest.mark.parametrize(
    ("parts", "expected"),
    [
        (("demo", "prepare", None), "demo-prepare"),
        (("demo", "train", "llama2"), "demo-train-llama2"),
        (("Demo_X", "train", "m"), "demo-x-train-m-574707f7"),  # changed characters: a hash keeps it unique
    ],
    ids=["prepare", "train", "sanitised"],
)
def test_short_names_are_kept(parts: tuple, expected: str) -> None:
    assert step_name(*parts) == expected


@pytest.mark.parametrize("length", [60, 63, 64, 100, 253])
def test_long_names_fit_and_stay_valid(length: int) -> None:
    name = step_name("c" * length, "train", "mixtral-8x7b-instruct")
    assert len(name) <= 63
    assert DNS_LABEL.match(name)
    assert name == step_name("c" * length, "train", "mixtral-8x7b-instruct")


def test_truncated_names_stay_distinct() -> None:
    base = "a-very-long-comparison-name-that-goes-on-and-on-and-on"
    a, b = step_name(base, "train", "llama-2-7b-chat-a"), step_name(base, "train", "llama-2-7b-chat-b")
    assert a != b and len(a) <= 63 and len(b) <= 63


def test_names_that_clean_to_the_same_text_do_not_collide() -> None:
    # `a.b` and `a-b` may live side by side in one namespace; their Jobs and ConfigMaps must not share names.
    assert step_name("a.b", "train", "llama") != step_name("a-b", "train", "llama")
    assert step_name("a-b", "train", "llama") == "a-b-train-llama"
    assert DNS_LABEL.match(step_name("a.b", "train", "llama"))
    assert fit("a.b") != fit("a-b") == "a-b"


def test_fit_never_ends_with_a_dash() -> None:
    assert not fit("x" * 54 + "-" * 20).endswith("-")


def test_run_prefix_layout() -> None:
    assert run_prefix("ftc/", "team-a", "demo", "0f3a9c2e-1111-2222-3333-444455556666") == "ftc/team-a/demo-0f3a9c2e"
    assert run_prefix("", "ns", "n", "abcdef0123") == "ns/n-abcdef01"
