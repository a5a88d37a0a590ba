"""Benchmark of staging a hub model into S3: ftc's staging (parallel, resumable, content-addressed) against a
plain `huggingface_hub.snapshot_download` followed by boto3 `upload_file` of every file, side by side in one
run, on the local servers (the hub server of devcluster/servers/hub_server.py, MinIO).

    python -m bench.staging_bench [--shards 6] [--shard-mb 50] [--parallel 4] [--out bench/staging.json]

A repository of `--shards` safetensors shards of random bytes (devcluster/models/sharded.py) is served by the
local hub; each way copies it into its own prefix of a fresh bucket. Also measured: ftc's staging with one
file at a time (the serial copy it replaced moved one file at a time too), and a second staging of the same
commit (a later comparison: the shared copy is reused), and ftc with 8 files in flight, as many as
snapshot_download's 8 download threads. Each set runs twice: the hub as fast as this machine serves it, and the
hub at `--hub-mb-per-s` per connection (a hub far away). Both servers run on this machine, so the figures say
what the client side costs (threads, hashing, disk), not what a network would.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = "ftc-bench/sharded"


def baseline(endpoint: str, sha: str, bucket: str, s3_endpoint: str, work: Path) -> dict[str, Any]:
    """snapshot_download into a directory, then boto3 upload_file of each file (its default transfer config)."""
    import boto3
    from huggingface_hub import snapshot_download

    start = time.perf_counter()
    local = Path(snapshot_download(REPO, revision=sha, endpoint=endpoint, local_dir=work / "snapshot"))  # 8 threads
    downloaded = time.perf_counter()
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    files = [p for p in local.rglob("*") if p.is_file() and ".cache" not in p.parts]
    for path in files:
        client.upload_file(str(path), bucket, f"{work.name}/baseline/{path.relative_to(local).as_posix()}")
    done = time.perf_counter()
    size = sum(p.stat().st_size for p in files)
    shutil.rmtree(local)
    return {"seconds": round(done - start, 2), "download_seconds": round(downloaded - start, 2), "bytes": size,
            "files": len(files), "peak_scratch_bytes": size}  # fmt: skip


def ftc_stage(endpoint: str, bucket: str, s3_endpoint: str, work: Path, prefix: str, parallel: int) -> dict[str, Any]:
    """ftc's staging (resolve with files metadata, then stage) into s3://BUCKET/PREFIX."""
    from ftc_step.storage import Storage
    from ftc_trainer import staging

    os.environ[staging.PARALLEL_ENV] = str(parallel)
    store = Storage(endpoint_url=s3_endpoint)
    start = time.perf_counter()
    model = staging.resolve(REPO, None)
    staged = staging.stage(model, f"s3://{bucket}/{prefix}", store, work / prefix)
    seconds = time.perf_counter() - start
    largest = max(f.size or 0 for f in model.files)
    parallel = staging.parallelism(largest)
    return {"seconds": round(seconds, 2), "bytes": staged.bytes, "files": staged.files, "moved": staged.moved,
            "reused": staged.reused, "parallel": parallel, "peak_scratch_bytes_bound": parallel * largest}  # fmt: skip


def mb_per_s(result: dict[str, Any]) -> float:
    return round(result["bytes"] / 2**20 / max(result["seconds"], 1e-6), 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=6)
    p.add_argument("--shard-mb", type=float, default=50)
    p.add_argument("--parallel", type=int, default=4)
    p.add_argument("--hub-mb-per-s", type=float, default=25, help="the second run's download speed per connection")
    p.add_argument("--out", default="bench/staging.json")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.pop("HF_HUB_OFFLINE", None)

    from devcluster.models.sharded import build_sharded_repo
    from devcluster.servers.hub_server import FakeHub
    from devcluster.servers.s3 import start_s3_server

    work = Path(tempfile.mkdtemp(prefix="ftc-staging-bench-"))
    base = work / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    repo_dir = build_sharded_repo(work / "repo", base, args.shards, args.shard_mb)
    s3 = start_s3_server(work / "minio.log", buckets=("bench",))
    os.environ.update(s3.env())
    hub = FakeHub().start()
    try:
        repo = hub.add(REPO, repo_dir)
        os.environ["HF_ENDPOINT"] = hub.endpoint
        runs: dict[str, dict[str, Any]] = {}
        for speed, label in ((None, "local"), (args.hub_mb_per_s, f"hub_at_{args.hub_mb_per_s:g}_mb_per_s_per_connection")):
            hub.bytes_per_second = speed * 2**20 if speed else None
            bucket_prefix = label
            results = {
                "baseline_snapshot_download_then_upload_file": baseline(
                    hub.endpoint, repo.sha, "bench", s3.endpoint_url, work / bucket_prefix
                ),
                "ftc_staging": ftc_stage(hub.endpoint, "bench", s3.endpoint_url, work, f"{bucket_prefix}/ftc", args.parallel),
                "ftc_staging_8_at_a_time_as_snapshot_download": ftc_stage(
                    hub.endpoint, "bench", s3.endpoint_url, work, f"{bucket_prefix}/eight", 8
                ),
                "ftc_staging_one_file_at_a_time": ftc_stage(
                    hub.endpoint, "bench", s3.endpoint_url, work, f"{bucket_prefix}/serial", 1
                ),
            }
            gets = len(hub.downloads())
            again = ftc_stage(hub.endpoint, "bench", s3.endpoint_url, work, f"{bucket_prefix}/ftc", args.parallel)
            results["ftc_staging_again_same_commit"] = again | {"hub_downloads": len(hub.downloads()) - gets}
            for result in results.values():
                result["mb_per_second"] = mb_per_s(result)
            base = results["baseline_snapshot_download_then_upload_file"]["seconds"]
            runs[label] = {"results": results, "speedup_vs_baseline": round(base / results["ftc_staging"]["seconds"], 2)}
    finally:
        hub.stop()
        s3.stop()
        shutil.rmtree(work, ignore_errors=True)
    doc = {
        "what": "staging a hub model into S3: ftc against snapshot_download + boto3 upload_file, local servers",
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "repo": {"shards": args.shards, "shard_mb": args.shard_mb, "bytes": runs["local"]["results"]["ftc_staging"]["bytes"]},
        "runs": runs,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0]},
    }  # fmt: skip
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
