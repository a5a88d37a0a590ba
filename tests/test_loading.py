"""One loader for both images: the evaluator's base model is the one training adapted (same dtype, same
4-bit layout, same tokenizer settings), since both go through ftc_step.loading."""

from __future__ import annotations

import pytest
from ftc_api.spec import Method, QuantizationSpec, TrainingSpec

from devcluster.models.tiny import TinyAssets

QUANT = QuantizationSpec(quant_type="nf4", double_quant=False)


def layout(model) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every base parameter's dtype and shape (the LoRA and k-bit preparation leave these alone)."""
    return {
        name.removeprefix("base_model.model.").replace(".base_layer.", "."): (str(p.dtype), tuple(p.shape))
        for name, p in model.named_parameters()
        if "lora_" not in name
    }


@pytest.mark.ml
@pytest.mark.parametrize("method", [Method.LORA, Method.QLORA])
def test_the_evaluator_loads_the_base_model_training_saw(tiny_assets: TinyAssets, method: Method) -> None:
    from ftc_evaluator.generate import load_model as load_for_answers
    from ftc_trainer.models import load_model as load_for_training
    from ftc_trainer.models import load_tokenizer

    path = str(tiny_assets.llama)
    trained, forced = load_for_training(path, method, TrainingSpec(quantization=QUANT))
    answering = load_for_answers(path, None, method=method.value, quantization=QUANT)
    assert layout(answering.model) == layout(trained)
    if method == Method.QLORA:
        train_quant = trained.config.quantization_config.to_dict()
        assert train_quant == answering.model.config.quantization_config.to_dict()
        assert train_quant["bnb_4bit_use_double_quant"] is False  # the spec's setting reached both
        assert forced == {"computeDtype": "float32 (no GPU: bf16 is used on GPUs)"}
    else:
        assert forced == {"dtype": "float32 (no GPU: bf16 is used on GPUs)"}
    tokenizer = load_tokenizer(path)
    assert (answering.tokenizer.chat_template, answering.tokenizer.pad_token) == (tokenizer.chat_template, tokenizer.pad_token)
    assert answering.tokenizer.padding_side == "left"


# ---------------------------------------------------------------------------------------------- one dtype policy


@pytest.mark.unit
@pytest.mark.parametrize(
    ("method", "on_gpu", "sharded", "compute", "expected"),
    [
        ("lora", True, False, None, ("bfloat16", None, "bfloat16", set())),
        ("lora", True, True, None, ("bfloat16", None, "bfloat16", set())),
        ("lora", False, False, None, ("float32", None, "float32", {"dtype"})),
        ("qlora", True, False, None, ("bfloat16", "uint8", "bfloat16", set())),
        ("qlora", True, True, None, ("bfloat16", "bfloat16", "bfloat16", set())),  # FSDP: one dtype per block
        ("qlora", True, True, "float16", ("float16", "float16", "float16", set())),
        ("qlora", False, False, "float16", ("float32", "uint8", "float32", {"computeDtype"})),
        ("qlora", False, True, None, ("float32", "float32", "float32", {"computeDtype"})),
    ],
    ids=["lora-gpu", "lora-gpu-fsdp", "lora-cpu", "qlora-gpu", "qlora-gpu-fsdp", "qlora-gpu-fp16-fsdp", "qlora-cpu",
         "qlora-cpu-fsdp"],
)  # fmt: skip
def test_one_dtype_policy(method, on_gpu, sharded, compute, expected) -> None:
    from ftc_step.dtypes import dtype_policy

    policy = dtype_policy(method, on_gpu, sharded, compute)
    want_compute, storage, rest, forced = expected
    assert (policy.compute, policy.quant_storage, set(policy.forced)) == (want_compute, storage, forced)
    # Norms, embeddings, head and routers: never upcast, the compute dtype under every method and parallelism.
    assert {policy.dtype_for(r) for r in ("norm", "embedding", "head", "router", "linear")} == {rest}


@pytest.mark.unit
@pytest.mark.parametrize(
    ("name", "module_class", "role"),
    [
        ("model.layers.0.input_layernorm.weight", "LlamaRMSNorm", "norm"),
        ("model.norm.weight", "MixtralRMSNorm", "norm"),
        ("model.embed_tokens.weight", "Embedding", "embedding"),
        ("lm_head.weight", "Linear", "head"),
        ("model.layers.1.block_sparse_moe.gate.weight", "Linear", "router"),
        ("model.layers.1.mlp.router.weight", "Linear", "router"),
        ("model.layers.0.mlp.gate_proj.weight", "Linear4bit", "linear"),
        ("model.layers.0.self_attn.q_proj.bias", "Linear", "linear"),
        ("model.layers.1.mlp.experts.gate_up_proj", "MixtralExperts", "other"),
    ],
)
def test_parameter_roles(name, module_class, role) -> None:
    from ftc_step.dtypes import role_of

    assert role_of(name, module_class) == role


@pytest.mark.ml
@pytest.mark.parametrize("method", [Method.LORA, Method.QLORA])
def test_trainer_and_evaluator_agree_under_the_gpu_policy(
    tiny_assets: TinyAssets, method: Method, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GPU policy (bf16 compute) forced on the CPU: here an fp32 upcast by either side shows, where the
    CPU policy (everything fp32) would hide it."""
    import torch
    from ftc_evaluator.generate import load_model as load_for_answers
    from ftc_step.dtypes import FORCE_ENV, violations
    from ftc_step.loading import policy_for
    from ftc_trainer.models import load_model as load_for_training
    from ftc_trainer.models import lora_config, resolve_targets
    from peft import get_peft_model

    monkeypatch.setenv(FORCE_ENV, "gpu")
    training = TrainingSpec(quantization=QUANT)
    for path in (tiny_assets.llama, tiny_assets.mixtral):
        trained, forced = load_for_training(str(path), method, training)
        trained = get_peft_model(trained, lora_config(training, resolve_targets(trained, None)))  # as build_model does
        answering = load_for_answers(str(path), None, method=method.value, quantization=QUANT, merge=False)
        train_layout, answer_layout = layout(trained), layout(answering.model)
        assert train_layout == answer_layout
        policy = policy_for(method.value, QUANT, on_gpu=True)
        assert violations(trained, policy) == [] and violations(answering.model, policy) == []
        floats = {dtype for dtype, _ in train_layout.values() if dtype != "torch.uint8"}
        assert floats == {"torch.bfloat16"}, floats  # norms, embeddings, head and routers too: no fp32 upcast
        assert forced == {}  # the GPU recipe, not the CPU's
        assert answering.model.model.norm.weight.dtype == torch.bfloat16
