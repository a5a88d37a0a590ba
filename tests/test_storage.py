"""ftc_step.storage: S3 URIs, uploads and downloads, manifests written last and verified reads (S3 and local paths)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ftc_step.storage import MANIFEST_NAME, Entry, Manifest, Storage, StorageError, is_s3, join, parse_s3_uri, sha256_file

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://bucket/a/b.json", ("bucket", "a/b.json")),
        ("s3://bucket/prefix/", ("bucket", "prefix/")),
        ("s3://bucket", ("bucket", "")),
    ],
    ids=["object", "prefix", "bucket-only"],
)
def test_parse_s3_uri(uri: str, expected: tuple[str, str]) -> None:
    assert parse_s3_uri(uri) == expected


@pytest.mark.parametrize("uri", ["/tmp/x", "s3:///key", "http://bucket/key"], ids=["path", "no-bucket", "http"])
def test_parse_s3_uri_rejects(uri: str) -> None:
    with pytest.raises(StorageError, match="s3://|bucket"):
        parse_s3_uri(uri)


def test_join_and_is_s3() -> None:
    assert join("s3://b/p/", "/data/", "x.json") == "s3://b/p/data/x.json"
    assert is_s3("s3://b/k") and not is_s3("/local/path")


@pytest.fixture(params=["s3", "local"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Storage, str]:
    """A storage and an empty root URI on each backend."""
    if request.param == "local":
        return Storage(), str(tmp_path / "store")
    s3 = request.getfixturevalue("local_s3")
    return Storage(endpoint_url=s3.endpoint_url), f"s3://{s3.bucket}/storage-tests/{request.node.name}"


def _tree(path: Path) -> Path:
    (path / "sub").mkdir(parents=True)
    (path / "a.txt").write_text("alpha")
    (path / "sub" / "b.bin").write_bytes(bytes(range(256)) * 10)
    return path


def test_content_hash_ignores_when_a_manifest_was_written() -> None:
    files = {"a.txt": Entry("a.txt", "0" * 64, 5)}
    monday = Manifest(uri="s3://b/p/manifest.json", files=files, extra={"counts": {"rows": 2}}, created="2026-01-05T00:00:00Z")
    tuesday = Manifest(uri="s3://b/p/manifest.json", files=files, extra={"counts": {"rows": 2}}, created="2026-01-06T00:00:00Z")
    other = Manifest(uri="s3://b/p/manifest.json", files=files, extra={"counts": {"rows": 3}}, created="2026-01-05T00:00:00Z")
    assert monday.content_sha256 == tuesday.content_sha256 != other.content_sha256


def test_upload_tree_then_verified_download(root: tuple[Storage, str], tmp_path: Path) -> None:
    store, base = root
    src = _tree(tmp_path / "src")
    manifest = store.upload_tree(src, f"{base}/tree", extra={"counts": {"rows": 2}})
    assert sorted(manifest.files) == ["a.txt", "sub/b.bin"]
    assert manifest.files["sub/b.bin"].sha256 == sha256_file(src / "sub" / "b.bin")
    assert store.list(f"{base}/tree") == ["a.txt", MANIFEST_NAME, "sub/b.bin"]

    again = store.read_manifest(f"{base}/tree")
    assert again is not None and again.extra == {"counts": {"rows": 2}} and again.sha256 == manifest.sha256
    assert again.content_sha256 == manifest.content_sha256 and again.created == manifest.created
    got = store.download_verified(f"{base}/tree", tmp_path / "dst")
    assert (tmp_path / "dst" / "sub" / "b.bin").read_bytes() == (src / "sub" / "b.bin").read_bytes()
    assert set(got.files) == set(manifest.files)
    assert store.read_verified(f"{base}/tree", "a.txt") == b"alpha"


def test_manifest_is_what_readers_trust(root: tuple[Storage, str], tmp_path: Path) -> None:
    store, base = root
    src = _tree(tmp_path / "src")
    store.upload_tree(src, f"{base}/tree")
    store.write_text(f"{base}/tree/extra.txt", "not listed")
    store.download_verified(f"{base}/tree", tmp_path / "dst")
    assert not (tmp_path / "dst" / "extra.txt").exists()
    with pytest.raises(StorageError, match="does not list 'extra.txt'"):
        store.read_verified(f"{base}/tree", "extra.txt")


def test_tampered_object_is_refused(root: tuple[Storage, str], tmp_path: Path) -> None:
    store, base = root
    store.upload_tree(_tree(tmp_path / "src"), f"{base}/tree")
    store.write_text(f"{base}/tree/a.txt", "tampered")
    with pytest.raises(StorageError, match=r"a\.txt: sha256 .* differs from the manifest"):
        store.download_verified(f"{base}/tree", tmp_path / "dst")
    with pytest.raises(StorageError, match="differs from the manifest"):
        store.read_verified(f"{base}/tree", "a.txt")


def test_upload_without_manifest_reads_as_absent(root: tuple[Storage, str], tmp_path: Path) -> None:
    store, base = root
    store.upload_dir(_tree(tmp_path / "src"), f"{base}/partial")
    assert store.read_manifest(f"{base}/partial") is None
    with pytest.raises(StorageError, match="no manifest.json under .*incomplete or absent"):
        store.download_verified(f"{base}/partial", tmp_path / "dst")


def test_single_objects_and_missing_ones(root: tuple[Storage, str], tmp_path: Path) -> None:
    store, base = root
    store.write_bytes(f"{base}/one.json", json.dumps({"x": 1}).encode())
    assert store.exists(f"{base}/one.json") and not store.exists(f"{base}/nope.json")
    assert json.loads(store.read_text(f"{base}/one.json")) == {"x": 1}
    assert store.download_file(f"{base}/one.json", tmp_path / "one.json").read_text() == '{"x": 1}'
    with pytest.raises(StorageError, match=r"cannot read .*nope\.json"):
        store.read_bytes(f"{base}/nope.json")
    with pytest.raises(StorageError, match=r"cannot read .*nope\.json"):
        store.download_file(f"{base}/nope.json", tmp_path / "x")
    assert store.list(f"{base}/empty") == []


def test_delete_prefix_removes_manifest_first(root: tuple[Storage, str], tmp_path: Path) -> None:
    store, base = root
    store.upload_tree(_tree(tmp_path / "src"), f"{base}/gone")
    store.delete_prefix(f"{base}/gone")
    assert store.list(f"{base}/gone") == []
    assert store.read_manifest(f"{base}/gone") is None


def test_write_manifest_from_local_paths(root: tuple[Storage, str], tmp_path: Path) -> None:
    store, base = root
    src = _tree(tmp_path / "src")
    store.upload_file(src / "a.txt", f"{base}/m/a.txt")
    manifest = store.write_manifest(f"{base}/m", {"a.txt": src / "a.txt"})
    assert manifest.files["a.txt"].size == 5
    assert store.read_verified(f"{base}/m", "a.txt") == b"alpha"


def test_missing_bucket_names_the_uri(local_s3: object, tmp_path: Path) -> None:
    store = Storage(endpoint_url=local_s3.endpoint_url)  # type: ignore[attr-defined]
    with pytest.raises(StorageError, match=r"s3://no-such-bucket-ftc/x"):
        store.read_bytes("s3://no-such-bucket-ftc/x")
