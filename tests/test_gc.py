"""Garbage collection of shared model copies and old checkpoints: the pure plan by a table, the references
read from `kubectl get ftc -A -o json`, and the command against the local S3 server."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from ftc_trainer.gc import CONTENT, Listing, Live, live_from_kubectl, main, plan_gc

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
OLD = NOW - timedelta(days=2)
A = "s3://b/ftc-cache/models/hf/org--a/" + "1" * 40
A2 = "s3://b/ftc-cache/models/hf/org--a/" + "2" * 40
B = "s3://b/ftc-cache/models/hf/org--b/" + "3" * 40
C1 = "s3://b/ftc-cache/models/sha256/" + "c" * 64  # a base model given as an s3:// prefix or a path
C2 = "s3://b/ftc-cache/models/sha256/" + "d" * 64
CK = "s3://b/ftc/ns/run-12345678/models/m/checkpoints"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("copies", "checkpoints", "live", "doomed"),
    [
        ({A: ("org/a", OLD)}, {}, Live(), [A]),
        ({A: ("org/a", OLD)}, {}, Live(staged=frozenset({A})), []),
        ({A: ("org/a", OLD), A2: ("org/a", OLD)}, {}, Live(staged=frozenset({A2})), [A]),
        ({A: ("org/a", OLD), B: ("org/b", OLD)}, {}, Live(staging=frozenset({"org/a"})), [B]),
        ({A: ("org/a", NOW - timedelta(minutes=5))}, {}, Live(), []),
        ({}, {CK: [10, 30, 20]}, Live(trained=frozenset({CK})), [f"{CK}/step-10", f"{CK}/step-20"]),
        ({}, {CK: [10, 30, 20]}, Live(), []),
        ({}, {CK: [30]}, Live(trained=frozenset({CK})), []),
        ({C1: (CONTENT, OLD), C2: (CONTENT, OLD)}, {}, Live(staged=frozenset({C1})), [C2]),
        ({C1: (CONTENT, OLD), C2: (CONTENT, OLD)}, {}, Live(staging=frozenset({CONTENT})), []),
        ({C1: (CONTENT, OLD), A: ("org/a", OLD)}, {}, Live(staging=frozenset({"org/a"})), [C1]),
    ],
    ids=[
        "unreferenced-copy-goes",
        "referenced-copy-stays",
        "other-commit-of-a-used-repo-goes",
        "repo-being-staged-keeps-its-copies",
        "young-copy-stays",
        "trained-model-keeps-newest-checkpoint",
        "model-not-trained-keeps-all",
        "one-checkpoint-stays",
        "unreferenced-content-copy-goes",
        "s3-or-path-base-being-staged-keeps-content-copies",
        "hub-repo-being-staged-keeps-no-content-copy",
    ],
)
def test_plan_gc(copies: dict, checkpoints: dict, live: Live, doomed: list[str]) -> None:
    assert plan_gc(Listing(copies, checkpoints), live, NOW, keep_checkpoints=1, min_age=timedelta(hours=1)) == doomed


def comparison(
    name: str, uid: str, models: list[dict[str, Any]], status: list[dict[str, Any]], bucket: str = "b"
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "ns", "uid": uid},
        "spec": {"storage": {"bucket": bucket, "prefix": "ftc"}, "models": models},
        "status": {"models": status},
    }


@pytest.mark.unit
def test_references_come_from_the_comparisons_status_and_spec() -> None:
    doc = {
        "items": [
            comparison(
                "done",
                "12345678-aaaa",
                [{"name": "m", "baseModel": "org/a"}],
                [{"name": "m", "phase": "Trained", "stagedBaseModel": A}],
            ),
            comparison(
                "new", "87654321-bbbb", [{"name": "x", "baseModel": "org/b"}, {"name": "y", "baseModel": "s3://b/own"}], []
            ),
        ]
    }
    live = live_from_kubectl(doc)
    assert (
        live.staged == {A}
        and live.staging == {"org/b", CONTENT}
        and live.trained == {"s3://b/ftc/ns/done-12345678/models/m/checkpoints"}
    )


@pytest.mark.ml
def test_gc_deletes_what_no_comparison_references(local_s3: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ftc_step.storage import Storage

    store = Storage(endpoint_url=local_s3.endpoint_url)
    cache = f"s3://{local_s3.bucket}/gc-test/ftc-cache"
    kept, gone = f"{cache}/models/hf/org--a/{'1' * 40}", f"{cache}/models/hf/org--a/{'2' * 40}"
    kept_content, gone_content = f"{cache}/models/sha256/{'c' * 64}", f"{cache}/models/sha256/{'d' * 64}"
    run = f"s3://{local_s3.bucket}/ftc/ns/done-12345678/models/m/checkpoints"
    for prefix in (kept, gone, kept_content, gone_content):
        store.write_manifest(prefix, [], extra={"revision": prefix[-40:]})
        store.write_bytes(f"{prefix}/model.safetensors", b"w")
    for step in (10, 20):
        store.write_bytes(f"{run}/step-{step}/adapter.safetensors", b"c")
    live = {
        "items": [
            comparison(
                "done",
                "12345678-aaaa",
                [{"name": "m", "baseModel": "org/a"}, {"name": "p", "baseModel": "/pvc/models/mid"}],
                [
                    {"name": "m", "phase": "Trained", "stagedBaseModel": kept},
                    {"name": "p", "phase": "Trained", "stagedBaseModel": kept_content},
                ],
                local_s3.bucket,
            )
        ]
    }
    (tmp_path / "live.json").write_text(json.dumps(live))
    args = [
        "--comparisons",
        str(tmp_path / "live.json"),
        "--cache",
        cache,
        "--endpoint-url",
        local_s3.endpoint_url,
        "--min-age-hours",
        "0",
    ]
    assert main([*args, "--dry-run"]) == 0 and store.list(gone)  # a dry run deletes nothing
    assert f"would delete {gone}" in capsys.readouterr().out
    assert main(args) == 0
    assert store.list(kept) and not store.list(gone) and store.list(run) == ["step-20/adapter.safetensors"]
    assert store.list(kept_content) and not store.list(gone_content)
