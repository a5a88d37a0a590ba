"""The node-local model cache (ftc_step.model_cache): key, eviction plan, lock and atomic rename.

The stores here are ftc's own Storage on a local directory (the same code path as S3 past the client), with
every file read counted, so "no byte from storage" is what the store served, not what the cache says."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from ftc_step import model_cache
from ftc_step.model_cache import Entry, cache_key, cached_tree, plan_eviction
from ftc_step.storage import Storage, StorageError

pytestmark = pytest.mark.unit


class CountingStorage(Storage):
    """Storage that counts the files it downloads (and can wait or fail on one)."""

    def __init__(self, delay: float = 0.0, fail_on: str | None = None) -> None:
        super().__init__()
        self.reads: Counter[str] = Counter()
        self.delay = delay
        self.fail_on = fail_on
        self._lock = threading.Lock()

    def download_file(self, uri: str, path: Any) -> Path:
        with self._lock:
            self.reads[uri.rsplit("/", 1)[-1]] += 1
        if self.fail_on and uri.endswith(self.fail_on):
            raise StorageError(f"{uri}: connection reset (injected)")
        time.sleep(self.delay)
        return super().download_file(uri, path)


def staged(tmp_path: Path, name: str, weights: bytes = b"w" * 1000) -> str:
    """A staged model copy (config + one weight file + manifest) at a local prefix."""
    src = tmp_path / "src" / name
    src.mkdir(parents=True)
    (src / "config.json").write_text('{"model_type": "llama"}')
    (src / "model.safetensors").write_bytes(weights)
    prefix = str(tmp_path / "bucket" / name)
    store = Storage()
    store.write_manifest(prefix, store.upload_dir(src, prefix))
    return prefix


def test_the_key_is_the_content_not_the_path_nor_the_upload_time(tmp_path: Path) -> None:
    store = Storage()
    a, b = staged(tmp_path, "run-a"), staged(tmp_path, "shared/models/x")
    other = staged(tmp_path, "other", weights=b"v" * 1000)
    ma, mb, mo = (store.read_manifest(p) for p in (a, b, other))
    assert ma and mb and mo
    assert cache_key(ma) == cache_key(mb)  # same files under another prefix (staging's shared copy)
    assert cache_key(ma) != cache_key(mo)  # other weights
    assert len(cache_key(ma)) == 64


GB = 10**9


@pytest.mark.parametrize(
    ("entries", "need", "max_bytes", "free", "expected"),
    [
        ([], 5 * GB, None, 100 * GB, []),  # empty cache, room enough
        ([Entry("a", 10 * GB, 1), Entry("b", 10 * GB, 2)], 5 * GB, 30 * GB, None, []),  # fits the bound
        ([Entry("a", 10 * GB, 1), Entry("b", 10 * GB, 2)], 15 * GB, 30 * GB, None, ["a"]),  # least recently used
        ([Entry("a", 10 * GB, 3), Entry("b", 10 * GB, 2)], 15 * GB, 30 * GB, None, ["b"]),
        ([Entry("a", 10 * GB, 1), Entry("b", 10 * GB, 2)], 25 * GB, 30 * GB, None, ["a", "b"]),
        ([Entry("a", 10 * GB, 1), Entry("b", 10 * GB, 2)], 5 * GB, None, 1 * GB, ["a"]),  # the volume's free space
        ([Entry("a", 10 * GB, 1), Entry("b", 10 * GB, 2)], 50 * GB, 30 * GB, None, ["a", "b"]),  # never fits: all
        ([Entry("keep", 10 * GB, 1), Entry("b", 10 * GB, 2)], 15 * GB, 20 * GB, None, ["b"]),  # not the one fetched
    ],
)
def test_plan_eviction(entries: list[Entry], need: int, max_bytes: int | None, free: int | None, expected: list[str]) -> None:
    assert plan_eviction(entries, need, "keep", max_bytes, free) == expected


def test_a_second_fetch_reads_nothing_from_storage_even_under_another_prefix(tmp_path: Path) -> None:
    a, b = staged(tmp_path, "run-a"), staged(tmp_path, "shared/x")
    store, root = CountingStorage(), tmp_path / "cache"
    first = cached_tree(store, a, store.read_manifest(a), root)  # type: ignore[arg-type]
    assert not first.hit and store.reads == {"config.json": 1, "model.safetensors": 1}
    again = cached_tree(store, b, store.read_manifest(b), root)  # type: ignore[arg-type]
    assert again.hit and again.path == first.path and again.downloaded_bytes == 0
    assert store.reads == {"config.json": 1, "model.safetensors": 1}  # nothing more served
    assert (again.path / "model.safetensors").read_bytes() == b"w" * 1000
    assert sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock")) == [first.path.name]  # no temp left


@pytest.mark.timeout(60)  # the old code could wait forever here: a waiter blocked on the exclusive lock a user held shared
def test_two_pods_on_one_node_download_once(tmp_path: Path) -> None:
    prefix = staged(tmp_path, "m")
    store, root = CountingStorage(delay=0.3), tmp_path / "cache"
    manifest = store.read_manifest(prefix)
    results: list[Any] = []
    start = threading.Barrier(2)

    def fetch() -> None:  # each thread opens its own lock file description: flock serialises them as processes
        start.wait()
        results.append(cached_tree(store, prefix, manifest, root))  # type: ignore[arg-type]

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.hit for r in results) == [False, True]
    assert store.reads["model.safetensors"] == 1


def test_a_download_cut_short_leaves_no_entry_and_the_next_one_cleans_up(tmp_path: Path) -> None:
    prefix = staged(tmp_path, "m")
    root = tmp_path / "cache"
    broken = CountingStorage(fail_on="model.safetensors")
    with pytest.raises(StorageError, match="injected"):
        cached_tree(broken, prefix, broken.read_manifest(prefix), root)  # type: ignore[arg-type]
    left = [p.name for p in root.iterdir() if not p.name.endswith(".lock")]
    assert len(left) == 1 and left[0].startswith(".tmp-")  # the partial download, never visible as an entry
    store = CountingStorage()
    got = cached_tree(store, prefix, store.read_manifest(prefix), root)  # type: ignore[arg-type]
    assert not got.hit and [p.name for p in root.iterdir() if not p.name.endswith(".lock")] == [got.path.name]


def test_a_damaged_entry_is_downloaded_again(tmp_path: Path) -> None:
    prefix = staged(tmp_path, "m")
    store, root = CountingStorage(), tmp_path / "cache"
    manifest = store.read_manifest(prefix)
    got = cached_tree(store, prefix, manifest, root)  # type: ignore[arg-type]
    model_cache._held.clear()  # as if that pod had exited
    (got.path / "model.safetensors").write_bytes(b"cut")
    again = cached_tree(store, prefix, manifest, root)  # type: ignore[arg-type]
    assert not again.hit and (again.path / "model.safetensors").read_bytes() == b"w" * 1000


def test_a_corrupt_object_is_refused(tmp_path: Path) -> None:
    prefix = staged(tmp_path, "m")
    (Path(prefix) / "model.safetensors").write_bytes(b"x" * 1000)  # same size, other bytes
    store, root = CountingStorage(), tmp_path / "cache"
    with pytest.raises(StorageError, match="differs from the manifest"):
        cached_tree(store, prefix, store.read_manifest(prefix), root)  # type: ignore[arg-type]
    assert not [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]


def test_eviction_removes_the_least_recently_used_entry_no_live_process_uses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b, c, d = (staged(tmp_path, n, weights=n.encode() * 1000) for n in ("a", "b", "c", "d"))
    store, root = CountingStorage(), tmp_path / "cache"
    monkeypatch.setenv(model_cache.CACHE_MAX_BYTES_ENV, "2600")  # two models fit (1000 bytes of weights, config, record)
    ea = cached_tree(store, a, store.read_manifest(a), root)  # type: ignore[arg-type]
    eb = cached_tree(store, b, store.read_manifest(b), root)  # type: ignore[arg-type]
    ec = cached_tree(store, c, store.read_manifest(c), root)  # type: ignore[arg-type]
    assert ea.path.exists() and eb.path.exists()  # both in use by a live process (this one): none evicted
    for entry in (ea, eb, ec):
        model_cache._held.pop(entry.path.name).close()  # the pods that used them exited
    cached_tree(store, b, store.read_manifest(b), root)  # type: ignore[arg-type]  # b used again: a is the oldest
    model_cache._held.clear()
    cached_tree(store, d, store.read_manifest(d), root)  # type: ignore[arg-type]
    assert not ea.path.exists() and not ec.path.exists() and eb.path.exists()  # LRU a, then c; back under the bound


@pytest.fixture(autouse=True)
def _release_locks() -> Any:
    yield
    for handle in list(model_cache._held.values()):
        handle.close()
    model_cache._held.clear()


@pytest.mark.parametrize(
    ("where", "refused"),
    [("content", False), ("renamed", True), ("not-content-addressed", False)],
    ids=["named-by-its-content", "manifest-of-other-content", "hub-or-run-prefix-not-checked"],
)
def test_a_content_addressed_copy_must_hold_the_manifest_its_name_says(tmp_path: Path, where: str, refused: bool) -> None:
    """A base model given as an s3:// prefix or a path is staged at models/sha256/SHA: its node cache entry is
    SHA, and a manifest whose content is not SHA is refused before any byte is read."""
    store = CountingStorage()
    source = staged(tmp_path, "src-model")
    manifest = store.read_manifest(source)
    assert manifest is not None
    key = cache_key(manifest)
    name = {"content": key, "renamed": "0" * 64, "not-content-addressed": "run-a/base"}[where]
    prefix = str(tmp_path / "bucket" / "ftc-cache" / "models" / ("sha256/" + name if where != "not-content-addressed" else name))
    store.write_manifest(prefix, store.upload_dir(tmp_path / "src" / "src-model", prefix))
    if refused:
        with pytest.raises(StorageError, match=f"its manifest's content is {key}, not the {name} its name says"):
            cached_tree(store, prefix, manifest, tmp_path / "cache")
        assert not store.reads
        return
    got = cached_tree(store, prefix, manifest, tmp_path / "cache")
    assert got.path.name == key and not got.hit
