"""The checks a merged model must pass before it is handed on: the stop ids it must end
on, parity of its logits with base + adapter, and greedy generations that stop, both on
probe prompts from the held-out split and on one load of the merged folder."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from tasks.core.artifacts import heldout_rows
from tasks.core.config import ExportConfig
from tasks.core.models import generate_greedy, load_causal_lm, load_tokenizer, render_prompt
from tasks.export.errors import ExportError, StopCheckError

log = logging.getLogger(__name__)


#: Default parity tolerance by dtype when ``export.parity_atol`` is unset. float32 on
#: CPU matches to ~1e-6 (only summation order differs); half precision rounds the
#: merged weights (W + BA) once more than the unmerged path, ~2^-8 relative per
#: weight, which accumulates through the layers.
DEFAULT_PARITY_ATOL = {"float32": 1e-3, "bfloat16": 0.25, "float16": 0.1}


def parity_tolerance(cfg: ExportConfig) -> float:
    return cfg.parity_atol or DEFAULT_PARITY_ATOL[cfg.dtype]


def turn_end_token_id(tokenizer: Any) -> int | None:
    """The token the chat template puts right after an assistant answer (``<|eot_id|>``
    for Llama 3, ``<|im_end|>`` for ChatML), found by rendering a sentinel answer."""
    sentinel = "SLOTHFLOWSENTINEL"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": sentinel}],
            tokenize=False,
        )
    except Exception:  # a template that cannot render this pair has no answer turn
        return None
    tail = str(text).split(sentinel, 1)[-1]
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    if ids and ids[0] in set(tokenizer.all_special_ids):
        return int(ids[0])
    return None


def stop_token_ids(tokenizer: Any, configured: int | list[int] | None) -> list[int]:
    """Every id that must end generation: the base's configured EOS ids, the
    tokenizer's EOS and the chat template's end-of-turn token, in that order."""
    ids: list[int] = []
    if isinstance(configured, int):
        ids.append(configured)
    elif configured:
        ids.extend(int(i) for i in configured)
    for extra in (tokenizer.eos_token_id, turn_end_token_id(tokenizer)):
        if extra is not None and int(extra) not in ids:
            ids.append(int(extra))
    if not ids:
        raise ExportError("the tokenizer defines no EOS token and the base config lists none")
    return ids


def probe_logits(model: Any, tokenizer: Any, prompts: list[str]) -> list[Any]:
    import torch

    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = tokenizer(p, add_special_tokens=False, return_tensors="pt").to(model.device)
            outs.append(model(**ids).logits[0].float().cpu())
    return outs


@dataclass(frozen=True)
class MergedProbe:
    """What the parity and stop checks need from the merged model, from one load of it."""

    tokenizer: Any  # the artifact's own saved tokenizer
    prompts: list[str]
    max_new_tokens: int
    logits: list[Any]  # per probe prompt: logits at every position (float32, on the CPU)
    generations: list[list[int]]  # per probe prompt: the greedy new token ids
    eos_ids: set[int]  # the eos_token_id of the artifact's saved generation_config.json


def probe_merged(
    model_path: str, prompts: list[str], max_new_tokens: int, dtype: str, device: str
) -> MergedProbe:
    """Load the merged folder once, as saved (weights, tokenizer, generation config), and
    run what both checks need on the probe prompts: their logits (:func:`check_parity`)
    and greedy generations (:func:`check_stop`). The model is freed on return."""
    from transformers import GenerationConfig

    tokenizer = load_tokenizer(model_path)
    model = load_causal_lm(model_path, dtype, device)
    logits = probe_logits(model, tokenizer, prompts)
    generations = generate_greedy(model, tokenizer, prompts, max_new_tokens)
    del model
    eos = GenerationConfig.from_pretrained(model_path).eos_token_id
    return MergedProbe(
        tokenizer=tokenizer,
        prompts=prompts,
        max_new_tokens=max_new_tokens,
        logits=logits,
        generations=generations,
        eos_ids={eos} if isinstance(eos, int) else set(eos or []),
    )


def check_parity(
    probe: MergedProbe,
    base_path: str,
    adapter_path: str,
    dtype: str,
    device: str,
    atol: float,
    base_revision: str | None = None,
) -> float:
    """Max |logit(merged) − logit(base + adapter)| over the probe prompts; raises
    :class:`ExportError` above ``atol``. Base + adapter are loaded here, once the
    merged model of ``probe`` is gone."""
    from peft import PeftModel

    base = load_causal_lm(base_path, dtype, device, base_revision)
    ref_model = PeftModel.from_pretrained(base, adapter_path).eval()
    want = probe_logits(ref_model, probe.tokenizer, probe.prompts)
    diff = max(float((g - w).abs().max()) for g, w in zip(probe.logits, want, strict=True))
    n = len(probe.prompts)
    log.info("parity: max |Δlogit| = %.3g over %d probe prompts (atol %.3g)", diff, n, atol)
    if not diff <= atol:  # also catches NaN
        raise ExportError(
            f"parity check failed: merged logits differ from base + adapter by up to {diff:.4g} "
            f"(> export.parity_atol {atol:g}) on {n} probe prompts; the merge is wrong"
        )
    return diff


def check_stop(probe: MergedProbe) -> float:
    """Share of probe prompts whose greedy generation ends on an EOS id from the
    artifact's own ``generation_config.json``; raises unless every prompt stops."""
    outs, eos_ids, n = probe.generations, probe.eos_ids, len(probe.prompts)
    stopped = [bool(o) and o[-1] in eos_ids for o in outs]
    frac = sum(stopped) / n
    log.info("stop: %d/%d probe prompts ended on EOS %s", sum(stopped), n, sorted(eos_ids))
    if not all(stopped):
        bad = next(i for i, s in enumerate(stopped) if not s)
        text = probe.tokenizer.decode(outs[bad], skip_special_tokens=False)
        raise StopCheckError(
            frac,
            f"stop check failed: {n - sum(stopped)}/{n} probe prompts did not end on an EOS "
            f"token {sorted(eos_ids)} within {probe.max_new_tokens} new tokens "
            f"(e.g. prompt {bad} generated {text!r}). The exported generation_config or "
            "tokenizer has lost the end-of-turn token, or the model never learned to stop.",
        )
    return frac


def probe_prompts(tokenizer: Any, validation_path: str, n: int) -> list[str]:
    """The first ``n`` held-out conversations (read by :func:`heldout_rows`, as every
    stage reads the split) rendered as prompts (in-distribution, so a model that learned
    to stop is expected to stop on every one)."""
    prompts = [
        render_prompt(tokenizer, row["messages"]) for _, row in heldout_rows(validation_path)[:n]
    ]
    if not prompts:
        raise ExportError(f"no probe prompts: {validation_path} has no rows")
    return prompts
