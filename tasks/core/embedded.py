"""The embedded default base model: a tiny Llama built on the spot, no download.

A byte-level BPE tokenizer is trained on the shipped sample's raw text (digits split,
special tokens for the chat roles), wrapped as a ``PreTrainedTokenizerFast`` with a
Jinja chat template that carries ``{% generation %}`` markers (TRL's assistant-only
loss reads them), plus a randomly initialised ``LlamaForCausalLM`` of the configured
shape. Both are saved with ``save_pretrained`` (safetensors), so every later stage
loads them through the ordinary ``from_pretrained(path)`` code path.

The build is cached under ``SLOTHFLOW_HOME/models/`` by a hash of the sample's
content, the shape and the builder version: the data stage's token-length filter
and the trainer see the same tokenizer without depending on each other.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tasks.core.config import REPO_ROOT, TinyModelConfig
from tasks.core.refs import sha256_file, sha256_json

log = logging.getLogger(__name__)

BUILDER_VERSION = "1"
SAMPLE_FILES = (
    REPO_ROOT / "data" / "sample" / "topics_chat.jsonl",
    REPO_ROOT / "data" / "sample" / "topics_alpaca.jsonl",
)
BOS, EOS, PAD = "<|begin|>", "<|end|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = [PAD, BOS, EOS, *ROLE_TOKENS]

# Generation markers wrap exactly the assistant's answer and its end token, so the
# assistant-only loss also teaches the model to stop.
CHAT_TEMPLATE = (
    "{{- '" + BOS + "' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{- '<|system|>' + message['content'] + '" + EOS + "' -}}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- '<|user|>' + message['content'] + '" + EOS + "' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '<|assistant|>' -}}"
    "{% generation %}{{- message['content'] + '" + EOS + "' -}}{% endgeneration %}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)


def sample_texts(files: tuple[Path, ...] = SAMPLE_FILES) -> Iterator[str]:
    """Every string in the sample files (JSON lines), the tokenizer's training text."""
    for path in files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    yield from _strings(json.loads(line))
                except ValueError:
                    yield line


def _strings(obj: object) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


#: The named shapes (config.EMBEDDED_SHAPES): ``LlamaConfig`` fields, from the published
#: config of the model they are named after. The vocabulary is the model's (its embedding
#: and head have the real size); the tokenizer's few hundred ids are a subset of it.
SHAPES: dict[str, dict[str, Any]] = {
    "embedded:llama-3.2-1b": {
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    },
}


def build_key(
    cfg: TinyModelConfig, files: tuple[Path, ...] = SAMPLE_FILES, shape: str | None = None
) -> str:
    # The tiny model's key is unchanged by the named shapes (its builds stay valid).
    named = {} if shape is None else {"named": shape, "dims": SHAPES[shape]}
    return sha256_json(
        {
            "builder": BUILDER_VERSION,
            "shape": cfg.model_dump(mode="json"),
            "sample": [sha256_file(p) for p in files],
            **named,
        }
    )[:16]


def train_tokenizer(texts: Iterator[str], vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Digits one by one: numbers tokenize the same way whatever their neighbours.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
        model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build(cfg: TinyModelConfig, out_dir: Path, shape: str | None = None) -> Path:
    """Build tokenizer + random Llama into ``out_dir`` (safetensors): the tiny one of
    ``cfg``'s shape, or the named ``shape`` (:data:`SHAPES`, saved in bfloat16 as its
    namesake is)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer(sample_texts(), cfg.vocab_size)
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if shape is None:
        model_cfg = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_attention_heads,
            max_position_embeddings=cfg.max_position_embeddings,
            tie_word_embeddings=False,
            **ids,
        )
    else:
        dims = SHAPES[shape]
        if len(tokenizer) > dims["vocab_size"]:
            raise ValueError(f"{shape}: the tokenizer has more ids than the shape's vocabulary")
        model_cfg = LlamaConfig(**dims, **ids)
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        model = LlamaForCausalLM(model_cfg)
    if shape is not None:
        model = model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "LICENSE.txt").write_text(
        "Randomly initialised by slothflow from the shipped sample; Apache-2.0.\n"
    )
    return out_dir


def ensure_built(cfg: TinyModelConfig, models_dir: Path, shape: str | None = None) -> Path:
    """The cached build for this shape and sample, building it first if needed; ``shape``:
    a named shape (:data:`SHAPES`) instead of ``cfg``'s tiny one.

    Built in a temporary folder and renamed into place, so a crash or a concurrent
    builder never leaves a half-written model behind.
    """
    stem = "tiny-llama" if shape is None else shape.removeprefix("embedded:")
    final = models_dir / f"{stem}-{build_key(cfg, shape=shape)}"
    if (final / "model.safetensors").exists():
        return final
    models_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=models_dir, prefix=".build-"))
    try:
        log.info(
            "building the embedded %s (%s) in %s",
            shape or "tiny Llama",
            SHAPES.get(shape or "") or cfg.model_dump(),
            final.name,
        )
        build(cfg, tmp, shape)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
