"""A generated multi-file hub repository for staging tests and the staging bench: the tiny Llama's config and
tokenizer (a real transformers model as far as prepare reads it) beside N safetensors shards of random bytes.

Each shard is a valid safetensors file (one uint8 tensor), and `model.safetensors.index.json` maps the tensors
to their shards, as a sharded checkpoint on the hub does. Random bytes do not compress, so what moves is what
a real checkpoint of that size moves. Written once per directory (a marker beside it skips a second build).

    python -m devcluster.models.sharded OUT --shards 8 --shard-mb 20
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

LIGHT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
# A Llama of about 70B parameters: its config alone says it cannot fit one 80 GB GPU with LoRA in bf16.
HUGE_LLAMA = {
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
}


def write_shard(path: Path, name: str, size: int) -> None:
    """A safetensors file holding one uint8 tensor `name` of `size` random bytes."""
    header = json.dumps({name: {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(header)) + header)
        left = size
        while left:
            chunk = min(left, 8 << 20)
            out.write(os.urandom(chunk))
            left -= chunk


def build_sharded_repo(
    out: Path, base: Path, shards: int = 8, shard_mb: float = 20, config: dict[str, Any] | None = None
) -> Path:
    """Write the repository into `out` from the tiny model directory `base` (config and tokenizer files);
    `config` overrides fields of config.json. Returns `out`."""
    out = Path(out)
    marker = out.parent / f"{out.name}.built"  # beside it: the hub serves every file inside
    if marker.exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for name in LIGHT_FILES:
        if (base / name).is_file():
            shutil.copyfile(base / name, out / name)
    if config:
        doc = json.loads((out / "config.json").read_text())
        doc.update(config)
        (out / "config.json").write_text(json.dumps(doc, indent=2))
    size = int(shard_mb * 2**20)
    weight_map = {}
    for i in range(1, shards + 1):
        shard = f"model-{i:05d}-of-{shards:05d}.safetensors"
        tensor = f"model.layers.{i - 1}.weight"
        write_shard(out / shard, tensor, size)
        weight_map[tensor] = shard
    index = {"metadata": {"total_size": size * shards}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    marker.touch()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--base", type=Path, required=True, help="the tiny model directory (config and tokenizer)")
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--shard-mb", type=float, default=20)
    args = p.parse_args(argv)
    build_sharded_repo(args.out, args.base, args.shards, args.shard_mb)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
