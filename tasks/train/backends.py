"""Training backends: transformers + PEFT (any device) and Unsloth (CUDA), each
loading the base and putting a fresh LoRA adapter on it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from tasks.core.config import ConfigError, ModelConfig, TrainConfig
from tasks.core.hardware import BackendNotReadyError, HardwareDecision, for_model, import_unsloth
from tasks.core.models import LOAD_KWARGS, hub_load_revision, load_base_tokenizer, torch_dtype
from tasks.core.refs import BaseModelRef
from tasks.train.perf import choose_gradient_checkpointing

log = logging.getLogger(__name__)


def load_peft(
    t: TrainConfig, m: ModelConfig, base: BaseModelRef, hw: HardwareDecision
) -> tuple[Any, Any]:
    """transformers + PEFT: the base from safetensors, a fresh LoRA adapter on top."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, set_seed

    dtype = torch_dtype(hw.dtype)
    kwargs: dict[str, Any] = {"dtype": dtype, "use_safetensors": True, **LOAD_KWARGS}
    if hw.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    rev = hub_load_revision(base)
    model = AutoModelForCausalLM.from_pretrained(base.name_or_path, revision=rev, **kwargs)
    tokenizer = load_base_tokenizer(base)
    lora = t.lora
    # The adapter's random init draws from torch's RNG: seed it here, since TRL would
    # otherwise wrap the model before the trainer seeds anything.
    set_seed(t.seed)
    model = get_peft_model(
        model,
        LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            use_rslora=lora.use_rslora,
            bias="none",
            task_type="CAUSAL_LM",
        ),
    )
    return model, tokenizer


def load_unsloth(
    t: TrainConfig, m: ModelConfig, base: BaseModelRef, hw: HardwareDecision
) -> tuple[Any, Any]:
    """Unsloth (CUDA): the base through ``FastLanguageModel`` (4-bit when the hardware
    decision says so, its dtype, ``max_seq_length``), then its LoRA adapter with the
    configured rank, alpha, dropout, targets and rsLoRA, and gradient checkpointing as
    :func:`choose_gradient_checkpointing` sizes it against the memory left after loading.
    """
    if hw.device != "cuda":
        raise BackendNotReadyError(
            f"the Unsloth backend needs CUDA ({hw.reason}); set train.backend=peft"
        )
    import_unsloth()
    import torch
    from transformers import set_seed
    from unsloth import FastLanguageModel

    lora = t.lora
    rev = hub_load_revision(base)
    model, _ = FastLanguageModel.from_pretrained(
        model_name=base.name_or_path,
        revision=rev,
        max_seq_length=m.max_seq_length,
        dtype=torch_dtype(hw.dtype),
        load_in_4bit=hw.load_in_4bit,
        random_state=t.seed,
        **LOAD_KWARGS,
    )
    # The stage's own tokenizer (the one the base stage recorded, template included),
    # not the one Unsloth loads beside the weights.
    tokenizer = load_base_tokenizer(base)

    free, _total = torch.cuda.mem_get_info()
    choice = choose_gradient_checkpointing(t, m.max_seq_length, hw, model.config, free)
    log.info("train: gradient checkpointing %s (%s)", choice.label, choice.reason)
    if lora.dropout > 0:
        log.warning(
            "train.lora.dropout=%s: Unsloth's fused LoRA kernels need dropout 0 and fall back "
            "to slower ones otherwise",
            lora.dropout,
        )
    set_seed(t.seed)
    model = FastLanguageModel.get_peft_model(
        model,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        use_gradient_checkpointing=choice.mode,
        random_state=t.seed,
        use_rslora=lora.use_rslora,
        max_seq_length=m.max_seq_length,
    )
    FastLanguageModel.for_training(model)
    model.slothflow_checkpointing = choice
    return model, tokenizer


#: (train section, model section, base, hardware) -> (model with its adapter, tokenizer)
Backend = Callable[[TrainConfig, ModelConfig, BaseModelRef, HardwareDecision], tuple[Any, Any]]

BACKENDS: dict[str, Backend] = {
    "peft": load_peft,
    "unsloth": load_unsloth,
}


def select_backend(hw: HardwareDecision) -> Backend:
    try:
        return BACKENDS[hw.backend]
    except KeyError:
        raise ConfigError(f"unknown training backend {hw.backend!r}") from None


def resolve_backend(t: TrainConfig, base: BaseModelRef, hw: HardwareDecision) -> HardwareDecision:
    """The run's decision, refined once the base model's architecture is known.

    Only an Unsloth decision can change (see :func:`tasks.core.hardware.for_model`); Unsloth
    is imported here, before this stage touches transformers, since it patches it.
    """
    if hw.backend != "unsloth":
        return hw
    import_unsloth()
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        base.name_or_path, revision=hub_load_revision(base), **LOAD_KWARGS
    )
    refined = for_model(t.backend, hw, config.model_type)
    if refined is not hw:
        log.warning("train: backend changed: %s", refined.reason)
    return refined
