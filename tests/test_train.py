"""The train step for real on the tiny Llama and Mixtral: LoRA and QLoRA, response-only labels, eval history,
expert adapters, reloadable adapters, resume after SIGKILL, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from ftc_api.spec import LoraSpec, Method, TrainingSpec
from ftc_api.steps import EXIT_BAD_INPUT, MAX_SUMMARY_BYTES, Location, LossPoint, ModelRef, TrainInput, TrainResult
from ftc_step.runtime import compact_summary
from ftc_step.storage import Storage, parse_s3_uri

from devcluster import steps
from devcluster.models.tiny import TinyAssets, TinyS3, new_run

ROOT = Path(__file__).resolve().parents[1]

LORA_TRAINING = TrainingSpec(
    epochs=2,
    learning_rate=5e-3,
    lr_scheduler="linear",
    warmup_ratio=0.0,
    per_device_batch_size=8,
    gradient_accumulation_steps=1,
    max_seq_length=64,
    eval_steps=10,
    save_steps=20,
    logging_steps=5,
    gradient_checkpointing=False,
    lora=LoraSpec(r=8, alpha=16, dropout=0.05),
    seed=3,
)
QLORA_TRAINING = LORA_TRAINING.model_copy(
    update={"max_steps": 8, "eval_steps": 4, "logging_steps": 2, "learning_rate": 1e-2, "gradient_checkpointing": True}
)
KINDS = {
    "tiny-llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "tiny-mixtral": {"q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"},
}


@pytest.fixture(autouse=True)
def _model_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTC_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "ftc-model-cache"))


def train_input(tiny_s3: TinyS3, loc: Location, kind: str, method: Method, training: TrainingSpec) -> TrainInput:
    return TrainInput(model=ModelRef(name=kind, base_model=tiny_s3.model(kind), method=method), training=training, location=loc)


def adapter_tensors(store: Storage, uri: str, dest: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    store.download_verified(uri, dest)
    return load_file(dest / "adapter_model.safetensors")


def expert_lora_b(tensors: dict[str, Any]) -> dict[str, float]:
    """|lora_B| of every expert projection (lora_B starts at zero, so non-zero means it trained)."""
    return {k: float(v.abs().sum()) for k, v in tensors.items() if ".experts." in k and "lora_B" in k}


def losses(history: list[LossPoint]) -> tuple[list[float], dict[int, float]]:
    trains = [p.train_loss for p in history if p.train_loss is not None]
    evals = {p.step: p.eval_loss for p in history if p.eval_loss is not None}
    return trains, evals  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------- labels


@pytest.mark.ml
@pytest.mark.parametrize("template", ["tokenizer", "default"])
def test_prompt_and_template_tokens_are_labelled_minus_100(tiny_assets: TinyAssets, template: str) -> None:
    from ftc_step.modeling import DEFAULT_CHAT_TEMPLATE
    from ftc_trainer.templates import IGNORE_INDEX, apply_template, encode
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_assets.llama)
    if template == "default":
        tokenizer.chat_template = None
    assert apply_template(tokenizer) == template
    if template == "default":
        assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 3 plus 4?"},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "And 2 plus 2?"},
        {"role": "assistant", "content": "4"},
    ]
    item = encode(tokenizer, messages, max_length=256)
    trained = [t for t, label in zip(item["input_ids"], item["labels"], strict=True) if label != IGNORE_INDEX]
    assert all(label in (IGNORE_INDEX, t) for t, label in zip(item["input_ids"], item["labels"], strict=True))
    text = tokenizer.decode(trained)
    end = "<|end|>\n" if template == "tokenizer" else "<|end|>\n\n"
    assert text == f"7{end}4{end}"
    assert "3 plus 4" not in text and "Answer" not in text
    cut = encode(tokenizer, messages, max_length=5)
    assert len(cut["input_ids"]) == 5 and set(cut["labels"]) == {IGNORE_INDEX}


@pytest.mark.unit
def test_a_sentencepiece_token_straddling_the_prompt_response_boundary_is_learned() -> None:
    """Llama-2-style templates end the prompt with "[/INST] "; SentencePiece glues that space to the answer's
    first word ("▁Paris"), so the token starts in the prompt. It must still be trained on."""
    from ftc_trainer.templates import IGNORE_INDEX, apply_template, encode
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "▁[INST]", "▁Capital", "▁of", "▁France?", "▁[/INST]", "▁Paris.", "▁"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST] "
        "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{% endif %}"
    )
    apply_template(tokenizer, template)
    assert tokenizer.pad_token == "</s>"  # pad_token = eos when the tokenizer has none

    item = encode(tokenizer, [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}], 64)

    pieces = tokenizer.convert_ids_to_tokens(item["input_ids"])
    labelled = [p for p, label in zip(pieces, item["labels"], strict=True) if label != IGNORE_INDEX]
    assert "▁Paris." in pieces  # the space from the prompt and the answer's first word are one token
    assert labelled == ["▁Paris.", "</s>"]


# ---------------------------------------------------------------------------------------------- LoRA


@pytest.mark.ml
@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-mixtral"])
def test_lora_trains_and_the_adapter_reloads(tiny_s3: TinyS3, data_prefix: str, kind: str, tmp_path: Path) -> None:
    import torch
    from ftc_trainer.train import run_train
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loc = new_run(tiny_s3, data_prefix, f"lora-{kind}", tmp_path)
    result = run_train(train_input(tiny_s3, loc, kind, Method.LORA, LORA_TRAINING), tmp_path / "work")
    store = Storage(endpoint_url=tiny_s3.endpoint_url)

    assert result.ok and result.total_steps == 52  # 204 rows / 8 = 26 steps per epoch, 2 epochs
    assert set(result.adapted_modules) == KINDS[kind]
    assert result.trainable_parameters and result.trainable_parameters > 10_000
    assert result.tokens_per_second and result.trained_tokens and result.train_seconds
    summary = compact_summary(result)
    assert len(summary.encode()) <= MAX_SUMMARY_BYTES and json.loads(summary) == result.to_wire()  # fits untrimmed

    history = [LossPoint.model_validate(p) for p in json.loads(store.read_text(result.metrics_uri or ""))]
    trains, evals = losses(history)
    assert [p.step for p in history if p.train_loss is not None] == [*range(5, 51, 5), 52]
    assert set(evals) == {10, 20, 26, 30, 40, 50, 52}  # every evalSteps, each epoch end, the end
    assert trains[-1] < trains[0] - 0.3, trains
    assert evals[52] < evals[10]
    assert result.best_eval_loss == min(evals.values()) and result.final_eval_loss == evals[52]
    assert result.overfitting is not None and result.overfitting.verdict in ("ok", "overfitting")

    final = adapter_tensors(store, result.adapter_uri or "", tmp_path / "adapter")
    assert store.read_manifest(loc.uri(f"models/{kind}")) is not None
    assert store.read_manifest(result.best_adapter_uri or "") is not None
    assert store.list(loc.uri(f"models/{kind}/checkpoints")) and "step-20/manifest.json" in store.list(
        loc.uri(f"models/{kind}/checkpoints")
    )
    if kind == "tiny-mixtral":
        experts = expert_lora_b(final)
        assert len(experts) == 2 * 4 * 3  # layers x experts x (w1, w2, w3)
        assert all(v > 0 for v in experts.values()), experts

    base_path = tiny_s3.model(kind)
    local_base = tmp_path / "base"
    store.download_verified(base_path, local_base)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "adapter")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 plus 3?"}], add_generation_prompt=True, return_tensors="pt"
    )
    base = AutoModelForCausalLM.from_pretrained(local_base)
    with torch.no_grad():
        before = base(prompt).logits
        tuned = PeftModel.from_pretrained(base, tmp_path / "adapter")
        after = tuned(prompt).logits
    assert not torch.allclose(before, after, atol=1e-4)


# ---------------------------------------------------------------------------------------------- QLoRA


def four_bit_matrices(model: Any, full_precision: tuple[str, ...]) -> list[str]:
    """Names of the weight matrices stored 4-bit NF4 with double quantisation; fails on any other matrix
    above 1024 elements unless its name ends with one of `full_precision`."""
    from bitsandbytes.nn import Params4bit

    checked = []
    for name, param in model.named_parameters():
        if param.dim() != 2 and not isinstance(param, Params4bit):
            continue
        if name.endswith(full_precision):
            assert not isinstance(param, Params4bit), name  # kept in full precision on purpose
            continue
        if isinstance(param, Params4bit) or param.numel() > 1024:
            assert isinstance(param, Params4bit), f"{name} is {param.dtype}, not 4-bit"
            assert param.quant_state.quant_type == "nf4" and param.quant_state.nested  # NF4, double quant
            checked.append(name)
    return checked


@pytest.mark.ml
def test_qlora_quantises_every_weight_matrix_of_llama(tiny_assets: TinyAssets) -> None:
    from ftc_trainer.models import load_model

    model, _ = load_model(str(tiny_assets.llama), Method.QLORA, QLORA_TRAINING)
    checked = four_bit_matrices(model, ("embed_tokens.weight", "lm_head.weight"))
    assert len(checked) == model.config.num_hidden_layers * 7  # q, k, v, o, gate, up, down in every block


@pytest.mark.ml
def test_qlora_quantises_every_weight_matrix_experts_included(tiny_assets: TinyAssets) -> None:
    import torch
    from ftc_trainer.models import load_model

    model, _ = load_model(str(tiny_assets.mixtral), Method.QLORA, QLORA_TRAINING)
    checked = four_bit_matrices(model, ("embed_tokens.weight", "lm_head.weight", "block_sparse_moe.gate.weight"))
    assert sum(".experts." in n for n in checked) == 2 * 4 * 3
    assert all(".block_sparse_moe.gate." not in n for n in checked)
    gate = model.model.layers[0].block_sparse_moe.gate
    assert type(gate) is torch.nn.Linear and gate.weight.dtype == torch.float32


@pytest.mark.ml
@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-mixtral"])
def test_qlora_trains(tiny_s3: TinyS3, data_prefix: str, kind: str, tmp_path: Path) -> None:
    from ftc_trainer.train import run_train

    loc = new_run(tiny_s3, data_prefix, f"qlora-{kind}", tmp_path)
    training = QLORA_TRAINING
    if kind == "tiny-mixtral":
        training = training.model_copy(update={"router_aux_loss_coef": 0.01})
    result = run_train(train_input(tiny_s3, loc, kind, Method.QLORA, training), tmp_path / "work")
    assert result.ok and result.total_steps == 8 and set(result.adapted_modules) == KINDS[kind]
    assert "dtype" not in result.forced
    store = Storage(endpoint_url=tiny_s3.endpoint_url)
    trains, evals = losses([LossPoint.model_validate(p) for p in json.loads(store.read_text(result.metrics_uri or ""))])
    assert set(evals) == {4, 8} and len(trains) == 4
    assert trains[-1] < trains[0], trains
    if kind == "tiny-mixtral":
        experts = expert_lora_b(adapter_tensors(store, result.adapter_uri or "", tmp_path / "adapter"))
        assert len(experts) == 24 and all(v > 0 for v in experts.values())


# ---------------------------------------------------------------------------------------------- padding-free


@pytest.mark.ml
@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-mixtral"])
def test_padding_free_batches_keep_rows_apart_and_give_the_padded_loss(tiny_assets: TinyAssets, kind: str) -> None:
    import torch
    from ftc_trainer.models import load_model, load_tokenizer
    from ftc_trainer.train import encode_rows, make_collator

    from devcluster.models.tiny import fact_rows, to_messages

    tokenizer = load_tokenizer(str(tiny_assets.model(kind)))
    encoded, _ = encode_rows(tokenizer, [{"messages": to_messages(r)} for r in fact_rows()], 64)
    by_length = {len(r["input_ids"]): r for r in encoded}
    rows = [by_length[n] for n in sorted(by_length)[:6]]
    assert len(rows) >= 3  # rows of different lengths: the padded batch has padding
    model, _ = load_model(str(tiny_assets.model(kind)), Method.LORA, LORA_TRAINING)
    model.config.use_cache = False  # as run_train does
    model.eval()
    padded = make_collator(tokenizer, packing=False)([dict(r) for r in rows])
    flat = make_collator(tokenizer, packing=True)([dict(r) for r in rows])
    assert flat["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in rows)) and "attention_mask" not in flat
    leaky = dict(flat, position_ids=torch.arange(flat["input_ids"].shape[1])[None])  # one long row: no boundaries
    with torch.no_grad():
        padded_loss, flat_loss, leaky_loss = (float(model(**batch).loss) for batch in (padded, flat, leaky))
    assert abs(flat_loss - padded_loss) < 1e-4 * padded_loss, (flat_loss, padded_loss)
    assert abs(leaky_loss - padded_loss) > 1e-3, "rows attending to each other must change the loss"


@pytest.mark.ml
@pytest.mark.parametrize("packing", [False, True], ids=["padded", "padding-free"])
@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-mixtral"])
def test_response_loss_is_the_models_own_loss_from_a_fraction_of_the_logits(
    tiny_assets: TinyAssets, kind: str, packing: bool
) -> None:
    import torch
    from ftc_trainer.loss import predicting_positions, response_loss_sum
    from ftc_trainer.models import load_model, load_tokenizer
    from ftc_trainer.train import encode_rows, make_collator

    from devcluster.models.tiny import fact_rows, to_messages

    tokenizer = load_tokenizer(str(tiny_assets.model(kind)))
    rows, _ = encode_rows(tokenizer, [{"messages": to_messages(r)} for r in fact_rows()[::25]], 64)
    training = LORA_TRAINING.model_copy(update={"router_aux_loss_coef": 0.02 if kind == "tiny-mixtral" else None})
    model, _ = load_model(str(tiny_assets.model(kind)), Method.LORA, training)
    model.config.use_cache = False
    model.eval()
    batch = make_collator(tokenizer, packing)([dict(r) for r in rows])
    labels = batch.pop("labels")
    positions = predicting_positions(labels)
    with torch.no_grad():
        own = model(**batch, labels=labels).loss  # the model's loss (MoE router loss included) from every logit
        out = model(**batch, logits_to_keep=positions)
        total, count = response_loss_sum(out.logits, labels, positions)
    aux = getattr(out, "aux_loss", None)
    mine = total / count + (training.router_aux_loss_coef or 0) * (aux if aux is not None else 0)
    assert float(mine) == pytest.approx(float(own), rel=1e-5)
    assert out.logits.shape[1] == len(positions) < 0.7 * batch["input_ids"].shape[1]  # prompt logits never built
    assert int(count) == int((labels != -100).sum())


@pytest.mark.ml
def test_packing_trains_padding_free_on_the_same_tokens(tiny_s3: TinyS3, data_prefix: str, tmp_path: Path) -> None:
    from ftc_trainer.train import run_train

    training = LORA_TRAINING.model_copy(update={"max_steps": 10, "eval_steps": 5, "save_steps": 100})
    runs = {}
    for packing in (False, True):
        loc = new_run(tiny_s3, data_prefix, f"packing-{packing}", tmp_path / str(packing))
        spec = training.model_copy(update={"packing": packing})
        runs[packing] = run_train(train_input(tiny_s3, loc, "tiny-llama", Method.LORA, spec), tmp_path / f"work-{packing}")
    padded, packed = runs[False], runs[True]
    assert packed.ok and "packing" not in packed.forced
    assert packed.trained_tokens == padded.trained_tokens  # the same rows, counted without padding
    assert packed.final_train_loss is not None and padded.final_train_loss is not None
    assert abs(packed.final_train_loss - padded.final_train_loss) < 0.05 * padded.final_train_loss
    assert packed.final_eval_loss is not None and padded.final_eval_loss is not None
    assert abs(packed.final_eval_loss - padded.final_eval_loss) < 0.05 * padded.final_eval_loss


@pytest.mark.ml
def test_router_aux_loss_is_switched_on(tiny_assets: TinyAssets) -> None:
    from ftc_trainer.models import load_model

    training = LORA_TRAINING.model_copy(update={"router_aux_loss_coef": 0.05})
    model, forced = load_model(str(tiny_assets.mixtral), Method.LORA, training)
    assert model.config.output_router_logits is True and model.config.router_aux_loss_coef == 0.05
    _, forced = load_model(str(tiny_assets.llama), Method.LORA, training)
    assert forced["routerAuxLossCoef"].startswith("ignored")


# ---------------------------------------------------------------------------------------------- progress


@pytest.mark.unit
def test_progress_reporter_throttles_and_uses_the_status_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from ftc_api.status import Progress
    from ftc_trainer.progress import ProgressReporter, pod_patcher

    sent: list[dict] = []
    now = [100.0]
    reporter = ProgressReporter(sent.append, interval=5, clock=lambda: now[0])
    state = SimpleNamespace(global_step=3, max_steps=10, epoch=0.3)
    reporter.on_log(None, state, None, logs={"loss": 2.5})
    now[0] += 1
    reporter.on_log(None, state, None, logs={"eval_loss": 2.7})
    assert len(sent) == 1
    now[0] += 5
    state.global_step = 4
    reporter.on_step_end(None, state, None)
    reporter.on_train_end(None, state, None)
    assert len(sent) == 3
    doc = Progress.model_validate(sent[-1])
    assert (doc.step, doc.total_steps, doc.train_loss, doc.eval_loss) == (4, 10, 2.5, 2.7) and doc.updated_at

    def refused(doc: dict[str, Any]) -> None:
        raise RuntimeError("the API server refused the patch")

    failing = ProgressReporter(refused, interval=0)
    failing.on_step_end(None, state, None)  # a failed patch never stops training
    assert failing.failures == 1
    for var in ("FTC_POD_NAME", "FTC_POD_NAMESPACE", "KUBECONFIG", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(var, raising=False)
    assert pod_patcher() is None
    monkeypatch.setenv("FTC_POD_NAME", "p")
    monkeypatch.setenv("FTC_POD_NAMESPACE", "ns")
    assert pod_patcher() is None  # no kubeconfig and not in a cluster: skipped silently


# ---------------------------------------------------------------------------------------------- resume


def _cli_env(tiny_s3: TinyS3, tmp_path: Path, name: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        AWS_DEFAULT_REGION="us-east-1",
        FTC_TERMINATION_LOG=str(tmp_path / f"{name}.termination-log"),
        FTC_WORK_DIR=str(tmp_path / f"{name}.work"),
        PYTHONPATH=str(ROOT),
    )
    return env


def _trainer_cli(
    input_path: Path, env: dict[str, str], log: Path, entry: tuple[str, ...] = ("-m", "ftc_trainer")
) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *entry, "train", "--input", str(input_path)],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )


@pytest.mark.ml
@pytest.mark.timeout(600)
def test_resume_after_sigkill_continues_the_history(tiny_s3: TinyS3, data_prefix: str, tmp_path: Path) -> None:
    from ftc_trainer.train import run_train

    training = LORA_TRAINING.model_copy(update={"max_steps": 40, "save_steps": 10, "eval_steps": 10, "logging_steps": 2})
    reference = run_train(
        train_input(tiny_s3, new_run(tiny_s3, data_prefix, "resume-ref", tmp_path), "tiny-llama", Method.LORA, training),
        tmp_path / "ref-work",
    )

    loc = new_run(tiny_s3, data_prefix, "resume", tmp_path)
    input_path = tmp_path / "input.json"
    input_path.write_text(train_input(tiny_s3, loc, "tiny-llama", Method.LORA, training).to_json())
    store = Storage(endpoint_url=tiny_s3.endpoint_url)
    checkpoints = loc.uri("models/tiny-llama/checkpoints")

    # The first run goes through the test-only wrapper that slows every optimizer step, so it is still running
    # when the test kills it (the product has no such hook).
    env = _cli_env(tiny_s3, tmp_path, "first") | {"FTC_SLOW_STEP_DELAY": "0.3"}
    first = _trainer_cli(input_path, env, tmp_path / "first.log", entry=(str(steps.script("slow_train.py")),))
    deadline = time.monotonic() + 300
    while "step-20/manifest.json" not in store.list(checkpoints):
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint step-20 within 300 s"
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    assert first.wait(30) == -signal.SIGKILL
    assert store.read_manifest(loc.uri("models/tiny-llama/adapter")) is None  # killed before the end

    second = _trainer_cli(input_path, _cli_env(tiny_s3, tmp_path, "second"), tmp_path / "second.log")
    assert second.wait(300) == 0, (tmp_path / "second.log").read_text()[-3000:]
    result = TrainResult.model_validate_json((tmp_path / "second.termination-log").read_text())
    assert result.ok and result.resumed_from_step is not None and result.resumed_from_step >= 20
    assert result.total_steps == 40

    history = [LossPoint.model_validate(p) for p in json.loads(store.read_text(result.metrics_uri or ""))]
    train_steps = [p.step for p in history if p.train_loss is not None]
    eval_steps = [p.step for p in history if p.eval_loss is not None]
    assert train_steps == list(range(2, 41, 2))  # every logged step exactly once
    assert eval_steps == [10, 20, 26, 30, 40]  # every evalSteps and the end of epoch 1
    assert store.read_manifest(result.adapter_uri or "") is not None
    assert result.final_eval_loss == pytest.approx(reference.final_eval_loss, rel=0.01)
    ref_trains, _ = losses([LossPoint.model_validate(p) for p in json.loads(store.read_text(reference.metrics_uri or ""))])
    assert [p.train_loss for p in history if p.train_loss is not None] == pytest.approx(ref_trains, rel=0.01)


@pytest.mark.ml
@pytest.mark.timeout(600)
def test_a_retry_after_the_last_checkpoint_trains_no_further(tiny_s3: TinyS3, data_prefix: str, tmp_path: Path) -> None:
    """An attempt that saved the checkpoint of its last step and then failed (uploading its results, say) is
    retried: the retry resumes from that checkpoint and stops there. transformers checks maxSteps only after
    a step, so without a guard it trained on to the end of the epoch (steps 25 and 26 of 24, seen in a storage
    fault test)."""
    from ftc_trainer.train import run_train

    training = LORA_TRAINING.model_copy(update={"max_steps": 24, "save_steps": 12, "eval_steps": 12, "logging_steps": 2})
    loc = new_run(tiny_s3, data_prefix, "last-step", tmp_path)
    inp = train_input(tiny_s3, loc, "tiny-llama", Method.LORA, training)
    first = run_train(inp, tmp_path / "first")
    store = Storage(endpoint_url=tiny_s3.endpoint_url)
    assert "step-24/manifest.json" in store.list(loc.uri("models/tiny-llama/checkpoints"))
    bucket, key = parse_s3_uri(loc.uri("models/tiny-llama/manifest.json"))
    store.client.delete_object(Bucket=bucket, Key=key)  # as if the results upload had failed

    again = run_train(inp, tmp_path / "again")
    assert again.ok and again.resumed_from_step == 24 and again.total_steps == 24
    history = [LossPoint.model_validate(p) for p in json.loads(store.read_text(again.metrics_uri or ""))]
    assert [p.step for p in history if p.train_loss is not None] == list(range(2, 25, 2))
    assert again.final_train_loss == first.final_train_loss and again.final_eval_loss == first.final_eval_loss
    assert store.read_manifest(loc.uri("models/tiny-llama")) is not None


@pytest.mark.ml
@pytest.mark.timeout(600)
def test_sigterm_saves_the_step_in_flight_and_the_retry_trains_no_step_twice(
    tiny_s3: TinyS3, data_prefix: str, tmp_path: Path
) -> None:
    """A preempted, evicted or deleted pod gets SIGTERM and its grace period. The trainer finishes the step in
    flight, saves and uploads a full checkpoint of it (not only every saveSteps), exits 1 (retryable) with
    preemptedAtStep; the retry resumes from exactly that step: steps lost 0 (only the step in flight runs on),
    every step once in the history, and the same losses and adapter as a run that was never interrupted."""
    from ftc_trainer.train import run_train

    training = LORA_TRAINING.model_copy(update={"max_steps": 20, "save_steps": 10, "eval_steps": 10, "logging_steps": 1})
    reference = run_train(
        train_input(tiny_s3, new_run(tiny_s3, data_prefix, "sigterm-ref", tmp_path), "tiny-llama", Method.LORA, training),
        tmp_path / "ref-work",
    )
    loc = new_run(tiny_s3, data_prefix, "sigterm", tmp_path)
    input_path = tmp_path / "input.json"
    input_path.write_text(train_input(tiny_s3, loc, "tiny-llama", Method.LORA, training).to_json())
    store = Storage(endpoint_url=tiny_s3.endpoint_url)
    checkpoints = loc.uri("models/tiny-llama/checkpoints")
    counter = tmp_path / "steps-done"
    env = _cli_env(tiny_s3, tmp_path, "run") | {
        "FTC_SLOW_STEP_DELAY": "0.3",
        "FTC_SLOW_STEP_COUNTER": str(counter),
        "FTC_TERMINATION_GRACE_SECONDS": "60",
    }
    run = _trainer_cli(input_path, env, tmp_path / "run.log", entry=(str(steps.script("slow_train.py")),))
    deadline = time.monotonic() + 300
    while not counter.exists() or int(counter.read_text() or 0) < 13:  # past checkpoint 10, before saveSteps 20
        assert run.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "13 steps not trained within 300 s"
        time.sleep(0.02)
    done_before = int(counter.read_text())
    t0 = time.monotonic()
    run.send_signal(signal.SIGTERM)
    assert run.wait(60) == 1, (tmp_path / "run.log").read_text()[-3000:]
    stop_seconds = time.monotonic() - t0
    first = TrainResult.model_validate_json((tmp_path / "run.termination-log").read_text())
    assert not first.ok and first.preempted_at_step is not None, first.error
    stopped = first.preempted_at_step
    assert done_before <= stopped <= done_before + 1  # nothing trained is lost; at most the step in flight ran on
    assert f"step-{stopped}/manifest.json" in store.list(checkpoints)  # uploaded before the exit, manifest last
    assert first.preemption_checkpoint_seconds is not None and first.preemption_seconds is not None
    assert first.preemption_seconds <= stop_seconds and "uploaded in" in (first.error or "")
    assert store.read_manifest(loc.uri("models/tiny-llama/adapter")) is None

    second = _trainer_cli(input_path, _cli_env(tiny_s3, tmp_path, "second"), tmp_path / "second.log")
    assert second.wait(300) == 0, (tmp_path / "second.log").read_text()[-3000:]
    result = TrainResult.model_validate_json((tmp_path / "second.termination-log").read_text())
    assert result.ok and result.resumed_from_step == stopped and result.total_steps == 20
    history = [LossPoint.model_validate(p) for p in json.loads(store.read_text(result.metrics_uri or ""))]
    assert [p.step for p in history if p.train_loss is not None] == list(range(1, 21))  # each step exactly once
    assert [p.step for p in history if p.eval_loss is not None] == [10, 20]  # no evaluation added at the stop
    ref_history = [LossPoint.model_validate(p) for p in json.loads(store.read_text(reference.metrics_uri or ""))]
    assert losses(history)[0] == pytest.approx(losses(ref_history)[0], rel=0.01)
    assert result.final_eval_loss == pytest.approx(reference.final_eval_loss, rel=0.01)
    ours = adapter_tensors(store, result.adapter_uri or "", tmp_path / "adapter")
    theirs = adapter_tensors(store, reference.adapter_uri or "", tmp_path / "ref-adapter")
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert float((tensor - theirs[name]).abs().max()) <= 0.01 * float(theirs[name].abs().max()) + 1e-6, name
    print(
        f"SIGTERM after {done_before} steps done: stopped after step {stopped} (steps lost 0), checkpoint saved and "
        f"uploaded in {first.preemption_checkpoint_seconds:.2f}s, {first.preemption_seconds:.2f}s after SIGTERM, "
        f"exit {stop_seconds:.2f}s after SIGTERM"
    )


# ---------------------------------------------------------------------------------------------- bad input


def _run_train_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, doc: dict) -> tuple[int, dict]:
    from ftc_trainer.__main__ import main

    path = tmp_path / "input.json"
    path.write_text(json.dumps(doc))
    log = tmp_path / "termination-log"
    monkeypatch.setenv("FTC_TERMINATION_LOG", str(log))
    code = main(["train", "--input", str(path), "--workdir", str(tmp_path / "work")])
    return code, json.loads(log.read_text())


@pytest.mark.ml
@pytest.mark.parametrize(
    ("case", "message"),
    [
        pytest.param("missing-base-s3", r"base model s3://.*/no-such-model not found: no config\.json", id="missing-base-s3"),
        pytest.param("missing-base-path", r"base model '/nonexistent/model' not found", id="missing-base-path"),
        pytest.param("no-prepared-data", r"cannot read the prepared data at s3://.*/data: no manifest\.json", id="no-data"),
        pytest.param("no-assistant-turn", r"data/train\.jsonl line 2: a row with no assistant turn", id="no-assistant-turn"),
        pytest.param("unknown-method", r"invalid train input .*model\.method", id="unknown-method"),
        pytest.param("bad-targets", r"loraTargetModules \['nonexistent'\] match no module", id="bad-targets"),
    ],
)
def test_bad_input_fails_with_a_message(
    case: str, message: str, tiny_s3: TinyS3, data_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import re

    store = Storage(endpoint_url=tiny_s3.endpoint_url)
    loc = Location(bucket=tiny_s3.bucket, prefix=f"runs/bad-{case}", endpoint_url=tiny_s3.endpoint_url)
    if case != "no-prepared-data":
        loc = new_run(tiny_s3, data_prefix, f"bad-{case}", tmp_path)
    if case == "no-assistant-turn":
        rows = [
            {"id": "a", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"id": "b", "messages": [{"role": "user", "content": "only a question"}]},
        ]
        (tmp_path / "bad").mkdir()
        for split in ("train", "eval", "test"):
            (tmp_path / "bad" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        store.upload_tree(tmp_path / "bad", loc.uri("data"))
    base = {
        "missing-base-s3": f"s3://{tiny_s3.bucket}/assets/models/no-such-model",
        "missing-base-path": "/nonexistent/model",
    }.get(case, tiny_s3.llama)
    ref = ModelRef(
        name="m", base_model=base, method=Method.LORA, lora_target_modules=["nonexistent"] if case == "bad-targets" else None
    )
    doc = TrainInput(model=ref, training=LORA_TRAINING, location=loc).to_wire()
    if case == "unknown-method":
        doc["model"]["method"] = "full"
    code, summary = _run_train_cli(tmp_path, monkeypatch, doc)
    assert code == EXIT_BAD_INPUT and summary["ok"] is False and summary["model"] == "m"
    assert re.search(message, summary["error"]), summary["error"]


# ---------------------------------------------------------------------------------------------- pure helpers


@pytest.mark.unit
def test_loss_history_merges_steps_and_shows_repeats() -> None:
    from ftc_trainer.train import loss_history

    logs = [
        {"loss": 3.0, "step": 5, "epoch": 0.5},
        {"eval_loss": 3.2, "step": 5, "epoch": 0.5},
        {"loss": 2.0, "step": 10, "epoch": 1.0},
        {"loss": 2.1, "step": 10, "epoch": 1.0},  # a repeated step stays visible
        {"train_runtime": 1.0, "train_loss": 2.5, "step": 10},
    ]
    history = loss_history(logs)
    assert [(p.step, p.train_loss, p.eval_loss) for p in history] == [(5, 3.0, 3.2), (10, 2.0, None), (10, 2.1, None)]


@pytest.mark.unit
def test_newest_checkpoint_needs_a_manifest() -> None:
    from ftc_trainer.train import newest_checkpoint_steps

    names = ["step-10/manifest.json", "step-10/optimizer.pt", "step-30/optimizer.pt", "step-20/manifest.json", "x/manifest.json"]
    assert newest_checkpoint_steps(names) == [20, 10]  # step-30 has no manifest: incomplete
