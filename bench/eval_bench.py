"""Benchmark of the evaluator's generation: batched answers/s against one prompt at a time, side by side
in one run, on the tiny models (tiny-llama and tiny-mixtral, LoRA and QLoRA) on this machine.

    python -m bench.eval_bench [--prompts 64] [--max-new-tokens 32] [--out bench/eval.json]

Each (model, method) loads base + a LoRA adapter once, warms up, then answers the same prompts with
batch size 1 and with the adaptive batch size (`batchSize: 0`), greedy; it records answers/s, new
tokens/s, the speed-up and how many answers are identical between the two runs. Target: >= 3x.
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=64, help="held-out prompts per run (default 64)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="longest answer in tokens (default 32)")
    parser.add_argument("--out", default="bench/eval.json", help="where to write the results (default bench/eval.json)")
    parser.add_argument("--assets", default=None, help="folder for the tiny models (default: a temporary folder)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from ftc_api.spec import GenerationSpec, QuantizationSpec
    from ftc_evaluator.generate import load_model, read_test_rows, unload
    from transformers.utils import logging as hf_logging

    from devcluster.models import tiny

    hf_logging.set_verbosity_error()
    root = Path(args.assets or tempfile.mkdtemp(prefix="ftc-eval-bench-"))
    try:
        assets = tiny.build_all(root)
        rows, _ = read_test_rows(assets.chat.read_text().splitlines())
        rows = (rows * (args.prompts // max(1, len(rows)) + 1))[: args.prompts]
        batched_spec = GenerationSpec(max_new_tokens=args.max_new_tokens, batch_size=0)
        single_spec = GenerationSpec(max_new_tokens=args.max_new_tokens, batch_size=1)

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
    finally:
        if not args.assets:
            shutil.rmtree(root, ignore_errors=True)
    speedups = [r["speedup"] for r in results if r["speedup"]]
    doc = {
        "benchmark": "evaluator generation: batched vs one prompt at a time",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "settings": {"prompts": len(rows), "max_new_tokens": args.max_new_tokens, "decoding": "greedy", "batch_size": "auto (0)"},
        "results": results,
        "min_speedup": min(speedups) if speedups else None,
        "target_speedup": TARGET_SPEEDUP,
        "meets_target": bool(speedups) and min(speedups) >= TARGET_SPEEDUP,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"min speed-up x{doc['min_speedup']} (target x{TARGET_SPEEDUP}); wrote {out}")
    return 0 if doc["meets_target"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
