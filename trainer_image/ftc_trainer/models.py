"""Finding, loading and adapting base models. Heavy imports stay inside the functions."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from ftc_api.spec import Method, TrainingSpec
from ftc_step.errors import StepError, transient
from ftc_step.modeling import ROUTER_NAMES

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")


def cache_dir() -> Path:
    return Path(os.environ.get("FTC_CACHE_DIR") or Path.home() / ".cache" / "ftc" / "models")


def looks_like_path(source: str) -> bool:
    return source.startswith(("/", ".", "~", "file://")) or source.count("/") > 1


def fetch_model(source: str, store: Any, weights: bool = True) -> str:
    """A local directory (or config file) for `source`: an s3:// prefix is downloaded into the cache
    (verified against its manifest when it has one); a local path is used as is; anything else is
    returned unchanged as a Hugging Face hub id. `weights=False` fetches config and tokenizer only."""
    from ftc_step.storage import StorageError, is_s3, join

    if not is_s3(source):
        path = Path(source[len("file://") :] if source.startswith("file://") else source).expanduser()
        if path.exists():
            return str(path)
        if looks_like_path(source):
            raise StepError(f"base model {source!r} not found: no such file or directory")
        return source
    try:
        manifest = store.read_manifest(source)
        if manifest is not None and weights:
            # The node-local model cache (ftc_step.model_cache), keyed by the manifest's content; shared with
            # the evaluator and with this pod's retries when the chart mounts a cache volume.
            from ftc_step.model_cache import cache_root, cached_tree

            local = cached_tree(store, source, manifest, cache_root(cache_dir())).path
            if not (local / "config.json").exists():
                raise StepError(f"base model {source} not found: no config.json under that prefix")
            return str(local)
        # The cache key covers the manifest, so a re-uploaded model is fetched again.
        key = source + (manifest.sha256 or "" if manifest is not None else "")
        target = cache_dir() / hashlib.sha256(key.encode()).hexdigest()[:16]
        marker = target / (".ftc-complete" if weights else ".ftc-config")
        if marker.exists() or (target / ".ftc-complete").exists():
            return str(target)
        names = list(manifest.files) if manifest is not None else store.list(source)
        if not weights:
            names = [n for n in names if not n.endswith(WEIGHT_SUFFIXES)]
        for name in names:
            store.download_file(join(source, name), target / name)
    except StorageError as err:
        raise StepError(f"cannot read base model {source}: {err}", retryable=transient(err)) from err
    if not (target / "config.json").exists():
        raise StepError(f"base model {source} not found: no config.json under that prefix")
    marker.touch()
    return str(target)


def load_config(local: str, source: str | None = None) -> Any:
    """The model's transformers config (from a directory, a config .json file, or a hub id)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(local)
    except Exception as err:
        message = f"cannot read the config of base model {source or local!r}: {type(err).__name__}: {err}"
        raise StepError(message, retryable=transient(err)) from err


def load_tokenizer(local: str, override: str | None = None, source: str | None = None) -> Any:
    """The tokenizer as both images prepare it (ftc_step.loading): template fallback and pad token."""
    from ftc_step.loading import load_tokenizer as load

    try:
        return load(local, override)
    except Exception as err:
        message = f"cannot load the tokenizer of base model {source or local!r}: {type(err).__name__}: {err}"
        raise StepError(message, retryable=transient(err)) from err


def has_cuda() -> bool:
    from ftc_step.loading import cuda_available

    return cuda_available()


def load_model(
    local: str, method: Method, training: TrainingSpec, source: str | None = None, device: str | None = "auto"
) -> tuple[Any, dict[str, str]]:
    """The base model ready for LoRA, loaded by ftc_step.loading with the one dtype policy (bf16 on a GPU, fp32
    on the CPU; `qlora`: 4-bit with the spec's quantisation, the rest in the compute dtype). `device`: this
    process's device ('auto': cuda:LOCAL_RANK or the CPU; None: left on the CPU for FSDP to shard).
    Returns the model and the settings ftc had to change."""
    from ftc_step.loading import load_base_model

    forced: dict[str, str] = {}
    extra: dict[str, Any] = {}
    config = load_config(local, source)
    if training.router_aux_loss_coef is not None:
        if hasattr(config, "router_aux_loss_coef"):
            extra.update(output_router_logits=True, router_aux_loss_coef=training.router_aux_loss_coef)
        else:
            forced["routerAuxLossCoef"] = "ignored: not a mixture-of-experts model"
    if device == "auto":
        device = process_device()
    try:
        model, changed = load_base_model(local, method.value, training.quantization, device=device, extra=extra)
    except Exception as err:
        message = f"cannot load base model {source or local!r}: {type(err).__name__}: {err}"
        raise StepError(message, retryable=transient(err)) from err
    forced.update(changed)
    # The dtypes are the one policy's (ftc_step.dtypes), shared with the evaluator: no fp32 upcast of norms,
    # embeddings, head or routers (peft's prepare_model_for_kbit_training would make them fp32, which the
    # evaluator never sees and FSDP cannot flatten beside bf16 4-bit storage). What that call did besides,
    # as TRL's SFTTrainer does: base weights frozen, checkpointing with inputs that carry gradients.
    for param in model.parameters():
        param.requires_grad_(False)
    if training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    return model, forced


def process_device() -> str:
    """This process's device: its own GPU under torchrun (LOCAL_RANK), the first one alone, else the CPU."""
    if not has_cuda():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK') or 0)}"


def linear_leaf_names(model: Any) -> list[str]:
    """Leaf names of every linear layer inside the decoder blocks (attention, MLP and experts), routers excluded."""
    import torch

    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}":
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in ROUTER_NAMES and leaf != "lm_head":
                names.add(leaf)
    return sorted(names)


def resolve_targets(model: Any, requested: list[str] | None) -> list[str]:
    """The LoRA target modules: `requested`, else every linear projection of attention, MLP and experts."""
    available = linear_leaf_names(model)
    if not requested:
        if not available:
            raise StepError("the base model has no linear layers inside its decoder blocks to adapt")
        return available
    all_leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in requested if t not in all_leaves]
    if len(missing) == len(requested):
        raise StepError(f"loraTargetModules {requested} match no module of the base model; its linear layers are {available}")
    return list(requested)


def lora_config(training: TrainingSpec, targets: list[str]) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=training.lora.r,
        lora_alpha=training.lora.alpha,
        lora_dropout=training.lora.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )


def adapted_modules(model: Any) -> list[str]:
    """Kinds (leaf names) of the modules that carry LoRA weights."""
    kinds = set()
    for name, _ in model.named_parameters():
        if ".lora_A." in name:
            kinds.add(name.split(".lora_A.")[0].rsplit(".", 1)[-1])
    return sorted(kinds)


def trainable_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
