"""Model and tokenizer loading, the one way every stage does it.

One loader for tokenizers and causal LMs, one dtype map, one greedy generation and
one prompt rendering: a difference between how training, export, evaluation and the
data filter load or prompt a model would show up as a silent quality gap.

Every ``from_pretrained`` gets :data:`LOAD_KWARGS` (``trust_remote_code`` off) and
weights load from safetensors only. A Hub base is pinned to the commit the base stage
recorded (:func:`hub_load_revision`); a local folder's recorded revision is a content
hash, not something ``from_pretrained`` could load by. Heavy libraries are imported
inside the functions, so importing this module costs nothing.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from tasks.core.refs import BaseModelRef
from tasks.core.revision import is_hub_id

#: Passed to every ``from_pretrained`` in slothflow; a test asserts it never changes.
LOAD_KWARGS: dict[str, Any] = {"trust_remote_code": False}

DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str) -> Any:
    """The ``torch.dtype`` of a config's dtype name (``float32``, ``bfloat16``, ``float16``)."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def hub_load_revision(base: BaseModelRef) -> str | None:
    """The ``revision=`` to pass to ``from_pretrained``: the commit for hub ids, nothing for
    folders (whose recorded revision is a content hash, not something the Hub knows)."""
    return base.revision if is_hub_id(base.name_or_path) else None


def base_tokenizer_revision(base: BaseModelRef) -> str | None:
    """The ``revision=`` for ``base.tokenizer_path``: the base's hub commit when the
    tokenizer is the base's own (a hub id), nothing for a folder (the base's own, or the
    copy that carries a configured chat template, which is keyed by content)."""
    return hub_load_revision(base) if base.tokenizer_path == base.name_or_path else None


def preload() -> None:
    """Import what loading a model takes (transformers' auto classes: ~4 s on two cores)
    ahead of the first load, while the caller would otherwise only wait (for Prefect's
    temporary server to boot)."""
    import transformers

    _ = transformers.AutoTokenizer, transformers.AutoModelForCausalLM


def load_tokenizer(path: str, revision: str | None = None) -> Any:
    """A tokenizer from a folder or hub id, never with remote code."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, revision=revision, **LOAD_KWARGS)


def load_base_tokenizer(base: BaseModelRef) -> Any:
    """The tokenizer the base stage recorded: ``base.tokenizer_path`` pinned to
    :func:`base_tokenizer_revision`."""
    return load_tokenizer(base.tokenizer_path, base_tokenizer_revision(base))


def load_causal_lm(path: str, dtype: str, device: str, revision: str | None = None) -> Any:
    """A causal LM in ``dtype`` on ``device``, in eval mode, from safetensors only."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path,
        revision=revision,
        dtype=torch_dtype(dtype),
        use_safetensors=True,
        **LOAD_KWARGS,
    )
    return model.to(device).eval()


def template_sha256(text: str) -> str:
    """The hash recorded as ``BaseModelRef.chat_template_sha256``: sha256 of the template's
    UTF-8 text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def template_text(template: str | dict[str, str] | None) -> str | None:
    """The tokenizer's chat template as one string (some tokenizers carry several, by name)."""
    if template is None or isinstance(template, str):
        return template
    return template.get("default") or json.dumps(template, sort_keys=True)


def chat_template_sha256(template: str | dict[str, str] | None) -> str:
    """The hash the base stage records (a tokenizer with several named templates
    hashes as the base stage reads it)."""
    return template_sha256(template_text(template) or "")


def render_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The prompt text a served model sees: every turn before the last answer, rendered
    with the model's own chat template plus the generation prompt."""
    history = messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages
    return str(tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True))


def generate_greedy(
    model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int
) -> list[list[int]]:
    """New token ids per rendered prompt, greedy, stopping on the model's generation
    config EOS ids. The prompt is tokenized without special tokens: the chat template
    already put them in."""
    import torch

    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = tokenizer(p, add_special_tokens=False, return_tensors="pt").to(model.device)
            seq = model.generate(
                **ids,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            outs.append(seq[0, ids["input_ids"].shape[1] :].tolist())
    return outs
