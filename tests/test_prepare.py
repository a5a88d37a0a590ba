"""The prepare step: formats, drops with reasons, deterministic splits, the data manifest, memory check, bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from ftc_api.spec import DatasetFormat, DatasetSpec, FieldMapping, LoraSpec, Method, SplitSpec, TrainingSpec
from ftc_api.steps import EXIT_BAD_INPUT, MAX_SUMMARY_BYTES, Location, MemoryEstimate, ModelRef, PreparedModel, PrepareInput
from ftc_step.errors import StepError
from ftc_step.storage import Storage
from ftc_trainer import data

from devcluster.models.tiny import MESSY_COUNTS, TinyAssets, TinyS3, build_messy_dataset

CONFIGS = Path(__file__).parent / "data" / "configs"


# ---------------------------------------------------------------------------------------------- pure: normalising


@pytest.mark.unit
@pytest.mark.parametrize(
    ("fmt", "row", "expected"),
    [
        (
            DatasetFormat.ALPACA,
            {"instruction": "Add.", "input": "2 and 3", "output": "5"},
            [{"role": "user", "content": "Add.\n\n2 and 3"}, {"role": "assistant", "content": "5"}],
        ),
        (
            DatasetFormat.ALPACA,
            {"instruction": "Hi", "output": "Hello", "system": "Be kind."},
            [
                {"role": "system", "content": "Be kind."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
            ],
        ),
        (
            DatasetFormat.CHAT,
            {
                "messages": [
                    {"role": "user", "content": "Q"},
                    {"role": "assistant", "content": "A"},
                    {"role": "user", "content": "?"},
                ]
            },
            [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
        ),
        (
            DatasetFormat.SHAREGPT,
            {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
            [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
        ),
    ],
    ids=["alpaca-input", "alpaca-system", "chat-trailing-user-dropped", "sharegpt"],
)
def test_normalise(fmt: DatasetFormat, row: dict, expected: list[dict[str, str]]) -> None:
    assert data.normalise(row, fmt) == expected


@pytest.mark.unit
def test_field_mapping_is_honoured() -> None:
    fields = FieldMapping(instruction="question", output="answer", input="context")
    row = {"question": "Capital of Peru?", "context": "", "answer": "Lima"}
    assert data.normalise(row, DatasetFormat.ALPACA, fields)[-1] == {"role": "assistant", "content": "Lima"}
    chat = FieldMapping(messages="dialog")
    assert data.normalise(
        {"dialog": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, DatasetFormat.CHAT, chat
    )


@pytest.mark.unit
@pytest.mark.parametrize(
    ("fmt", "row", "reason"),
    [
        (DatasetFormat.ALPACA, {"instruction": " ", "output": ""}, data.EMPTY),
        (DatasetFormat.ALPACA, {}, data.EMPTY),
        (DatasetFormat.ALPACA, {"instruction": "Q?", "output": ""}, data.NO_ASSISTANT),
        (DatasetFormat.ALPACA, {"instruction": 3, "output": "x"}, data.UNPARSEABLE),
        (DatasetFormat.ALPACA, [1, 2], data.UNPARSEABLE),
        (DatasetFormat.ALPACA, data.Unparseable("{bad", "Expecting value"), data.UNPARSEABLE),
        (DatasetFormat.CHAT, {"messages": [{"role": "user", "content": "only a question"}]}, data.NO_ASSISTANT),
        (DatasetFormat.CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, data.UNPARSEABLE),
        (DatasetFormat.CHAT, {"messages": "not a list"}, data.UNPARSEABLE),
        (DatasetFormat.CHAT, {"messages": [{"role": "user", "content": ""}]}, data.EMPTY),
        (DatasetFormat.SHAREGPT, {"conversations": [{"from": "human", "value": "Q"}]}, data.NO_ASSISTANT),
        (DatasetFormat.SHAREGPT, {"instruction": "alpaca row in a sharegpt set"}, data.UNPARSEABLE),
    ],
    ids=[
        "alpaca-blank",
        "alpaca-no-fields",
        "alpaca-no-output",
        "alpaca-number",
        "not-an-object",
        "invalid-json",
        "chat-no-assistant",
        "chat-unknown-role",
        "chat-not-a-list",
        "chat-blank",
        "sharegpt-no-gpt",
        "sharegpt-wrong-columns",
    ],
)
def test_drop_reasons(fmt: DatasetFormat, row: Any, reason: str) -> None:
    with pytest.raises(data.DropRow) as drop:
        data.normalise(row, fmt)
    assert drop.value.reason == reason


@pytest.mark.unit
def test_clean_counts_each_reason_with_examples(tmp_path: Path) -> None:
    cleaned = data.clean(data.read_file(build_messy_dataset(tmp_path / "messy.jsonl")), DatasetFormat.ALPACA)
    assert len(cleaned.rows) == MESSY_COUNTS["good"]
    assert cleaned.dropped == {k: v for k, v in MESSY_COUNTS.items() if k != "good"}
    assert cleaned.read == sum(MESSY_COUNTS.values())
    assert all(1 <= len(v) <= data.MAX_EXAMPLES for v in cleaned.examples.values())
    assert all(e.startswith("row ") for v in cleaned.examples.values() for e in v)


# ---------------------------------------------------------------------------------------------- dataset abuse


def _chat(user: str, answer: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


@pytest.mark.unit
def test_abusive_lines_are_counted_under_their_reason_and_never_crash(tmp_path: Path) -> None:
    """Every kind of bad line at once, streamed from one file: each is dropped and counted with its reason;
    invalid UTF-8 is counted as such (never replaced and kept); what is usable is kept whole."""
    big = "x" * (10 * 2**20)  # a 10 MB answer
    lines: list[bytes] = [
        json.dumps(_chat("a 10 MB row", big)).encode(),
        b'{"messages": [{"role": "user", "content": "caf\xe9 latin-1"}, {"role": "assistant", "content": "no"}]}',
        b"\xff\xfe\x00garbage that is not text",
        b"[" * 100_000 + b"]" * 100_000,  # nested far deeper than any parser's recursion limit
        json.dumps({"messages": [{"role": 1, "content": ["not", "text"]}]}).encode(),
        json.dumps({"messages": "a string"}).encode(),
        json.dumps({"messages": [{"role": "wizard", "content": "?"}, {"role": "assistant", "content": "!"}]}).encode(),
        json.dumps({"messages": [{"role": "assistant", "content": "unprompted"}, *_chat("q", "a")["messages"]]}).encode(),
        json.dumps(["a", "list", "row"]).encode(),
        b"null",
        *[json.dumps(_chat("same question", "same answer")).encode()] * 10,  # 90% duplicates of one row
    ]
    path = tmp_path / "abuse.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    cleaned = data.clean(data.read_file(path), DatasetFormat.CHAT)
    assert cleaned.read == len(lines) == 20
    assert cleaned.dropped == {"invalid_utf8": 2, "unparseable": 6, "duplicate": 9}
    kept = [row["messages"] for row in cleaned.rows]
    assert len(kept) == 3
    assert kept[0][1]["content"] == big  # the 10 MB row, whole
    assert kept[1] == _chat("q", "a")["messages"]  # the leading assistant turn answers nothing: not trained on
    assert all("\ufffd" not in json.dumps(m) for m in kept)
    shown = " ".join(cleaned.examples["invalid_utf8"])
    assert "invalid UTF-8 at byte" in shown and "\\xe9" in shown  # shown escaped, never decoded with replacement
    from tests.readme_table import assert_readme_figure

    assert_readme_figure("abusive dataset lines", f"{cleaned.read} lines, {len(cleaned.dropped)} drop reasons")


@pytest.mark.unit
def test_the_readme_states_the_measured_prepare_peak() -> None:
    """bench/prepare.json (make bench) holds the measurement; the README quotes it."""
    from tests.readme_table import README, assert_readme_figure

    bench = json.loads((README.parent / "bench" / "prepare.json").read_text())
    biggest = bench["streaming"]["2048MB"]
    assert_readme_figure("a large dataset", f"**{biggest['peak_rss_mib']:.0f} MiB** peak")
    assert_readme_figure("a large dataset", f"({bench['ratio_baseline_over_streaming_peak_rss']:.1f}x)")


@pytest.mark.unit
def test_a_file_that_is_not_what_its_extension_says_fails_clearly(tmp_path: Path) -> None:
    fake = tmp_path / "data.parquet"
    fake.write_text(json.dumps(_chat("q", "a")) + "\n")
    with pytest.raises(StepError, match="cannot read data.parquet as Parquet"):
        list(data.read_file(fake))


@pytest.mark.unit
def test_a_parquet_file_with_the_wrong_schema_leaves_no_usable_rows_and_says_so(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"question": ["q1", "q2"], "score": [1, 2]}), path)
    cleaned = data.clean(data.read_file(path), DatasetFormat.CHAT)
    assert (cleaned.read, len(cleaned.rows), cleaned.dropped) == (2, 0, {"unparseable": 2})
    assert "no 'messages' column" in cleaned.examples["unparseable"][0]
    assert data.no_rows_message(cleaned) == "no usable rows: read 2 rows, dropped 2 unparseable"


@pytest.mark.unit
def test_parquet_is_read_in_batches_with_every_row(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = data.PARQUET_BATCH_ROWS * 3 + 5
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(n)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "many.parquet", row_group_size=1000)
    assert list(data.read_file(tmp_path / "many.parquet")) == rows


@pytest.mark.unit
def test_spooled_splits_are_the_bytes_of_in_memory_splits(tmp_path: Path) -> None:
    cleaned = data.clean(data.read_file(build_messy_dataset(tmp_path / "messy.jsonl")), DatasetFormat.ALPACA)
    in_memory = [cleaned.rows[i] for i in range(len(cleaned.rows))]
    order = data.split_order(len(cleaned.rows), SplitSpec(), seed=5)
    for name, picked in order.items():
        cleaned.rows.write(picked, tmp_path / f"{name}.jsonl")
        assert (tmp_path / f"{name}.jsonl").read_bytes() == data.to_jsonl(in_memory[i] for i in picked)
    assert data.split_rows(in_memory, SplitSpec(), seed=5)["test"] == [in_memory[i] for i in order["test"]]


# ---------------------------------------------------------------------------------------------- pure: splitting


def _rows(n: int) -> list[dict]:
    return [
        {"id": str(i), "messages": [{"role": "user", "content": str(i)}, {"role": "assistant", "content": "x"}]} for i in range(n)
    ]


@pytest.mark.unit
def test_split_is_deterministic_and_disjoint() -> None:
    rows = _rows(100)
    a = data.split_rows(rows, SplitSpec(), seed=7)
    b = data.split_rows(list(rows), SplitSpec(), seed=7)
    assert {k: data.to_jsonl(v) for k, v in a.items()} == {k: data.to_jsonl(v) for k, v in b.items()}
    assert [len(a[k]) for k in ("train", "eval", "test")] == [80, 10, 10]
    ids = [r["id"] for split in a.values() for r in split]
    assert sorted(ids, key=int) == [str(i) for i in range(100)]
    assert data.split_rows(rows, SplitSpec(), seed=8)["test"] != a["test"]


@pytest.mark.unit
def test_split_counts_and_max_rows() -> None:
    splits = data.split_rows(_rows(50), SplitSpec(eval_count=5, test_count=3), seed=1, max_rows=20)
    assert [len(splits[k]) for k in ("train", "eval", "test")] == [12, 5, 3]


@pytest.mark.unit
def test_split_too_small_says_why() -> None:
    with pytest.raises(StepError, match="3 usable rows are too few for the split: eval 1 \\+ test 2"):
        data.split_rows(_rows(3), SplitSpec(test_count=2), seed=1)


# ---------------------------------------------------------------------------------------------- the step, on S3


def _location(tiny_s3: TinyS3, run: str) -> Location:
    return Location(bucket=tiny_s3.bucket, prefix=f"runs/{run}", endpoint_url=tiny_s3.endpoint_url)


def _run_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, doc: dict | str) -> tuple[int, dict]:
    from ftc_trainer.__main__ import main

    path = tmp_path / "input.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    log = tmp_path / "termination-log"
    monkeypatch.setenv("FTC_TERMINATION_LOG", str(log))
    code = main(["prepare", "--input", str(path), "--workdir", str(tmp_path / "work")])
    text = log.read_text()
    assert len(text.encode()) <= MAX_SUMMARY_BYTES
    return code, json.loads(text)


@pytest.fixture(autouse=True)
def _model_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTC_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "ftc-model-cache"))


@pytest.mark.ml
def test_prepare_messy_dataset_from_s3(tiny_s3: TinyS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loc = _location(tiny_s3, "prepare-messy")
    models = [
        ModelRef(name="llama", base_model=tiny_s3.llama, method=Method.LORA),
        ModelRef(name="mixtral", base_model=tiny_s3.mixtral, method=Method.QLORA),
    ]
    doc = PrepareInput(
        dataset=DatasetSpec(source=tiny_s3.messy, split=SplitSpec(eval_count=6, test_count=6)), location=loc, models=models
    ).to_wire()
    code, summary = _run_cli(tmp_path, monkeypatch, doc)
    assert code == 0, summary
    assert summary["counts"] == {"read": 74, "usable": 60, "train": 48, "eval": 6, "test": 6}
    assert summary["dropped"] == {"duplicate": 5, "empty": 3, "no_assistant_turn": 2, "unparseable": 4}
    assert set(summary["examples"]) == set(summary["dropped"])

    store = Storage(endpoint_url=tiny_s3.endpoint_url)
    manifest = store.read_manifest(loc.uri("data"))
    assert manifest is not None and sorted(manifest.files) == ["eval.jsonl", "test.jsonl", "train.jsonl"]
    assert manifest.extra["counts"] == summary["counts"] and summary["datasetSha256"] == manifest.content_sha256
    test_rows = [json.loads(line) for line in store.read_verified(loc.uri("data"), "test.jsonl").decode().splitlines()]
    assert len(test_rows) == 6 and all(r["messages"][-1]["role"] == "assistant" and r["id"] for r in test_rows)

    for model in summary["models"]:
        assert model["memory"]["fits"] and model["memory"]["parameters"] > 100_000
        counts = model["tokenCounts"]
        assert set(counts) == {"train", "eval", "test"} and counts["train"] > counts["test"] > 0

    # The same inputs give byte-identical splits.
    first = {n: store.read_bytes(f"{loc.uri('data')}/{n}") for n in manifest.files}
    code, again = _run_cli(tmp_path, monkeypatch, doc)
    assert code == 0
    assert {n: store.read_bytes(f"{loc.uri('data')}/{n}") for n in manifest.files} == first
    assert again["datasetSha256"] == summary["datasetSha256"]  # a hash of the content, not of when it was written


@pytest.mark.ml
@pytest.mark.parametrize(
    ("fixture_attr", "fmt"),
    [("chat", DatasetFormat.CHAT), ("sharegpt", DatasetFormat.SHAREGPT)],
    ids=["chat", "sharegpt"],
)
def test_prepare_local_chat_formats(
    tiny_assets: TinyAssets,
    tiny_s3: TinyS3,
    fixture_attr: str,
    fmt: DatasetFormat,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loc = _location(tiny_s3, f"prepare-{fixture_attr}")
    doc = PrepareInput(dataset=DatasetSpec(source=str(getattr(tiny_assets, fixture_attr)), format=fmt), location=loc).to_wire()
    code, summary = _run_cli(tmp_path, monkeypatch, doc)
    assert code == 0, summary
    assert summary["counts"]["usable"] == 80 and summary.get("dropped", {}) == {}


@pytest.mark.ml
def test_prepare_reads_an_s3_prefix_and_parquet(
    tiny_assets: TinyAssets, tiny_s3: TinyS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    store = Storage(endpoint_url=tiny_s3.endpoint_url)
    rows = [json.loads(line) for line in tiny_assets.dataset.read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows[:100]), tmp_path / "part-0.parquet")
    (tmp_path / "part-1.json").write_text(json.dumps(rows[100:150]))
    prefix = f"s3://{tiny_s3.bucket}/datasets/mixed"
    store.upload_file(tmp_path / "part-0.parquet", f"{prefix}/part-0.parquet")
    store.upload_file(tmp_path / "part-1.json", f"{prefix}/part-1.json")
    code, summary = _run_cli(
        tmp_path, monkeypatch, PrepareInput(dataset=DatasetSpec(source=prefix), location=_location(tiny_s3, "prefix")).to_wire()
    )
    assert code == 0, summary
    assert summary["counts"]["read"] == 150 and summary["counts"]["usable"] == 150


# ---------------------------------------------------------------------------------------------- memory check


@pytest.mark.ml
@pytest.mark.parametrize(
    ("config", "method", "gpu_gib", "fits", "params_b", "total_range"),
    [
        ("llama-2-7b", Method.LORA, 80, True, 6.74, (14, 24)),
        ("llama-2-7b", Method.QLORA, 80, True, 6.74, (6, 12)),
        ("llama-2-7b", Method.LORA, 16, False, 6.74, (14, 24)),
        ("mixtral-8x7b", Method.LORA, 80, False, 46.7, (90, 120)),
        ("mixtral-8x7b", Method.QLORA, 80, True, 46.7, (25, 45)),
    ],
    ids=["llama-lora-a100", "llama-qlora-a100", "llama-lora-16g", "mixtral-lora-a100", "mixtral-qlora-a100"],
)
def test_memory_estimate_of_real_configs(
    config: str, method: Method, gpu_gib: float, fits: bool, params_b: float, total_range: tuple[float, float]
) -> None:
    from ftc_trainer.memory import estimate
    from transformers import AutoConfig

    est = estimate(
        AutoConfig.from_pretrained(CONFIGS / f"{config}.json"),
        method,
        r=16,
        targets=None,
        batch_size=4,
        seq_length=1024,
        gradient_checkpointing=True,
        double_quant=True,
        gpu_memory_gib=gpu_gib,
    )
    assert est.parameters / 1e9 == pytest.approx(params_b, rel=0.01)
    assert total_range[0] <= est.total_gib <= total_range[1]
    assert est.fits is fits
    # On disk the checkpoint keeps its stored dtype (float16 / bfloat16: 2 bytes), whatever the method.
    assert est.disk_gib == pytest.approx(est.parameters * 2 / 1024**3, rel=0.001)
    if method == Method.QLORA:  # 4-bit linear layers (experts too): ~0.52 byte per parameter, embeddings in fp32
        assert est.weights_gib < est.parameters * 0.7 / 1024**3


@pytest.mark.ml
def test_model_that_cannot_fit_fails_the_step_with_numbers(
    tiny_s3: TinyS3, tiny_assets: TinyAssets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = [
        ModelRef(name="mixtral-big", base_model=str(CONFIGS / "mixtral-8x7b.json"), method=Method.LORA),
        ModelRef(name="llama-big", base_model=str(CONFIGS / "llama-2-7b.json"), method=Method.QLORA),
    ]
    doc = PrepareInput(
        dataset=DatasetSpec(source=str(tiny_assets.dataset)),
        location=_location(tiny_s3, "prepare-too-big"),
        models=models,
        training=TrainingSpec(lora=LoraSpec(r=16)),
    ).to_wire()
    code, summary = _run_cli(tmp_path, monkeypatch, doc)
    assert code == EXIT_BAD_INPUT and summary["ok"] is False
    assert "model mixtral-big (lora) needs an estimated" in summary["error"]
    assert "but one GPU of its placement has 80.00 GiB" in summary["error"] and "llama-big" not in summary["error"]
    by_name = {m["name"]: m for m in summary["models"]}
    assert by_name["llama-big"]["memory"]["fits"] and not by_name["mixtral-big"]["memory"]["fits"]
    assert Storage(endpoint_url=tiny_s3.endpoint_url).read_manifest(_location(tiny_s3, "prepare-too-big").uri("data")) is None


def _estimate(total: float, available: float = 80.0) -> MemoryEstimate:
    parts = {"weights_gib": total / 2, "lora_gib": 0.1, "activations_gib": total / 4}
    return MemoryEstimate(**parts, total_gib=total, available_gib=available, fits=total <= available)


FITS, TOO_BIG = _estimate(10.0), _estimate(120.0)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("models", "exclude", "error", "left_out"),
    [
        pytest.param({"a": FITS, "b": FITS}, False, None, [], id="all-fit"),
        pytest.param({"a": FITS, "b": TOO_BIG}, False, r"^model b \(lora\) needs an estimated 120\.00 GiB", [], id="fail-fast"),
        pytest.param({"a": FITS, "b": FITS, "c": TOO_BIG}, True, None, ["c"], id="excluded-two-remain"),
        pytest.param({"a": FITS, "b": TOO_BIG}, True, r"would leave 1 of 2, and the comparison needs 2", [], id="too-few-remain"),
        pytest.param({"a": TOO_BIG}, True, r"would leave 0 of 1, and the comparison needs 1", [], id="the-only-model"),
        pytest.param(
            {"a": FITS, "b": FITS, "c": TOO_BIG, "d": "cannot read the config"},
            True,
            r"^model c .*; model d: cannot read the config\. Use qlora",
            [],
            id="an-unreadable-model-still-fails",
        ),
    ],
)
def test_memory_verdict(models: dict[str, Any], exclude: bool, error: str | None, left_out: list[str]) -> None:
    from ftc_trainer.prepare import memory_verdict

    inp = PrepareInput(
        dataset=DatasetSpec(source="/data.jsonl"),
        location=Location(bucket="b", prefix="p"),
        models=[ModelRef(name=name, base_model="/m", method=Method.LORA) for name in models],
        exclude_failed_models=exclude,
    )
    prepared = [
        PreparedModel(name=name, error=m) if isinstance(m, str) else PreparedModel(name=name, memory=m)
        for name, m in models.items()
    ]
    verdict = memory_verdict(inp, prepared)
    if error is None:
        assert verdict.error is None
    else:
        assert verdict.error is not None and re.search(error, verdict.error), verdict.error
    assert sorted(verdict.left_out) == left_out
    for why in verdict.left_out.values():
        assert why.startswith("left out of the comparison (evaluation.excludeFailedModels): model c (lora) needs")


@pytest.mark.ml
@pytest.mark.parametrize(
    ("gpus", "exclude", "code"),
    [
        pytest.param({"llama": 80.0, "llama-small-gpu": 0.25}, False, EXIT_BAD_INPUT, id="fails-fast-by-default"),
        pytest.param({"llama": 80.0, "llama-2": 80.0, "llama-small-gpu": 0.25}, True, 0, id="excluded-the-others-go-on"),
        pytest.param({"llama": 80.0, "llama-small-gpu": 0.25}, True, EXIT_BAD_INPUT, id="excluded-but-too-few-remain"),
    ],
)
def test_a_model_that_does_not_fit_fails_prepare_unless_it_may_be_left_out(
    gpus: dict[str, float], exclude: bool, code: int, tiny_s3: TinyS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loc = _location(tiny_s3, f"prepare-no-fit-{len(gpus)}-{exclude}")
    doc = PrepareInput(
        dataset=DatasetSpec(source=tiny_s3.dataset),
        location=loc,
        models=[ModelRef(name=n, base_model=tiny_s3.llama, method=Method.LORA, gpu_memory_gib=g) for n, g in gpus.items()],
        training=TrainingSpec(lora=LoraSpec(r=8), max_seq_length=64, per_device_batch_size=2),
        exclude_failed_models=exclude,
    ).to_wire()

    got, summary = _run_cli(tmp_path, monkeypatch, doc)

    assert got == code, summary
    by_name = {m["name"]: m for m in summary["models"]}
    small = by_name["llama-small-gpu"]["memory"]
    assert not small["fits"] and small["availableGib"] == 0.25 and small["totalGib"] > 0.25
    assert all(by_name[n]["memory"]["fits"] for n in gpus if n != "llama-small-gpu")
    manifest = Storage(endpoint_url=tiny_s3.endpoint_url).read_manifest(loc.uri("data"))
    if code == 0:  # the data is written; the operator gives llama-small-gpu no train Job (DoesNotFitGPU)
        assert summary["ok"] and manifest is not None
        assert by_name["llama-small-gpu"]["error"].startswith("left out of the comparison (evaluation.excludeFailedModels)")
        assert "llama-small-gpu (lora) needs an estimated" in by_name["llama-small-gpu"]["error"]
        assert all("error" not in by_name[n] for n in gpus if n != "llama-small-gpu")
        _the_planner_leaves_it_out(summary, gpus)
    else:  # fail fast, naming the model, its estimate and the GPU
        assert not summary["ok"] and manifest is None
        assert summary["error"].startswith("model llama-small-gpu (lora) needs an estimated ")
        assert "but one GPU of its placement has 0.25 GiB" in summary["error"] and "model llama " not in summary["error"]
        assert ("would leave 1 of 2" in summary["error"]) is exclude


def _the_planner_leaves_it_out(summary: dict[str, Any], gpus: dict[str, float]) -> None:
    """The real prepare's result, as the operator reads it from the prepare Job: the models that fit get their
    train Jobs, the one that does not gets none and is Failed with DoesNotFitGPU, named in status."""
    import datetime as dt

    from ftc_operator.comparison import Owner, parse_spec
    from ftc_operator.config import OperatorConfig
    from ftc_operator.observe import JobState, ObservedJob
    from ftc_operator.planning import plan

    spec = {
        "models": [{"name": n, "baseModel": "s3://ftc/assets/tiny-llama"} for n in gpus],
        "dataset": {"source": "s3://ftc/assets/data/train.jsonl"},
        "storage": {"bucket": "ftc", "credentialsSecretRef": {"name": "ftc-s3"}},
        "evaluation": {"judge": {"baseUrl": "https://judge.example/v1"}, "excludeFailedModels": True},
    }
    prep = ObservedJob(name="c-prepare", step="prepare", model=None, state=JobState.SUCCEEDED, result=json.dumps(summary))
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    p = plan(parse_spec(spec), None, [prep], now, owner=Owner("c", "ns", "u" * 16, 1), config=OperatorConfig())
    trained = [c.model for c in p.creates if c.step == "train"]
    assert None not in trained, trained
    assert sorted(m for m in trained if m is not None) == sorted(n for n in gpus if n != "llama-small-gpu")
    small = next(m for m in p.status.models if m.name == "llama-small-gpu")
    assert small.phase.value == "Failed" and (small.message or "").startswith("DoesNotFitGPU"), small


# Older Mistral Instruct templates refuse a system turn with raise_exception().
NO_SYSTEM_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% if message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
    "{% else %}{{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


@pytest.mark.ml
def test_a_template_that_refuses_a_turn_fails_prepare_as_bad_input(
    tiny_s3: TinyS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = [
        {
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"{2 * i}."},
            ]
        }
        for i in range(60)
    ]
    data = tmp_path / "system.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    models = [
        ModelRef(name="mistral-old", base_model=tiny_s3.llama, method=Method.LORA, chat_template=NO_SYSTEM_TEMPLATE),
        ModelRef(name="llama", base_model=tiny_s3.llama, method=Method.LORA),
    ]
    doc = PrepareInput(
        dataset=DatasetSpec(source=str(data), format=DatasetFormat.CHAT),
        location=_location(tiny_s3, "prepare-no-system"),
        models=models,
    ).to_wire()

    code, summary = _run_cli(tmp_path, monkeypatch, doc)

    assert code == EXIT_BAD_INPUT and summary["ok"] is False  # deterministic: the Job fails at once, no retry
    assert "model mistral-old: the chat template cannot render a conversation with the turns [system, user" in summary["error"]
    assert "System role not supported" in summary["error"] and "chatTemplate" in summary["error"]
    assert "model llama" not in summary["error"]


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.ml
@pytest.mark.parametrize(
    ("case", "message"),
    [
        pytest.param("missing-path", r"dataset '/nonexistent/data.jsonl' not found", id="missing-path"),
        pytest.param("missing-s3", r"no dataset at s3://.*/no/such/data\.jsonl", id="missing-s3"),
        pytest.param("unknown-file-format", r"unknown dataset file format 'rows\.csv'", id="unknown-file-format"),
        pytest.param("no-assistant-turns", r"no usable rows: read 3 rows, dropped 3 no_assistant_turn", id="no-assistant-turns"),
        pytest.param("unknown-format", r"invalid prepare input .*dataset\.format", id="unknown-format"),
        pytest.param("too-few-rows", r"2 usable rows are too few for the split", id="too-few-rows"),
        pytest.param("missing-bucket", r"(cannot read dataset|no dataset at) s3://no-such-bucket-ftc/", id="missing-bucket"),
        pytest.param(
            "corrupt-s3-parquet",
            r"cannot read s3://.*/bad-input/rows\.parquet as Parquet: .*magic bytes",
            id="corrupt-s3-parquet",
        ),
        pytest.param("unreadable-model-config", r"model broken: cannot read the config", id="unreadable-model-config"),
    ],
)
def test_bad_input_fails_with_a_message(
    case: str, message: str, tiny_s3: TinyS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = {
        "missing-path": "/nonexistent/data.jsonl",
        "missing-s3": f"s3://{tiny_s3.bucket}/no/such/data.jsonl",
        "unknown-file-format": str(tmp_path / "rows.csv"),
        "missing-bucket": "s3://no-such-bucket-ftc/data.jsonl",
        "corrupt-s3-parquet": f"s3://{tiny_s3.bucket}/bad-input/rows.parquet",
    }.get(case, str(tmp_path / "rows.jsonl"))
    if case == "corrupt-s3-parquet":
        Storage(endpoint_url=tiny_s3.endpoint_url).write_bytes(source, b"PAR1 this is not parquet")
    (tmp_path / "rows.csv").write_text("instruction,output\nq,a\n")
    rows = [{"instruction": f"q{i}", "output": ""} for i in range(3)] if case == "no-assistant-turns" else []
    rows = rows or [{"instruction": f"q{i}", "output": "a"} for i in range(2)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    doc = PrepareInput(dataset=DatasetSpec(source=source), location=_location(tiny_s3, f"bad-{case}")).to_wire()
    if case == "unknown-format":
        doc["dataset"]["format"] = "xml"
    if case == "unreadable-model-config":
        (tmp_path / "broken").mkdir()
        (tmp_path / "broken" / "config.json").write_text("{not json")
        doc["models"] = [ModelRef(name="broken", base_model=str(tmp_path / "broken"), method=Method.LORA).to_wire()]
        rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(40)]
        (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, summary = _run_cli(tmp_path, monkeypatch, doc)
    assert code == EXIT_BAD_INPUT and summary["ok"] is False  # bad input: the Job fails at once, no retry
    assert summary["error"] and __import__("re").search(message, summary["error"]), summary["error"]
