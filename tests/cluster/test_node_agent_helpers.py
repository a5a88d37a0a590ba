"""The node agent's pure helpers: what a container runs, $(VAR) expansion, path rewriting, messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cluster.node_agent import (
    cap_message,
    container_argv,
    expand_vars,
    image_basename,
    rewrite_paths,
    tail_message,
)

pytestmark = pytest.mark.unit
VENV = Path("/repo/.venv/bin")


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        pytest.param("ghcr.io/ftc-project/ftc-trainer:0.1.0", "ftc-trainer", id="registry-and-tag"),
        pytest.param("ftc-evaluator", "ftc-evaluator", id="bare"),
        pytest.param("localhost:5000/ftc-operator:dev", "ftc-operator", id="registry-port"),
        pytest.param("ghcr.io/x/ftc-trainer@sha256:abc", "ftc-trainer", id="digest"),
        pytest.param("busybox:1.36", "busybox", id="library"),
    ],
)
def test_image_basename(image, expected):
    assert image_basename(image) == expected


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        pytest.param({"image": "busybox", "command": ["sh", "-c", "echo $(X)"]}, ["sh", "-c", "echo 1"], id="command"),
        pytest.param(
            {"image": "ghcr.io/ftc-project/ftc-trainer:0.1.0", "args": ["--input", "/etc/ftc/in.json"]},
            [str(VENV / "ftc-trainer"), "--input", "/etc/ftc/in.json"],
            id="venv-entry-point",
        ),
        pytest.param(
            {"image": "ghcr.io/ftc-project/ftc-trainer:0.1.0", "command": ["python", "-V"]},
            ["python", "-V"],
            id="command-wins-over-entry-point",
        ),
        pytest.param({"image": "unknown", "args": ["true"]}, ["true"], id="args-only"),
        pytest.param({"image": "unknown"}, [], id="nothing-to-run"),
    ],
)
def test_container_argv(spec, expected):
    assert container_argv(spec, {"X": "1"}, VENV) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("$(A)/x", "a/x", id="defined"),
        pytest.param("$(MISSING)", "$(MISSING)", id="undefined-stays"),
        pytest.param("$$(A)", "$(A)", id="escaped"),
        pytest.param("$$", "$", id="double-dollar"),
        pytest.param("$A", "$A", id="shell-syntax-untouched"),
    ],
)
def test_expand_vars(text, expected):
    assert expand_vars(text, {"A": "a"}) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("/data/x", "/pod/data/x", id="prefix"),
        pytest.param("--out=/data", "--out=/pod/data", id="after-equals"),
        pytest.param("/database", "/database", id="not-a-component"),
        pytest.param("/srv/data/x", "/srv/data/x", id="not-a-prefix"),
        pytest.param("/data/sub/f", "/pod/sub/f", id="longest-first"),
    ],
)
def test_rewrite_paths(text, expected):
    assert rewrite_paths(text, {"/data": "/pod/data", "/data/sub": "/pod/sub"}) == expected


def test_tail_message_keeps_the_last_80_lines_and_2048_bytes(tmp_path: Path):
    log = tmp_path / "c.log"
    log.write_text("".join(f"line {i}\n" for i in range(200)))
    assert tail_message(log).splitlines() == [f"line {i}" for i in range(120, 200)]
    log.write_text("x" * 5000)
    assert len(tail_message(log)) == 2048


def test_cap_message_is_4096_bytes_without_splitting_characters():
    assert len(cap_message("é" * 3000).encode()) <= 4096
    assert cap_message("ok") == "ok"
