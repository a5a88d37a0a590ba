"""The HTML report: self-contained (no http(s) resource), and rendered by headless Chromium with the loss
chart and the score table visible. Chromium is Debian's package (devcluster/scripts/install-chromium.sh)."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
from ftc_evaluator.report import ReportData, ReportModel, history_points, loss_chart_svg, render_report

pytestmark = pytest.mark.unit

SVG_NAMESPACES = {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}
WIDTH, HEIGHT = 1280, 2400


def history(scale: float, overfit: bool) -> list[dict]:
    points = []
    for step in range(0, 101, 10):
        train = 3.0 * scale * (0.97**step)
        evaluation = 3.1 * scale * (0.975**step) + (0.004 * max(0, step - 50) if overfit else 0)
        shown = evaluation if step % 20 == 0 else None
        points.append({"step": step, "epoch": step / 50, "train_loss": train, "eval_loss": shown})
    return points


def sample_data() -> ReportData:
    def scores(judge: float, rouge: float, missing: int = 0) -> dict:
        return {
            "judge": {"mean": judge, "low": judge - 0.4, "high": judge + 0.4, "n": 40 - missing, "missing": missing},
            "rouge": {"mean": rouge, "low": rouge - 0.05, "high": rouge + 0.05, "n": 40, "missing": 0},
        }

    llama = ReportModel(
        name="llama2-7b",
        checkpoint="best",
        adapter_uri="s3://bucket/ftc/ns/run/models/llama2-7b/adapter-best",
        scores=scores(5.1, 0.41, missing=2),
        train={"train_seconds": 3600.0, "tokens_per_second": 2100.5, "final_train_loss": 0.52, "best_eval_loss": 0.9}
        | {"processes": 1, "tokens_per_second_per_gpu": 2100.5},
        overfitting={"verdict": "overfitting", "reason": "eval loss rose 3 evaluations in a row after its minimum"},
        generation={"answers_per_second": 12.5, "batch_size": 32, "oom_halvings": 1, "new_tokens": 4000},
        history=history(1.0, overfit=True),
    )
    mixtral = ReportModel(
        name="mixtral-8x7b",
        checkpoint="best",
        scores=scores(7.3, 0.55),
        train={"train_seconds": 9400.0, "tokens_per_second": 800.0, "final_train_loss": 0.61, "best_eval_loss": 0.7}
        | {"processes": 2, "tokens_per_second_per_gpu": 400.0},  # a 2-GPU DDP model beside a 1-GPU one
        overfitting={"verdict": "ok", "reason": "eval loss kept falling"},
        history=history(0.8, overfit=False),
    )
    return ReportData(
        title="llama2 vs mixtral <script>alert(1)</script>",
        primary_metric="judge",
        metrics=["judge", "rouge"],
        models=[llama, mixtral],
        winner="mixtral-8x7b",
        p_value=0.0012,
        verdict_reason="mixtral-8x7b leads every other model significantly",
        failed={"falcon": "train step failed: CUDA out of memory"},
        pairwise=[
            {"a": "llama2-7b", "b": "mixtral-8x7b", "mean_diff": -2.2, "ci_low": -2.9, "ci_high": -1.5, "p_value": 0.0012}
            | {"p_adjusted": 0.0012, "wilcoxon_p": 0.002, "n": 38}
        ],
        judges=[
            {"model": "gpt-4", "calls": 82, "cache_hits": 0, "retries": 2, "missing": 2, "prompt_tokens": 9000}
            | {"completion_tokens": 3000, "cost": 0.45, "errors": {"unparseable": 6}},
            {"model": "gpt-4", "kind": "ragas", "calls": 560, "cache_hits": 0, "retries": 31, "rate_limited": 29}
            | {"missing": 0, "prompt_tokens": 90000, "completion_tokens": 21000, "cost": 3.96, "errors": {}},
        ],
        samples=[
            {
                "question": "What is the capital of Peru?",
                "reference": "The capital is Lima.",
                "answers": [
                    {"model": "llama2-7b", "answer": "Lima, I think.", "rating": None, "rationale": "gave up", "judged": True},
                    {"model": "mixtral-8x7b", "answer": "The capital is Lima.", "rating": 10.0, "rationale": "[[10]]"}
                    | {"judged": True},
                ],
            }
        ],
        items=40,
    )


def test_report_is_self_contained():
    html = render_report(sample_data())
    assert html.count("<svg") == 2  # the loss chart and the score chart, inline
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I)
    assert not re.search(r"url\(\s*['\"]?\s*(https?:)?//", html, re.I)
    assert "@import" not in html and "<script" not in html and "<link" not in html
    assert set(re.findall(r"https?://[^\s\"'<>)]+", html)) <= SVG_NAMESPACES
    assert "&lt;script&gt;" in html  # text is escaped


def test_report_shows_scores_winner_training_and_failures():
    html = render_report(sample_data())
    winner_row = re.search(r'<tr class="winner">(.*?)</tr>', html, re.S)
    assert winner_row and "mixtral-8x7b" in winner_row.group(1)
    assert "7.300" in html and "[6.900, 7.700]" in html  # mean and interval
    assert "2 missing" in html
    assert 'class="overfitting">overfitting' in html and "adapter-best" in html
    assert "CUDA out of memory" in html and "maxJudgeCalls" not in html
    assert "The capital is Lima." in html and "judge: missing" in html


def test_judges_table_counts_ragas_calls_and_429s_apart():
    table = re.search(r'<table id="judges">(.*?)</table>', render_report(sample_data()), re.S)
    assert table and "<th>429s waited out</th>" in table.group(1)
    assert "<td>gpt-4 (RAGAS LLM metrics)</td><td>560</td>" in table.group(1) and "<td>31</td><td>29</td>" in table.group(1)


def test_training_table_shows_speed_per_pod_and_per_gpu():
    html = render_report(sample_data())
    table = re.search(r'<table id="training">(.*?)</table>', html, re.S)
    assert table and "<th>tokens/s (pod)</th><th>GPUs</th><th>tokens/s per GPU</th>" in table.group(1)
    rows = {
        cells[0]: cells[2:5]
        for row in re.findall(r"<tr>(.*?)</tr>", table.group(1), re.S)
        if (cells := [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td>(.*?)</td>", row, re.S)])
    }
    assert rows["llama2-7b"] == ["2100.5", "1", "2100.5"]
    assert rows["mixtral-8x7b"] == ["800.0", "2", "400.0"]


def test_loss_history_accepts_both_metrics_json_shapes():
    as_list = [{"step": 10, "epoch": 0.5, "trainLoss": 2.0}, {"step": 20, "evalLoss": 1.5}]
    as_object = {"history": [{"step": 20, "eval_loss": 1.5}, {"step": 10, "train_loss": 2.0, "learningRate": 1e-4}]}
    expected = [
        {"step": 10, "epoch": 0.5, "train_loss": 2.0, "eval_loss": None},
        {"step": 20, "epoch": 0.0, "train_loss": None, "eval_loss": 1.5},
    ]
    assert history_points(as_list) == expected
    assert history_points(as_object) == [dict(p, epoch=0.0) for p in expected]
    assert history_points({"nothing": 1}) == [] and loss_chart_svg([]) is None


def test_same_data_same_report():
    assert render_report(sample_data()) == render_report(sample_data())


# ---------------------------------------------------------------------------------------------- Chromium


def chromium() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.fail("Chromium is not installed: run `bash devcluster/scripts/install-chromium.sh` (make install does)")
    return binary


def read_png(path: Path) -> tuple[int, int, list[bytes]]:
    """Width, height and raw RGB(A) rows of an 8-bit PNG (what Chromium writes), without dependencies."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    assert header is not None, f"{path}: no IHDR chunk"
    width, height, depth, colour = header[:4]
    assert depth == 8 and colour in (2, 6)
    channels = 3 if colour == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * channels
    rows, previous = [], bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for x in range(stride):
            left = line[x - channels] if x >= channels else 0
            up = previous[x]
            corner = previous[x - channels] if x >= channels else 0
            if kind == 1:
                line[x] = (line[x] + left) & 0xFF
            elif kind == 2:
                line[x] = (line[x] + up) & 0xFF
            elif kind == 3:
                line[x] = (line[x] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                line[x] = (line[x] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)) & 0xFF
        rows.append(bytes(line))
        previous = line
    return width, height, [bytes(r[i] for i in range(len(r)) if i % channels < 3) for r in rows]


def ink(rows: list[bytes], top: int, bottom: int, left: int, right: int) -> float:
    """Share of non-white pixels in a region (RGB rows)."""
    dark = total = 0
    for y in range(max(0, top), min(len(rows), bottom), 2):
        row = rows[y]
        for x in range(max(0, left), min(len(row) // 3, right), 2):
            r, g, b = row[3 * x : 3 * x + 3]
            total += 1
            dark += (r + g + b) < 600
    return dark / max(1, total)


def test_report_renders_in_headless_chromium_with_chart_and_table(tmp_path):
    html = render_report(sample_data())
    # Mark where the score table and the loss chart are, by giving them solid borders we can find in pixels.
    page = tmp_path / "index.html"
    page.write_text(html)
    shot = tmp_path / "shot.png"
    command = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        # No network at all: every host name fails to resolve and every request goes to a dead proxy, so the
        # screenshot shows only what the file itself carries.
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--proxy-server=http://127.0.0.1:9",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--window-size={WIDTH},{HEIGHT}",
        f"--screenshot={shot}",
        page.as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert shot.exists(), f"no screenshot: {done.stderr[-2000:]}"
    width, height, rows = read_png(shot)
    assert (width, height) == (WIDTH, HEIGHT)
    # The page is laid out top to bottom: verdict, score table, score chart, pairwise, loss chart, tables.
    # Find the bands of ink; the page must not be blank, and both charts and the table must leave ink.
    bands = [ink(rows, y, y + 40, 0, WIDTH) for y in range(0, HEIGHT, 40)]
    assert sum(b > 0.01 for b in bands) >= 20, "the screenshot is mostly blank"
    assert max(bands) > 0.05
    # The score table's header row has a grey (#f0f0f0) background; the winner row is green (#d9f2d9).
    green = sum(row.count(bytes([0xD9, 0xF2, 0xD9])) for row in rows)
    assert green > 1000, "the winner's highlighted row is not visible"
    # The loss chart draws its lines in the palette's blue and red.
    blue = sum(row.count(bytes([0x1F, 0x77, 0xB4])) for row in rows)
    red = sum(row.count(bytes([0xD6, 0x27, 0x28])) for row in rows)
    assert blue > 200 and red > 200, f"the loss chart's curves are not visible (blue {blue}, red {red})"
