"""The train step's TrainingArguments: a pure mapping from the spec and how the pod trains (ftc_trainer.arguments),
as a table of cases, each naming only the settings it changes and the arguments they give."""

from __future__ import annotations

from typing import Any

import pytest
from ftc_api.spec import Scheduler, TrainingSpec
from ftc_trainer.arguments import training_arguments

pytestmark = pytest.mark.unit

SPEC = TrainingSpec(
    epochs=2,
    learning_rate=1e-4,
    lr_scheduler=Scheduler.COSINE,
    warmup_ratio=0.05,
    weight_decay=0.01,
    per_device_batch_size=4,
    gradient_accumulation_steps=4,
    eval_steps=25,
    save_steps=50,
    logging_steps=5,
    seed=7,
)

# What one process on the CPU gets for SPEC: every case below starts from this.
BASE: dict[str, Any] = {
    "output_dir": "/work/trainer",
    "num_train_epochs": 2,
    "max_steps": -1,
    "per_device_train_batch_size": 4,
    "per_device_eval_batch_size": 4,
    "gradient_accumulation_steps": 4,
    "learning_rate": 1e-4,
    "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.05,
    "weight_decay": 0.01,
    "eval_strategy": "steps",
    "eval_steps": 25,
    "save_strategy": "steps",
    "save_steps": 50,
    "save_total_limit": 1,
    "logging_strategy": "steps",
    "logging_steps": 5,
    "seed": 7,
    "data_seed": 7,
    "bf16": False,
    "use_cpu": True,
    "gradient_checkpointing": True,
    "gradient_checkpointing_kwargs": {"use_reentrant": False},
    "include_num_input_tokens_seen": "non_padding",
    "remove_unused_columns": False,
    "prediction_loss_only": True,
    "report_to": [],
    "disable_tqdm": True,
    "dataloader_num_workers": 0,
    "ddp_find_unused_parameters": False,
    "ddp_timeout": 1800,
}

FSDP = {
    "fsdp": "full_shard auto_wrap",
    "fsdp_config": {
        "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
        "use_orig_params": True,
        "sync_module_states": False,
        "cpu_ram_efficient_loading": False,
        "activation_checkpointing": False,
    },
}

CASES = [
    pytest.param({}, {}, {}, id="one-process-on-the-cpu"),
    pytest.param({"max_steps": 30}, {}, {"max_steps": 30}, id="max-steps"),
    pytest.param({"lr_scheduler": Scheduler.CONSTANT}, {}, {"lr_scheduler_type": "constant"}, id="scheduler-by-name"),
    pytest.param({}, {"has_eval": False}, {"eval_strategy": "no"}, id="no-eval-set-no-eval"),
    pytest.param({}, {"cuda": True, "bf16_supported": True}, {"bf16": True, "use_cpu": False}, id="gpu-with-bf16"),
    pytest.param({}, {"cuda": True, "bf16_supported": False}, {"bf16": False, "use_cpu": False}, id="gpu-without-bf16"),
    pytest.param({}, {"cuda": False, "bf16_supported": True}, {"bf16": False, "use_cpu": True}, id="cpu-never-bf16"),
    pytest.param({}, {"processes": 2, "parallelism": "ddp"}, {"gradient_accumulation_steps": 2}, id="ddp-divides-accumulation"),
    pytest.param(
        {"gradient_accumulation_steps": 3},
        {"processes": 2, "parallelism": "ddp"},
        {"gradient_accumulation_steps": 3},
        id="ddp-keeps-an-accumulation-it-cannot-divide",
    ),
    pytest.param(
        {},
        {"processes": 2, "parallelism": "fsdp", "blocks": ["LlamaDecoderLayer"]},
        {"gradient_accumulation_steps": 2, **FSDP},
        id="fsdp-wraps-each-block",
    ),
    pytest.param({}, {"parallelism": "ddp", "blocks": ["LlamaDecoderLayer"]}, {}, id="blocks-matter-only-to-fsdp"),
    pytest.param(
        {},
        {"processes": 2, "parallelism": "ddp", "moe": True},
        {"gradient_accumulation_steps": 2, "ddp_find_unused_parameters": True},
        id="ddp-moe-finds-unused",
    ),
    pytest.param({}, {"moe": True}, {"ddp_find_unused_parameters": True}, id="moe-one-process"),
    pytest.param({"packing": True}, {}, {"include_num_input_tokens_seen": "all"}, id="packing-counts-every-token"),
    pytest.param({"gradient_checkpointing": False}, {}, {"gradient_checkpointing": False}, id="no-gradient-checkpointing"),
    pytest.param(
        {"process_group_timeout_seconds": 5},
        {"processes": 2, "parallelism": "ddp"},
        {"gradient_accumulation_steps": 2, "ddp_timeout": 5},
        id="process-group-timeout",
    ),
]


@pytest.mark.parametrize(("spec", "run", "changed"), CASES)
def test_training_arguments(spec: dict[str, Any], run: dict[str, Any], changed: dict[str, Any]) -> None:
    training = SPEC.model_copy(update=spec)
    assert training_arguments(training, output_dir="/work/trainer", **run) == BASE | changed


@pytest.mark.parametrize(
    ("spec", "run"),
    [
        pytest.param({}, {}, id="one-process-on-the-cpu"),
        pytest.param({"max_steps": 30, "packing": True}, {"has_eval": False}, id="no-eval-packing"),
    ],
)
def test_transformers_takes_the_arguments(spec: dict[str, Any], run: dict[str, Any], tmp_path) -> None:
    from ftc_trainer.train import FtcTrainingArguments

    kwargs = training_arguments(SPEC.model_copy(update=spec), output_dir=str(tmp_path), **run)
    args = FtcTrainingArguments(**kwargs)
    assert args.gradient_accumulation_steps == kwargs["gradient_accumulation_steps"] and args.device.type == "cpu"


@pytest.mark.parametrize(
    ("config", "moe"),
    [
        ("MixtralConfig", True),
        ("Qwen2MoeConfig", True),
        ("OlmoeConfig", True),
        ("DeepseekV3Config", True),
        ("DbrxConfig", True),  # experts counted in its ffn_config
        ("LlamaConfig", False),
        ("MistralConfig", False),
        ("Qwen2Config", False),
        ("GPT2Config", False),
    ],
)
def test_a_mixture_of_experts_is_told_by_its_config(config: str, moe: bool) -> None:
    import transformers
    from ftc_trainer.arguments import is_mixture_of_experts

    assert is_mixture_of_experts(getattr(transformers, config)()) is moe


def test_one_expert_is_no_mixture() -> None:
    from types import SimpleNamespace

    from ftc_trainer.arguments import is_mixture_of_experts

    assert not is_mixture_of_experts(SimpleNamespace(num_local_experts=1))
    assert not is_mixture_of_experts(SimpleNamespace(num_experts=None))
    assert is_mixture_of_experts(SimpleNamespace(text_config=SimpleNamespace(num_experts=8)))
