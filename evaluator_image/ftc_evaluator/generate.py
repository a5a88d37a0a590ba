"""Answer the held-out test set with base + adapter: batched, left-padded, the model's chat template,
greedy by default (or the spec's seeded sampling). Batch size adapts to memory: `batchSize: 0` starts
at `AUTO_BATCH` and halves on out-of-memory.

Rows of `data/test.jsonl` are conversations (`messages`: a list of {role, content}); the last assistant
message is the reference and everything before it is the prompt. Alpaca rows
(`instruction`/`input`/`output`) and ShareGPT rows (`conversations`) are accepted too.

torch / transformers / peft are imported inside the functions that need them.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

AUTO_BATCH = 64


# ---------------------------------------------------------------------------------------------- test rows


@dataclass(frozen=True)
class TestRow:
    """One held-out item: the prompt messages, the user's question and the reference answer."""

    index: int
    messages: list[dict[str, str]]
    question: str
    reference: str


def row_from_json(index: int, doc: Any) -> TestRow | None:
    """A TestRow from one JSONL document, or None when it has no reference answer."""
    if not isinstance(doc, dict):
        return None
    messages: list[dict[str, str]] | None = None
    if isinstance(doc.get("messages"), list):
        messages = [{"role": str(m.get("role")), "content": str(m.get("content") or "")} for m in doc["messages"]]
    elif isinstance(doc.get("conversations"), list):
        roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
        messages = [
            {"role": roles.get(str(m.get("from")), str(m.get("from"))), "content": str(m.get("value") or "")}
            for m in doc["conversations"]
        ]
    elif "instruction" in doc and "output" in doc:
        user = str(doc["instruction"]) + (f"\n\n{doc['input']}" if doc.get("input") else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": str(doc["output"])}]
        if doc.get("system"):
            messages.insert(0, {"role": "system", "content": str(doc["system"])})
    if not messages:
        return None
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None or not messages[last]["content"].strip():
        return None
    prompt = messages[:last]
    users = [m["content"] for m in prompt if m["role"] == "user"]
    if not users:
        return None
    return TestRow(index, prompt, question_text(prompt), messages[last]["content"])


def question_text(prompt: list[dict[str, str]]) -> str:
    """What the judge and RAGAS see as the question: the user's message or, for a multi-turn prompt,
    the whole conversation so far (a follow-up question means nothing without it)."""
    users = [m for m in prompt if m["role"] == "user"]
    if len(users) == 1:
        return users[0]["content"]
    return "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in prompt)


def read_test_rows(lines: Iterable[str]) -> tuple[list[TestRow], int]:
    """Rows of a test JSONL file, and how many lines were skipped (unparseable or without a reference)."""
    rows: list[TestRow] = []
    skipped = 0
    for line in lines:
        if not line.strip():
            continue
        try:
            row = row_from_json(len(rows) + skipped, json.loads(line))
        except ValueError:
            row = None
        if row is None:
            skipped += 1
        else:
            rows.append(row)
    return rows, skipped


def sample_rows(rows: Sequence[TestRow], size: int | None, seed: int) -> list[TestRow]:
    """A seeded sample of `size` rows in their original order (all rows when size is None or larger)."""
    if size is None or size >= len(rows):
        return list(rows)
    chosen = sorted(random.Random(seed).sample(range(len(rows)), size))
    return [rows[i] for i in chosen]


# ---------------------------------------------------------------------------------------------- predictions


@dataclass
class Prediction:
    """One model's answer to one held-out item."""

    index: int
    prompt: str
    reference: str
    answer: str
    tokens: int
    latency: float
    batch_size: int
    messages: list[dict[str, str]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


@dataclass
class GenerationStats:
    """How generation went for one model."""

    seconds: float = 0.0
    answers: int = 0
    new_tokens: int = 0
    batch_size: int = 0
    oom_halvings: int = 0

    @property
    def answers_per_second(self) -> float:
        return self.answers / self.seconds if self.seconds else 0.0


def is_oom(err: BaseException) -> bool:
    """Whether an exception is an accelerator (or host) out-of-memory error."""
    name = type(err).__name__
    return name == "OutOfMemoryError" or "out of memory" in str(err).lower()


def generate_adaptive(
    prompts: Sequence[str],
    generate_batch: Callable[[list[str]], list[tuple[str, int]]],
    batch_size: int = 0,
    *,
    on_oom: Callable[[], None] | None = None,
) -> tuple[list[tuple[str, int, float, int]], GenerationStats]:
    """Run `generate_batch` over `prompts` in batches, longest prompts first (an out-of-memory error
    shows up in the first batch, and similar lengths waste less padding). On out-of-memory the batch
    size halves and the batch is retried; at batch size 1 the error is raised.

    Returns, in the prompts' order, (answer, new tokens, latency of its batch, batch size) and stats."""
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    size = batch_size if batch_size > 0 else AUTO_BATCH
    results: list[tuple[str, int, float, int] | None] = [None] * len(prompts)
    stats = GenerationStats()
    start = time.perf_counter()
    position = 0
    while position < len(order):
        chunk = order[position : position + size]
        began = time.perf_counter()
        try:
            outputs = generate_batch([prompts[i] for i in chunk])
        except Exception as err:
            if not is_oom(err) or len(chunk) == 1:
                raise
            size = max(1, len(chunk) // 2)
            stats.oom_halvings += 1
            log.warning("out of memory with %d prompts per batch; retrying with %d", len(chunk), size)
            if on_oom is not None:
                on_oom()
            continue
        latency = time.perf_counter() - began
        for i, (answer, tokens) in zip(chunk, outputs, strict=True):
            results[i] = (answer, tokens, latency, len(chunk))
            stats.new_tokens += tokens
        position += len(chunk)
    stats.seconds = time.perf_counter() - start
    stats.answers = len(prompts)
    stats.batch_size = size
    return [r for r in results if r is not None], stats


# ---------------------------------------------------------------------------------------------- models


@dataclass
class LoadedModel:
    """A model ready to answer: base + adapter, its tokenizer (left padding) and where it runs."""

    model: Any
    tokenizer: Any
    device: str
    method: str

    def render(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# Headroom over the weights when answering on one GPU: a fifth (KV cache, activations of a batch) and 2 GiB
# (CUDA context, the allocator's reserve). A model that needs more is spread over the pod's GPUs.
INFERENCE_HEADROOM = 1.2
INFERENCE_OVERHEAD_GIB = 2.0


def inference_weights_gib(weights_gib: float | None, parallelism: str | None, gpu_count: int) -> float | None:
    """The whole model's weights in GPU memory for answering, from prepare's training estimate (MemoryEstimate:
    `weightsGib` is per GPU, a shard under FSDP); None when prepare gave no estimate."""
    if weights_gib is None:
        return None
    return weights_gib * max(gpu_count, 1) if parallelism == "fsdp" else weights_gib


def inference_devices(weights_gib: float | None, gpu_memory_gib: float, gpus: int) -> str:
    """Where a model answers: `cpu` without a GPU; `cuda:0` when it has one GPU or its weights (with headroom)
    fit one; `auto` (its layers spread over every GPU: a bf16 Mixtral-8x7B) only when they do not, or when their
    size is unknown. A 4-bit 7B model on a pod with two GPUs runs on one: no activation crosses devices."""
    if gpus <= 0:
        return "cpu"
    if gpus == 1:
        return "cuda:0"
    if weights_gib is not None and weights_gib * INFERENCE_HEADROOM + INFERENCE_OVERHEAD_GIB <= gpu_memory_gib:
        return "cuda:0"
    return "auto"


def pick_device() -> str:
    from ftc_step.loading import cuda_available

    return "cuda" if cuda_available() else "cpu"


def load_model(
    base_path: str | Path,
    adapter_path: str | Path | None,
    *,
    method: str = "lora",
    quantization: Any = None,
    chat_template: str | None = None,
    device: str | None = None,
    merge: bool = True,
    spread: bool | None = None,
) -> LoadedModel:
    """The base model and tokenizer loaded as training loaded them (ftc_step.loading), with the LoRA adapter.

    The tokenizer comes from the adapter folder when the trainer saved one there, else from the base; it
    pads on the left for generation. One GPU: everything on it; several (a bf16 Mixtral-8x7B needs
    ~90 GB): the layers spread over them. `lora` adapters are merged into the weights (same outputs,
    faster); `qlora` ones stay separate. `spread`: False keeps a model on one GPU however many the pod has
    (see `inference_devices`); None spreads on a GPU."""
    from ftc_step.loading import load_base_model, load_tokenizer

    device = device or pick_device()
    tokenizer_source = (
        adapter_path if adapter_path is not None and (Path(adapter_path) / "tokenizer_config.json").exists() else base_path
    )
    tokenizer = load_tokenizer(str(tokenizer_source), chat_template, padding_side="left")
    spread = device.startswith("cuda") if spread is None else spread and device.startswith("cuda")
    model, _ = load_base_model(str(base_path), method, quantization, device=device, spread=spread)
    if adapter_path is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_path))
        if merge and method != "qlora":
            model = model.merge_and_unload()
    model.eval()
    return LoadedModel(model, tokenizer, device, method)


def make_batch_generator(loaded: LoadedModel, generation: Any) -> Callable[[list[str]], list[tuple[str, int]]]:
    """A function that answers a batch of rendered prompts: [(answer text, new tokens)]."""
    import torch

    model, tokenizer = loaded.model, loaded.tokenizer
    eos_ids = _eos_ids(model, tokenizer)
    sample = bool(getattr(generation, "do_sample", False))
    options: dict[str, Any] = {
        "max_new_tokens": int(getattr(generation, "max_new_tokens", 256)),
        "do_sample": sample,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": eos_ids,
    }
    if sample:
        options.update(temperature=float(generation.temperature), top_p=float(generation.top_p))
    else:
        options.update(temperature=None, top_p=None, top_k=None)

    def generate_batch(prompts: list[str]) -> list[tuple[str, int]]:
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(loaded.device)
        encoded.pop("token_type_ids", None)
        with torch.inference_mode():
            output = model.generate(**encoded, **options)
        new = output[:, encoded["input_ids"].shape[1] :]
        results = []
        for row in new.tolist():
            cut = next((i for i, t in enumerate(row) if t in eos_ids), len(row))
            results.append((tokenizer.decode(row[:cut], skip_special_tokens=True).strip(), cut))
        return results

    return generate_batch


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, list):
        ids.update(configured)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def answer_rows(loaded: LoadedModel, rows: Sequence[TestRow], generation: Any) -> tuple[list[Prediction], GenerationStats]:
    """Answer every row with `loaded`; batch size from `generation.batch_size` (0 = adaptive)."""
    import torch

    if getattr(generation, "do_sample", False):
        torch.manual_seed(int(generation.seed))
    prompts = [loaded.render(row.messages) for row in rows]

    def free() -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    outputs, stats = generate_adaptive(
        prompts, make_batch_generator(loaded, generation), int(getattr(generation, "batch_size", 0)), on_oom=free
    )
    predictions = [
        Prediction(row.index, row.question, row.reference, answer, tokens, round(latency, 4), batch, row.messages)
        for row, (answer, tokens, latency, batch) in zip(rows, outputs, strict=True)
    ]
    return predictions, stats


def unload(loaded: LoadedModel | None) -> None:
    """Free a model's memory before the next one loads."""
    import gc

    import torch

    if loaded is not None:
        loaded.model = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
