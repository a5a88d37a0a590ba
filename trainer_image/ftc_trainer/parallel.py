"""Data-parallel training across the GPUs of one pod (one process per GPU, see ``launch.py``).

Pure decisions here; the train step applies them:

- the effective batch (perDeviceBatchSize x gradientAccumulationSteps, as on one GPU) is kept on N
  processes by giving each process gradientAccumulationSteps / N micro-batches per optimizer step; when N
  does not divide it, each process keeps the spec's accumulation and the N-fold larger batch is recorded
  in the result's `forced` settings (a deviation the fairness record shows);
- DDP: every process holds the whole model on its own GPU; FSDP: transformers' Trainer shards it
  (accelerate's FSDP plugin), wrapping each decoder block.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any


def world_size(env: Mapping[str, str] = os.environ) -> int:
    """Training processes of this pod (torchrun's WORLD_SIZE; 1 outside torchrun)."""
    try:
        return max(1, int(env.get("WORLD_SIZE") or 1))
    except ValueError:
        return 1


def split_accumulation(accumulation: int, processes: int) -> tuple[int, str | None]:
    """Micro-batches per process per optimizer step, and the deviation to record when the effective batch
    cannot stay that of one GPU."""
    if processes <= 1:
        return accumulation, None
    if accumulation % processes == 0:
        return accumulation // processes, None
    return accumulation, (
        f"{accumulation} per process on {processes} processes: the effective batch is {processes}x that of one GPU "
        f"(gradientAccumulationSteps {accumulation} does not divide by {processes})"
    )


def block_class_names(model: Any) -> list[str]:
    """Class names of the decoder blocks (what FSDP wraps one unit at a time)."""
    names = getattr(model, "_no_split_modules", None) or []
    return sorted(set(names))


def fsdp_arguments(blocks: Sequence[str]) -> dict[str, Any]:
    """TrainingArguments settings that shard a model with FSDP: full sharding, one unit per decoder block
    (`blocks`: their class names, :func:`block_class_names`), original parameters kept (LoRA trains some
    parameters of a module and freezes the others)."""
    return {
        "fsdp": "full_shard auto_wrap",
        "fsdp_config": {
            "transformer_layer_cls_to_wrap": list(blocks),
            "use_orig_params": True,
            "sync_module_states": False,
            "cpu_ram_efficient_loading": False,
            "activation_checkpointing": False,
        },
    }
