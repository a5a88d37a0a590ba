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
        name.removeprefix("base_model.model."): (str(p.dtype), tuple(p.shape))
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
