"""Warm start (``train.init_adapter``): training continues a registered adapter (the
champion's, handed over by the flow as an :class:`~tasks.core.artifacts.InitAdapter`)
instead of a fresh LoRA.

Everything that can refuse it is read from the adapter's folder before the base model
loads: its manifest's base revision and chat template against this run's base, its files
against the hashes the cache key was made of, and its LoRA shape against ``train.lora``.
Then the backend builds its fresh LoRA as usual and :func:`load_init_weights` puts the
adapter's weights into it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tasks.core.artifacts import InitAdapter, read_manifest
from tasks.core.config import ConfigError, LoraConfig
from tasks.core.refs import BaseModelRef, sha256_file

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def check_init_adapter(init: InitAdapter, lora: LoraConfig, base: BaseModelRef) -> None:
    """Refuse, naming ``train.init_adapter``, an adapter this run cannot continue: one
    trained on another base revision or chat template (its deltas belong to those
    weights and that prompt format), one whose files are not those its manifest lists,
    or one whose LoRA shape is not ``train.lora``'s (the run records ``train.lora``)."""
    folder = Path(init.path)
    what = f"train.init_adapter=champion ({init.label})"
    try:
        manifest = read_manifest(folder)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{what}: {exc}") from None
    if manifest.get("kind") != "adapter":
        raise ConfigError(f"{what}: {folder} is not an adapter artifact")
    recorded = manifest.get("base_model") or {}
    if recorded.get("revision") != base.revision:
        raise ConfigError(
            f"{what} was trained on {recorded.get('id')} @ {recorded.get('revision')}, but "
            f"this run's base is {base.name_or_path} @ {base.revision}: an adapter only fits "
            "the weights it was trained on; use that base or set train.init_adapter=none"
        )
    if manifest.get("chat_template_sha256") != base.chat_template_sha256:
        raise ConfigError(
            f"{what} was trained with another chat template than this run's "
            f"(sha256 {manifest.get('chat_template_sha256')} vs {base.chat_template_sha256}); "
            "use that template or set train.init_adapter=none"
        )
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        path = folder / name
        if not path.is_file():
            raise ConfigError(f"{what}: no {name} in {folder} (safetensors weights only)")
        if sha256_file(path) != init.files.get(name):
            raise ConfigError(f"{what}: {path} is not the file its manifest lists")
    _check_shape(json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8")), lora, what)


def _check_shape(adapter: dict[str, Any], lora: LoraConfig, what: str) -> None:
    if adapter.get("peft_type") != "LORA":
        raise ConfigError(f"{what}: a {adapter.get('peft_type')} adapter, not LoRA")
    targets = adapter.get("target_modules")
    theirs = {
        "r": adapter.get("r"),
        "alpha": adapter.get("lora_alpha"),
        "target_modules": sorted(targets) if isinstance(targets, list) else targets,
        "use_rslora": bool(adapter.get("use_rslora", False)),
    }
    ours = {
        "r": lora.r,
        "alpha": lora.alpha,
        "target_modules": sorted(lora.target_modules),
        "use_rslora": lora.use_rslora,
    }
    if diff := [f"train.lora.{k}={ours[k]} vs {theirs[k]}" for k in ours if ours[k] != theirs[k]]:
        raise ConfigError(
            f"{what} has another LoRA shape ({', '.join(diff)}): a warm start continues "
            "that adapter, so train.lora must describe it; match it or set "
            "train.init_adapter=none"
        )


def load_init_weights(model: Any, init: InitAdapter) -> None:
    """Put the adapter's weights into the backend's fresh LoRA of the same (checked) shape:
    what ``PeftModel.from_pretrained(..., is_trainable=True)`` does, on either backend's
    own LoRA modules (Unsloth's stay as it patched them), with ``train.lora.dropout``.
    Every LoRA weight must come from the adapter and every adapter weight must land."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(Path(init.path) / ADAPTER_WEIGHTS))
    result = set_peft_model_state_dict(model, weights)
    stray = [k for k in result.missing_keys if "lora_" in k] + list(result.unexpected_keys)
    if stray:
        raise ConfigError(
            f"train.init_adapter=champion ({init.label}): its weights do not fit the LoRA "
            f"train.lora describes ({len(stray)} mismatched, e.g. {stray[0]})"
        )
    log.info("train: starting from the adapter of %s (%d tensors)", init.label, len(weights))
