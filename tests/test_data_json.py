""".json datasets as users download them: a JSON array, pretty-printed or not, or an object holding a `data` list,
streamed record by record (ijson) with the memory the JSON-lines reader needs; a document cut off mid-record
(an interrupted download) reported with the byte offset of its end and the number of complete records, or those
records used under `dataset.allowTruncated`; a `.json` file read as JSON lines only when it really is JSON lines."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from ftc_api.spec import DatasetFormat, DatasetSpec, SplitSpec
from ftc_api.steps import EXIT_BAD_INPUT, Location, PrepareInput
from ftc_step.errors import StepError
from ftc_trainer import data

pytestmark = pytest.mark.unit

WORDS = [f"w{i}" for i in range(5000)]


def _rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` distinct Alpaca rows of about 1 KB, as users' instruction datasets have."""
    rng = random.Random(seed)
    return [
        {
            "instruction": f"question {i}: " + " ".join(rng.choices(WORDS, k=20)),
            "input": "",
            "output": " ".join(rng.choices(WORDS, k=150)),
        }
        for i in range(n)
    ]


def _array(rows: list[dict[str, str]]) -> tuple[bytes, list[int]]:
    """A JSON array, one record a line, and the byte offset where each record starts."""
    records = [json.dumps(r).encode() for r in rows]
    starts, offset = [], 2
    for record in records:
        starts.append(offset)
        offset += len(record) + 2  # the record, then ",\n"
    return b"[\n" + b",\n".join(records) + b"\n]\n", starts


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


# ---------------------------------------------------------------------------------------------- what a .json file is


ROWS = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(3)]


@pytest.mark.parametrize(
    ("content", "layout"),
    [
        (json.dumps(ROWS).encode(), (0, "item")),
        (json.dumps(ROWS, indent=2).encode(), (0, "item")),
        (b"\xef\xbb\xbf \n\t" + json.dumps(ROWS).encode(), (6, "item")),
        (json.dumps({"version": 2, "meta": {"data": [1]}, "data": ROWS}, indent=2).encode(), (0, "data.item")),
        (json.dumps({"data": "a string", "rows": ROWS}).encode(), (0, "rows.item")),
        (b"  " + json.dumps({"examples": ROWS}).encode(), (2, "examples.item")),
        ("\n".join(json.dumps(r) for r in ROWS).encode(), None),
        (json.dumps(ROWS[0]).encode() + b"\n{not json\n" + json.dumps(ROWS[1]).encode(), None),
        (b" \n\n ", None),
    ],
    ids=[
        "array",
        "pretty-array",
        "bom-and-spaces",
        "data-object",
        "first-key-that-is-a-list",
        "examples-key",
        "json-lines",
        "json-lines-with-a-bad-line",
        "blank",
    ],
)
def test_the_first_byte_decides_what_a_json_file_is(tmp_path: Path, content: bytes, layout: tuple[int, str] | None) -> None:
    assert data.json_layout(_write(tmp_path / "d.json", content), "d.json") == layout


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b' "hello"', r"expected a JSON array of rows or an object with a `data` list, found '\"hello\"' at byte 1"),
        (json.dumps(ROWS[0]).encode(), r"a JSON object without a `data`, `rows`, `train` or `examples` list of rows"),
        (b'{"version": 2, "da', r"ends early at byte 18, before any list of rows"),
        (b'{"version": 2 "data": []}', r"not valid JSON at byte 19: .*name JSON lines \.jsonl"),  # where "data" ends
    ],
    ids=["scalar", "object-without-rows", "object-cut-before-its-rows", "broken-object"],
)
def test_a_json_file_that_holds_no_rows_says_why(tmp_path: Path, content: bytes, message: str) -> None:
    with pytest.raises(StepError, match=message):
        list(data.read_file(_write(tmp_path / "d.json", content)))


@pytest.mark.parametrize(
    "document",
    [
        lambda rows: json.dumps(rows),
        lambda rows: json.dumps(rows, indent=2),
        lambda rows: json.dumps({"data": rows}, indent=2),
        lambda rows: json.dumps({"source": "a download", "count": len(rows), "train": rows, "tail": {"x": 1}}),
    ],
    ids=["array", "pretty-printed-array", "data-object", "train-object"],
)
def test_every_json_layout_gives_the_rows_of_the_same_json_lines(tmp_path: Path, document: Any) -> None:
    rows = _rows(500) + [{"instruction": "scores stay numbers", "output": "ok", "score": 0.5, "n": 3}]
    as_json = data.clean(data.read_file(_write(tmp_path / "d.json", document(rows).encode())), DatasetFormat.ALPACA)
    lines = "".join(json.dumps(r) + "\n" for r in rows).encode()
    as_lines = data.clean(data.read_file(_write(tmp_path / "d.jsonl", lines)), DatasetFormat.ALPACA)
    assert list(data.read_file(tmp_path / "d.json")) == rows
    assert (as_json.read, len(as_json.rows), as_json.dropped) == (501, 501, {})
    assert [as_json.rows.line(i) for i in range(501)] == [as_lines.rows.line(i) for i in range(501)]


# ---------------------------------------------------------------------------------------------- cut off


CUT_RECORD = 15_000


@pytest.mark.parametrize("wrap", ["array", "data-object"])
def test_a_real_sized_array_cut_mid_record_says_where_and_how_many(tmp_path: Path, wrap: str) -> None:
    """20,000 rows of ~1 KB (about 20 MB), the download cut in the middle of record 15,001: the old reader
    reported "no usable rows: ... unparseable", counting lines as rows; now the message names the byte where
    the document ends and the 15,000 complete records, and allowTruncated trains on exactly those."""
    rows = _rows(20_000)
    body, starts = _array(rows)
    if wrap == "data-object":
        head = b'{"source": "a download",\n "data": '
        body, starts = head + body[:-1] + b"}\n", [s + len(head) for s in starts]
    cut = starts[CUT_RECORD] + 400  # inside record 15,001
    path = _write(tmp_path / "download.json", body[:cut])
    assert path.stat().st_size > 15 * 10**6

    with pytest.raises(StepError) as failed:
        data.clean(data.read_file(path), DatasetFormat.ALPACA)
    message = str(failed.value)
    assert f"download.json: the JSON document ends early at byte {cut}, after {CUT_RECORD} complete records" in message
    assert "dataset.allowTruncated: true" in message and "no usable rows" not in message

    cleaned = data.clean(data.read_file(path, allow_truncated=True), DatasetFormat.ALPACA)
    assert (cleaned.read, len(cleaned.rows), cleaned.dropped) == (CUT_RECORD + 1, CUT_RECORD, {data.TRUNCATED: 1})
    assert cleaned.rows[CUT_RECORD - 1]["messages"] == data.normalise(rows[CUT_RECORD - 1], DatasetFormat.ALPACA)
    [example] = cleaned.examples[data.TRUNCATED]
    assert example.startswith(f"row {CUT_RECORD + 1}: ...") and f"ends early at byte {cut}" in example
    from tests.readme_table import assert_readme_figure

    assert_readme_figure("`.json` datasets as downloaded", f"cut after {CUT_RECORD} of {len(rows)} records")


def test_a_broken_byte_mid_array_is_reported_at_its_offset_even_with_allow_truncated(tmp_path: Path) -> None:
    rows = _rows(2_000)
    body, starts = _array(rows)
    broken = starts[1_234] + 1  # the record's first key loses its opening quote
    assert body[broken : broken + 1] == b'"'
    path = _write(tmp_path / "d.json", body[:broken] + b"#" + body[broken + 1 :])
    for allow in (False, True):
        with pytest.raises(StepError, match=rf"d\.json: not valid JSON at byte {broken}, after 1234 complete records: "):
            list(data.read_file(path, allow_truncated=allow))


def test_prepare_fails_on_a_cut_download_as_bad_input_unless_allowed(
    local_s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The step itself: exit 2 (no retry) with the message in the summary; under allowTruncated the complete
    records are split and uploaded, the cut one counted as `truncated`."""
    from ftc_trainer.__main__ import main

    body, starts = _array(_rows(300))
    cut = starts[250] + 100
    source = _write(tmp_path / "download.json", body[:cut])
    monkeypatch.setenv("FTC_TERMINATION_LOG", str(tmp_path / "termination-log"))
    summaries = {}
    for allow in (False, True):
        spec = DatasetSpec(source=str(source), split=SplitSpec(eval_count=10, test_count=10), allow_truncated=allow)
        loc = Location(bucket=local_s3.bucket, prefix=f"runs/cut-{allow}", endpoint_url=local_s3.endpoint_url)
        (tmp_path / "input.json").write_text(PrepareInput(dataset=spec, location=loc).to_json())
        code = main(["prepare", "--input", str(tmp_path / "input.json"), "--workdir", str(tmp_path / f"work-{allow}")])
        summaries[allow] = (code, json.loads((tmp_path / "termination-log").read_text()))
    code, summary = summaries[False]
    assert code == EXIT_BAD_INPUT and f"ends early at byte {cut}, after 250 complete records" in summary["error"]
    code, summary = summaries[True]
    assert code == 0, summary
    assert summary["counts"] == {"read": 251, "usable": 250, "train": 230, "eval": 10, "test": 10}
    assert summary["dropped"] == {"truncated": 1}


# ---------------------------------------------------------------------------------------------- memory


PEAK_RSS = """
import sys
from pathlib import Path
from ftc_trainer import data
rows = sum(1 for _ in data.read_file(Path(sys.argv[1])))
status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
print(rows, int(status["VmHWM"].split()[0]) // 1024)
"""


def _read_in_a_child(path: Path) -> tuple[int, int]:
    """(rows, peak RSS in MiB) of reading `path` with `data.read_file` in a process of its own. The peak is the
    child's VmHWM, not its ru_maxrss: a child started with vfork carries its parent's peak in ru_maxrss."""
    out = subprocess.run([sys.executable, "-c", PEAK_RSS, str(path)], capture_output=True, text=True, check=True)
    rows, peak_mib = out.stdout.split()
    return int(rows), int(peak_mib)


def test_a_2gb_json_array_streams_in_the_memory_the_json_lines_reader_needs(tmp_path: Path) -> None:
    """A 2 GB JSON array (2,048,000 rows of ~1 KB, written in ~3 s from one repeated block) is read in a child
    process whose peak RSS stays within a few MiB of the JSON-lines reader's on the same rows (its memory does
    not grow with the file: measured on 200 MB); a whole-file parse would need several times the file's size.
    The whole prepare on a 2 GB array against 2 GB of JSON lines is in bench/prepare.json (make bench)."""
    records = [json.dumps(r).encode() for r in _rows(1_000)]
    block, copies = b",\n".join(records), 2048
    big = tmp_path / "big.json"
    with big.open("wb") as out:
        out.write(b"[\n")
        for i in range(copies):
            out.write(block + (b",\n" if i < copies - 1 else b"\n]\n"))
    lines = tmp_path / "lines.jsonl"
    with lines.open("wb") as out:
        for _ in range(200):
            out.write(b"".join(r + b"\n" for r in records))
    assert big.stat().st_size > 2 * 10**9

    rows, json_peak = _read_in_a_child(big)
    big.unlink()
    line_rows, lines_peak = _read_in_a_child(lines)
    assert (rows, line_rows) == (1_000 * copies, 1_000 * 200)
    assert json_peak <= lines_peak + 16, (json_peak, lines_peak)
    assert json_peak < 128  # MiB, for a 2,035 MiB file
    from tests.readme_table import assert_readme_figure

    assert_readme_figure("`.json` datasets as downloaded", f"2 GB array ({rows:,} rows)")
