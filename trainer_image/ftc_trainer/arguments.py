"""The train step's `TrainingArguments`, as a pure mapping from the spec and how the pod trains.

No I/O and no heavy import: `training_arguments(...)` returns the keyword arguments the train step hands
to transformers' `TrainingArguments` (its table of cases lives with the unit tests). What it maps:

- the schedule: epochs, maxSteps (-1: none), learning rate, scheduler, warmup, weight decay, seed (also
  the data order's);
- the batch: perDeviceBatchSize for train and eval; gradientAccumulationSteps divided over the training
  processes so that the effective batch is that of one GPU (`parallel.split_accumulation`);
- evaluation every evalSteps when there is an eval set, checkpoints every saveSteps (one kept locally:
  the uploaded ones are the record), the train loss every loggingSteps;
- the device: bf16 on a GPU that supports it, the CPU when there is no GPU; gradient checkpointing
  (non-reentrant, as LoRA with frozen inputs needs);
- `fsdp` parallelism: transformers' FSDP settings wrapping each decoder block (`parallel.fsdp_arguments`);
- DDP's search for unused parameters, set on purpose from the model (`is_mixture_of_experts`): on for a
  mixture of experts, whose idle experts (and their LoRA weights) get no gradient in a step that routes no
  token to them, so DDP must look for them or fail with "Expected to have finished reduction"; off for a
  dense model, where every trainable parameter gets a gradient and the search is a wasted pass over the
  graph each step (left unset, transformers turns it on for any model that is not a PreTrainedModel, which
  a PeftModel is not);
- the process group's timeout: processGroupTimeoutSeconds (`ddp_timeout`, the same value the train step
  creates the group with);
- fixed choices: tokens counted (all of them with packing, where there is no padding, else the non-padding
  ones), no logits gathered in eval (the loss only), no columns removed, no reporting integrations,
  no progress bars, no data-loading workers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ftc_api.spec import TrainingSpec

from .parallel import fsdp_arguments, split_accumulation

# Config attributes that count a mixture of experts' experts, by architecture: Mixtral, GPT-OSS, Phi-MoE and
# Granite-MoE (num_local_experts); Qwen2/3-MoE, OLMoE, Jamba, Switch (num_experts); DeepSeek-V2/V3
# (n_routed_experts); DBRX's ffn_config (moe_num_experts).
EXPERT_COUNT_ATTRIBUTES = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def is_mixture_of_experts(config: Any) -> bool:
    """Whether a model config (transformers' PretrainedConfig, or any object with its attributes) routes
    tokens among more than one expert; a multimodal config is judged by its text model's config."""
    for part in (config, getattr(config, "text_config", None), getattr(config, "ffn_config", None)):
        for name in EXPERT_COUNT_ATTRIBUTES:
            count = getattr(part, name, None) if part is not None else None
            if isinstance(count, int) and not isinstance(count, bool) and count > 1:
                return True
    return False


def training_arguments(
    training: TrainingSpec,
    *,
    output_dir: str,
    processes: int = 1,
    parallelism: str = "single",
    blocks: Sequence[str] = (),
    has_eval: bool = True,
    cuda: bool = False,
    bf16_supported: bool = False,
    moe: bool = False,
) -> dict[str, Any]:
    """TrainingArguments kwargs for `training` run by `processes` processes under `parallelism` (`single`,
    `ddp` or `fsdp`, whose units are the decoder `blocks`), with or without an eval set, on a GPU (`cuda`)
    or the CPU, for a mixture of experts (`moe`) or a dense model."""
    accumulation, _ = split_accumulation(training.gradient_accumulation_steps, processes)
    return {
        "output_dir": output_dir,
        "num_train_epochs": training.epochs,
        "max_steps": training.max_steps or -1,
        "per_device_train_batch_size": training.per_device_batch_size,
        "per_device_eval_batch_size": training.per_device_batch_size,
        "gradient_accumulation_steps": accumulation,
        "learning_rate": training.learning_rate,
        "lr_scheduler_type": training.lr_scheduler.value,
        "warmup_ratio": training.warmup_ratio,
        "weight_decay": training.weight_decay,
        "eval_strategy": "steps" if has_eval else "no",
        "eval_steps": training.eval_steps,
        "save_strategy": "steps",
        "save_steps": training.save_steps,
        "save_total_limit": 1,
        "logging_strategy": "steps",
        "logging_steps": training.logging_steps,
        "seed": training.seed,
        "data_seed": training.seed,
        "bf16": bool(cuda and bf16_supported),
        "use_cpu": not cuda,
        "gradient_checkpointing": training.gradient_checkpointing,
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
        "include_num_input_tokens_seen": "all" if training.packing else "non_padding",  # padding-free: all are real
        "remove_unused_columns": False,
        "prediction_loss_only": True,  # eval needs the loss only: never gather logits over the eval set
        "report_to": [],
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "ddp_find_unused_parameters": moe,  # idle experts get no gradient; a dense model needs no search
        "ddp_timeout": training.process_group_timeout_seconds,  # the group itself is made by train.join_process_group
        **(fsdp_arguments(blocks, cuda) if parallelism == "fsdp" else {}),
    }
