"""Staging at the size that matters, on the real path: the local hub server (real huggingface_hub client)
serves a generated repository of 8 safetensors shards of 20 MB (160 MB: a few hundred MB would not keep the
file under ~30 s on 2 busy cores, and 8 files show the same resume as 19), the local S3 server is MinIO.

- a copy cut after 3 shards (the hub rate-limits every later download) fails as retryable; the retry moves
  only the 5 shards that are missing (hub downloads and S3 PUTs counted), and the manifest comes last;
- a second comparison reuses the shared copy: no file downloaded from the hub;
- a model whose config.json says it cannot fit is refused before any weight is downloaded or copied;
- a base model given as a path or an s3:// prefix (a smaller repository: 4 shards of 8 MB) is staged by its
  content: a second comparison (same source, or the same files from the other source) reads and copies 0
  bytes; a staging cut while hashing or while copying resumes without hashing or copying a finished file
  again; the node cache downloads it once and then hits (0 bytes);
- a source that cannot be staged (missing, empty, no config.json, an object gone) fails naming it and
  writes no manifest.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from ftc_api.spec import DatasetSpec, Method, SplitSpec
from ftc_api.steps import EXIT_BAD_INPUT, EXIT_FAILED, Location, ModelRef, PrepareInput
from ftc_step.errors import StepError
from ftc_step.storage import Storage, StorageError

from devcluster.models.sharded import HUGE_LLAMA, build_sharded_repo
from devcluster.models.tiny import TinyAssets, TinyS3
from devcluster.servers.hub_server import FakeHub

SHARDS = 8
MID_SHARDS = 4
WEIGHTS = ".safetensors"


@pytest.fixture(scope="module")
def sharded(tiny_assets: TinyAssets, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The generated repository (160 MB), and the same with a config of a ~70B Llama."""
    root = tmp_path_factory.mktemp("sharded")
    return {
        "big": build_sharded_repo(root / "big", tiny_assets.llama, shards=SHARDS, shard_mb=20),
        "huge": build_sharded_repo(root / "huge", tiny_assets.llama, shards=2, shard_mb=1, config=HUGE_LLAMA),
        "mid": build_sharded_repo(root / "mid", tiny_assets.llama, shards=MID_SHARDS, shard_mb=8),
    }


def _prepare(tiny_s3: TinyS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hub: FakeHub, run: str, repo: str):
    from huggingface_hub.utils import reset_sessions

    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # see test_staging._prepare
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    reset_sessions()
    return _run_prepare(tiny_s3, tmp_path, monkeypatch, run, ModelRef(name="big", base_model=repo, method=Method.LORA))


def _run_prepare(
    tiny_s3: TinyS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: str, model: ModelRef, cache: str | None = None
) -> tuple[int, Any]:
    """`python -m ftc_trainer prepare` of one model in this process; its exit code and termination message."""
    from ftc_trainer.__main__ import main

    loc = Location(bucket=tiny_s3.bucket, prefix=f"runs/{run}", endpoint_url=tiny_s3.endpoint_url)
    dataset = DatasetSpec(source=tiny_s3.dataset, split=SplitSpec())
    doc = PrepareInput(dataset=dataset, location=loc, models=[model], **({"cache_prefix": cache} if cache else {}))
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "input.json").write_text(doc.to_json())
    log = tmp_path / "termination-log"
    monkeypatch.setenv("FTC_TERMINATION_LOG", str(log))
    code = main(["prepare", "--input", str(tmp_path / "input.json"), "--workdir", str(tmp_path / "work")])
    return code, json.loads(log.read_text())


@pytest.fixture
def puts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The URIs staging PUTs (the real upload still happens)."""
    seen: list[str] = []
    original = Storage.put_file_checked

    def spy(self: Storage, path: str, uri: str, sha256: str) -> None:
        seen.append(uri)
        original(self, path, uri, sha256)

    monkeypatch.setattr(Storage, "put_file_checked", spy)
    return seen


@pytest.mark.ml
def test_a_cut_copy_resumes_with_only_the_missing_files_and_a_second_comparison_downloads_nothing(
    sharded: dict[str, Path], tiny_s3: TinyS3, hub_server: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    puts: list[str],
) -> None:  # fmt: skip
    repo = hub_server.add("ftc-test/big-llama", sharded["big"])
    dest = f"s3://{tiny_s3.bucket}/ftc-cache/models/hf/ftc-test--big-llama/{repo.sha}"
    store = Storage(endpoint_url=tiny_s3.endpoint_url)

    hub_server.cut_after(3, WEIGHTS)  # the hub serves 3 shards, then rate-limits every other download
    code, summary = _prepare(tiny_s3, tmp_path / "cut", monkeypatch, hub_server, "cut", "ftc-test/big-llama")
    assert code == EXIT_FAILED and "429" in summary["error"], summary  # transient: the Job retries it
    first = hub_server.downloads(WEIGHTS)
    staged = [n for n in store.list(dest) if n.endswith(WEIGHTS)]
    assert len(first) == 3 and len(staged) == 3 and "manifest.json" not in store.list(dest)

    hub_server.cut, before, puts[:] = None, len(hub_server.requests), []
    code, summary = _prepare(tiny_s3, tmp_path / "retry", monkeypatch, hub_server, "cut", "ftc-test/big-llama")
    assert code == 0 and summary["models"][0]["stagedUri"] == dest, summary
    second = [r["path"] for r in hub_server.requests[before:] if r.get("served") and r["path"].endswith(WEIGHTS)]
    assert len(second) == SHARDS - 3 and not set(second) & set(first)  # only the rest came from the hub
    assert sorted(u for u in puts if u.endswith(WEIGHTS)) == sorted(f"{dest}/{p.rsplit('/', 1)[1]}" for p in second)
    assert puts[-1] == f"{dest}/manifest.json" or "manifest.json" in store.list(dest)
    manifest = store.read_manifest(dest)
    assert manifest is not None and sorted(manifest.files) == sorted(repo.files)
    for name, data in repo.files.items():  # every object holds the hub's bytes, as S3 itself checked them
        stat = store.stat(f"{dest}/{name}")
        assert stat is not None and stat.size == len(data) and stat.sha256 == hashlib.sha256(data).hexdigest(), name
        assert manifest.files[name].sha256 == stat.sha256

    # A second comparison of the same commit reuses the shared copy: nothing downloaded from the hub.
    before, puts[:] = len(hub_server.requests), []
    code, summary = _prepare(tiny_s3, tmp_path / "second", monkeypatch, hub_server, "second", "ftc-test/big-llama")
    assert code == 0 and summary["models"][0]["stagedUri"] == dest and summary["models"][0]["tokenCounts"]["train"] > 0
    assert not [r for r in hub_server.requests[before:] if r.get("served")] and not puts


@pytest.mark.ml
def test_a_model_that_cannot_fit_is_refused_before_any_weight_moves(
    sharded: dict[str, Path], tiny_s3: TinyS3, hub_server: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    puts: list[str],
) -> None:  # fmt: skip
    hub_server.add("ftc-test/huge-llama", sharded["huge"])
    code, summary = _prepare(tiny_s3, tmp_path, monkeypatch, hub_server, "huge", "ftc-test/huge-llama")
    assert code == EXIT_BAD_INPUT and "needs an estimated 132.74 GiB" in summary["error"], summary
    assert "stagedUri" not in summary["models"][0]  # nothing was staged
    assert hub_server.downloads("config.json") and not hub_server.downloads(WEIGHTS)  # config yes, weights never
    assert not puts


# ------------------------------------------------------------------------------ s3:// and path sources


class Moves:
    """What staging reads from a source to hash it and copies into the shared cache (the real calls still run;
    `fail_hash_after` / `fail_copy_after`: that many calls succeed, then each fails as a lost connection)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.hashed: list[str] = []
        self.copied: list[str] = []
        self.fail_hash_after: int | None = None
        self.fail_copy_after: int | None = None
        hash_of, copy = Storage.sha256_of, Storage.copy_checked
        moves = self

        def sha256_of(store: Storage, uri: str) -> str:
            if moves.fail_hash_after is not None and len(moves.hashed) >= moves.fail_hash_after:
                raise StorageError(f"cannot read {uri}") from ConnectionError("connection reset")
            moves.hashed.append(uri)
            return hash_of(store, uri)

        def copy_checked(store: Storage, source: str, uri: str, sha256: str) -> None:
            if moves.fail_copy_after is not None and len(moves.copied) >= moves.fail_copy_after:
                raise StorageError(f"cannot copy {source}") from ConnectionError("connection reset")
            copy(store, source, uri, sha256)
            moves.copied.append(uri)

        monkeypatch.setattr(Storage, "sha256_of", sha256_of)
        monkeypatch.setattr(Storage, "copy_checked", copy_checked)

    def reset(self) -> None:
        self.hashed, self.copied = [], []
        self.fail_hash_after = self.fail_copy_after = None

    def bytes(self, uris: list[str], store: Storage) -> int:
        total = 0
        for uri in uris:
            stat = store.stat(uri)
            assert stat is not None, uri
            total += stat.size
        return total


@pytest.fixture
def moves(monkeypatch: pytest.MonkeyPatch) -> Moves:
    return Moves(monkeypatch)


def _cache(tiny_s3: TinyS3, name: str) -> Any:
    return lambda *parts: "/".join([f"s3://{tiny_s3.bucket}/{name}", *parts])


def _source_prepare(tiny_s3: TinyS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: str, base: str, cache: str):
    model = ModelRef(name="mid", base_model=base, method=Method.LORA)
    return _run_prepare(tiny_s3, tmp_path, monkeypatch, run, model, cache)


@pytest.mark.ml
def test_an_s3_or_path_base_is_staged_once_by_its_content_and_the_node_cache_then_hits(
    sharded: dict[str, Path], tiny_s3: TinyS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, moves: Moves
) -> None:
    from ftc_step.model_cache import cached_tree

    store = Storage(endpoint_url=tiny_s3.endpoint_url)
    local = tmp_path / "pvc" / "mid-llama"
    shutil.copytree(sharded["mid"], local)
    source = f"s3://{tiny_s3.bucket}/assets/models/mid-llama"
    store.upload_dir(local, source)  # plain uploads: no manifest, no sha256 the server keeps
    total = sum(p.stat().st_size for p in local.iterdir())
    cache = "content-cache"

    code, first = _source_prepare(tiny_s3, tmp_path / "first", monkeypatch, "content-1", source, cache)
    assert code == 0, first
    staged = first["models"][0]
    sha = staged["revision"]
    assert staged["stagedUri"] == f"s3://{tiny_s3.bucket}/{cache}/models/sha256/{sha}"
    assert moves.bytes(moves.hashed, store) == total and moves.bytes(moves.copied, store) == total
    manifest = store.read_manifest(staged["stagedUri"])
    assert manifest is not None and manifest.content_sha256 == sha and not manifest.extra  # named by its content
    for path in local.iterdir():  # each copy made inside the server, which computed its sha256 itself
        stat = store.stat(f"{staged['stagedUri']}/{path.name}")
        assert (
            stat is not None and stat.sha256 == manifest.files[path.name].sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        )

    # A second comparison of the same s3:// source: nothing read to hash (the source index knows each ETag),
    # nothing copied.
    moves.reset()
    code, second = _source_prepare(tiny_s3, tmp_path / "second", monkeypatch, "content-2", source, cache)
    assert code == 0 and second["models"][0]["stagedUri"] == staged["stagedUri"], second
    assert moves.hashed == [] and moves.copied == []

    # The same files given as a path (a PVC): hashed once (a new source), copied never (the content is there).
    moves.reset()
    code, third = _source_prepare(tiny_s3, tmp_path / "third", monkeypatch, "content-3", str(local), cache)
    assert code == 0 and third["models"][0]["stagedUri"] == staged["stagedUri"], third
    assert len(moves.hashed) == len(manifest.files) and moves.copied == []
    moves.reset()
    code, fourth = _source_prepare(tiny_s3, tmp_path / "fourth", monkeypatch, "content-4", str(local), cache)
    assert code == 0 and moves.hashed == [] and moves.copied == []

    # Train and evaluate pods on one node: the first attempt downloads it into the node cache, keyed by the
    # manifest's content (the prefix's own name); the next attempt (a retry, the evaluate pod) reads 0 bytes.
    root = tmp_path / "node-cache"
    miss = cached_tree(store, staged["stagedUri"], manifest, root)
    hit = cached_tree(store, staged["stagedUri"], manifest, root)
    assert (miss.hit, miss.downloaded_bytes, miss.path.name) == (False, total, sha)
    assert (hit.hit, hit.downloaded_bytes, hit.path) == (True, 0, miss.path)


@pytest.mark.ml
@pytest.mark.parametrize("cut", ["while-hashing", "while-copying"])
def test_a_cut_content_staging_resumes_without_redoing_a_finished_file(
    sharded: dict[str, Path], tiny_s3: TinyS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, moves: Moves, cut: str
) -> None:
    from ftc_trainer.staging import stage_content

    store = Storage(endpoint_url=tiny_s3.endpoint_url)
    source = tmp_path / f"mid-{cut}"
    shutil.copytree(sharded["mid"], source)
    (source / "model-00001-of-00004.safetensors").open("ab").write(cut.encode())  # content of its own: a new copy
    cache = _cache(tiny_s3, f"cut-cache-{cut}")
    files = sorted(p.name for p in source.iterdir())
    monkeypatch.setenv("FTC_STAGING_PARALLEL", "1")  # one file at a time: the cut falls at a known file
    if cut == "while-hashing":
        moves.fail_hash_after = 2
    else:
        moves.fail_copy_after = 3
    with pytest.raises(StepError, match="cannot (read|copy) base model") as err:
        stage_content(str(source), store, cache)
    assert err.value.retryable  # the Job retries it
    done_hashing, done_copying = list(moves.hashed), list(moves.copied)
    assert not [u for u in store.list(cache("models/sha256")) if u.endswith("manifest.json")]  # nothing complete
    moves.reset()
    staged = stage_content(str(source), store, cache)
    assert not set(moves.hashed) & set(done_hashing) and not set(moves.copied) & set(done_copying)
    assert len(done_hashing) + len(moves.hashed) == len(files)  # each file hashed once over both attempts
    assert len(done_copying) + len(moves.copied) == len(files)  # and copied once
    assert staged.skipped == len(done_copying) and staged.moved == len(files) - len(done_copying)
    assert store.download_verified(staged.uri, tmp_path / "check").content_sha256 == staged.revision


@pytest.mark.ml
@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("missing", "not found: no such file or directory"),
        ("file", "is a file: give the directory that holds config.json"),
        ("empty", "the directory is empty"),
        ("no-config", "no config.json in the directory"),
        ("s3-empty", "the prefix is empty"),
        ("s3-no-config", "no config.json in the prefix"),
    ],
    ids=["missing", "file", "empty", "no-config", "s3-empty", "s3-no-config"],
)
def test_a_source_that_cannot_be_staged_is_named_and_nothing_is_written(
    tiny_s3: TinyS3, tmp_path: Path, layout: str, message: str
) -> None:
    from ftc_trainer.staging import stage_content

    store = Storage(endpoint_url=tiny_s3.endpoint_url)
    source = str(tmp_path / "model")
    if layout == "file":
        (tmp_path / "model").write_text("{}")
    elif layout in ("empty", "no-config"):
        (tmp_path / "model").mkdir()
        if layout == "no-config":
            (tmp_path / "model" / "model.safetensors").write_bytes(b"w")
    elif layout.startswith("s3"):
        source = f"s3://{tiny_s3.bucket}/bad-sources/{layout}"
        if layout == "s3-no-config":
            store.write_bytes(f"{source}/model.safetensors", b"w")
    cache = _cache(tiny_s3, f"bad-cache-{layout}")
    with pytest.raises(StepError, match=message) as err:
        stage_content(source, store, cache)
    assert source in str(err.value) and not err.value.retryable and store.list(cache("models")) == []


@pytest.mark.ml
def test_an_object_gone_before_it_is_hashed_fails_naming_it(tiny_s3: TinyS3) -> None:
    from ftc_trainer.staging import SourceFile, hash_source

    store = Storage(endpoint_url=tiny_s3.endpoint_url)
    source = f"s3://{tiny_s3.bucket}/bad-sources/gone"
    store.write_bytes(f"{source}/config.json", b"{}")
    files = [SourceFile("config.json", 2, "e1"), SourceFile("model.safetensors", 10, "e2")]  # listed, then deleted
    index = f"s3://{tiny_s3.bucket}/bad-cache-gone/index.json"
    with pytest.raises(StepError, match=f"cannot read base model {source}: cannot read {source}/model.safetensors: no such"):
        hash_source(source, files, store, index)
