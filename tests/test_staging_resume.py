"""Staging at the size that matters, on the real path: the local hub server (real huggingface_hub client)
serves a generated repository of 8 safetensors shards of 20 MB (160 MB: a few hundred MB would not keep the
file under ~30 s on 2 busy cores, and 8 files show the same resume as 19), the local S3 server is MinIO.

- a copy cut after 3 shards (the hub rate-limits every later download) fails as retryable; the retry moves
  only the 5 shards that are missing (hub downloads and S3 PUTs counted), and the manifest comes last;
- a second comparison reuses the shared copy: no file downloaded from the hub;
- a model whose config.json says it cannot fit is refused before any weight is downloaded or copied.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from ftc_api.spec import DatasetSpec, Method, SplitSpec
from ftc_api.steps import EXIT_BAD_INPUT, EXIT_FAILED, Location, ModelRef, PrepareInput
from ftc_step.storage import Storage

from devcluster.models.sharded import HUGE_LLAMA, build_sharded_repo
from devcluster.models.tiny import TinyAssets, TinyS3
from devcluster.servers.hub_server import FakeHub

SHARDS = 8
WEIGHTS = ".safetensors"


@pytest.fixture(scope="module")
def sharded(tiny_assets: TinyAssets, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The generated repository (160 MB), and the same with a config of a ~70B Llama."""
    root = tmp_path_factory.mktemp("sharded")
    return {
        "big": build_sharded_repo(root / "big", tiny_assets.llama, shards=SHARDS, shard_mb=20),
        "huge": build_sharded_repo(root / "huge", tiny_assets.llama, shards=2, shard_mb=1, config=HUGE_LLAMA),
    }


def _prepare(tiny_s3: TinyS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hub: FakeHub, run: str, repo: str):
    from ftc_trainer.__main__ import main
    from huggingface_hub.utils import reset_sessions

    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # see test_staging._prepare
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    reset_sessions()
    loc = Location(bucket=tiny_s3.bucket, prefix=f"runs/{run}", endpoint_url=tiny_s3.endpoint_url)
    models = [ModelRef(name="big", base_model=repo, method=Method.LORA)]
    doc = PrepareInput(dataset=DatasetSpec(source=tiny_s3.dataset, split=SplitSpec()), location=loc, models=models)
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
