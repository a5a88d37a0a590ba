"""Benchmark of the prepare step's memory: peak resident memory against dataset size, the streaming prepare
against the in-memory one it replaced, side by side in one run.

    python -m bench.prepare_bench [--sizes-mb 200 2048] [--baseline-mb 200] [--out bench/prepare.json]

A JSON-lines Alpaca dataset of about 1 KB a row (unique rows, 5% exact duplicates) is generated for each
size; `ftc-trainer prepare` runs on it as its own process (local file in, a local S3 server out, no models)
and its peak RSS (`ru_maxrss` of the child) and wall time are recorded. The in-memory prepare (the tree at
BASELINE, extracted with `git archive`) runs on the `--baseline-mb` file only: it needs several times the
file's size. Results go to bench/prepare.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "2ef24d8"  # the last commit whose prepare held every row in memory
PACKAGES = ("api", "storage", "loading", "trainer_image")


def generate(path: Path, size_mb: int, seed: int = 0) -> int:
    """A JSONL dataset of about `size_mb` MB; returns its row count."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(5000)]
    target, written, rows = size_mb * 2**20, 0, 0
    with path.open("w") as out:
        previous = ""
        while written < target:
            if previous and rng.random() < 0.05:
                line = previous  # an exact duplicate
            else:
                instruction = f"question {rows}: " + " ".join(rng.choices(words, k=20))
                output = " ".join(rng.choices(words, k=150))
                line = json.dumps({"instruction": instruction, "input": "", "output": output}) + "\n"
            out.write(line)
            previous, written, rows = line, written + len(line), rows + 1
    return rows


def run_prepare(dataset: Path, work: Path, endpoint: str, pythonpath: str) -> dict[str, Any]:
    """`python -m ftc_trainer prepare` on `dataset` in a child process: its summary, peak RSS and wall time."""
    from ftc_api.spec import DatasetSpec, SplitSpec
    from ftc_api.steps import Location, PrepareInput

    loc = Location(bucket="bench", prefix=f"prepare/{time.monotonic_ns()}", endpoint_url=endpoint)
    inp = PrepareInput(dataset=DatasetSpec(source=str(dataset), split=SplitSpec()), location=loc)
    (work / "input.json").write_text(inp.to_json())
    env = {**os.environ, "PYTHONPATH": pythonpath, "FTC_TERMINATION_LOG": str(work / "summary.json")}
    started = time.monotonic()
    with (work / "stderr.log").open("w") as errors:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ftc_trainer", "prepare", "--input", str(work / "input.json"), "--workdir", str(work / "w")],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=errors,
        )
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak, not the largest of all children
    wall = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed on {dataset}:\n{(work / 'stderr.log').read_text()[-3000:]}")
    peak_kib = usage.ru_maxrss
    summary = json.loads((work / "summary.json").read_text())
    return {"peak_rss_mib": round(peak_kib / 1024, 1), "seconds": round(wall, 1), "counts": summary["counts"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[200, 2048], help="dataset sizes, ascending")
    parser.add_argument("--baseline-mb", type=int, default=200, help="the size the in-memory prepare also runs on")
    parser.add_argument("--out", default="bench/prepare.json", help="where to write the results")
    args = parser.parse_args(argv)
    from devcluster.servers.s3 import start_s3_server

    # The S3 server (MinIO) runs as its own process, so its memory never counts in a measured child's ru_maxrss.
    server = start_s3_server(Path(tempfile.gettempdir()) / "ftc-prepare-bench-minio.log", buckets=("bench",))
    os.environ.update(server.env())
    endpoint = server.endpoint_url
    streaming: dict[str, Any] = {}
    baseline: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="ftc-prepare-bench-") as tmp:
            old = Path(tmp) / "baseline"
            old.mkdir()
            archive = subprocess.run(["git", "archive", BASELINE, *PACKAGES], cwd=ROOT, capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
            new_path = os.pathsep.join(str(ROOT / p) for p in PACKAGES) + os.pathsep + str(ROOT)
            old_path = os.pathsep.join(str(old / p) for p in PACKAGES) + os.pathsep + str(ROOT)
            for size in sorted(args.sizes_mb):
                dataset = Path(tmp) / f"data-{size}.jsonl"
                rows = generate(dataset, size)
                file_mib = round(dataset.stat().st_size / 2**20, 1)
                if size == args.baseline_mb:
                    work = Path(tmp) / f"old-{size}"
                    work.mkdir()
                    baseline[f"{size}MB"] = {"file_mib": file_mib, "rows": rows} | run_prepare(dataset, work, endpoint, old_path)
                    print("baseline", size, baseline[f"{size}MB"], flush=True)
                work = Path(tmp) / f"new-{size}"
                work.mkdir()
                row = {"file_mib": file_mib, "rows": rows} | run_prepare(dataset, work, endpoint, new_path)
                streaming[f"{size}MB"] = row
                print("streaming", size, row, flush=True)
                dataset.unlink()
                for done in Path(tmp).glob(f"*-{size}"):  # scratch of this size: the disk holds one size at a time
                    shutil.rmtree(done, ignore_errors=True)
    finally:
        server.stop()
    b = args.baseline_mb
    doc = {
        "benchmark": "prepare peak RSS vs dataset size: streaming prepare vs the in-memory one it replaced",
        "dataset": "JSONL Alpaca rows of ~1 KB, 5% exact duplicates; split 80/10/10; no models",
        "streaming": streaming,
        "in_memory_baseline": {"commit": BASELINE} | baseline,
        "note": "ru_maxrss of each prepare process (os.wait4), the same file for both at the baseline size",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if f"{b}MB" in baseline and f"{b}MB" in streaming:
        doc["ratio_baseline_over_streaming_peak_rss"] = round(
            baseline[f"{b}MB"]["peak_rss_mib"] / streaming[f"{b}MB"]["peak_rss_mib"], 2
        )
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
