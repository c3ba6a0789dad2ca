"""A servable tiny Llama whose answers are known by construction (no training).

The serving tests need a model that (a) vLLM loads through its ordinary Llama code
path, (b) answers a held-out set *correctly*, so the smoke test can compare the
served score with an offline one, and (c) takes seconds to make. Training the
embedded model until it answers reliably takes minutes of the CI budget; instead
we take the embedded tokenizer (digits are single tokens, chat template included)
and set the weights of a one-layer, one-head Llama by hand so that it solves one
task exactly: "which digit appears in this sentence?".

How the weights do it (hidden size 64 = head size, residual dimensions named):

- The embedding writes a constant 1 into dim 0 (so RMSNorm never divides by
  zero), a one-hot digit identity into dims 1-10 plus an ``is_digit`` flag in dim
  22, and an ``is_assistant`` flag in dim 11 for the ``<|assistant|>`` token.
- Attention: the query of ``<|assistant|>`` and the key of every digit are placed
  in head dim 31, the lowest RoPE frequency (about 1e-4 rad per token), so their
  match ignores position. The assistant position therefore attends to the one
  digit of the prompt; the value copies that digit's identity into dims 12-21.
- The MLP is switched off (``down_proj`` = 0).
- ``lm_head`` maps dims 12-21 to the digit tokens (the answer) and the
  ``is_digit`` flag of the *current* token to ``<|end|>``: after emitting a digit
  the model stops, which is what "stop on EOS" checks.

``wrong=True`` wires dims 12-21 to the *next* digit: the model loads and answers
fluently, and every answer is wrong — the case the smoke test must catch.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from tasks.core.config import TinyModelConfig
from tasks.core.embedded import ROLE_TOKENS, ensure_built

SHAPE = TinyModelConfig(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=1,
    num_attention_heads=1,
    max_position_embeddings=256,
)

_SUBJECTS = ["the locker", "my bus", "the room", "her ticket", "the gate", "our table"]
_TAILS = ["today", "this week", "on Friday", "again", "for now", "as usual"]


def digit_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Held-out rows in the pipeline's chat shape; each prompt holds exactly one digit."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        d = rng.randrange(10)
        prompt = (
            f"Which number is in this sentence? {rng.choice(_SUBJECTS)} is "
            f"number {d} {rng.choice(_TAILS)}."
        )
        rows.append(
            {
                "id": f"digit-{i}",
                "messages": [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": str(d)},
                ],
            }
        )
    return rows


def build_digit_model(out_dir: Path, models_cache: Path, wrong: bool = False) -> Path:
    """Write the hand-wired model (safetensors + tokenizer) into ``out_dir``."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    if (out_dir / "model.safetensors").exists():
        return out_dir
    base = ensure_built(SHAPE, models_cache)
    tok = AutoTokenizer.from_pretrained(base)
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    digits = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
    assistant = tok.convert_tokens_to_ids(ROLE_TOKENS[2])
    eos = tok.eos_token_id

    hidden = model.config.hidden_size
    rope_dim = model.config.head_dim // 2 - 1  # pairs with rope_dim + head_dim/2; slowest

    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        emb = model.model.embed_tokens.weight
        emb[:, 0] = 1.0
        for d, t in enumerate(digits):
            emb[t, 1 + d] = 1.0
            emb[t, 22] = 1.0
        emb[assistant, 11] = 1.0

        layer = model.model.layers[0]
        layer.input_layernorm.weight.fill_(1.0)
        layer.post_attention_layernorm.weight.fill_(1.0)
        model.model.norm.weight.fill_(1.0)
        attn = layer.self_attn
        attn.q_proj.weight[rope_dim, 11] = 3.0
        attn.k_proj.weight[rope_dim, 22] = 3.0
        for d in range(10):
            attn.v_proj.weight[12 + d, 1 + d] = 1.0
            attn.o_proj.weight[12 + d, 12 + d] = 1.0

        head = model.lm_head.weight
        for d in range(10):
            answer = digits[(d + 1) % 10] if wrong else digits[d]
            head[answer, 12 + d] = 2.0
        head[eos, 22] = 4.0
        assert hidden > 22

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir


def offline_answers(model_dir: Path, rows: list[dict[str, Any]]) -> list[str]:
    """Greedy ``generate`` answers to ``rows``: the "offline evaluation" per item."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    answers = []
    for row in rows:
        ids = tok.apply_chat_template(
            row["messages"][:-1], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
        answers.append(tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
    return answers


def write_rows(rows: list[dict[str, Any]], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
