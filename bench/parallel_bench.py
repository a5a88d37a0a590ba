"""Benchmark of data-parallel training: ftc's train step (`python -m ftc_trainer train`, as in a pod) with one
process against two processes started by torchrun (gloo on the CPU), SmolLM2-135M-Instruct, LoRA, the same
data, steps and effective batch; trained tokens/s side by side in one run.

    python -m bench.parallel_bench [--steps 8] [--repeats 2] [--out bench/parallel.json]
    python -m bench.parallel_bench --fsdp-memory-only   # just the FSDP-memory part, merged into the JSON

FSDP memory (`fsdp_memory` in the JSON): two gloo processes load SmolLM2 with ftc's own loader
(`ftc_trainer.models.load_model`, device None as `build_model` does under FSDP), add LoRA and wrap it in FSDP
as transformers' Trainer does (one unit per decoder block, the LoRA layers in units of their own), then
compute one loss. `every_rank_loads` is the old setting (`cpu_ram_efficient_loading: False`); `rank0_loads`
is what ftc does on GPUs now (`FSDP_CPU_RAM_EFFICIENT_LOADING` before loading: rank 1 gets empty weights,
`sync_module_states` broadcasts rank 0's one unit at a time). torch refuses `sync_module_states` for CPU
tensors (it expects GPUs), so this bench lifts that check, which is what lets it measure the GPU path on the
CPU; ftc itself keeps every-rank loading on the CPU. Peak RSS per rank (ru_maxrss) and its rise over the
process's RSS before loading, beside the model's size; equal losses show rank 1 got rank 0's weights.
On the CPU the FSDP shard itself lives in host RAM (half the model per rank); on GPUs it is on the device, so
rank 1's host RAM stays near its `load_rise_gib`.

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


# glibc keeps freed small blocks (a layer's weights are 1-4 MB) in its heap, so RSS would count every
# block FSDP ever held at once; a fixed mmap threshold returns each freed weight to the system, in both modes.
MMAP_THRESHOLD = 128 * 1024


def _rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def fsdp_memory_worker(mode: str, model_dir: str, out: str) -> None:
    """One rank of the FSDP-memory measurement (run under torchrun): load, add LoRA, wrap, one loss."""
    import resource

    import torch
    import torch.distributed as dist
    import torch.distributed.fsdp._init_utils as fsdp_init
    from ftc_api.spec import LoraSpec, Method, TrainingSpec
    from ftc_trainer.models import load_model, lora_config, resolve_targets
    from ftc_trainer.parallel import block_class_names, fsdp_loading_env
    from peft import get_peft_model
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    rank0 = mode == "rank0_loads"
    os.environ.update(fsdp_loading_env(rank0))  # what build_model sets (True: the GPU decision)
    before = _rss_gib()
    training = TrainingSpec(lora=LoraSpec(r=8, alpha=16, dropout=0.0), gradient_checkpointing=False)
    model, _ = load_model(model_dir, Method.LORA, training, device=None)
    loaded = _rss_gib()
    model = get_peft_model(model, lora_config(training, resolve_targets(model, None)))
    os.environ["FSDP_TRANSFORMER_CLS_TO_WRAP"] = ",".join(block_class_names(model))
    if rank0:  # torch's check that sync_module_states runs on GPU tensors; gloo broadcasts CPU ones
        fsdp_init._check_module_states_for_sync_module_states = lambda module_states: None
    wrapped = FSDP(
        model,
        sharding_strategy=ShardingStrategy.FULL_SHARD,
        auto_wrap_policy=fsdp_auto_wrap_policy(model),
        use_orig_params=True,
        sync_module_states=rank0,
        device_id=torch.device("cpu"),  # as accelerate passes its device
    )
    wrapped_rss = _rss_gib()
    wrap_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # loading and wrapping, before any compute
    ids = torch.arange(1, 65).unsqueeze(0)
    with torch.no_grad():
        loss = float(wrapped(input_ids=ids, labels=ids).loss)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    Path(f"{out}.{rank}").write_text(json.dumps({
        "rank": rank, "rss_before_load_gib": round(before, 3), "rss_after_load_gib": round(loaded, 3),
        "rss_after_wrap_gib": round(wrapped_rss, 3),
        "peak_rss_through_wrap_gib": round(wrap_peak, 3), "load_rise_gib": round(loaded - before, 3),
        "peak_rise_through_wrap_gib": round(wrap_peak - before, 3),
        "peak_rss_gib": round(peak, 3), "peak_rise_gib": round(peak - before, 3), "loss": round(loss, 6),
    }))  # fmt: skip
    dist.destroy_process_group()


def fsdp_memory(model_dir: Path) -> dict[str, Any]:
    """Both loading modes on two gloo processes: each rank's memory figures, and the model's size."""
    from safetensors import safe_open

    size = 0
    for file in model_dir.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            size += sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (safe_open is no dict)
    doc: dict[str, Any] = {
        "benchmark": "FSDP LoRA load + wrap + one loss, two gloo processes: every rank loads vs rank 0 loads",
        "malloc_mmap_threshold": MMAP_THRESHOLD,
        "model": model_dir.name,
        "parameters": size,
        "model_gib_as_loaded_fp32": round(size * 4 / 2**30, 3),  # the CPU policy loads fp32
    }
    with tempfile.TemporaryDirectory(prefix="ftc-fsdp-memory-") as tmp:
        for mode in ("every_rank_loads", "rank0_loads"):
            out = Path(tmp) / mode
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                   "-m", "bench.parallel_bench", "--fsdp-memory-worker", mode, str(model_dir), str(out)]  # fmt: skip
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "FTC_ALLOW_CPU": "1",
                   "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}  # fmt: skip
            run = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
            if run.returncode != 0:
                raise SystemExit(f"fsdp memory ({mode}) failed:\n{(run.stdout + run.stderr)[-4000:]}")
            ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in (0, 1)]
            doc[mode] = {f"rank{r['rank']}": r for r in ranks}
            print(mode, ranks, flush=True)
    return doc


def _numel(shape: Any) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--fsdp-memory-worker":
        fsdp_memory_worker(*sys.argv[2:5])
        return 0
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run (default 8)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs per variant; the fastest counts")
    parser.add_argument("--out", default="bench/parallel.json", help="where to write the results")
    parser.add_argument("--fsdp-memory-only", action="store_true", help="run only the FSDP-memory part (merged)")
    args = parser.parse_args(argv)
    if args.fsdp_memory_only:
        from devcluster.models.smollm2 import build

        doc = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
        doc["fsdp_memory"] = fsdp_memory(Path(build())) | {"measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
        print(json.dumps(doc["fsdp_memory"], indent=1))
        return 0

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
