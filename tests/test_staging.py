"""Staging hub models: prepare copies a model named by hub id (from a local server speaking the hub's API,
HF_ENDPOINT) into the run's S3 prefix once, with a manifest and the resolved commit sha; a gated model without
a token fails at once as bad input naming the setting to use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ftc_api.spec import DatasetSpec, Method, SplitSpec
from ftc_api.steps import EXIT_BAD_INPUT, Location, ModelRef, PrepareInput
from ftc_step.storage import Entry, ObjectStat, Storage
from ftc_trainer.staging import HubFile, files_to_move, is_hub_id, wanted_files

from devcluster.models.tiny import TinyAssets, TinyS3
from devcluster.servers.hub_server import FakeHub


@pytest.mark.unit
@pytest.mark.parametrize(
    ("source", "hub"),
    [
        ("meta-llama/Llama-2-7b-hf", True),
        ("gpt2", True),
        ("s3://ftc/models/x", False),
        ("/models/x", False),
        ("./x", False),
        ("file:///x", False),
        ("a/b/c", False),
        ("../x", False),
    ],
)
def test_what_counts_as_a_hub_id(source: str, hub: bool) -> None:
    assert is_hub_id(source) is hub


@pytest.mark.unit
def test_only_what_transformers_needs_is_staged_and_safetensors_win() -> None:
    names = [
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json", "pytorch_model.bin", "tokenizer.json", "tokenizer_config.json",
        "model.gguf", "onnx/model.onnx", "original/consolidated.00.pth", "flax_model.msgpack", "README.md",
    ]  # fmt: skip
    assert wanted_files(names) == [
        "README.md", "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
    ]  # fmt: skip
    assert wanted_files(["config.json", "pytorch_model.bin"]) == ["config.json", "pytorch_model.bin"]


def _prepare(tiny_s3: TinyS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hub: FakeHub, run: str, **ref: str):
    from ftc_trainer.__main__ import main
    from huggingface_hub.utils import reset_sessions

    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    # A prepare pod is a fresh process; in this one an earlier test (the evaluator's entry point) may have set
    # HF_HUB_OFFLINE, which huggingface_hub read at import.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    reset_sessions()
    loc = Location(bucket=tiny_s3.bucket, prefix=f"runs/{run}", endpoint_url=tiny_s3.endpoint_url)
    models = [ModelRef(name="llama", method=Method.LORA, **{"base_model": "ftc-test/tiny-llama", **ref})]
    doc = PrepareInput(dataset=DatasetSpec(source=tiny_s3.dataset, split=SplitSpec()), location=loc, models=models)
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "input.json").write_text(doc.to_json())
    log = tmp_path / "termination-log"
    monkeypatch.setenv("FTC_TERMINATION_LOG", str(log))
    code = main(["prepare", "--input", str(tmp_path / "input.json"), "--workdir", str(tmp_path / "work")])
    return code, json.loads(log.read_text()), loc


@pytest.mark.ml
def test_a_hub_model_is_staged_once_with_its_commit_and_read_from_the_copy(
    tiny_assets: TinyAssets, tiny_s3: TinyS3, hub_server: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = hub_server.add("ftc-test/tiny-llama", tiny_assets.llama)
    code, summary, loc = _prepare(tiny_s3, tmp_path, monkeypatch, hub_server, "staged")
    assert code == 0, summary
    model = summary["models"][0]
    assert (
        model["revision"] == repo.sha
        and model["stagedUri"] == f"s3://{loc.bucket}/ftc-cache/models/hf/ftc-test--tiny-llama/{repo.sha}"
    )
    assert model["memory"]["parameters"] > 100_000 and model["tokenCounts"]["train"] > 0  # checked on the copy
    store = Storage(endpoint_url=tiny_s3.endpoint_url)
    copy = store.download_verified(model["stagedUri"], tmp_path / "copy")  # every file matches its sha256
    assert sorted(copy.files) == sorted(repo.files) and copy.extra["revision"] == repo.sha
    assert all((tmp_path / "copy" / n).read_bytes() == data for n, data in repo.files.items())
    downloads = [r for r in hub_server.requests if r["method"] == "GET" and "/resolve/" in r["path"]]
    assert len(downloads) == len(repo.files) and all(f"/resolve/{repo.sha}/" in r["path"] for r in downloads)

    # A retried prepare finds the copy at the same commit and downloads nothing again (one HEAD of config.json
    # checks that this token may still read the repository).
    before = len(hub_server.requests)
    code, again, _ = _prepare(tiny_s3, tmp_path / "again", monkeypatch, hub_server, "staged")
    assert code == 0 and again["models"][0]["revision"] == repo.sha
    assert [r["method"] for r in hub_server.requests[before:] if "/resolve/" in r["path"]] == ["HEAD"]


@pytest.mark.ml
@pytest.mark.parametrize(
    ("token", "revision", "message"),
    [
        (None, None, "is gated or private and no token was given: create a Secret"),
        ("hf_wrong", None, "refused the token from spec.hub.tokenSecretRef (HTTP 401)"),
        ("hf_right", "v9", "revision 'v9' not found"),
    ],
    ids=["gated-no-token", "gated-wrong-token", "unknown-revision"],
)
def test_a_hub_refusal_fails_prepare_at_once_naming_the_fix(
    tiny_assets: TinyAssets, tiny_s3: TinyS3, hub_server: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    token: str | None, revision: str | None, message: str,
) -> None:  # fmt: skip
    hub_server.add("ftc-test/tiny-llama", tiny_assets.llama, gated_token="hf_right")
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    else:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    extra = {"revision": revision} if revision else {}
    code, summary, _ = _prepare(tiny_s3, tmp_path, monkeypatch, hub_server, f"refused-{token}-{revision}", **extra)
    assert code == EXIT_BAD_INPUT and message in summary["error"] and "ftc-test/tiny-llama" in summary["error"], summary
    assert "hf_right" not in json.dumps(summary) and (token is None or token not in json.dumps(summary))


@pytest.mark.ml
def test_a_hub_error_quoting_the_token_leaks_it_nowhere(
    tiny_assets: TinyAssets, tiny_s3: TinyS3, hub_server: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    canary = "hf_canary_echoed_71d3"
    hub_server.add("ftc-test/tiny-llama", tiny_assets.llama, gated_token=canary)
    hub_server.fail_with = 400  # its message quotes the request's "Authorization: Bearer <token>"
    monkeypatch.setenv("HF_TOKEN", canary)
    code, summary, _ = _prepare(tiny_s3, tmp_path, monkeypatch, hub_server, "echoed")
    out, err = capfd.readouterr()
    assert code != 0 and "cannot stage base model ftc-test/tiny-llama" in summary["error"], summary
    assert "Bearer [redacted]" in summary["error"]  # the hub's message is kept, the token is not
    assert canary not in json.dumps(summary) and canary not in out and canary not in err
    from tests.readme_table import assert_readme_figure

    assert_readme_figure("a judge and a hub that quote the request's `Authorization` header", "2 servers")


@pytest.mark.ml
def test_a_gated_model_is_staged_with_the_token(
    tiny_assets: TinyAssets, tiny_s3: TinyS3, hub_server: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = hub_server.add("ftc-test/tiny-llama", tiny_assets.llama, gated_token="hf_right")
    monkeypatch.setenv("HF_TOKEN", "hf_right")
    code, summary, _ = _prepare(tiny_s3, tmp_path, monkeypatch, hub_server, "gated-ok")
    assert code == 0 and summary["models"][0]["revision"] == repo.sha, summary


@pytest.mark.unit
@pytest.mark.parametrize(
    ("present", "moved"),
    [
        ({}, ["a.safetensors", "b.safetensors", "config.json"]),
        ({"a.safetensors": ObjectStat(10, "aa"), "b.safetensors": ObjectStat(20, "bb")}, ["config.json"]),
        ({"a.safetensors": ObjectStat(9, "aa")}, ["a.safetensors", "b.safetensors", "config.json"]),  # cut short
        ({"a.safetensors": ObjectStat(10, "ab")}, ["a.safetensors", "b.safetensors", "config.json"]),  # other bytes
        ({"a.safetensors": ObjectStat(10, None)}, ["a.safetensors", "b.safetensors", "config.json"]),  # no checksum
        ({"config.json": ObjectStat(3, None)}, ["a.safetensors", "b.safetensors", "config.json"]),  # sha unknown
    ],
    ids=["nothing-there", "weights-there", "short-object", "other-content", "no-checksum", "unknown-sha"],
)
def test_a_resumed_copy_moves_only_files_not_already_in_place(present: dict[str, ObjectStat], moved: list[str]) -> None:
    files = [HubFile("a.safetensors", 10, "aa"), HubFile("b.safetensors", 20, "bb"), HubFile("config.json", 3, None)]
    assert [f.name for f in files_to_move(files, present)] == moved


@pytest.mark.unit
@pytest.mark.parametrize(
    ("head", "stat"),
    [
        ({"ContentLength": 4, "ChecksumSHA256": "qqo=", "ChecksumType": "FULL_OBJECT"}, ObjectStat(4, "aaaa", True)),
        (
            {"ContentLength": 4, "ChecksumSHA256": "qqo=-3", "ChecksumType": "COMPOSITE", "Metadata": {"sha256": "ff"}},
            ObjectStat(4, "ff"),
        ),
        ({"ContentLength": 4, "Metadata": {"sha256": "ff"}}, ObjectStat(4, "ff")),  # moto: no checksum kept
        ({"ContentLength": 4}, ObjectStat(4, None)),
    ],
    ids=["s3-full-object", "multipart-uses-metadata", "metadata-only", "nothing-known"],
)
def test_an_objects_sha256_comes_from_s3s_checksum_else_ftcs_metadata(head: dict, stat: ObjectStat) -> None:
    assert ObjectStat.from_head(head) == stat


@pytest.mark.unit
@pytest.mark.parametrize(
    ("env", "largest", "parallel"),
    [
        ({}, 50 * 2**20, 4),
        ({}, int(4.9e9), 3),  # Mixtral's 4.9 GB shards: 3 fit the default 16 GiB scratch budget
        ({"FTC_STAGING_PARALLEL": "8"}, 2**30, 8),
        ({"FTC_STAGING_SCRATCH_GIB": "4"}, 3 * 2**30, 1),  # never fewer than one
        ({"FTC_STAGING_SCRATCH_GIB": "100", "FTC_STAGING_PARALLEL": "16"}, int(4.9e9), 16),
    ],
    ids=["small-files", "mixtral-shards", "more-in-flight", "budget-below-one-file", "large-budget"],
)
def test_files_in_flight_stay_within_the_scratch_budget(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], largest: int, parallel: int
) -> None:
    from ftc_trainer.staging import parallelism

    for key in ("FTC_STAGING_PARALLEL", "FTC_STAGING_SCRATCH_GIB"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert parallelism(largest) == parallel


@pytest.mark.unit
def test_a_bad_parallelism_setting_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from ftc_step.errors import StepError
    from ftc_trainer.staging import parallelism

    monkeypatch.setenv("FTC_STAGING_PARALLEL", "many")
    with pytest.raises(StepError, match="FTC_STAGING_PARALLEL='many': expected a positive number"):
        parallelism(1)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("index", "known"),
    [
        ({}, [None, None]),
        ({"a.safetensors": {"identity": "e1", "size": 10, "sha256": "aa"}}, ["aa", None]),
        ({"a.safetensors": {"identity": "e0", "size": 10, "sha256": "aa"}}, [None, None]),  # rewritten since
        ({"a.safetensors": {"identity": "e1", "size": 9, "sha256": "aa"}}, [None, None]),  # other size
        ({"a.safetensors": "junk", "config.json": {"identity": "e2", "size": 3}}, [None, None]),  # no sha256
    ],
    ids=["no-index", "unchanged-file-known", "new-etag-or-mtime", "other-size", "malformed-entries"],
)
def test_a_source_file_is_hashed_again_only_when_its_identity_changed(index: dict, known: list[str | None]) -> None:
    from ftc_trainer.staging import SourceFile, known_hashes

    files = [SourceFile("a.safetensors", 10, "e1"), SourceFile("config.json", 3, "e2")]
    assert [f.sha256 for f in known_hashes(files, index)] == known


@pytest.mark.unit
def test_a_content_copy_is_named_by_its_manifests_content_hash_whatever_the_source(tmp_path: Path) -> None:
    from ftc_api.names import content_model_dir
    from ftc_trainer.staging import SourceFile, content_sha256

    files = [SourceFile("config.json", 3, "etag-1", "aa" * 32), SourceFile("w.safetensors", 10, "1:2", "bb" * 32)]
    other_source = [SourceFile(f.name, f.size, "mtime-elsewhere", f.sha256) for f in files]
    sha = content_sha256(files)
    assert content_sha256(other_source) == sha  # where it was read from does not count
    written = Storage().write_manifest(str(tmp_path / "copy"), [Entry(f.name, f.sha256 or "", f.size) for f in files])
    assert written.content_sha256 == sha  # the node cache's key (ftc_step.model_cache.cache_key) is the same
    assert content_model_dir(sha) == f"models/sha256/{sha}"
    with pytest.raises(ValueError, match="is not a sha256"):
        content_model_dir("main")
    with pytest.raises(ValueError, match=r"no sha256 yet for \['w.safetensors'\]"):
        content_sha256([files[0], SourceFile("w.safetensors", 10, "x")])


# The flagship example's weights: Llama-2-7b's two shards; Mixtral-8x7B's 19 shards of about 4.9 GB (93.4 GB).
LLAMA_2_7B = [9_976_576_152, 3_500_296_424]
MIXTRAL_8X7B = [4_920_000_000] * 18 + [4_840_000_000]


@pytest.mark.unit
@pytest.mark.parametrize(("sizes", "total"), [(LLAMA_2_7B, 13.5e9), (MIXTRAL_8X7B, 93.4e9)], ids=["llama-2-7b", "mixtral-8x7b"])
@pytest.mark.parametrize(
    ("indexed", "in_place", "hashed", "copied"),
    [
        (False, "none", "all", "all"),
        (True, "all-but-the-last", "none", "the-last"),
        (True, "all", "none", "none"),
        (False, "all", "all", "none"),  # hashed once (a new source), copied never
    ],
    ids=["first-comparison", "retry-cut-before-the-last-shard", "second-comparison", "same-content-other-source"],
)
def test_bytes_moved_per_staging_of_the_flagship_bases(
    sizes: list[int], total: float, indexed: bool, in_place: str, hashed: str, copied: str
) -> None:
    """The bytes a staging reads to hash and copies, by the same pure steps stage_content takes (known_hashes,
    then files_to_move against the copy's objects), at the flagship example's sizes (docs/steps.md's table)."""
    from ftc_trainer.staging import SourceFile, known_hashes

    files = [SourceFile(f"model-{i:05d}.safetensors", size, f"etag-{i}") for i, size in enumerate(sizes, 1)]
    shas = {f.name: f"{i:064x}" for i, f in enumerate(files, 1)}
    index = {f.name: {"identity": f.identity, "size": f.size, "sha256": shas[f.name]} for f in files} if indexed else {}
    known = known_hashes(files, index)
    full = [HubFile(f.name, f.size, shas[f.name]) for f in files]
    there = {"none": [], "all-but-the-last": full[:-1], "all": full}[in_place]
    moving = files_to_move(full, {f.name: ObjectStat(f.size or 0, f.sha256) for f in there})
    expect = {"all": sum(sizes), "the-last": sizes[-1], "none": 0}
    assert sum(sizes) == pytest.approx(total, rel=0.002)
    assert sum(f.size for f in known if f.sha256 is None) == expect[hashed]
    assert sum(f.size or 0 for f in moving) == expect[copied]
