"""ftc's train and evaluate code on a real pretrained model: SmolLM2-135M-Instruct (Llama architecture, GPT-2-style
byte-level BPE, ChatML template, pad token == eos), built from its PyPI GGUF by devcluster/models/smollm2.py."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from ftc_api.spec import LoraSpec, Method, TrainingSpec
from ftc_api.steps import LossPoint, ModelRef, TrainInput, TrainResult
from ftc_step.storage import Storage

from devcluster.models.smollm2 import END_OF_TURN, PARAMETERS, SmolS3
from devcluster.models.tiny import TinyS3, new_run

TRAINING = TrainingSpec(
    max_steps=12,
    learning_rate=1e-3,
    lr_scheduler="constant",
    warmup_ratio=0.0,
    per_device_batch_size=8,
    gradient_accumulation_steps=1,
    max_seq_length=96,
    eval_steps=6,
    save_steps=100,
    logging_steps=2,
    gradient_checkpointing=False,
    lora=LoraSpec(r=8, alpha=16, dropout=0.0),
    seed=7,
)
GIB = 1024**3


@pytest.fixture(autouse=True)
def _model_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTC_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "ftc-model-cache"))


def _history(store: Storage, result: TrainResult) -> tuple[list[float], dict[int, float]]:
    points = [LossPoint.model_validate(p) for p in json.loads(store.read_text(result.metrics_uri or ""))]
    trains = [p.train_loss for p in points if p.train_loss is not None]
    evals = {p.step: p.eval_loss for p in points if p.eval_loss is not None}
    return trains, evals  # type: ignore[return-value]


@pytest.fixture(scope="module")
def lora_run(tiny_s3: TinyS3, data_prefix: str, smollm2_s3: SmolS3, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """SmolLM2 fine-tuned with LoRA for 12 steps on the tiny instructions (shared by the tests below)."""
    from ftc_trainer.train import run_train

    tmp = tmp_path_factory.mktemp("smol-lora")
    loc = new_run(tiny_s3, data_prefix, "smol-lora", tmp)
    ref = ModelRef(name="smollm2", base_model=smollm2_s3.uri, method=Method.LORA)
    return run_train(TrainInput(model=ref, training=TRAINING, location=loc), tmp / "work")


# ---------------------------------------------------------------------------------------------- pre-flight


@pytest.mark.ml
def test_the_preflight_estimate_counts_the_real_models_parameters_and_weights(smollm2: Path) -> None:
    import torch
    from ftc_trainer.memory import estimate
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(smollm2)
    est = estimate(
        config, Method.LORA, r=8, targets=None, batch_size=1, seq_length=64, gradient_checkpointing=False,
        double_quant=True, gpu_memory_gib=80,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.bfloat16)
    loaded = sum(p.numel() for p in model.parameters())  # tied embeddings once
    assert loaded == PARAMETERS and est.parameters == loaded
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # bf16, as LoRA loads it on a GPU
    assert est.weights_gib == pytest.approx(weight_bytes / GIB, abs=1e-3)
    on_disk = (smollm2 / "model.safetensors").stat().st_size
    assert est.disk_gib == pytest.approx(on_disk / GIB, rel=0.01)


@pytest.mark.ml
def test_the_qlora_estimate_matches_the_4bit_models_footprint(smollm2: Path) -> None:
    import torch
    from ftc_api.spec import QuantizationSpec
    from ftc_trainer.memory import count_parameters, estimate
    from ftc_trainer.models import load_model
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(smollm2)
    training = TRAINING.model_copy(update={"quantization": QuantizationSpec(compute_dtype="float32")})
    est = estimate(
        config, Method.QLORA, r=8, targets=None, batch_size=1, seq_length=64, gradient_checkpointing=False,
        double_quant=True, gpu_memory_gib=80,
    )  # fmt: skip
    model, _ = load_model(str(smollm2), Method.QLORA, training)
    footprint = model.get_memory_footprint()
    in_flight = count_parameters(config, None, 8)["largest"] * 2  # the estimate's one dequantised weight
    assert footprint / GIB == pytest.approx(est.weights_gib - in_flight / GIB, rel=0.05)
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    assert model.lm_head.weight.dtype == torch.float32  # kept in full precision (tied to the embeddings)


# ---------------------------------------------------------------------------------------------- labels


@pytest.mark.ml
def test_the_chatml_template_labels_only_the_answer_and_its_end_of_turn(smollm2: Path) -> None:
    from ftc_trainer.templates import IGNORE_INDEX, apply_template, encode
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    assert apply_template(tokenizer) == "tokenizer"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids(END_OF_TURN)
    messages = [
        {"role": "user", "content": "What is the capital of Ghana?"},
        {"role": "assistant", "content": "The capital is Accra."},
        {"role": "user", "content": "And of Mali?"},
        {"role": "assistant", "content": "Bamako."},
    ]
    item = encode(tokenizer, messages, max_length=256)
    ids, labels = item["input_ids"], item["labels"]
    assert all(label in (IGNORE_INDEX, t) for t, label in zip(ids, labels, strict=True))
    learned = [t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    assert tokenizer.decode(learned) == f"The capital is Accra.{END_OF_TURN}\nBamako.{END_OF_TURN}\n"
    # pad == eos, and the end of each answer is still learned: padding is masked by position, not by id.
    assert learned.count(tokenizer.eos_token_id) == 2
    prompt = tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label == IGNORE_INDEX])
    assert "You are a helpful AI assistant named SmolLM" in prompt and "capital of Ghana" in prompt
    assert "Accra" not in prompt


# ---------------------------------------------------------------------------------------------- training


@pytest.mark.ml
def test_lora_fine_tunes_the_real_model_and_the_loss_falls(lora_run: TrainResult, tiny_s3: TinyS3) -> None:
    assert lora_run.ok, lora_run.error
    assert lora_run.total_steps == 12 and set(lora_run.adapted_modules) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    }  # fmt: skip
    assert lora_run.trainable_parameters == 8 * 30 * (2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536))
    trains, evals = _history(Storage(endpoint_url=tiny_s3.endpoint_url), lora_run)
    assert trains[-1] < 0.6 * trains[0], trains
    assert evals[12] < evals[6], evals


@pytest.mark.ml
def test_qlora_fine_tunes_the_real_model_and_the_loss_falls(
    tiny_s3: TinyS3, data_prefix: str, smollm2_s3: SmolS3, tmp_path: Path
) -> None:
    from ftc_trainer.train import run_train

    loc = new_run(tiny_s3, data_prefix, "smol-qlora", tmp_path)
    ref = ModelRef(name="smollm2-qlora", base_model=smollm2_s3.uri, method=Method.QLORA)
    training = TRAINING.model_copy(update={"max_steps": 8, "eval_steps": 4})
    result = run_train(TrainInput(model=ref, training=training, location=loc), tmp_path / "work")
    assert result.ok, result.error
    trains, evals = _history(Storage(endpoint_url=tiny_s3.endpoint_url), result)
    assert trains[-1] < 0.8 * trains[0], trains
    assert evals[8] < evals[4], evals


# ---------------------------------------------------------------------------------------------- answers


def _answers(base: Path, adapter: Path | None, questions: list[str]) -> list[Any]:
    from ftc_evaluator.generate import TestRow, answer_rows, load_model, unload

    loaded = load_model(base, adapter, method="lora", device="cpu")
    rows = [TestRow(i, [{"role": "user", "content": q}], q, "") for i, q in enumerate(questions)]
    predictions, _ = answer_rows(loaded, rows, SimpleNamespace(max_new_tokens=32, do_sample=False, batch_size=0))
    unload(loaded)
    return predictions


@pytest.mark.ml
def test_the_evaluator_answers_with_the_adapter_in_the_trained_format_and_stops(
    lora_run: TrainResult, smollm2: Path, tiny_s3: TinyS3, tmp_path: Path
) -> None:
    store = Storage(endpoint_url=tiny_s3.endpoint_url)
    adapter = tmp_path / "adapter"
    store.download_verified(lora_run.adapter_uri or "", adapter)
    questions = ["What is the capital of Poland?", "What is 2 plus 5?", "What is the opposite of fast?"]
    tuned = _answers(smollm2, adapter, questions)
    base = _answers(smollm2, None, questions)
    for p in tuned:  # the eos (== pad) was learned: every answer ends well before the token limit
        assert 0 < p.tokens < 32 and p.answer.strip() and p.answer.isprintable(), p
    assert tuned[0].answer.strip() == "The capital is Warsaw.", tuned[0]
    assert "7" in tuned[1].answer and "2 plus 5 is" in tuned[1].answer, tuned[1]
    assert [p.answer for p in tuned] != [p.answer for p in base]  # the adapter is applied
    assert sum(p.tokens for p in base) > sum(p.tokens for p in tuned)  # the chatty base, the terse fine-tune
