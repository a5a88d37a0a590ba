"""Benchmark of data-parallel training: ftc's train step (`python -m ftc_trainer train`, as in a pod) with one
process against two processes started by torchrun (gloo on the CPU), SmolLM2-135M-Instruct, LoRA, the same
data, steps and effective batch; trained tokens/s side by side in one run.

    python -m bench.parallel_bench [--steps 8] [--repeats 2] [--out bench/parallel.json]

The CPU cores are shared out: one process gets every core as threads, two processes get half each, so
the ratio shows what splitting the work over processes costs or gains on the same hardware (on GPUs each
process has its own device and the ratio is the scaling). Per device batch 4, gradient accumulation 2:
one process runs two micro-batches per optimizer step, each of two processes one. The variants run
interleaved `--repeats` times; the fastest run of each counts. Results go to bench/parallel.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROCESSES = (1, 2)


def run_step(processes: int, input_path: Path, work: Path, endpoint: str) -> dict[str, Any]:
    """One train step as its own process tree; its summary and wall time."""
    from ftc_api.steps import TrainResult

    threads = max(1, (os.cpu_count() or 2) // processes)
    env = {
        **os.environ,
        "FTC_GPUS": str(processes),
        "FTC_ALLOW_CPU": "1",
        "FTC_TERMINATION_LOG": str(work / "termination-log"),
        "FTC_WORK_DIR": str(work / "scratch"),
        "FTC_CACHE_DIR": str(work / "cache"),
        "OMP_NUM_THREADS": str(threads),
        "PYTHONPATH": str(ROOT),
    }
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "ftc_trainer", "train", "--input", str(input_path)], env=env, capture_output=True, text=True
    )
    wall = time.monotonic() - started
    if out.returncode != 0:
        raise SystemExit(f"{processes} process(es) failed:\n{(out.stdout + out.stderr)[-4000:]}")
    result = TrainResult.model_validate_json((work / "termination-log").read_text())
    return {
        "processes": processes,
        "threads_per_process": threads,
        "parallelism": result.parallelism,
        "tokens": result.trained_tokens,
        "train_seconds": result.train_seconds,
        "tokens_per_second": result.tokens_per_second,
        "step_wall_seconds": round(wall, 2),
        "final_train_loss": result.final_train_loss,
        "rank0_peak_rss_gib": result.peak_memory_gib,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run (default 8)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs per variant; the fastest counts")
    parser.add_argument("--out", default="bench/parallel.json", help="where to write the results")
    args = parser.parse_args(argv)

    from ftc_api.spec import DatasetSpec, LoraSpec, Method, SplitSpec, TrainingSpec
    from ftc_api.steps import Location, ModelRef, PrepareInput, TrainInput
    from ftc_trainer.prepare import run_prepare

    from devcluster.models.smollm2 import build
    from devcluster.models.tiny import build_dataset
    from devcluster.servers.s3 import start_s3_server

    model = build()  # once, before anything is timed
    server = start_s3_server(Path(tempfile.gettempdir()) / "ftc-parallel-bench-minio.log", buckets=("bench",))
    os.environ.update(server.env())  # MinIO checks signatures: the workers need its credentials
    endpoint = server.endpoint_url
    training = TrainingSpec(
        max_steps=args.steps,
        per_device_batch_size=4,
        gradient_accumulation_steps=2,
        max_seq_length=1024,
        eval_steps=10 * args.steps,
        save_steps=10 * args.steps,
        logging_steps=args.steps,
        lora=LoraSpec(r=8, alpha=16, dropout=0.0),
        gradient_checkpointing=True,
    )
    runs: dict[int, list[dict[str, Any]]] = {p: [] for p in PROCESSES}
    try:
        with tempfile.TemporaryDirectory(prefix="ftc-parallel-bench-") as tmp:
            dataset = build_dataset(Path(tmp) / "tiny-alpaca.jsonl")
            data = Location(bucket="bench", prefix="bench/data", endpoint_url=endpoint)
            split = SplitSpec(eval_fraction=0.0, test_fraction=0.0)
            run_prepare(PrepareInput(dataset=DatasetSpec(source=str(dataset), split=split), location=data), Path(tmp) / "prep")
            for rep in range(args.repeats):
                for processes in PROCESSES:
                    work = Path(tmp) / f"p{processes}-{rep}"
                    work.mkdir()
                    loc = Location(bucket="bench", prefix=f"bench/p{processes}-{rep}", endpoint_url=endpoint)
                    _copy_data(endpoint, data, loc, work)
                    ref = ModelRef(name="smollm2", base_model=str(model), method=Method.LORA, gpu_count=processes)
                    (work / "input.json").write_text(TrainInput(model=ref, training=training, location=loc).to_json())
                    runs[processes].append(run_step(processes, work / "input.json", work, endpoint))
                    print(processes, rep, runs[processes][-1], flush=True)
    finally:
        server.stop()
    best = {p: max(r, key=lambda x: x["tokens_per_second"] or 0) for p, r in runs.items()}
    speed = {p: [x["tokens_per_second"] for x in runs[p]] for p in PROCESSES}
    ratio = (best[2]["tokens_per_second"] or 0) / (best[1]["tokens_per_second"] or 1)
    import torch

    doc = {
        "benchmark": "train tokens/s, one process vs two torchrun processes (DDP, gloo), SmolLM2-135M-Instruct, LoRA, CPU",
        "steps": args.steps,
        "repeats": args.repeats,
        "effective_batch": "perDeviceBatchSize 4 x gradientAccumulationSteps 2 (1 per process on 2 processes)",
        "results": {f"{p}_process": best[p] | {"runs_tokens_per_second": speed[p]} for p in PROCESSES},
        "ratio_two_over_one_tokens_per_second": round(ratio, 3),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "versions": {"torch": torch.__version__},
        "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc, indent=1))
    return 0


def _copy_data(endpoint: str, source: Any, dest: Any, work: Path) -> None:
    """The prepared data/ under a fresh run prefix (each run trains from its own prefix, as a comparison)."""
    from ftc_step.storage import Storage

    store = Storage(endpoint_url=endpoint)
    store.download_verified(source.uri("data"), work / "data-copy")
    store.upload_tree(work / "data-copy", dest.uri("data"))


if __name__ == "__main__":
    raise SystemExit(main())
