"""Deterministic names that fit Kubernetes limits, and the run's S3 layout."""

from __future__ import annotations

import hashlib
import re

MAX_NAME = 63  # DNS-1123 label: Job, ConfigMap and label-value limit


def fit(name: str, limit: int = MAX_NAME) -> str:
    """`name` when it is already a DNS label within `limit`; else its cleaned head and an 8-hex hash of the
    original (deterministic, and unique: `a.b` and `a-b` differ, as do two long names with one head)."""
    clean = re.sub(r"[^a-z0-9-]", "-", name.lower()).strip("-") or "x"
    if clean == name and len(clean) <= limit:
        return clean
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    head = clean[: limit - len(digest) - 1].rstrip("-")
    return f"{head}-{digest}"


def step_name(comparison: str, step: str, model: str | None = None, key: str | None = None) -> str:
    """Name of a step's Job and ConfigMap: COMPARISON-STEP[-MODEL][-KEY], fitted to 63 characters. `key` (a short
    lowercase hex hash of the settings the step depends on: generate and score Jobs) is always kept whole at the
    end, so a change of those settings gives a new name however long the rest is."""
    head = "-".join(p for p in (comparison, step, model) if p)
    if not key:
        return fit(head)
    if not re.fullmatch(r"[0-9a-f]{1,16}", key):
        raise ValueError(f"step_name: key {key!r} is not 1 to 16 lowercase hex digits")
    return f"{fit(head, MAX_NAME - len(key) - 1)}-{key}"


def run_id(name: str, uid: str) -> str:
    """NAME-UID8: a run's folder, unique even when a comparison is deleted and re-created."""
    return f"{name}-{uid.replace('-', '')[:8]}"


def run_prefix(prefix: str, namespace: str, name: str, uid: str) -> str:
    """The run's key prefix: PREFIX/NAMESPACE/NAME-UID8 (no leading or trailing slash)."""
    return "/".join(p.strip("/") for p in (prefix, namespace, run_id(name, uid)) if p.strip("/"))


# Keys under a run prefix (DESIGN.md: the S3 layout).
DATA_SPLITS = ("train", "eval", "test")


def data_key(split: str) -> str:
    return f"data/{split}.jsonl"


DATA_MANIFEST = "data/manifest.json"


def model_dir(model: str) -> str:
    return f"models/{model}"


def adapter_dir(model: str, best: bool = False) -> str:
    return f"models/{model}/adapter-best" if best else f"models/{model}/adapter"


# The shared prefix (in each comparison's spec.storage bucket) where base models are staged, content-addressed,
# for every comparison that uses that bucket (the operator's config.cachePrefix).
DEFAULT_CACHE_PREFIX = "ftc-cache"
SHARED_MODELS_DIR = "models"
_COMMIT = re.compile(r"^[0-9a-f]{40}$|^[0-9a-f]{64}$")


def shared_model_dir(repo: str, commit: str) -> str:
    """models/hf/ORG--NAME/SHA: a hub model's staged copy under the shared cache prefix, keyed by the resolved
    commit `sha` (never a branch name), so one commit is copied once for every comparison."""
    if not _COMMIT.match(commit):
        raise ValueError(f"shared_model_dir: {commit!r} is not a resolved commit sha")
    return f"{SHARED_MODELS_DIR}/hf/{repo.replace('/', '--')}/{commit}"


_CONTENT = re.compile(r"^[0-9a-f]{64}$")
CONTENT_MODELS_DIR = f"{SHARED_MODELS_DIR}/sha256"
SOURCE_INDEX_DIR = f"{SHARED_MODELS_DIR}/sources"


def content_model_dir(content_sha256: str) -> str:
    """models/sha256/SHA: the staged copy of a base model given as an s3:// prefix or a path, keyed by its
    manifest's content hash (files, sizes, sha256s; the node cache's key too), so the same weights are copied
    once for every comparison, wherever they were read from."""
    if not _CONTENT.match(content_sha256):
        raise ValueError(f"content_model_dir: {content_sha256!r} is not a sha256 (64 lowercase hex digits)")
    return f"{CONTENT_MODELS_DIR}/{content_sha256}"


def source_index_key(source: str) -> str:
    """models/sources/H.json: what staging learned of an s3:// or path source (each file's identity, size and
    sha256), so an unchanged file is not read again to be hashed; H hashes the source as written."""
    return f"{SOURCE_INDEX_DIR}/{hashlib.sha256(source.rstrip('/').encode()).hexdigest()[:32]}.json"


def checkpoints_dir(model: str) -> str:
    return f"models/{model}/checkpoints"


def metrics_key(model: str) -> str:
    return f"models/{model}/metrics.json"


def predictions_key(model: str) -> str:
    return f"eval/{model}/predictions.jsonl"


SCORES_KEY = "eval/scores.json"
ENDPOINTS_KEY = "data/endpoints.json"  # prepare's preflight of the evaluation endpoints (the mode RAGAS runs in)
REPORT_KEY = "report/index.html"
JUDGE_CACHE_DIR = "eval/judge-cache"
