"""A node-local cache of base models that the train and evaluate pods (and their retries) share.

Both images fetch a staged base model through :func:`cached_tree` (the trainer's ``fetch_model``, the
evaluator's ``base_model``), so a pod that replaces a killed one, a Job's retry, or the evaluate pod after
training on the same node read the weights from the cache, not from S3.

- **Where**: ``$FTC_MODEL_CACHE_DIR`` (the operator mounts the chart's ``config.modelCache`` volume there and
  sets it); without it, the caller's default (the pod's own /tmp: nothing survives the pod).
- **Key**: the staged copy's *content*: the manifest's ``content_sha256`` (the files and their sha256s, not
  its path nor its upload time), so the same weights staged under another prefix are one entry. A base model
  given as an s3:// prefix or a path is staged by prepare into ``CACHE_PREFIX/models/sha256/KEY/`` (its
  manifest lists only the files), so its entry bears the name of its copy, whichever source it came from; a
  manifest under such a prefix whose content is not KEY is refused (:func:`check_content_prefix`).
- **Verified**: every file is checked against the manifest's sha256 as it is downloaded; an entry becomes
  visible only complete (downloaded into ``.tmp-KEY-*`` then renamed to ``KEY``); a hit checks that the
  entry's recorded manifest is the one asked for and every file has the manifest's size.
- **Locks**: ``KEY.lock`` (``flock``): the downloader holds it exclusively, so two pods on one node never
  download the same model twice nor collide; a process that uses an entry holds it shared until it exits,
  so eviction never removes a model a live pod is loading. A pod killed mid-download leaves a ``.tmp-KEY-*``
  directory that the next holder of the lock removes (the kernel releases a dead process's locks).
- **Eviction**: least recently used entries not in use go first, when the new model does not fit under
  ``$FTC_MODEL_CACHE_MAX_BYTES`` (when set) or in the volume's free space (:func:`plan_eviction`, pure).
  Clearing it by hand: delete the PVC's files (``rm -rf /cache/models/*`` from any pod mounting it) or the PVC.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ftc_api.names import CONTENT_MODELS_DIR
from ftc_api.steps import MODEL_CACHE_DIR_ENV, MODEL_CACHE_MAX_BYTES_ENV

from .storage import Manifest, StorageError

__all__ = [
    "CACHE_DIR_ENV",
    "CACHE_MAX_BYTES_ENV",
    "CachedTree",
    "Entry",
    "cache_key",
    "cache_root",
    "cached_tree",
    "check_content_prefix",
    "plan_eviction",
]

log = logging.getLogger("ftc.model_cache")

CACHE_DIR_ENV = MODEL_CACHE_DIR_ENV
CACHE_MAX_BYTES_ENV = MODEL_CACHE_MAX_BYTES_ENV
RECORD = ".ftc-manifest.json"  # the manifest an entry was downloaded from, written last before the rename
TMP_PREFIX = ".tmp-"
WAIT_SECONDS = 1.0  # how often a pod waiting for another pod's download looks again

_held: dict[str, IO[bytes]] = {}  # lock files of the entries this process uses, held (shared) until it exits


@dataclass(frozen=True)
class CachedTree:
    path: Path
    hit: bool  # True: nothing was read from S3
    downloaded_bytes: int


@dataclass(frozen=True)
class Entry:
    key: str
    size: int
    last_used: float


def cache_key(manifest: Manifest) -> str:
    """The cache key of a staged copy: its manifest's content hash (files and sha256s), not where it is."""
    return manifest.content_sha256


def check_content_prefix(prefix: str, manifest: Manifest) -> None:
    """A content-addressed copy (``.../models/sha256/SHA``, SHA 64 hex digits) must hold the manifest whose
    content hash is SHA: anything else (a manifest rewritten in place) raises StorageError naming both."""
    marker = f"/{CONTENT_MODELS_DIR}/"
    head, found, name = prefix.rstrip("/").rpartition(marker)
    if found and head and len(name) == 64 and set(name) <= set("0123456789abcdef") and name != cache_key(manifest):
        raise StorageError(f"{prefix}: its manifest's content is {cache_key(manifest)}, not the {name} its name says")


def cache_root(default: str | os.PathLike[str]) -> Path:
    """``$FTC_MODEL_CACHE_DIR`` when set (the shared volume), else `default`."""
    return Path(os.environ.get(CACHE_DIR_ENV) or default)


def max_bytes_from_env() -> int | None:
    text = os.environ.get(CACHE_MAX_BYTES_ENV, "").strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{CACHE_MAX_BYTES_ENV}={text!r} is not a number of bytes") from None
    return value if value > 0 else None


def manifest_bytes(manifest: Manifest) -> int:
    return sum(max(e.size, 0) for e in manifest.files.values())


def plan_eviction(entries: list[Entry], need: int, keep: str, max_bytes: int | None, free_bytes: int | None) -> list[str]:
    """The keys to remove, least recently used first, so that `need` more bytes fit: under `max_bytes`
    (the cache's bound, when set) and in `free_bytes` (the volume's free space, when known). `keep` (the
    entry being fetched) is never removed. When even removing everything else is not enough, everything
    else is removed (the download then fails on a full volume with the filesystem's own error)."""
    others = sorted((e for e in entries if e.key != keep), key=lambda e: (e.last_used, e.key))
    used = sum(e.size for e in entries if e.key != keep)
    out: list[str] = []
    freed = 0
    for entry in others:
        over_bound = max_bytes is not None and used - freed + need > max_bytes
        over_disk = free_bytes is not None and free_bytes + freed < need
        if not (over_bound or over_disk):
            break
        out.append(entry.key)
        freed += entry.size
    return out


def _tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _entries(root: Path) -> list[Entry]:
    out = []
    for path in root.iterdir():
        if path.is_dir() and not path.name.startswith("."):
            out.append(Entry(path.name, _tree_size(path), path.stat().st_mtime))
    return out


def _complete(entry: Path, manifest: Manifest) -> bool:
    """The entry holds what `manifest` lists (recorded manifest content and every file's size)."""
    try:
        record = json.loads((entry / RECORD).read_text())
    except (OSError, ValueError):
        return False
    if record.get("contentSha256") != manifest.content_sha256:
        return False
    for name, meta in manifest.files.items():
        path = entry / name
        if not path.is_file() or (meta.size >= 0 and path.stat().st_size != meta.size):
            return False
    return True


def _lock(path: Path, mode: int) -> IO[bytes]:
    handle = open(path, "a+b")  # noqa: SIM115 - held past this function (see _held)
    try:
        fcntl.flock(handle, mode)
    except BaseException:
        handle.close()
        raise
    return handle


def _try_lock(path: Path) -> IO[bytes] | None:
    try:
        return _lock(path, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return None


def _evict(root: Path, key: str, need: int) -> None:
    try:
        free: int | None = shutil.disk_usage(root).free
    except OSError:
        free = None
    for victim in plan_eviction(_entries(root), need, key, max_bytes_from_env(), free):
        handle = _try_lock(root / f"{victim}.lock")
        if handle is None:
            log.info("model cache: %s is in use, not evicted", victim)
            continue
        try:
            shutil.rmtree(root / victim, ignore_errors=True)
            log.info("model cache: evicted %s (least recently used)", victim)
        finally:
            handle.close()


def _keep_shared(key: str, handle: IO[bytes]) -> None:
    """Hold `key`'s lock shared for the rest of this process (eviction skips entries in use)."""
    fcntl.flock(handle, fcntl.LOCK_SH)
    old = _held.pop(key, None)
    _held[key] = handle
    if old is not None:
        old.close()


def cached_tree(store: Any, prefix: str, manifest: Manifest, root: str | os.PathLike[str]) -> CachedTree:
    """The local directory holding the staged copy at `prefix` (described by `manifest`) under the cache
    `root`: from the cache when a complete entry is there, else downloaded (each file verified against the
    manifest) into a temporary directory renamed into place under the entry's exclusive lock."""
    check_content_prefix(prefix, manifest)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    key = cache_key(manifest)
    entry, lock_path = root / key, root / f"{key}.lock"
    handle = _lock(lock_path, fcntl.LOCK_SH)  # waits only while another pod downloads (holds it exclusive)
    waiting = False
    while True:
        if _complete(entry, manifest):
            os.utime(entry)  # last use, for eviction
            _keep_shared(key, handle)
            log.info("base model %s: model cache hit %s (0 bytes from S3)", prefix, entry)
            return CachedTree(entry, True, 0)
        handle.close()
        # One downloader per entry. Never block for the exclusive lock: pods using an entry hold it shared for
        # their lifetime, so a blocking request would wait for them to exit; take the shared lock again instead
        # (it waits only while a download runs) and look at the entry once more.
        exclusive = _try_lock(lock_path)
        if exclusive is not None:
            handle = exclusive
            break
        if not waiting:
            log.info("base model %s: another pod holds the model cache entry %s; waiting for it", prefix, entry)
            waiting = True
        time.sleep(WAIT_SECONDS)
        handle = _lock(lock_path, fcntl.LOCK_SH)
    try:
        if _complete(entry, manifest):  # another pod downloaded it while this one waited
            os.utime(entry)
            _keep_shared(key, handle)
            log.info("base model %s: model cache hit %s after waiting (0 bytes from S3)", prefix, entry)
            return CachedTree(entry, True, 0)
        for stale in root.glob(f"{TMP_PREFIX}{key}-*"):  # left by a pod killed mid-download
            shutil.rmtree(stale, ignore_errors=True)
        need = manifest_bytes(manifest)
        _evict(root, key, need)
        tmp = root / f"{TMP_PREFIX}{key}-{uuid.uuid4().hex[:8]}"
        started = time.monotonic()
        got = store.download_verified(prefix, tmp)
        if got.content_sha256 != manifest.content_sha256:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StorageError(f"{prefix}: the manifest changed while it was downloaded; try again")
        (tmp / RECORD).write_text(json.dumps({"uri": prefix, "contentSha256": manifest.content_sha256}))
        if entry.exists():
            shutil.rmtree(entry)  # an incomplete or damaged entry
        os.rename(tmp, entry)
        log.info(
            "base model %s: model cache miss, downloaded %d bytes into %s in %.1f s",
            prefix,
            need,
            entry,
            time.monotonic() - started,
        )
        _keep_shared(key, handle)
        return CachedTree(entry, False, need)
    except BaseException:
        handle.close()
        raise
