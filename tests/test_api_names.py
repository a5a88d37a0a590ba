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


# ---------------------------------------------------------------------------------------------- names as attack surface

HOSTILE = {
    "dot-dot": "..",
    "dot-dot-segment": "runs/../other-team",
    "dot-segment": "runs/./x",
    "encoded-slash": "runs%2F..%2Fx",
    "leading-slash": "/runs",
    "empty-segment": "runs//x",
    "look-alike": "runѕ",  # Cyrillic ѕ
    "fullwidth": "ｒｕｎｓ",
    "control": "runs\nx",
    "nul": "runs\x00x",
    "space": "my runs",
    "backslash": "runs\\..\\x",
    "long": "a" * 513,
}


@pytest.mark.parametrize("prefix", list(HOSTILE.values()), ids=list(HOSTILE))
def test_a_storage_prefix_that_could_leave_its_place_is_refused_naming_the_field(prefix: str) -> None:
    from ftc_api.spec import validation_errors

    spec: dict[str, object] = {
        "models": [{"name": "a", "baseModel": "x"}, {"name": "b", "baseModel": "y"}],
        "dataset": {"source": "s3://ftc/d.jsonl"},
        "storage": {"bucket": "ftc", "prefix": prefix},
        "evaluation": {"metrics": ["bleu"], "primaryMetric": "bleu"},
    }
    errors = validation_errors(spec)
    assert errors and all(e.startswith("spec.storage.prefix:") for e in errors), errors


@pytest.mark.parametrize("prefix", ["ftc", "ftc/", "", "teams/ml-1/ftc_runs", "a.b/c.d", "2026/12"])
def test_ordinary_prefixes_are_accepted_and_the_run_stays_under_them(prefix: str) -> None:
    from ftc_api.spec import StorageSpec

    StorageSpec(bucket="ftc", prefix=prefix)
    uid = "0f3a9c2e-1111-2222-3333-444455556666"
    run = run_prefix(prefix, "team-a", "x.y", uid)
    assert run.startswith(prefix.strip("/")) and ".." not in run.split("/") and "//" not in run


BAD_MODEL_NAMES = ["llаma", "Llama", "a" * 41, "a_b", "-a", "a-", "a.b", "a/b", "a\nb", "", "ｌｌａｍａ"]


def test_the_readme_states_how_many_hostile_prefixes_and_names_are_tried() -> None:
    from tests.readme_table import assert_readme_figure

    assert_readme_figure("hostile `storage.prefix` values", f"{len(HOSTILE)} prefixes, {len(BAD_MODEL_NAMES)} names")


@pytest.mark.parametrize("name", BAD_MODEL_NAMES, ids=repr)
def test_model_names_that_are_not_dns_labels_are_refused(name: str) -> None:
    from ftc_api.spec import validation_errors

    spec: dict[str, object] = {
        "models": [{"name": name, "baseModel": "x"}, {"name": "b", "baseModel": "y"}],
        "dataset": {"source": "s3://ftc/d.jsonl"},
        "storage": {"bucket": "ftc"},
        "evaluation": {"metrics": ["bleu"], "primaryMetric": "bleu"},
    }
    assert any(e.startswith("spec.models[0].name:") for e in validation_errors(spec)), name


@pytest.mark.parametrize("comparison", ["bake", "c" * 63, "a-very-long-comparison-name-" * 5])
def test_a_settings_key_stays_whole_at_the_end_of_a_step_name(comparison: str) -> None:
    a = step_name(comparison, "generate", "mixtral-8x7b-instruct", "0123abcd")
    b = step_name(comparison, "generate", "mixtral-8x7b-instruct", "89abcdef")
    assert a.endswith("-0123abcd") and b.endswith("-89abcdef") and a != b
    assert len(a) <= 63 and DNS_LABEL.match(a)
    assert step_name(comparison, "score", None, "0123abcd").endswith("-score-0123abcd") or len(comparison) > 40


def test_a_settings_key_must_be_short_hex() -> None:
    assert step_name("bake", "score", None, "0123abcd") == "bake-score-0123abcd"
    with pytest.raises(ValueError, match="not 1 to 16 lowercase hex"):
        step_name("bake", "score", None, "Not-Hex")
