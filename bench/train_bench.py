"""Benchmark of the train step: trained tokens/s of ftc's trainer against TRL's SFTTrainer with default
settings, on the same data and the same tiny model, side by side in one run; plus TRL's packing and
padding-free modes.

    python -m bench.train_bench [--steps 160] [--out bench/train.json]

For each tiny model (tiny-llama, tiny-mixtral) with LoRA (r 8, alpha 16, every linear projection incl.
experts) on the CPU, batch 8, gradient checkpointing on (TRL's default, and ftc's), sequences up to 1024:
- `ftc`: the real train step (`run_train`) against a local S3 server; its own tokens/s (non-padding
  tokens over the training wall time). Eval and checkpoints are pushed past the end so only training is timed.
- `trl_default`: `SFTTrainer(model, train_dataset=<the same conversations as "messages">, peft_config=<same LoRA>,
  args=SFTConfig(per_device_train_batch_size=8, max_steps=N))`; everything else default (bf16 off: CPU).
- `ftc_padding_free`: the real train step with `training.packing: true`: each micro-batch's rows are
  concatenated into one sequence with position ids restarting per row (no padding; transformers 4.57 builds
  the per-row attention mask from the position ids under SDPA, so rows stay apart on the CPU too).
- `ftc_varied`, `ftc_padding_free_varied`: the same two on `varied_dataset()`, whose rows vary about tenfold
  in length, so that padded batches carry real padding.
- `trl_packing`: TRL with `packing=True` (best-fit decreasing); `trl_padding_free`: `padding_free=True`.
Tokens are counted the same way for all (`include_num_input_tokens_seen="non_padding"`), and time is
measured by the same callback for all (`ftc_trainer.train.RunClock`: from `on_train_begin` to
`on_train_end`, so model loading and dataset tokenisation are outside it for every variant). The
machine is shared, so variants run interleaved `--repeats` times and the fastest run of each counts
(every run's figure is kept in `runs_tokens_per_second`); CPU time (`time.process_time()`, all
threads) is far less sensitive to other load, so the median tokens per CPU-second and its ratio
(`cpu_ratio_ftc_over_trl_default`) are the steadier comparison.
Results and the ftc/TRL ratio go to bench/train.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODELS = ("tiny-llama", "tiny-mixtral")
VARIANTS = ("ftc", "ftc_padding_free", "trl_default", "trl_packing", "trl_padding_free")
VARIED = ("ftc_varied", "ftc_padding_free_varied")  # ftc padded vs padding-free on rows of widely varying length
BATCH = 8


def _lora() -> Any:
    from ftc_api.spec import LoraSpec

    return LoraSpec(r=8, alpha=16, dropout=0.05)


def varied_dataset(path: Path) -> Path:
    """The fixture facts with an alpaca `input` context of 0 to 11 filler sentences (row i gets i % 12), so row
    lengths vary about tenfold, as instruction datasets' do (Alpaca's `input` is empty for most rows and long for
    some). Padded batches then carry real padding; the uniform fixture rows carry almost none."""
    from devcluster.models.tiny import WORDS, fact_rows

    rows = []
    for i, row in enumerate(fact_rows()):
        n = len(WORDS)
        filler = " ".join(f"The {WORDS[(i + j) % n]} is near the {WORDS[(i + 2 * j) % n]}." for j in range(i % 12))
        rows.append(row | {"input": (row["input"] + "\n" + filler).strip()})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_ftc(
    kind: str, assets: Any, steps: int, endpoint: str, bucket: str, work: Path, packing: bool = False, dataset: Path | None = None
) -> dict[str, Any]:
    from ftc_api.spec import DatasetSpec, Method, SplitSpec, TrainingSpec
    from ftc_api.steps import Location, ModelRef, PrepareInput, TrainInput
    from ftc_trainer.prepare import run_prepare
    from ftc_trainer.train import RunClock, run_train

    loc = Location(bucket=bucket, prefix=f"bench/{kind}-{time.monotonic_ns()}", endpoint_url=endpoint)
    run_prepare(
        PrepareInput(
            dataset=DatasetSpec(source=str(dataset or assets.dataset), split=SplitSpec(eval_fraction=0.0, test_fraction=0.0)),
            location=loc,
        ),
        work / "prepare",
    )
    training = TrainingSpec(
        max_steps=steps,
        per_device_batch_size=BATCH,
        gradient_accumulation_steps=1,
        max_seq_length=1024,
        eval_steps=10 * steps,
        save_steps=10 * steps,
        logging_steps=steps,
        lora=_lora(),
        gradient_checkpointing=True,
        packing=packing,
    )
    ref = ModelRef(name=kind, base_model=str(assets.model(kind)), method=Method.LORA)
    result = run_train(TrainInput(model=ref, training=training, location=loc), work / "train")
    clock = RunClock.last
    assert clock is not None and result.trained_tokens
    return {
        "tokens": result.trained_tokens,
        "seconds": result.train_seconds,
        "tokens_per_second": result.tokens_per_second,
        "cpu_seconds": round(clock.cpu_seconds, 3),
        "tokens_per_cpu_second": round(result.trained_tokens / clock.cpu_seconds, 2),
        "final_train_loss": result.final_train_loss,
    }


def run_trl(kind: str, assets: Any, steps: int, work: Path, **options: Any) -> dict[str, Any]:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from devcluster.models.tiny import fact_rows, to_messages

    lora = _lora()
    dataset = Dataset.from_list([{"messages": to_messages(r)} for r in fact_rows()])
    config = SFTConfig(
        output_dir=str(work),
        per_device_train_batch_size=BATCH,
        max_steps=steps,
        bf16=False,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=steps,
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        **options,
    )
    from ftc_trainer.models import linear_leaf_names

    trainer = SFTTrainer(
        model=str(assets.model(kind)),
        train_dataset=dataset,
        args=config,
        peft_config=LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=linear_leaf_names(_load(assets.model(kind))),
            task_type="CAUSAL_LM",
        ),
    )
    from ftc_trainer.train import RunClock

    clock = RunClock()  # the same clock as ftc's run: from on_train_begin to on_train_end
    trainer.add_callback(clock)
    output = trainer.train()
    seconds, cpu_seconds = clock.seconds, clock.cpu_seconds
    tokens = clock.tokens_at_end - clock.tokens_at_start
    return {
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_second": round(tokens / seconds, 2),
        "cpu_seconds": round(cpu_seconds, 3),
        "tokens_per_cpu_second": round(tokens / cpu_seconds, 2),
        "final_train_loss": round(float(output.training_loss), 4),
    }


def _load(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=160, help="optimizer steps per run (default 160: runs of several seconds)")
    parser.add_argument("--packed-steps", type=int, default=8, help="steps of the packing runs: 8 x 1024 tokens each (default 8)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per variant; the fastest counts (default 3)")
    parser.add_argument("--out", default="bench/train.json", help="where to write the results (default bench/train.json)")
    parser.add_argument("--assets", default=None, help="folder for the tiny models (default: a temporary folder)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import torch
    import transformers
    import trl

    from devcluster.models.tiny import build_all
    from devcluster.servers.s3 import start_s3_server

    tmp = Path(tempfile.mkdtemp(prefix="ftc-train-bench-"))
    os.environ.setdefault("FTC_CACHE_DIR", str(tmp / "cache"))
    assets = build_all(Path(args.assets) if args.assets else tmp / "assets")
    server = start_s3_server(tmp / "minio.log", buckets=("bench",))  # MinIO, its own process
    os.environ.update(server.env())
    endpoint = server.endpoint_url
    results: dict[str, Any] = {}
    try:
        for kind in MODELS:
            runs: dict[str, list[dict[str, Any]]] = {v: [] for v in (*VARIANTS, *VARIED)}
            varied = varied_dataset(tmp / "varied.jsonl")
            for rep in range(args.repeats):  # interleaved, so load from other processes hits every variant alike
                work = tmp / kind / str(rep)
                runs["ftc"].append(run_ftc(kind, assets, args.steps, endpoint, "bench", work / "ftc"))
                runs["ftc_padding_free"].append(
                    run_ftc(kind, assets, args.steps, endpoint, "bench", work / "ftc-padding-free", packing=True)
                )
                for packing, variant in zip((False, True), VARIED, strict=True):
                    runs[variant].append(
                        run_ftc(kind, assets, args.steps, endpoint, "bench", work / variant, packing=packing, dataset=varied)
                    )
                runs["trl_default"].append(run_trl(kind, assets, args.steps, work / "trl"))
                runs["trl_packing"].append(run_trl(kind, assets, args.packed_steps, work / "trl-packing", packing=True))
                runs["trl_padding_free"].append(
                    run_trl(kind, assets, args.steps, work / "trl-padding-free", padding_free=True, max_length=None)
                )
            row: dict[str, Any] = {}
            for variant, variant_runs in runs.items():
                row[variant] = max(variant_runs, key=lambda x: x["tokens_per_second"]) | {
                    "runs_tokens_per_second": [x["tokens_per_second"] for x in variant_runs],
                    "median_tokens_per_cpu_second": statistics.median(x["tokens_per_cpu_second"] for x in variant_runs),
                }
            row["ratio_ftc_over_trl_default"] = round(
                row["ftc"]["tokens_per_second"] / row["trl_default"]["tokens_per_second"], 3
            )
            row["ratio_ftc_padding_free_over_ftc"] = round(
                row["ftc_padding_free"]["tokens_per_second"] / row["ftc"]["tokens_per_second"], 3
            )
            row["ratio_ftc_padding_free_over_ftc_varied"] = round(
                row["ftc_padding_free_varied"]["tokens_per_second"] / row["ftc_varied"]["tokens_per_second"], 3
            )
            row["cpu_ratio_ftc_padding_free_over_ftc_varied"] = round(
                row["ftc_padding_free_varied"]["median_tokens_per_cpu_second"]
                / row["ftc_varied"]["median_tokens_per_cpu_second"],
                3,
            )
            row["cpu_ratio_ftc_over_trl_default"] = round(
                row["ftc"]["median_tokens_per_cpu_second"] / row["trl_default"]["median_tokens_per_cpu_second"], 3
            )
            results[kind] = row
            print(kind, json.dumps(row), flush=True)
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    doc = {
        "benchmark": "train tokens/s, ftc vs TRL SFTTrainer defaults (LoRA, CPU)",
        "steps": args.steps,
        "packed_steps": args.packed_steps,
        "repeats": args.repeats,
        "batch_size": BATCH,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
        "notes": "ftc_padding_free is training.packing: true (rows of a micro-batch concatenated, position ids "
        "restarting per row; transformers 4.57 masks each row apart under SDPA, checked by the ML tests). "
        "trl_packing runs --packed-steps steps of 8 x 1024 packed tokens.",
        "results": results,
    }
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
