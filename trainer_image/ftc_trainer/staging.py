"""Staging: a base model named by Hugging Face hub id is copied once, by the prepare step (a CPU pod), into the
run's S3 prefix with a manifest; train and evaluate then read only that verified copy, offline.

The hub is whatever `HF_ENDPOINT` names (spec.hub.endpoint; huggingface.co by default), the token is
`HF_TOKEN` (from the Secret spec.hub.tokenSecretRef names). The revision is resolved to its commit sha first,
and every file is fetched at that sha, so a branch moving during the copy cannot mix two commits. Files go
one at a time (download, upload, delete), so the pod's scratch disk needs only the largest file. A copy whose
manifest records the same sha is reused (a retried prepare pays nothing twice).
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftc_api.steps import HUB_TOKEN_ENV
from ftc_step.errors import StepError, transient

log = logging.getLogger("ftc.trainer.staging")

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


@dataclass(frozen=True)
class Staged:
    """A staged base model: where the copy is, the commit it was taken at, its files and their total size."""

    uri: str
    revision: str
    files: int
    bytes: int
    reused: bool = False


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


def stage(repo: str, revision: str | None, dest: str, store: Any, workdir: Path) -> Staged:
    """Copy hub model `repo` at `revision` (default main) to `dest` (an S3 prefix) with a manifest; see module doc."""
    from ftc_step.storage import Entry, StorageError, sha256_file
    from huggingface_hub import HfApi, hf_hub_download

    endpoint = os.environ.get("HF_ENDPOINT") or None
    token = os.environ.get(HUB_TOKEN_ENV) or None
    try:
        info = HfApi(endpoint=endpoint, token=token or False).model_info(repo, revision=revision)
    except Exception as err:
        raise _refused(err, repo, revision, token) from err
    sha = info.sha
    if not sha:
        raise StepError(f"base model {repo}: the hub gave no commit sha for revision {revision or 'main'}")
    try:
        existing = store.read_manifest(dest)
    except StorageError:
        existing = None
    if existing is not None and existing.extra.get("revision") == sha:
        size = sum(e.size for e in existing.files.values())
        log.info("%s@%s already staged at %s", repo, sha, dest)
        return Staged(dest, sha, len(existing.files), size, reused=True)
    files = wanted_files([s.rfilename for s in info.siblings or []])
    if not any(f == "config.json" for f in files):
        raise StepError(f"base model {repo}@{sha}: the repository has no config.json (not a transformers model?)")
    scratch = workdir / "hub-stage"
    entries = []
    for name in files:
        try:
            local = Path(hf_hub_download(repo, name, revision=sha, endpoint=endpoint, token=token or False, local_dir=scratch))
        except Exception as err:
            raise _refused(err, repo, revision, token) from err
        entries.append(Entry(name, sha256_file(local), local.stat().st_size))
        try:
            store.upload_file(local, f"{dest.rstrip('/')}/{name}")
        except StorageError as err:
            raise StepError(f"cannot write the staged copy of {repo} to {dest}: {err}", retryable=True) from err
        local.unlink()  # one file on disk at a time
        log.info("staged %s/%s (%d bytes)", repo, name, entries[-1].size)
    extra = {"source": f"hf://{repo}", "revision": sha, "requestedRevision": revision or "main"}
    try:
        store.write_manifest(dest, entries, extra=extra)
    except StorageError as err:
        raise StepError(f"cannot write the manifest of {repo}'s staged copy: {err}", retryable=True) from err
    return Staged(dest, sha, len(entries), sum(e.size for e in entries))
