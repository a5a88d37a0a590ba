"""ftc's artefact storage: S3 (or an S3-compatible server) and plain local paths, behind one small API.

Every location is a string: `s3://BUCKET/KEY` for S3, anything else (or `file://...`) for the local
filesystem. Credentials come from boto3's standard sources (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
env vars, IRSA, ...); the endpoint and region from `Storage(endpoint_url=..., region=...)` or
`Storage.for_location(location)` (any object with `endpoint_url` and `region` attributes, such as
`ftc_api.steps.Location`).

Complete-or-absent uploads: write the objects, then `PREFIX/manifest.json` LAST, listing each object's
sha256 and size. Readers trust only what a manifest lists (`read_manifest`, `download_verified`,
`read_verified`).

    store = Storage.for_location(location)              # or Storage(endpoint_url=None, region=None)
    store.upload_file(path, uri)                        # one file
    store.download_file(uri, path) -> Path
    store.write_bytes(uri, data) / store.read_bytes(uri) -> bytes
    store.write_text(uri, text) / store.read_text(uri) -> str   # text written with credentials redacted
    store.exists(uri) -> bool
    store.put_file_checked(path, uri, sha256)           # the server checks the bytes (S3 ChecksumSHA256)
    store.stat(uri) -> ObjectStat | None                # size and sha256 as the server keeps them, no read
    store.sha256_of(uri) -> str                         # the object's sha256, its bytes streamed (not stored)
    store.copy_checked(src_uri, uri, sha256)            # S3 to S3 inside the server (no byte through this pod)
    store.list_stats(prefix) -> {name: (size, identity)}  # identity: S3's ETag, or a local file's size:mtime_ns
    store.list(prefix) -> list[str]                     # relative names of every object under prefix/
    store.upload_dir(local_dir, prefix) -> list[Entry]  # every file, no manifest
    store.download_prefix(prefix, local_dir) -> list[str]   # every object, unverified
    store.write_manifest(prefix, files, extra=None) -> Manifest  # files: Entry list or {name: local path}
    store.upload_tree(local_dir, prefix, extra=None) -> Manifest # upload_dir + write_manifest
    store.read_manifest(prefix) -> Manifest | None      # None when absent
    store.download_verified(prefix, local_dir) -> Manifest       # raises StorageError on a mismatch
    store.read_verified(prefix, name) -> bytes          # one listed object, sha256 checked
    store.delete_prefix(prefix)

Module helpers: `is_s3(uri)`, `parse_s3_uri(uri) -> (bucket, key)`, `join(uri, *parts)`,
`sha256_file(path)`, `sha256_bytes(data)`. Errors are `StorageError` (a `RuntimeError`) whose message
names the URI and what went wrong.
"""

from __future__ import annotations

import base64
import builtins
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
_CHUNK = 1 << 20
T = TypeVar("T")

__all__ = [
    "MANIFEST_NAME",
    "Entry",
    "Manifest",
    "ObjectStat",
    "Storage",
    "StorageError",
    "is_s3",
    "join",
    "parse_s3_uri",
    "sha256_bytes",
    "sha256_file",
]


# A response body that broke off (the request succeeded): read again, up to this many times in all.
BODY_ATTEMPTS = 5
_CUT_SHORT = frozenset({"ResponseStreamingError", "IncompleteReadError", "IncompleteRead", "ProtocolError", "ReadTimeoutError"})


def transfer_config() -> Any:
    """Multipart transfers with bounded memory: boto3's default queues up to 100 parts of 8 MiB (800 MiB) when
    the server is slower than the disk; here at most 4 in flight and 8 queued (about 100 MiB)."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_chunksize=8 * 2**20, max_concurrency=4, max_io_queue=8)


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URI."""


# One PUT carries at most 5 GiB (S3's limit); a larger file goes multipart, whose ChecksumSHA256 is per part.
SINGLE_PUT_LIMIT = 5 * 2**30
SHA256_META = "sha256"  # x-amz-meta-sha256: the sha256 (hex) put_file_checked stated for the whole object


@dataclass(frozen=True)
class ObjectStat:
    """An object's size and sha256 (hex) as its server keeps them; `server_checked`: the sha256 is S3's own
    full-object ChecksumSHA256 (the server verified the bytes), not only metadata."""

    size: int
    sha256: str | None
    server_checked: bool = False

    @classmethod
    def from_head(cls, head: Mapping[str, Any]) -> ObjectStat:
        """From a head_object answer (asked with ChecksumMode=ENABLED)."""
        size = int(head.get("ContentLength", -1))
        checksum = head.get("ChecksumSHA256")
        if checksum and "-" not in checksum and head.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT":
            return cls(size, base64.b64decode(checksum).hex(), server_checked=True)
        return cls(size, (head.get("Metadata") or {}).get(SHA256_META) or None)

    def holds(self, size: int, sha256: str | None) -> bool:
        """Whether this object already holds a file of `size` bytes and `sha256` (unknown sha256: never)."""
        return sha256 is not None and self.size == size and self.sha256 == sha256


@dataclass(frozen=True)
class Entry:
    """One object listed in a manifest: its name relative to the manifest's prefix, sha256 and size."""

    name: str
    sha256: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size}


@dataclass
class Manifest:
    """A manifest: the objects of a complete upload, plus free-form `extra` fields (counts, config...)."""

    uri: str
    files: dict[str, Entry]
    extra: dict[str, Any] = field(default_factory=dict)
    created: str | None = None
    sha256: str | None = None  # sha256 of the manifest document itself

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"version": MANIFEST_VERSION, "created": self.created}
        doc.update(self.extra)
        doc["files"] = {name: e.to_json() for name, e in sorted(self.files.items())}
        return doc

    @property
    def content_sha256(self) -> str:
        """sha256 of what the manifest says (files, their sha256s, `extra`), without its `created` time: the
        same content uploaded twice has the same content hash (for example a dataset's identity)."""
        doc = self.to_json()
        doc.pop("created", None)
        return sha256_bytes(encode_manifest(doc))


# ---------------------------------------------------------------------------------------------- helpers


def encode_manifest(doc: dict[str, Any]) -> bytes:
    """The canonical bytes of a manifest document (what is written, and what its hashes cover)."""
    return json.dumps(doc, indent=1, sort_keys=True).encode()


def is_s3(uri: str | os.PathLike[str]) -> bool:
    """True for `s3://` URIs."""
    return str(uri).startswith("s3://")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/key` -> ("bucket", "some/key"); the key may be empty."""
    if not is_s3(uri):
        raise StorageError(f"{uri!r} is not an s3:// URI")
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri!r} names no bucket")
    return bucket, key


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI or local path with single slashes."""
    out = str(uri).rstrip("/")
    for part in parts:
        part = str(part).strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _local(uri: str | os.PathLike[str]) -> Path:
    text = str(uri)
    return Path(text[len("file://") :] if text.startswith("file://") else text)


def _files_under(local_dir: Path) -> list[str]:
    return sorted(p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------- storage


class Storage:
    """S3 and local-path storage. One boto3 client, created on first S3 use."""

    def __init__(self, endpoint_url: str | None = None, region: str | None = None) -> None:
        self.endpoint_url = endpoint_url or None
        self.region = region or None
        self._client: Any = None

    @classmethod
    def for_location(cls, location: Any) -> Storage:
        """A Storage for an object with `endpoint_url` and `region` (for example ftc_api.steps.Location)."""
        return cls(getattr(location, "endpoint_url", None), getattr(location, "region", None))

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.client(
                "s3",
                endpoint_url=self.endpoint_url,
                region_name=self.region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
                config=Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=10, read_timeout=120),
            )
        return self._client

    # ------------------------------------------------------------------ single objects

    def upload_file(self, path: str | os.PathLike[str], uri: str) -> None:
        """Copy a local file to `uri`."""
        if is_s3(uri):
            bucket, key = parse_s3_uri(uri)
            try:
                self.client.upload_file(str(path), bucket, key, Config=transfer_config())
            except Exception as err:  # botocore raises many types; name the URI
                raise StorageError(f"cannot upload {path} to {uri}: {err}") from err
        else:
            target = _local(uri)
            target.parent.mkdir(parents=True, exist_ok=True)
            if Path(path).resolve() != target.resolve():
                shutil.copyfile(path, target)

    def download_file(self, uri: str, path: str | os.PathLike[str]) -> Path:
        """Copy the object at `uri` to a local file (parents created); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if is_s3(uri):
            bucket, key = parse_s3_uri(uri)
            tmp = path.with_name(path.name + ".part")
            try:
                self.client.download_file(bucket, key, str(tmp), Config=transfer_config())
            except Exception as err:
                tmp.unlink(missing_ok=True)
                raise StorageError(f"cannot read {uri}: {_explain(err)}") from err
            tmp.replace(path)
        else:
            source = _local(uri)
            if not source.is_file():
                raise StorageError(f"cannot read {uri}: no such file")
            if source.resolve() != path.resolve():
                shutil.copyfile(source, path)
        return path

    def put_file_checked(self, path: str | os.PathLike[str], uri: str, sha256: str) -> None:
        """Copy a local file to `uri`, stating its `sha256` (hex): the server checks the bytes against it (S3's
        ChecksumSHA256; up to 5 GiB, one PUT) and keeps it, and the object's metadata keeps it too (for servers
        that keep no checksum and for multipart objects, whose checksum is per part). See :meth:`stat`."""
        if not is_s3(uri):
            self.upload_file(path, uri)
            return
        bucket, key = parse_s3_uri(uri)
        meta = {SHA256_META: sha256}
        try:
            if Path(path).stat().st_size <= SINGLE_PUT_LIMIT:
                with open(path, "rb") as body:
                    checksum = base64.b64encode(bytes.fromhex(sha256)).decode()
                    self.client.put_object(Bucket=bucket, Key=key, Body=body, ChecksumSHA256=checksum, Metadata=meta)
            else:
                extra = {"ChecksumAlgorithm": "SHA256", "Metadata": meta}
                self.client.upload_file(str(path), bucket, key, ExtraArgs=extra, Config=transfer_config())
        except Exception as err:
            if any(code in str(err) for code in ("ChecksumMismatch", "BadDigest", "InvalidDigest")):
                raise StorageError(f"cannot upload {path} to {uri}: its bytes differ from sha256 {sha256}") from err
            raise StorageError(f"cannot upload {path} to {uri}: {_explain(err)}") from err

    def stat(self, uri: str) -> ObjectStat | None:
        """Size and sha256 of the object at `uri` as the server keeps them, without reading it (None: absent).
        sha256 is S3's full-object ChecksumSHA256 when the server returns one (checked by the server on upload),
        else the sha256 metadata :meth:`put_file_checked` wrote, else None."""
        if not is_s3(uri):
            local = _local(uri)
            return ObjectStat(local.stat().st_size, None) if local.is_file() else None
        bucket, key = parse_s3_uri(uri)
        try:
            head = self.client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        except Exception as err:
            if _status(err) in (404, 403) or "Not Found" in str(err):
                return None
            raise StorageError(f"cannot check {uri}: {_explain(err)}") from err
        return ObjectStat.from_head(head)

    def sha256_of(self, uri: str) -> str:
        """The sha256 (hex) of the object at `uri`, its body streamed through the hash (nothing stored, a few MB
        of memory): what an object without a checksum is identified by."""
        if not is_s3(uri):
            local = _local(uri)
            if not local.is_file():
                raise StorageError(f"cannot read {uri}: no such file")
            try:
                return sha256_file(local)
            except OSError as err:
                raise StorageError(f"cannot read {uri}: {err}") from err

        def hash_body(body: Any) -> str:
            digest = hashlib.sha256()  # a new one per attempt: a body cut short is read again from the start
            for chunk in body.iter_chunks(_CHUNK):
                digest.update(chunk)
            return digest.hexdigest()

        return self._with_body(uri, hash_body)

    def _with_body(self, uri: str, use: Callable[[Any], T]) -> T:
        """`use` applied to the body of the S3 object at `uri`. botocore retries the request, not the body: a
        transfer cut short is read again here, from the start, up to BODY_ATTEMPTS times."""
        bucket, key = parse_s3_uri(uri)
        for attempt in range(1, BODY_ATTEMPTS + 1):
            try:
                return use(self.client.get_object(Bucket=bucket, Key=key)["Body"])
            except Exception as err:
                if type(err).__name__ in _CUT_SHORT and attempt < BODY_ATTEMPTS:
                    time.sleep(min(8.0, 0.5 * 2**attempt))
                    continue
                raise StorageError(f"cannot read {uri}: {_explain(err)}") from err
        raise StorageError(f"cannot read {uri}: cut short {BODY_ATTEMPTS} times")  # pragma: no cover

    def copy_checked(self, source: str, uri: str, sha256: str) -> None:
        """Copy the object at `source` to `uri` stating its `sha256` (kept as metadata, as
        :meth:`put_file_checked` does): S3 to S3 inside the server (multipart above 5 GiB; no byte passes
        through this process), else through a local file. When the server keeps a full-object checksum of the
        copy and it differs from `sha256` (the source changed since it was hashed) the copy is deleted and
        StorageError raised."""
        if not (is_s3(source) and is_s3(uri)):
            if not is_s3(source):
                self.put_file_checked(_local(source), uri, sha256)
                return
            tmp = Path(tempfile.mkdtemp(prefix="ftc-copy-")) / "object"
            try:
                self.put_file_checked(self.download_file(source, tmp), uri, sha256)
            finally:
                shutil.rmtree(tmp.parent, ignore_errors=True)
            return
        src_bucket, src_key = parse_s3_uri(source)
        bucket, key = parse_s3_uri(uri)
        meta = {SHA256_META: sha256}
        try:
            size = int(self.client.head_object(Bucket=src_bucket, Key=src_key)["ContentLength"])
            if size <= SINGLE_PUT_LIMIT:  # one CopyObject: the server computes the copy's full-object sha256
                self.client.copy_object(
                    CopySource={"Bucket": src_bucket, "Key": src_key}, Bucket=bucket, Key=key,
                    Metadata=meta, MetadataDirective="REPLACE", ChecksumAlgorithm="SHA256",
                )  # fmt: skip
            else:  # multipart copy (UploadPartCopy): the sha256 is kept as metadata only
                extra = {"Metadata": meta, "MetadataDirective": "REPLACE"}
                self.client.copy({"Bucket": src_bucket, "Key": src_key}, bucket, key, ExtraArgs=extra, Config=transfer_config())
        except Exception as err:
            raise StorageError(f"cannot copy {source} to {uri}: {_explain(err)}") from err
        stat = self.stat(uri)
        if stat is not None and stat.server_checked and stat.sha256 != sha256:
            self.client.delete_object(Bucket=bucket, Key=key)
            raise StorageError(f"cannot copy {source} to {uri}: its bytes differ from sha256 {sha256} (changed since?)")

    def list_stats(self, prefix: str) -> dict[str, tuple[int, str]]:
        """Every object below `prefix`/: name -> (size, identity), read from the listing alone. The identity
        changes whenever the object is rewritten: S3's ETag, a local file's size and mtime in nanoseconds."""
        if not is_s3(prefix):
            root = _local(prefix)
            out = {}
            for name in _files_under(root) if root.is_dir() else []:
                info = (root / name).stat()
                out[name] = (info.st_size, f"{info.st_size}:{info.st_mtime_ns}")
            return out
        bucket, key = parse_s3_uri(prefix)
        key = key.rstrip("/") + "/" if key.strip("/") else ""
        found: dict[str, tuple[int, str]] = {}
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
                for obj in page.get("Contents", []):
                    if obj["Key"][len(key) :]:
                        found[obj["Key"][len(key) :]] = (int(obj["Size"]), str(obj.get("ETag", "")).strip('"'))
        except Exception as err:
            raise StorageError(f"cannot list {prefix}: {_explain(err)}") from err
        return dict(sorted(found.items()))

    def write_bytes(self, uri: str, data: bytes) -> None:
        if is_s3(uri):
            bucket, key = parse_s3_uri(uri)
            try:
                self.client.put_object(Bucket=bucket, Key=key, Body=data)
            except Exception as err:
                raise StorageError(f"cannot write {uri}: {_explain(err)}") from err
        else:
            target = _local(uri)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".part")
            tmp.write_bytes(data)
            tmp.replace(target)

    def read_bytes(self, uri: str) -> bytes:
        if is_s3(uri):
            return self._with_body(uri, lambda body: body.read())
        source = _local(uri)
        if not source.is_file():
            raise StorageError(f"cannot read {uri}: no such file")
        return source.read_bytes()

    def write_text(self, uri: str, text: str) -> None:
        """Write `text` (UTF-8) with every credential of this process redacted (:func:`ftc_step.runtime.redact`):
        the one door of the text artefacts a step writes (scores.json, the report), so no key a message quoted
        (a metric's or the judge's error, a note) reaches them."""
        from .runtime import redact

        self.write_bytes(uri, redact(text).encode())

    def read_text(self, uri: str) -> str:
        return self.read_bytes(uri).decode()

    def exists(self, uri: str) -> bool:
        """Whether an object (or local file) exists at `uri`."""
        if not is_s3(uri):
            return _local(uri).is_file()
        bucket, key = parse_s3_uri(uri)
        try:
            self.client.head_object(Bucket=bucket, Key=key)
            return True
        except Exception as err:
            if _status(err) in (404, 403) or "Not Found" in str(err):
                return False
            raise StorageError(f"cannot check {uri}: {_explain(err)}") from err

    # ------------------------------------------------------------------ prefixes

    def list(self, prefix: str) -> list[str]:
        """Names (relative to `prefix`/) of every object below `prefix`, sorted."""
        if not is_s3(prefix):
            root = _local(prefix)
            return _files_under(root) if root.is_dir() else []
        bucket, key = parse_s3_uri(prefix)
        key = key.rstrip("/") + "/" if key.strip("/") else ""
        names: list[str] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
                names.extend(obj["Key"][len(key) :] for obj in page.get("Contents", []))
        except Exception as err:
            raise StorageError(f"cannot list {prefix}: {_explain(err)}") from err
        return sorted(n for n in names if n)

    def upload_dir(self, local_dir: str | os.PathLike[str], prefix: str) -> builtins.list[Entry]:
        """Upload every file below `local_dir` to `prefix`/NAME; returns their entries (no manifest)."""
        local_dir = Path(local_dir)
        entries = []
        for name in _files_under(local_dir):
            if name == MANIFEST_NAME:
                continue
            path = local_dir / name
            entries.append(Entry(name, sha256_file(path), path.stat().st_size))
            self.upload_file(path, join(prefix, name))
        return entries

    def download_prefix(self, prefix: str, local_dir: str | os.PathLike[str]) -> builtins.list[str]:
        """Download every object below `prefix` into `local_dir` (unverified); returns the names."""
        names = self.list(prefix)
        for name in names:
            self.download_file(join(prefix, name), Path(local_dir) / name)
        return names

    def delete_prefix(self, prefix: str) -> None:
        """Delete every object below `prefix` (the manifest first, so a partial delete reads as absent)."""
        names = self.list(prefix)
        names.sort(key=lambda n: n != MANIFEST_NAME)
        if not is_s3(prefix):
            for name in names:
                (_local(prefix) / name).unlink(missing_ok=True)
            return
        bucket, key = parse_s3_uri(join(prefix, ""))
        for name in names:
            self.client.delete_object(Bucket=bucket, Key=join(key, name) if key else name)

    # ------------------------------------------------------------------ manifests

    def write_manifest(
        self,
        prefix: str,
        files: Iterable[Entry] | Mapping[str, str | os.PathLike[str]],
        extra: Mapping[str, Any] | None = None,
    ) -> Manifest:
        """Write `prefix`/manifest.json listing `files` (entries, or {name: local path} hashed here).
        Call it LAST, after every listed object is written."""
        if isinstance(files, Mapping):
            entries = [Entry(name, sha256_file(path), Path(path).stat().st_size) for name, path in files.items()]
        else:
            entries = list(files)
        manifest = Manifest(
            uri=join(prefix, MANIFEST_NAME),
            files={e.name: e for e in entries},
            extra=dict(extra or {}),
            created=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        data = encode_manifest(manifest.to_json())
        manifest.sha256 = sha256_bytes(data)
        self.write_bytes(manifest.uri, data)
        return manifest

    def upload_tree(self, local_dir: str | os.PathLike[str], prefix: str, extra: Mapping[str, Any] | None = None) -> Manifest:
        """Upload every file below `local_dir`, then the manifest: a complete-or-absent upload."""
        return self.write_manifest(prefix, self.upload_dir(local_dir, prefix), extra)

    def read_manifest(self, prefix: str) -> Manifest | None:
        """The manifest at `prefix`/manifest.json, or None when there is none."""
        uri = join(prefix, MANIFEST_NAME)
        if not self.exists(uri):
            return None
        data = self.read_bytes(uri)
        try:
            doc = json.loads(data)
            files = {name: Entry(name, str(meta["sha256"]), int(meta.get("size", -1))) for name, meta in doc.pop("files").items()}
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise StorageError(f"{uri} is not a valid manifest: {err}") from err
        doc.pop("version", None)
        created = doc.pop("created", None)
        return Manifest(uri=uri, files=files, extra=doc, created=created, sha256=sha256_bytes(data))

    def download_verified(self, prefix: str, local_dir: str | os.PathLike[str]) -> Manifest:
        """Download exactly the objects the manifest at `prefix` lists into `local_dir`, checking each
        sha256. Raises StorageError when the manifest is missing or an object differs from it."""
        manifest = self.read_manifest(prefix)
        if manifest is None:
            raise StorageError(f"no {MANIFEST_NAME} under {prefix}: the upload is incomplete or absent")
        local_dir = Path(local_dir)
        for name, entry in sorted(manifest.files.items()):
            path = self.download_file(join(prefix, name), local_dir / name)
            digest = sha256_file(path)
            if digest != entry.sha256:
                path.unlink(missing_ok=True)
                raise StorageError(f"{join(prefix, name)}: sha256 {digest} differs from the manifest's {entry.sha256}")
        return manifest

    def read_verified(self, prefix: str, name: str, manifest: Manifest | None = None) -> bytes:
        """The bytes of `prefix`/`name`, which the manifest must list with the same sha256."""
        manifest = manifest or self.read_manifest(prefix)
        if manifest is None:
            raise StorageError(f"no {MANIFEST_NAME} under {prefix}: the upload is incomplete or absent")
        entry = manifest.files.get(name)
        if entry is None:
            raise StorageError(f"{manifest.uri} does not list {name!r}")
        data = self.read_bytes(join(prefix, name))
        if sha256_bytes(data) != entry.sha256:
            raise StorageError(f"{join(prefix, name)}: sha256 differs from the manifest's {entry.sha256}")
        return data


def _status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        code = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code is None:
            code = response.get("Error", {}).get("Code")
        try:
            return int(code)
        except (TypeError, ValueError):
            return None
    return None


def _explain(err: BaseException) -> str:
    status = _status(err)
    if status == 404 or "NoSuchKey" in str(err) or "Not Found" in str(err):
        return "no such object"
    if status == 403:
        return "access denied"
    if "NoSuchBucket" in str(err):
        return "no such bucket"
    return f"{type(err).__name__}: {err}"
