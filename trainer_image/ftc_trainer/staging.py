"""Staging: a base model named by Hugging Face hub id is copied once, by the prepare step (a CPU pod), into the
shared cache of the run's bucket, content-addressed by repository and resolved commit
(`CACHE_PREFIX/models/hf/ORG--NAME/COMMIT/`, :func:`ftc_api.names.shared_model_dir`), with a manifest written
last; train and evaluate then read only that verified copy, offline, and later comparisons of the same commit
reuse it without touching the hub's weights.

The hub is whatever `HF_ENDPOINT` names (spec.hub.endpoint; huggingface.co by default), the token is
`HF_TOKEN` (from the Secret spec.hub.tokenSecretRef names). The revision is resolved to its commit sha first
(with each file's size and, for LFS files, the hub's sha256), and every file is fetched at that sha, so a
branch moving during the copy cannot mix two commits.

- Pre-flight first: :func:`fetch_light` downloads only the files that are not weights (config.json, the
  tokenizer); prepare checks memory on them and refuses (or leaves out) a model that cannot fit before any
  weight moves.
- Files move in parallel, `FTC_STAGING_PARALLEL` (default 4) at a time, each download -> upload -> delete: the
  scratch disk holds at most that many files at once (bound: N x the largest file, and N shrinks so that this
  stays under `FTC_STAGING_SCRATCH_GIB`, default 16); memory stays at a few MB per transfer (bodies stream
  from disk).
- Resume inside a model: a file whose object is already in the destination with the same size and sha256 (S3's
  own ChecksumSHA256, or the sha256 metadata ftc writes beside it; :meth:`ftc_step.storage.Storage.stat`) is
  skipped: neither downloaded nor hashed again. LFS files are never hashed here: the hub's sha256 is stated on
  the upload and the S3 server checks the bytes against it (ChecksumSHA256; a server that keeps no checksums,
  such as moto, is trusted on the size alone). Small non-LFS files are hashed after download.
- A copy whose manifest records the same commit is reused as it is.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ftc_api import names
from ftc_api.steps import HUB_TOKEN_ENV
from ftc_step.errors import StepError, transient

if TYPE_CHECKING:
    from ftc_step.storage import ObjectStat

log = logging.getLogger("ftc.trainer.staging")
T = TypeVar("T")
R = TypeVar("R")

# What a transformers model needs: config, tokenizer, weights. Other weight formats and extras are skipped.
SKIPPED = ("*.gguf", "*.onnx", "*.onnx_data", "*.msgpack", "*.h5", "*.tflite", "*.ot", "*.mlmodel", "onnx/*", "original/*")
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
TOKEN_HINT = (
    "create a Secret with a Hugging Face token that has access (kubectl create secret generic hf-token "
    "--from-literal=token=hf_...) and name it in spec.hub.tokenSecretRef"
)


def is_hub_id(source: str) -> bool:
    """Whether `source` names a hub repository (org/name or name), not an s3:// prefix or a local path."""
    from ftc_step.storage import is_s3

    from .models import looks_like_path

    return not is_s3(source) and not looks_like_path(source) and bool(HUB_ID.match(source))


def wanted_files(names: list[str]) -> list[str]:
    """The repository's files a transformers model needs (safetensors preferred over .bin / .pt weights)."""
    keep = [n for n in names if not any(fnmatch.fnmatch(n, p) for p in SKIPPED)]
    if any(n.endswith(".safetensors") for n in keep):
        keep = [n for n in keep if not n.endswith((".bin", ".pt", ".pth")) or "tokenizer" in n]
    return sorted(keep)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
PARALLEL_ENV = "FTC_STAGING_PARALLEL"
DEFAULT_PARALLEL = 4
SCRATCH_ENV = "FTC_STAGING_SCRATCH_GIB"
DEFAULT_SCRATCH_GIB = 16


def is_weight(name: str) -> bool:
    """Whether a repository file holds weights (moved only after the pre-flight passed)."""
    return name.endswith(WEIGHT_SUFFIXES) and "tokenizer" not in name


@dataclass(frozen=True)
class HubFile:
    """One file of a resolved hub repository: its size and the hub's sha256 (LFS files only; None otherwise)."""

    name: str
    size: int | None
    sha256: str | None


@dataclass(frozen=True)
class HubModel:
    """A hub repository resolved to one commit, and the files a transformers model needs at that commit."""

    repo: str
    sha: str
    requested: str | None
    files: tuple[HubFile, ...]

    @property
    def light(self) -> list[HubFile]:
        return [f for f in self.files if not is_weight(f.name)]


@dataclass(frozen=True)
class Staged:
    """A staged base model: where the copy is, the commit it was taken at (hub) or its content sha256 (s3:// or
    path source), its files and their total size; `moved`: files copied by this call, `skipped`: files already in
    place (a resumed copy)."""

    uri: str
    revision: str
    files: int
    bytes: int
    reused: bool = False
    moved: int = 0
    skipped: int = 0
    read_bytes: int = 0  # source bytes read to be hashed (an s3:// or path source whose sha256s were not known)
    copied_bytes: int = 0  # bytes written into the shared copy by this call


def files_to_move(files: Sequence[HubFile], present: Mapping[str, ObjectStat | None]) -> list[HubFile]:
    """Pure: the files whose destination object does not already hold them (same size and sha256); a file
    whose sha256 is not known yet is always moved."""
    out = []
    for f in files:
        stat = present.get(f.name)
        if stat is None or f.size is None or not stat.holds(f.size, f.sha256):
            out.append(f)
    return out


def in_parallel(work: Callable[[T], R], items: Sequence[T], parallel: int, done: Callable[[R], None] | None = None) -> list[R]:
    """`work` on every item, `parallel` at a time, results in the items' order; `done` is called (in this
    thread) as each finishes. On the first failure the items not started yet are cancelled (those in flight
    finish: a retry finds them in place) and that error is raised."""
    with ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="ftc-stage") as pool:
        futures = [pool.submit(work, item) for item in items]
        for future in as_completed(futures):
            if future.exception() is not None:
                for other in futures:
                    other.cancel()
                break
            if done is not None:
                done(future.result())
    errors = [fut.exception() for fut in futures if not fut.cancelled() and fut.exception() is not None]
    if errors:
        raise errors[0]  # type: ignore[misc]
    return [fut.result() for fut in futures]


def parallelism(largest: int) -> int:
    """Files in flight at once: $FTC_STAGING_PARALLEL (default 4), fewer when that many of the largest file
    would not fit the scratch budget $FTC_STAGING_SCRATCH_GIB (default 16 GiB, inside prepare's default /tmp
    limit of 20Gi beside the dataset); at least one."""
    wanted = int(_positive(PARALLEL_ENV, str(DEFAULT_PARALLEL), int))
    budget = _positive(SCRATCH_ENV, str(DEFAULT_SCRATCH_GIB), float) * 2**30
    return max(1, min(wanted, int(budget // max(largest, 1))))


def _positive(env: str, default: str, kind: type[int] | type[float]) -> float:
    raw = os.environ.get(env) or default
    try:
        value = kind(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise StepError(f"{env}={raw!r}: expected a positive number")
    return value


def _refused(err: Exception, repo: str, revision: str | None, token: str | None) -> StepError:
    """A clear StepError for a hub refusal (bad input, exit 2) or a transient failure (retried)."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, RevisionNotFoundError):
        return StepError(f"base model {repo}: revision {revision!r} not found on the hub")
    if isinstance(err, GatedRepoError) or (isinstance(err, RepositoryNotFoundError) and status in (401, 403)):
        if token:
            return StepError(
                f"base model {repo} is gated or private and the hub refused the token from spec.hub.tokenSecretRef "
                f"(HTTP {status}): does that token have access to {repo}?"
            )
        return StepError(f"base model {repo} is gated or private and no token was given: {TOKEN_HINT}")
    if type(err).__name__ == "OfflineModeIsEnabled":
        return StepError(f"base model {repo} is a hub id but HF_HUB_OFFLINE is set in the prepare pod: it cannot be staged")
    if isinstance(err, RepositoryNotFoundError):
        return StepError(f"base model {repo} not found on the hub ({os.environ.get('HF_ENDPOINT') or 'huggingface.co'})")
    return StepError(f"cannot stage base model {repo} from the hub: {type(err).__name__}: {err}", retryable=transient(err))


def _hub() -> tuple[str | None, str | None]:
    return os.environ.get("HF_ENDPOINT") or None, os.environ.get(HUB_TOKEN_ENV) or None


def resolve(repo: str, revision: str | None) -> HubModel:
    """Resolve `repo` at `revision` (default main) to its commit, with each wanted file's size and LFS sha256
    (one API call, no file downloaded)."""
    from huggingface_hub import HfApi

    endpoint, token = _hub()
    try:
        info = HfApi(endpoint=endpoint, token=token or False).model_info(repo, revision=revision, files_metadata=True)
    except Exception as err:
        raise _refused(err, repo, revision, token) from err
    sha = info.sha
    if not sha:
        raise StepError(f"base model {repo}: the hub gave no commit sha for revision {revision or 'main'}")
    siblings = {s.rfilename: s for s in info.siblings or []}
    names = wanted_files(list(siblings))
    if "config.json" not in names:
        raise StepError(f"base model {repo}@{sha}: the repository has no config.json (not a transformers model?)")
    files = []
    for name in names:
        sibling = siblings[name]
        lfs = sibling.lfs
        files.append(HubFile(name, sibling.size, lfs.sha256 if lfs is not None else None))
    return HubModel(repo, sha, revision, tuple(files))


def _download(model: HubModel, name: str, scratch: Path) -> Path:
    from huggingface_hub import hf_hub_download

    endpoint, token = _hub()
    try:
        return Path(
            hf_hub_download(model.repo, name, revision=model.sha, endpoint=endpoint, token=token or False, local_dir=scratch)
        )
    except Exception as err:
        raise _refused(err, model.repo, model.requested, token) from err


def fetch_light(model: HubModel, workdir: Path) -> Path:
    """Download the files that are not weights (config.json, tokenizer, ...) into a local directory for the
    pre-flight check; staging uploads them from there later (no second download)."""
    target = workdir / "hub" / model.repo.replace("/", "--") / model.sha
    for f in model.light:
        if not (target / f.name).is_file():
            _download(model, f.name, target)
    return target


def check_access(model: HubModel) -> None:
    """Whether this pod's token may read the repository's files (one HEAD of config.json, nothing downloaded):
    a shared copy made with someone else's token is not handed to a comparison whose token the hub refuses."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    endpoint, token = _hub()
    try:
        get_hf_file_metadata(hf_hub_url(model.repo, "config.json", revision=model.sha, endpoint=endpoint), token=token or False)
    except Exception as err:
        raise _refused(err, model.repo, model.requested, token) from err


def reuse(model: HubModel, dest: str, store: Any) -> Staged | None:
    """The complete copy at `dest` (its manifest records this commit and lists every wanted file), or None."""
    from ftc_step.storage import StorageError

    try:
        existing = store.read_manifest(dest)
    except StorageError:
        return None
    if existing is None or existing.extra.get("revision") != model.sha:
        return None
    if not {f.name for f in model.files} <= set(existing.files):
        return None
    size = sum(e.size for e in existing.files.values())
    return Staged(dest, model.sha, len(existing.files), size, reused=True)


def stage(model: HubModel, dest: str, store: Any, workdir: Path, light: Path | None = None) -> Staged:
    """Copy `model` to `dest` (an s3:// prefix) with a manifest, resuming a partial copy; see the module doc.
    `light`: the directory :func:`fetch_light` filled (its files are uploaded from there)."""
    from ftc_step.storage import Entry, StorageError, join, sha256_file

    done = reuse(model, dest, store)
    if done is not None:
        log.info("%s@%s already staged at %s", model.repo, model.sha, dest)
        return done
    light = light or fetch_light(model, workdir)
    # The small files' sha256 is known once they are here; the weights' from the hub (LFS).
    files = [
        HubFile(f.name, (light / f.name).stat().st_size, sha256_file(light / f.name)) if not is_weight(f.name) else f
        for f in model.files
    ]
    try:
        present = {f.name: store.stat(join(dest, f.name)) for f in files}
    except StorageError as err:
        raise StepError(f"cannot read the staged copy of {model.repo} at {dest}: {err}", retryable=True) from err
    moving = files_to_move(files, present)
    entries = {f.name: Entry(f.name, f.sha256 or "", f.size or 0) for f in files if f not in moving}
    scratch = workdir / "hub-stage" / model.sha

    def move(f: HubFile) -> Entry:
        local = light / f.name if not is_weight(f.name) else _download(model, f.name, scratch)
        try:
            sha = f.sha256 or sha256_file(local)  # hashed here only when the hub gave no sha256 (not LFS)
            store.put_file_checked(local, join(dest, f.name), sha)
            entry = Entry(f.name, sha, local.stat().st_size)
        except StorageError as err:
            raise StepError(f"cannot write the staged copy of {model.repo} to {dest}: {err}", retryable=True) from err
        finally:
            if is_weight(f.name):
                local.unlink(missing_ok=True)  # at most `parallel` weight files on disk at once
        log.info("staged %s/%s (%d bytes)", model.repo, f.name, entry.size)
        return entry

    parallel = parallelism(max((f.size or 0 for f in moving), default=0))
    log.info(
        "staging %s@%s: %d files to move, %d already in place, %d at a time",
        model.repo,
        model.sha,
        len(moving),
        len(entries),
        parallel,
    )
    for entry in in_parallel(move, moving, parallel):
        entries[entry.name] = entry
    extra = {"source": f"hf://{model.repo}", "revision": model.sha, "requestedRevision": model.requested or "main"}
    try:
        store.write_manifest(dest, list(entries.values()), extra=extra)  # last: the copy is complete
    except StorageError as err:
        raise StepError(f"cannot write the manifest of {model.repo}'s staged copy: {err}", retryable=True) from err
    size = sum(e.size for e in entries.values())
    copied = sum(f.size or 0 for f in moving)
    return Staged(dest, model.sha, len(entries), size, moved=len(moving), skipped=len(files) - len(moving), copied_bytes=copied)


# ---------------------------------------------------------------------------------- s3:// and path sources


@dataclass(frozen=True)
class SourceFile:
    """One file of a base model given as an s3:// prefix or a path: its size, its identity at the source (S3's
    ETag, a local file's size:mtime_ns: it changes whenever the file is rewritten) and its sha256 once known."""

    name: str
    size: int
    identity: str
    sha256: str | None = None


def known_hashes(files: Sequence[SourceFile], index: Mapping[str, Any]) -> list[SourceFile]:
    """Pure: `files`, each with the sha256 the source index recorded for the same identity and size (an
    unchanged file is not read again to be hashed); a file whose identity changed keeps what it had."""
    out = []
    for f in files:
        seen = index.get(f.name)
        if (
            f.sha256 is None
            and isinstance(seen, Mapping)
            and seen.get("identity") == f.identity
            and seen.get("size") == f.size
            and seen.get("sha256")
        ):
            f = replace(f, sha256=str(seen["sha256"]))
        out.append(f)
    return out


def content_sha256(files: Sequence[SourceFile]) -> str:
    """Pure: the content hash (:attr:`ftc_step.storage.Manifest.content_sha256`) of the manifest that lists
    these files (names, sizes, sha256s) and nothing else: the staged copy's prefix
    (:func:`ftc_api.names.content_model_dir`) and its node cache key, the same whichever source it was read from."""
    from ftc_step.storage import Entry, Manifest

    missing = [f.name for f in files if not f.sha256]
    if missing:
        raise ValueError(f"content_sha256: no sha256 yet for {missing}")
    return Manifest("", {f.name: Entry(f.name, f.sha256 or "", f.size) for f in files}).content_sha256


def source_location(source: str) -> str:
    """Where staging reads `source`: the s3:// prefix, or the local path (file:// and ~ resolved)."""
    from ftc_step.storage import is_s3

    if is_s3(source):
        return source.rstrip("/")
    return str(Path(source.removeprefix("file://")).expanduser())


def list_source(source: str, store: Any) -> list[SourceFile]:
    """The files a transformers model needs under an s3:// prefix or a directory (:func:`wanted_files`, hidden
    files left out), with the sha256s the source's own ftc manifest gives (same size only). Bad input
    (nothing there, a file instead of a directory, no config.json) raises StepError naming the source."""
    from ftc_step.storage import MANIFEST_NAME, StorageError, is_s3

    where = source_location(source)
    kind = "prefix" if is_s3(where) else "directory"
    if not is_s3(where):
        path = Path(where)
        if not path.exists():
            raise StepError(f"base model {source!r} not found: no such file or directory")
        if not path.is_dir():
            raise StepError(f"base model {source!r} is a file: give the directory that holds config.json and the weights")
    try:
        stats = store.list_stats(where)
        manifest = store.read_manifest(where) if MANIFEST_NAME in stats else None
    except StorageError as err:
        raise StepError(f"cannot read base model {source}: {err}", retryable=transient(err)) from err
    visible = [n for n in stats if n != MANIFEST_NAME and not any(part.startswith(".") for part in n.split("/"))]
    wanted = wanted_files(visible)
    if not wanted:
        raise StepError(f"base model {source!r}: the {kind} is empty (no model files under it)")
    if "config.json" not in wanted:
        raise StepError(f"base model {source!r}: no config.json in the {kind} (not a transformers model directory?)")
    listed = manifest.files if manifest is not None else {}
    out = []
    for name in wanted:
        size, identity = stats[name]
        entry = listed.get(name)
        out.append(SourceFile(name, size, identity, entry.sha256 if entry is not None and entry.size == size else None))
    return out


def _read_index(store: Any, uri: str) -> dict[str, Any]:
    from ftc_step.storage import StorageError

    try:
        doc = json.loads(store.read_bytes(uri)) if store.exists(uri) else {}
    except (StorageError, ValueError) as err:
        log.warning("source index %s unreadable (%s): every file is hashed again", uri, err)
        return {}
    files = doc.get("files") if isinstance(doc, dict) else None
    return files if isinstance(files, dict) else {}


def _write_index(store: Any, uri: str, where: str, files: Sequence[SourceFile]) -> None:
    from ftc_step.storage import StorageError

    known = {f.name: {"identity": f.identity, "size": f.size, "sha256": f.sha256} for f in files if f.sha256}
    try:
        store.write_bytes(uri, json.dumps({"source": where, "files": known}, indent=1, sort_keys=True).encode())
    except StorageError as err:  # only a shortcut for the next staging: the copy itself goes on
        log.warning("cannot write the source index %s: %s", uri, err)


def hash_source(source: str, files: Sequence[SourceFile], store: Any, index_uri: str) -> tuple[list[SourceFile], int]:
    """Every file with its sha256, and the bytes read to get them: those the source index knows (same identity
    and size) or the S3 server keeps (a full-object ChecksumSHA256, or ftc's sha256 metadata) are not read;
    the rest are streamed through the hash, `FTC_STAGING_PARALLEL` at a time, the index rewritten after each
    (an interrupted staging does not hash a finished file again)."""
    from ftc_step.storage import StorageError, is_s3, join

    where = source_location(source)
    files = known_hashes(files, _read_index(store, index_uri))
    try:
        if is_s3(where):
            stats = {f.name: store.stat(join(where, f.name)) for f in files if f.sha256 is None}
            files = [
                replace(f, sha256=stat.sha256) if (stat := stats.get(f.name)) and stat.sha256 and stat.size == f.size else f
                for f in files
            ]
    except StorageError as err:
        raise StepError(f"cannot read base model {source}: {err}", retryable=transient(err)) from err
    by_name = {f.name: f for f in files}
    todo = [f for f in files if f.sha256 is None]

    def digest(f: SourceFile) -> SourceFile:
        try:
            return replace(f, sha256=store.sha256_of(join(where, f.name)))
        except StorageError as err:
            raise StepError(f"cannot read base model {source}: {err}", retryable=transient(err)) from err

    def record(f: SourceFile) -> None:
        by_name[f.name] = f
        _write_index(store, index_uri, where, list(by_name.values()))
        log.info("hashed %s/%s (%d bytes)", where, f.name, f.size)

    if todo:
        log.info("base model %s: hashing %d of %d files (%d bytes)", source, len(todo), len(files), sum(f.size for f in todo))
    in_parallel(digest, todo, parallelism(0), done=record)
    return [by_name[f.name] for f in files], sum(f.size for f in todo)


def stage_content(source: str, store: Any, cache_uri: Callable[[str], str]) -> Staged:
    """Stage a base model given as an s3:// prefix or a path into the shared cache, content-addressed
    (`cache_uri(models/sha256/SHA)`, SHA: :func:`content_sha256`), with a manifest written last that lists the
    files and nothing else (its content hash is SHA: the node cache's key). A copy of the same content that is
    complete is reused as it is (0 bytes read or written); a partial one is resumed (objects already there with
    the same size and sha256 are skipped). S3 to S3 copies stay inside the server; a path is uploaded with its
    sha256 stated (the server checks the bytes). The source is only read."""
    from ftc_step.storage import Entry, StorageError, join

    where = source_location(source)
    files, read = hash_source(source, list_source(source, store), store, cache_uri(names.source_index_key(where)))
    sha = content_sha256(files)
    dest = cache_uri(names.content_model_dir(sha))
    size = sum(f.size for f in files)
    try:
        existing = store.read_manifest(dest)
        if existing is not None and existing.content_sha256 == sha:
            log.info("base model %s: its content %s is already staged at %s", source, sha, dest)
            return Staged(dest, sha, len(files), size, reused=True, read_bytes=read)
        present = {f.name: store.stat(join(dest, f.name)) for f in files}
    except StorageError as err:
        raise StepError(f"cannot read the staged copy of {source} at {dest}: {err}", retryable=True) from err
    moving = files_to_move([HubFile(f.name, f.size, f.sha256) for f in files], present)
    by_name = {f.name: f for f in files}

    def copy(f: HubFile) -> str:
        try:
            store.copy_checked(join(where, f.name), join(dest, f.name), f.sha256 or "")
        except StorageError as err:
            raise StepError(f"cannot copy base model {source} to {dest}: {err}", retryable=transient(err)) from err
        log.info("staged %s/%s (%d bytes)", where, f.name, f.size or 0)
        return f.name

    log.info("staging %s as %s: %d files to copy, %d already in place", source, dest, len(moving), len(files) - len(moving))
    in_parallel(copy, moving, parallelism(0))
    entries = [Entry(f.name, f.sha256 or "", f.size) for f in by_name.values()]
    try:
        manifest = store.write_manifest(dest, entries)  # last: the copy is complete
    except StorageError as err:
        raise StepError(f"cannot write the manifest of {source}'s staged copy: {err}", retryable=True) from err
    if manifest.content_sha256 != sha:  # the prefix's name is the content of its manifest
        raise StepError(f"staging {source}: the manifest at {dest} hashes to {manifest.content_sha256}, not {sha}")
    copied = sum(f.size or 0 for f in moving)
    return Staged(
        dest, sha, len(files), size, moved=len(moving), skipped=len(files) - len(moving), read_bytes=read, copied_bytes=copied
    )
