"""Benchmark of the evaluator on the tiny models (tiny-llama and tiny-mixtral) on this machine, two parts:

    python -m bench.eval_bench [--prompts 64] [--max-new-tokens 32] [--out bench/eval.json] [--part all]

`generation`: batched answers/s against one prompt at a time, side by side in one run. Each (model, method)
loads base + a LoRA adapter once, warms up, then answers the same prompts with batch size 1 and with the
adaptive batch size (`batchSize: 0`), greedy; it records answers/s, new tokens/s, the speed-up and how many
answers are identical between the two runs. Target: >= 3x.

`gpu-seconds`: the GPU-seconds each model holds in evaluation before and after the generate/score split,
side by side in one run, with the reference study's placements (tiny-llama as LLaMA 2 on 1 GPU, tiny-mixtral
as Mixtral on 2) and a judge that answers each call after `--judge-latency` seconds (an API under load):
before, the one evaluate pod (`ftc_evaluator.run.evaluate`) held the widest placement's GPUs for the whole
step; after, each generate step (`run.generate`) holds its own model's GPUs for its own duration and the score
step (`run.score`) holds none. Each arm has a run prefix of its own (no answer or judgment is reused), after a
warm-up evaluation (imports, first-call costs). `--part gpu-seconds` keeps the JSON's other figures.
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
from pathlib import Path

TARGET_SPEEDUP = 3.0
PLACEMENT_GPUS = {"tiny-llama": 1, "tiny-mixtral": 2}  # examples/llama2-vs-mixtral.yaml: Llama 1 GPU, Mixtral 2
METHODS = {"tiny-llama": "qlora", "tiny-mixtral": "qlora"}  # the reference study's QLoRA on both


def build_adapter(base: Path, out: Path) -> Path:
    """A seeded, non-trivial LoRA adapter on the attention projections (no training needed to time it)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if (out / "adapter_config.json").exists():
        return out
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(str(out))
    return out


def measure(loaded, rows, generation) -> dict:
    from ftc_evaluator.generate import answer_rows

    predictions, stats = answer_rows(loaded, rows, generation)
    return {
        "answers": stats.answers,
        "seconds": round(stats.seconds, 3),
        "answers_per_second": round(stats.answers_per_second, 2),
        "new_tokens_per_second": round(stats.new_tokens / stats.seconds, 1) if stats.seconds else None,
        "batch_size": stats.batch_size,
        "answers_text": [p.answer for p in predictions],
    }


def gpu_seconds(assets, root: Path, rows: int, max_new_tokens: int, judge_latency: float) -> dict:
    """GPU-seconds held per model in evaluation before and after the generate/score split (module docstring)."""
    from ftc_api.spec import DatasetSpec, EvaluationSpec, GenerationSpec, JudgeSpec, Method, Metric, SplitSpec
    from ftc_api.steps import EvaluatedModel, EvaluateInput, GenerateInput, Location, ModelRef, PrepareInput, ScoreInput
    from ftc_evaluator.run import evaluate, generate, score
    from ftc_step.storage import Storage
    from ftc_trainer.prepare import run_prepare

    from devcluster.servers.openai_server import FakeOpenAI
    from devcluster.servers.s3 import start_s3_server

    class SlowJudge(FakeOpenAI):
        """The local OpenAI-compatible server, each chat reply `judge_latency` seconds late."""

        async def _chat(self, request):  # type: ignore[no-untyped-def]
            import asyncio

            await asyncio.sleep(judge_latency)
            return await super()._chat(request)

    s3 = start_s3_server(root / "minio.log")
    judge = SlowJudge().start()
    os.environ.update(s3.env())
    os.environ["FTC_JUDGE_API_KEY"] = "bench"
    try:
        store = Storage(endpoint_url=s3.endpoint_url)
        dataset = f"s3://{s3.bucket}/assets/data/tiny-alpaca.jsonl"
        store.upload_file(assets.dataset, dataset)
        evaluation = EvaluationSpec(
            metrics=[Metric.JUDGE, Metric.ROUGE],
            primary_metric=Metric.JUDGE,
            judge=JudgeSpec(base_url=judge.base_url, model="fake-judge", concurrency=4),
            generation=GenerationSpec(max_new_tokens=max_new_tokens),
            test_sample_size=None,
            bootstrap_resamples=1000,
        )
        models = []
        for kind, method in METHODS.items():
            adapter = build_adapter(assets.model(kind), root / "adapters" / kind)
            ref = ModelRef(name=kind, base_model=str(assets.model(kind)), method=Method(method), gpu_count=PLACEMENT_GPUS[kind])
            models.append(EvaluatedModel(model=ref, adapter_uri=str(adapter), final_adapter_uri=str(adapter)))

        def location(arm: str) -> Location:
            loc = Location(bucket=s3.bucket, prefix=f"bench/{arm}", endpoint_url=s3.endpoint_url)
            split = SplitSpec(eval_count=10, test_count=rows)
            prepared = run_prepare(PrepareInput(dataset=DatasetSpec(source=dataset, split=split), location=loc), root / arm)
            assert prepared.ok, prepared.error
            return loc

        warm = evaluation.model_copy(update={"test_sample_size": 4})
        evaluate(EvaluateInput(models=models, evaluation=warm, location=location("warm-up")), workdir=root / "warm-up")

        loc = location("before")
        started = time.perf_counter()
        before = evaluate(EvaluateInput(models=models, evaluation=evaluation, location=loc), workdir=root / "before")
        before_seconds = time.perf_counter() - started
        assert before.ok, before.error
        widest = max(PLACEMENT_GPUS.values())

        loc = location("after")
        generated = {}
        for model in models:
            started = time.perf_counter()
            result = generate(GenerateInput(model=model, evaluation=evaluation, location=loc), workdir=root / "after")
            generated[model.model.name] = (time.perf_counter() - started, result)
            assert result.ok and not result.reused, result
        started = time.perf_counter()
        after = score(ScoreInput(models=models, evaluation=evaluation, location=loc), workdir=root / "score")
        score_seconds = time.perf_counter() - started
        assert after.ok, after.error
        judge_calls = len(judge.judge_requests())
    finally:
        judge.stop()
        s3.stop()
    per_model_before = {m: round(before_seconds * widest, 2) for m in PLACEMENT_GPUS}
    per_model_after = {m: round(seconds * PLACEMENT_GPUS[m], 2) for m, (seconds, _) in generated.items()}
    total_before = round(before_seconds * widest, 2)
    total_after = round(sum(per_model_after.values()), 2)
    return {
        "what": "GPU-seconds held per model in evaluation, before the generate/score split (one evaluate pod on the "
        "widest placement for the whole step) and after (each generate pod on its own model's GPUs for its own "
        "duration; the score pod on a CPU). Measured on this machine's CPU with nominal GPU counts; pod start-up "
        "and image pulls are not included.",
        "settings": {
            "test_rows": rows,
            "max_new_tokens": max_new_tokens,
            "metrics": ["judge", "rouge"],
            "judge_latency_seconds": judge_latency,
            "judge_concurrency": 4,
            "placement_gpus": PLACEMENT_GPUS,
            "methods": METHODS,
        },
        "before": {
            "evaluate_seconds": round(before_seconds, 2),
            "gpus_held": widest,
            "gpu_seconds_total": total_before,
            "gpu_seconds_per_model": per_model_before,
        },
        "after": {
            "generate_seconds": {m: round(seconds, 2) for m, (seconds, _) in generated.items()},
            "score_seconds": round(score_seconds, 2),
            "score_gpus": 0,
            "gpu_seconds_total": total_after,
            "gpu_seconds_per_model": per_model_after,
        },
        "gpu_seconds_saved_fraction": round(1 - total_after / total_before, 3) if total_before else None,
        "judge_calls_all_arms": judge_calls,  # warm-up, before and after together
        "same_verdict": (before.winner, before.p_value) == (after.winner, after.p_value),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=64, help="held-out prompts per run (default 64)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="longest answer in tokens (default 32)")
    parser.add_argument("--out", default="bench/eval.json", help="where to write the results (default bench/eval.json)")
    parser.add_argument("--assets", default=None, help="folder for the tiny models (default: a temporary folder)")
    parser.add_argument("--part", choices=("all", "generation", "gpu-seconds"), default="all", help="what to measure")
    parser.add_argument("--test-rows", type=int, default=25, help="gpu-seconds: held-out rows evaluated (default 25)")
    parser.add_argument("--judge-latency", type=float, default=0.5, help="gpu-seconds: seconds per judge reply (0.5)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from transformers.utils import logging as hf_logging

    from devcluster.models import tiny

    hf_logging.set_verbosity_error()
    out = Path(args.out)
    doc = json.loads(out.read_text()) if args.part == "gpu-seconds" and out.exists() else {}
    root = Path(args.assets or tempfile.mkdtemp(prefix="ftc-eval-bench-"))
    try:
        assets = tiny.build_all(root)
        if args.part in ("all", "generation"):
            doc = generation_speed(assets, root, args.prompts, args.max_new_tokens)
        if args.part in ("all", "gpu-seconds"):
            split = gpu_seconds(assets, root, args.test_rows, args.max_new_tokens, args.judge_latency)
            doc["gpu_seconds_in_evaluation"] = split
            b, a = split["before"], split["after"]
            print(
                f"GPU-seconds in evaluation: before {b['gpu_seconds_total']} ({b['evaluate_seconds']} s x {b['gpus_held']} "
                f"GPUs) | after {a['gpu_seconds_total']} (per model {a['gpu_seconds_per_model']}; score "
                f"{a['score_seconds']} s on a CPU) | saved {split['gpu_seconds_saved_fraction']:.0%}",
                flush=True,
            )
    finally:
        if not args.assets:
            shutil.rmtree(root, ignore_errors=True)
    machine = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if args.part in ("all", "generation"):
        doc["machine"] = machine
    if "gpu_seconds_in_evaluation" in doc and args.part != "generation":
        doc["gpu_seconds_in_evaluation"]["machine"] = machine
    if out.exists() and "rate_limits" not in doc:  # bench.ratelimit_bench's figures in the same file: kept
        doc["rate_limits"] = json.loads(out.read_text()).get("rate_limits")
        if doc["rate_limits"] is None:
            del doc["rate_limits"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"min speed-up x{doc.get('min_speedup')} (target x{TARGET_SPEEDUP}); wrote {out}")
    return 0 if doc.get("meets_target") else 1


def generation_speed(assets, root: Path, prompts: int, max_new_tokens: int) -> dict:
    """Batched against one prompt at a time (module docstring)."""
    from ftc_api.spec import GenerationSpec, QuantizationSpec
    from ftc_evaluator.generate import load_model, read_test_rows, unload

    from devcluster.models import tiny

    rows, _ = read_test_rows(assets.chat.read_text().splitlines())
    rows = (rows * (prompts // max(1, len(rows)) + 1))[:prompts]
    batched_spec = GenerationSpec(max_new_tokens=max_new_tokens, batch_size=0)
    single_spec = GenerationSpec(max_new_tokens=max_new_tokens, batch_size=1)

    results = []
    for kind in tiny.MODEL_KINDS:
        adapter = build_adapter(assets.model(kind), root / "adapters" / kind)
        for method in ("lora", "qlora"):
            loaded = load_model(assets.model(kind), adapter, method=method, quantization=QuantizationSpec())
            measure(loaded, rows[:4], single_spec)  # warm-up: first-call costs are not generation speed
            single = measure(loaded, rows, single_spec)
            batched = measure(loaded, rows, batched_spec)
            unload(loaded)
            same = sum(a == b for a, b in zip(single.pop("answers_text"), batched.pop("answers_text"), strict=True))
            speedup = batched["answers_per_second"] / single["answers_per_second"] if single["answers_per_second"] else None
            entry = {
                "model": kind,
                "method": method,
                "prompts": len(rows),
                "single": single,
                "batched": batched,
                "speedup": round(speedup, 2) if speedup else None,
                "identical_answers": same,
            }
            results.append(entry)
            print(
                f"{kind:13s} {method:5s} one-at-a-time {single['answers_per_second']:7.2f} answers/s | "
                f"batched (batch {batched['batch_size']}) {batched['answers_per_second']:7.2f} answers/s | "
                f"x{entry['speedup']} | identical answers {same}/{len(rows)}",
                flush=True,
            )
    speedups = [r["speedup"] for r in results if r["speedup"]]
    return {
        "benchmark": "evaluator generation: batched vs one prompt at a time",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {"prompts": len(rows), "max_new_tokens": max_new_tokens, "decoding": "greedy", "batch_size": "auto (0)"},
        "results": results,
        "min_speedup": min(speedups) if speedups else None,
        "target_speedup": TARGET_SPEEDUP,
        "meets_target": bool(speedups) and min(speedups) >= TARGET_SPEEDUP,
    }


if __name__ == "__main__":
    raise SystemExit(main())
