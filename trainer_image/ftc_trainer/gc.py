"""`python -m ftc_trainer.gc`: garbage collection of the shared model copies and of old checkpoints.

Shared copies (CACHE_PREFIX/models/hf/ORG--NAME/COMMIT/ for hub models, CACHE_PREFIX/models/sha256/SHA/ for
base models given as an s3:// prefix or a path, staged by prepare for every comparison of a bucket) are deleted
when no FineTuneComparison that still exists references them: none has it as status.models[].stagedBaseModel,
none names that repository (for a content-addressed copy: any s3:// or path base) while its prepare has not
recorded a copy yet (a copy being made), and its newest object is older than --min-age-hours (a prepare that
started after the listing of comparisons was taken). Checkpoints (RUN/models/MODEL/checkpoints/step-N/) of a model whose
training succeeded (phase Trained) are pruned to the newest --keep-checkpoints; the adapters are never touched.

The live comparisons come from the cluster as `kubectl get ftc -A -o json` prints them (a file or `-` for
stdin); the S3 credentials from the usual AWS_* variables. Run it where both are at hand, for example:

    kubectl get ftc -A -o json > live.json
    python -m ftc_trainer.gc --comparisons live.json --cache s3://BUCKET/ftc-cache --dry-run

:func:`plan_gc` decides, purely; `main` lists, plans and deletes (the manifest first, so a copy cut short
reads as absent and is staged again).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from ftc_api import names

from .models import looks_like_path

log = logging.getLogger("ftc.gc")
TRAINED = "Trained"
# The "repository" of every content-addressed copy (CACHE_PREFIX/models/sha256/SHA: a base model given as an s3://
# prefix or a path): while any comparison names such a base with no copy recorded yet, none of them is deleted.
CONTENT = "s3-or-path"


@dataclass(frozen=True)
class Live:
    """What the comparisons that exist still need."""

    staged: frozenset[str] = frozenset()  # shared copies (s3:// prefixes) recorded in a status
    staging: frozenset[str] = frozenset()  # hub repos (or CONTENT) named by a comparison with no copy recorded yet
    trained: frozenset[str] = frozenset()  # checkpoints/ prefixes of models whose training succeeded


@dataclass(frozen=True)
class Listing:
    """What storage holds: each shared copy's prefix (with its repo and newest object's time) and each
    checkpoints/ prefix with the steps under it."""

    copies: Mapping[str, tuple[str, datetime]] = field(default_factory=dict)  # prefix -> (repo, newest)
    checkpoints: Mapping[str, Iterable[int]] = field(default_factory=dict)  # checkpoints prefix -> steps


def plan_gc(listing: Listing, live: Live, now: datetime, keep_checkpoints: int, min_age: timedelta) -> list[str]:
    """Pure: the prefixes to delete, sorted. See the module doc for the rules."""
    doomed = []
    for prefix, (repo, newest) in listing.copies.items():
        if prefix in live.staged or repo in live.staging or now - newest < min_age:
            continue
        doomed.append(prefix)
    for prefix, steps in listing.checkpoints.items():
        if prefix not in live.trained:
            continue
        for step in sorted(steps, reverse=True)[keep_checkpoints:]:
            doomed.append(f"{prefix}/step-{step}")
    return sorted(doomed)


def live_from_kubectl(doc: Mapping[str, Any]) -> Live:
    """The references in `kubectl get ftc -A -o json` (a List, or one object)."""
    items = doc.get("items", [doc]) if isinstance(doc, Mapping) else []
    staged, staging, trained = set(), set(), set()
    for item in items:
        meta, spec, status = item.get("metadata", {}), item.get("spec", {}), item.get("status") or {}
        storage = spec.get("storage", {})
        run = names.run_prefix(storage.get("prefix", "ftc"), meta.get("namespace", ""), meta.get("name", ""), meta.get("uid", ""))
        recorded = {m.get("name"): m for m in status.get("models") or []}
        for model in spec.get("models", []):
            ms = recorded.get(model.get("name"), {})
            base = str(model.get("baseModel", ""))
            if ms.get("stagedBaseModel"):
                staged.add(str(ms["stagedBaseModel"]).rstrip("/"))
            elif base.startswith("s3://") or looks_like_path(base):
                staging.add(CONTENT)  # its content (hence its copy's name) is known only once prepare hashed it
            else:
                staging.add(base)
            if ms.get("phase") == TRAINED:
                trained.add(f"s3://{storage.get('bucket')}/{run}/{names.checkpoints_dir(model.get('name', ''))}")
    return Live(frozenset(staged), frozenset(staging), frozenset(trained))


def list_storage(store: Any, caches: Iterable[str], checkpoints: Iterable[str]) -> Listing:
    """List the shared copies under each cache prefix and the steps under each checkpoints/ prefix."""
    from ftc_step.storage import parse_s3_uri

    copies: dict[str, tuple[str, datetime]] = {}
    for cache in caches:
        for sub, depth in ((f"{names.SHARED_MODELS_DIR}/hf", 2), (names.CONTENT_MODELS_DIR, 1)):
            root = f"{cache.rstrip('/')}/{sub}"
            bucket, key = parse_s3_uri(root + "/")
            for page in store.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
                for obj in page.get("Contents", []):
                    parts = obj["Key"][len(key) :].split("/")
                    if len(parts) <= depth:
                        continue
                    prefix = "/".join([root, *parts[:depth]])
                    repo = parts[0].replace("--", "/", 1) if depth == 2 else CONTENT
                    newest = copies.get(prefix, (repo, obj["LastModified"]))[1]
                    copies[prefix] = (repo, max(newest, obj["LastModified"]))
    steps: dict[str, list[int]] = {}
    for prefix in checkpoints:
        found = {n.split("/", 1)[0] for n in store.list(prefix)}
        steps[prefix] = sorted(int(n[5:]) for n in found if n.startswith("step-") and n[5:].isdigit())
    return Listing(copies, steps)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ftc_trainer.gc", description=__doc__.split("\n\n")[0])
    p.add_argument("--comparisons", required=True, help="`kubectl get ftc -A -o json` output: a file, or - for stdin")
    p.add_argument("--cache", action="append", default=[], help="a shared cache prefix, s3://BUCKET/ftc-cache (repeatable)")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (default: AWS)")
    p.add_argument("--keep-checkpoints", type=int, default=1, help="checkpoints kept per trained model (default 1)")
    p.add_argument("--min-age-hours", type=float, default=1.0, help="never delete a copy written more recently (default 1)")
    p.add_argument("--dry-run", action="store_true", help="print what would be deleted, delete nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.keep_checkpoints < 0:
        raise SystemExit("--keep-checkpoints must be 0 or more")
    from ftc_step.storage import Storage

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    text = sys.stdin.read() if args.comparisons == "-" else Path(args.comparisons).read_text()
    try:
        live = live_from_kubectl(json.loads(text))
    except (ValueError, AttributeError) as err:
        raise SystemExit(f"--comparisons: not the JSON `kubectl get ftc -A -o json` prints: {err}") from err
    store = Storage(endpoint_url=args.endpoint_url)
    listing = list_storage(store, args.cache, sorted(live.trained))
    doomed = plan_gc(listing, live, datetime.now(UTC), args.keep_checkpoints, timedelta(hours=args.min_age_hours))
    for prefix in doomed:
        print(("would delete " if args.dry_run else "deleting ") + prefix)
        if not args.dry_run:
            store.delete_prefix(prefix)
    print(f"{len(doomed)} prefixes {'to delete' if args.dry_run else 'deleted'}; {len(listing.copies)} shared copies listed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
