"""Tiny, locally built ML assets: two models, a tokenizer and instruction datasets. Nothing is downloaded.

Builders (plain functions, also runnable as `python -m devcluster.models.tiny --out DIR`):
- `build_dataset(path)`: ~300 alpaca rows of templated facts a tiny model learns in seconds
  (single-digit arithmetic, country capitals, word reversal, opposites).
- `build_messy_dataset(path)`: the same kind of rows plus duplicates, empty rows, rows with no answer,
  unparseable lines and rows of the wrong type (counts in `MESSY_COUNTS`).
- `build_chat_dataset(path)` / `build_sharegpt_dataset(path)`: the facts as `messages` / `conversations`.
- `build_tokenizer(texts)`: a byte-level BPE tokenizer trained on the data, with a chat template,
  `<pad>` pad token and `<|end|>` as end of turn (eos).
- `build_model(kind, tokenizer, path)`: `tiny-llama` (LlamaForCausalLM, ~0.5M parameters) or
  `tiny-mixtral` (MixtralForCausalLM, 4 experts top-2, ~0.6M parameters);
  widths are multiples of 64, bitsandbytes' 4-bit block size (its CPU kernels need that), seeded random weights.
- `build_all(out)`: everything under OUT/{models/tiny-llama, models/tiny-mixtral, data/*.jsonl}.

Pytest fixtures (session-scoped):
- `tiny_assets` -> TinyAssets with the local paths (built once per session under a tmp dir).
- `tiny_s3` -> TinyS3: the same assets uploaded to the local S3 server (`local_s3`, MinIO), with manifests.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SEED = 1234
VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<pad>", "<s>", "<unk>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
MODEL_KINDS = ("tiny-llama", "tiny-mixtral")

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "China": "Beijing",
    "India": "Delhi",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Cuba": "Havana",
    "Canada": "Ottawa",
    "Russia": "Moscow",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Poland": "Warsaw",
    "Austria": "Vienna",
    "Greece": "Athens",
    "Ireland": "Dublin",
    "Turkey": "Ankara",
    "Iran": "Tehran",
    "Iraq": "Baghdad",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "Ghana": "Accra",
    "Mali": "Bamako",
    "Nepal": "Kathmandu",
}
WORDS = ["cat", "dog", "sun", "tree", "book", "lamp", "road", "star", "fish", "milk", "door", "rain", "wind", "bird"]
OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "up": "down",
    "fast": "slow",
    "light": "dark",
    "old": "new",
    "open": "closed",
    "happy": "sad",
    "early": "late",
    "full": "empty",
}


# ---------------------------------------------------------------------------------------------- data


def fact_rows() -> list[dict[str, str]]:
    """~300 distinct alpaca rows, in a fixed order."""
    rows: list[dict[str, str]] = []
    for a in range(10):
        for b in range(10):
            rows.append({"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} plus {b} is {a + b}."})
    for a in range(2, 10):
        for b in range(2, 6):
            rows.append({"instruction": "Multiply the two numbers.", "input": f"{a} and {b}", "output": f"{a * b}"})
    for country, city in CAPITALS.items():
        rows.append({"instruction": f"What is the capital of {country}?", "input": "", "output": f"The capital is {city}."})
        rows.append({"instruction": "Name the capital city.", "input": country, "output": city})
    for word in WORDS:
        rows.append({"instruction": "Reverse the word.", "input": word, "output": word[::-1]})
        rows.append({"instruction": f"Spell {word} backwards.", "input": "", "output": " ".join(word[::-1])})
        rows.append({"instruction": f"How many letters are in {word}?", "input": "", "output": str(len(word))})
    for word, opposite in OPPOSITES.items():
        rows.append({"instruction": f"What is the opposite of {word}?", "input": "", "output": opposite})
        rows.append({"instruction": "Give the opposite word.", "input": opposite, "output": word})
    return rows


def _write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        for row in rows:
            out.write(row if isinstance(row, str) else json.dumps(row, sort_keys=True))
            out.write("\n")
    return path


def build_dataset(path: Path) -> Path:
    """The clean alpaca dataset (JSONL)."""
    rows = fact_rows()
    random.Random(SEED).shuffle(rows)
    return _write_jsonl(Path(path), rows)


MESSY_COUNTS = {"good": 60, "duplicate": 5, "empty": 3, "no_assistant_turn": 2, "unparseable": 4}


def build_messy_dataset(path: Path) -> Path:
    """60 good alpaca rows plus 5 duplicates, 3 empty rows, 2 rows without an answer and 4 unparseable lines."""
    good = fact_rows()[:60]
    rows: list[Any] = list(good)
    rows += [dict(good[i]) for i in (0, 7, 7, 20, 59)]  # duplicates
    rows += [
        {"instruction": "", "input": "", "output": ""},
        {"instruction": "   ", "input": "", "output": "\n"},
        {},
    ]  # empty
    rows += [
        {"instruction": "What is 1 plus 1?", "input": "", "output": ""},
        {"instruction": "Name a colour.", "input": ""},
    ]  # no answer: no assistant turn
    rows += ['{"instruction": "broken', "[1, 2, 3]", '"just a string"', {"instruction": 5, "output": ["x"]}]  # unparseable
    random.Random(SEED).shuffle(rows)
    return _write_jsonl(Path(path), rows)


def to_messages(row: dict[str, str]) -> list[dict[str, str]]:
    user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]


def build_chat_dataset(path: Path, n: int = 80) -> Path:
    """Chat rows: `messages` with a system turn on every third row."""
    rows = []
    for i, row in enumerate(fact_rows()[:n]):
        messages = to_messages(row)
        if i % 3 == 0:
            messages.insert(0, {"role": "system", "content": "Answer briefly."})
        rows.append({"messages": messages})
    return _write_jsonl(Path(path), rows)


def build_sharegpt_dataset(path: Path, n: int = 80) -> Path:
    """ShareGPT rows: `conversations` of {from: human|gpt|system, value}."""
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    rows = [
        {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in to_messages(row)]}
        for row in fact_rows()[:n]
    ]
    return _write_jsonl(Path(path), rows)


# ---------------------------------------------------------------------------------------------- tokenizer and models


def build_tokenizer(texts: list[str]) -> Any:
    """A byte-level BPE tokenizer trained on `texts`, wrapped as PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="<|end|>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        model_max_length=512,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def model_config(kind: str, tokenizer: Any) -> Any:
    """The config of a tiny model; the two kinds differ in architecture and width."""
    from transformers import LlamaConfig, MixtralConfig

    common = dict(
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    if kind == "tiny-llama":
        return LlamaConfig(hidden_size=128, intermediate_size=256, **common)
    if kind == "tiny-mixtral":
        return MixtralConfig(
            hidden_size=128,
            intermediate_size=128,
            num_local_experts=4,
            num_experts_per_tok=2,
            router_aux_loss_coef=0.02,
            sliding_window=None,
            **common,
        )
    raise ValueError(f"unknown tiny model kind {kind!r}; expected one of {MODEL_KINDS}")


def build_model(kind: str, tokenizer: Any, path: Path) -> Path:
    """Build a seeded tiny model and save it (safetensors) with the tokenizer to `path`."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(model_config(kind, tokenizer))
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------- everything


@dataclass(frozen=True)
class TinyAssets:
    """Local paths of the tiny assets."""

    root: Path
    llama: Path
    mixtral: Path
    dataset: Path
    messy: Path
    chat: Path
    sharegpt: Path

    def model(self, kind: str) -> Path:
        return {"tiny-llama": self.llama, "tiny-mixtral": self.mixtral}[kind]


def build_all(out: Path) -> TinyAssets:
    """Build every asset under `out` (skips what is already there)."""
    out = Path(out)
    data = out / "data"
    assets = TinyAssets(
        root=out,
        llama=out / "models" / "tiny-llama",
        mixtral=out / "models" / "tiny-mixtral",
        dataset=data / "tiny-alpaca.jsonl",
        messy=data / "messy-alpaca.jsonl",
        chat=data / "tiny-chat.jsonl",
        sharegpt=data / "tiny-sharegpt.jsonl",
    )
    build_dataset(assets.dataset)
    build_messy_dataset(assets.messy)
    build_chat_dataset(assets.chat)
    build_sharegpt_dataset(assets.sharegpt)
    if not all((assets.model(k) / "config.json").exists() for k in MODEL_KINDS):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        texts = []
        for row in fact_rows():
            texts.append(row["instruction"] + " " + row["input"] + " " + row["output"])
        texts += ["Answer briefly.", "system user assistant"]
        tokenizer = build_tokenizer(texts)
        for kind in MODEL_KINDS:
            build_model(kind, tokenizer, assets.model(kind))
    return assets


@dataclass(frozen=True)
class TinyS3:
    """The tiny assets in S3: model prefixes (with manifests) and dataset objects."""

    endpoint_url: str
    bucket: str
    llama: str
    mixtral: str
    dataset: str
    messy: str

    def model(self, kind: str) -> str:
        return {"tiny-llama": self.llama, "tiny-mixtral": self.mixtral}[kind]


def new_run(tiny_s3: TinyS3, data_prefix: str, run: str, tmp_path: Path) -> Any:
    """A fresh run prefix (a Location) holding a verified copy of the prepared data."""
    from ftc_api.steps import Location
    from ftc_step.storage import Storage

    store = Storage(endpoint_url=tiny_s3.endpoint_url)
    loc = Location(bucket=tiny_s3.bucket, prefix=f"runs/{run}-{time.monotonic_ns()}", endpoint_url=tiny_s3.endpoint_url)
    store.download_verified(data_prefix, tmp_path / "data-copy")
    store.upload_tree(tmp_path / "data-copy", loc.uri("data"))
    return loc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build ftc's tiny models, tokenizer and datasets.")
    parser.add_argument("--out", required=True, type=Path, help="directory to write models/ and data/ into")
    args = parser.parse_args(argv)
    assets = build_all(args.out)
    print(json.dumps({k: str(v) for k, v in assets.__dict__.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
