"""Models and data for the export / evaluate / gate / registry tests (built once per process).

The CPU training stage is not a dependency of these tests; they make what they need:

* the embedded tiny Llama in a small shape (hidden 64, 1 layer, vocabulary 512);
* a held-out split from the shipped sample, with the long shared instruction cut off
  each prompt (rows are ~30 tokens instead of ~150: training is 5x cheaper on 2 cores);
* a **random LoRA adapter** with non-zero B (the merge changes the logits) for the
  parity and stop checks;
* **trained adapters**: LoRA on a random base learns this task slowly (0.9 exact match
  after ~400 steps / ~4 minutes here), full fine-tuning in ~150 steps. So the fixture
  fine-tunes the full model (norms frozen) in plain PyTorch, then writes the weight
  deltas as an *exact* rank-64 LoRA adapter (SVD; 64 is the full rank of every delta at
  hidden size 64) on the seven projections plus ``embed_tokens`` and ``lm_head``. The
  "strong" adapter is the end of training (~0.95+ exact match); the "weak" one is a
  snapshot after a few steps (well below the strong one), used as the worse challenger.

Everything is cached with ``lru_cache`` under the session's SLOTHFLOW_HOME, so several
test modules share one build and one training run.
"""

from __future__ import annotations

import json
import random
from functools import lru_cache
from pathlib import Path
from typing import Any

from tasks.core import home as home_mod
from tasks.core.config import PipelineConfig, TinyModelConfig, build_config
from tasks.core.embedded import ensure_built
from tasks.core.refs import BaseModelRef, DataRef, TrainRef, sha256_file
from tasks.export import chat_template_sha256

TINY = TinyModelConfig(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=1,
    num_attention_heads=2,
)
SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample" / "topics_chat.jsonl"
N_TRAIN, N_VAL = 2000, 220
STRONG_STEPS, WEAK_STEPS = 240, 12
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def root() -> Path:
    d = home_mod.resolve_home().root / "issue6-fixtures"
    d.mkdir(parents=True, exist_ok=True)
    return d


@lru_cache(maxsize=1)
def base_dir() -> Path:
    return ensure_built(TINY, home_mod.resolve_home().models)


def _short(row: dict[str, Any], i: int) -> dict[str, Any]:
    messages = [dict(m) for m in row["messages"]]
    messages[0]["content"] = messages[0]["content"].split("\n\n", 1)[-1]
    return {"id": f"s{i}", "messages": messages}


@lru_cache(maxsize=1)
def data_ref() -> DataRef:
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines() if line.strip()]
    random.Random(0).shuffle(rows)
    rows = [_short(r, i) for i, r in enumerate(rows)]
    d = root() / "data"
    d.mkdir(exist_ok=True)
    train, val = d / "train.jsonl", d / "validation.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:N_TRAIN]))
    val.write_text("".join(json.dumps(r) + "\n" for r in rows[N_TRAIN : N_TRAIN + N_VAL]))
    return DataRef(
        stage="data",
        path=str(d),
        train_path=str(train),
        validation_path=str(val),
        fingerprint=sha256_file(val),
        train_rows=N_TRAIN,
        validation_rows=N_VAL,
        report_path=str(d / "report.json"),
    )


def heldout() -> tuple[str, str]:
    """What evaluate takes of the data stage: the held-out path and its fingerprint."""
    data = data_ref()
    return data.validation_path, data.fingerprint


def base_ref() -> BaseModelRef:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir())
    return BaseModelRef(
        stage="base",
        path=str(base_dir()),
        name_or_path=str(base_dir()),
        revision="sha256:" + sha256_file(base_dir() / "model.safetensors"),
        tokenizer_path=str(base_dir()),
        chat_template_sha256=chat_template_sha256(tok.chat_template),
        license="Apache-2.0",
    )


def train_ref(adapter: Path, metrics: dict[str, float] | None = None) -> TrainRef:
    return TrainRef(
        stage="train",
        path=str(adapter.parent),
        adapter_path=str(adapter),
        tokenizer_path=str(base_dir()),
        base=base_ref(),
        data_fingerprint=data_ref().fingerprint,
        config_hash="c" * 64,
        backend="peft",
        best_step=0,
        metrics=metrics or {"train.loss": 0.1, "eval.loss": 0.2},
    )


def pipeline_cfg(**sections: Any) -> PipelineConfig:
    raw: dict[str, Any] = {
        "name": "issue6",
        "eval": {"max_new_tokens": 4, "batch_size": 32, "min_items": 200, "table_rows": 10},
        "export": {"dtype": "float32", "probe_prompts": 4},
        "tracking": {"registered_model": "tiny-topics"},
    }
    for k, v in sections.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    return build_config(raw)


def export_values(cfg: PipelineConfig) -> dict[str, Any]:
    """What ``export`` takes from outside ``cfg.export``, as the flow passes it."""
    return {
        "served_model_name": cfg.tracking.registered_model,
        "max_new_tokens": cfg.eval.max_new_tokens,
        "max_seq_length": cfg.model.max_seq_length,
    }


@lru_cache(maxsize=1)
def random_adapter() -> Path:
    """A LoRA adapter with random A *and* B (PEFT's init leaves B zero)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir(), dtype=torch.float32)
    peft = get_peft_model(
        model,
        LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False),
    )
    out = root() / "random-adapter"
    peft.save_pretrained(out, safe_serialization=True)
    return out


def _batch(items: list[tuple[list[int], list[int]]], pad: int) -> tuple[Any, Any, Any]:
    import torch

    width = max(len(p) + len(a) for p, a in items)
    ids = torch.full((len(items), width), pad)
    labels = torch.full((len(items), width), -100)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, (p, a) in enumerate(items):
        seq = p + a
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, len(p) : len(seq)] = torch.tensor(a)
    return ids, mask, labels


def _as_lora(model: Any, base_state: dict[str, Any], out: Path) -> Path:
    """Write ``model - base`` as an exact LoRA adapter (rank 64 = full rank here)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    r = TINY.hidden_size
    base = AutoModelForCausalLM.from_pretrained(base_dir(), dtype=torch.float32)
    peft = get_peft_model(
        base,
        LoraConfig(r=r, lora_alpha=r, target_modules=[*TARGETS, "lm_head", "embed_tokens"]),
    )
    tuned = dict(model.named_parameters())
    with torch.no_grad():
        for name, module in peft.named_modules():
            if not hasattr(module, "lora_A") or "default" not in getattr(module, "r", {}):
                continue
            key = name.removeprefix("base_model.model.") + ".weight"
            delta = (tuned[key] - base_state[key]).float()
            if hasattr(module, "lora_embedding_A") and "default" in module.lora_embedding_A:
                u, s, vh = torch.linalg.svd(delta.T, full_matrices=False)
                module.lora_embedding_B["default"].copy_(u[:, :r] * s[:r].sqrt())
                module.lora_embedding_A["default"].copy_(s[:r].sqrt()[:, None] * vh[:r])
            else:
                u, s, vh = torch.linalg.svd(delta, full_matrices=False)
                module.lora_B["default"].weight.copy_(u[:, :r] * s[:r].sqrt())
                module.lora_A["default"].weight.copy_(s[:r].sqrt()[:, None] * vh[:r])
    peft.save_pretrained(out, safe_serialization=True)
    return out


@lru_cache(maxsize=1)
def trained_adapters() -> dict[str, Path]:
    """{"weak": ..., "strong": ...}: full fine-tune snapshots as exact LoRA adapters."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(base_dir())
    rows = [json.loads(line) for line in Path(data_ref().train_path).read_text().splitlines()]
    data = []
    for r in rows:
        prompt = tok.apply_chat_template(
            r["messages"][:-1], tokenize=False, add_generation_prompt=True
        )
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        a = tok(r["messages"][-1]["content"] + tok.eos_token, add_special_tokens=False)["input_ids"]
        data.append((p, a))
    model = AutoModelForCausalLM.from_pretrained(base_dir(), dtype=torch.float32)
    base_state = {k: v.detach().clone() for k, v in model.named_parameters()}
    for name, p in model.named_parameters():
        p.requires_grad = "norm" not in name  # norms have no LoRA counterpart
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    out: dict[str, Path] = {}
    bs = 32
    for step in range(1, STRONG_STEPS + 1):
        items = [data[(step * bs + i) % len(data)] for i in range(bs)]
        ids, mask, labels = _batch(items, tok.pad_token_id)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
        if step == WEAK_STEPS:
            out["weak"] = _as_lora(model, base_state, root() / "adapter-weak")
    out["strong"] = _as_lora(model, base_state, root() / "adapter-strong")
    return out


# --------------------------------------------------------------------------- stage outputs


def cpu() -> Any:
    from tasks.core.hardware import HardwareDecision

    return HardwareDecision(
        device="cpu", backend="peft", dtype="float32", load_in_4bit=False, reason="tests: CPU"
    )


@lru_cache(maxsize=4)
def exported(which: str) -> Any:
    """The export stage's output for the "random", "weak" or "strong" adapter. Only the
    strong one learned to stop; the others export with ``stop_check: warn``."""
    from tasks.export import export

    adapter = random_adapter() if which == "random" else trained_adapters()[which]
    cfg = pipeline_cfg(export={"stop_check": "fail" if which == "strong" else "warn"})
    return export(
        cfg.export,
        train_ref(adapter),
        data_ref(),
        root() / f"export-{which}",
        cpu(),
        **export_values(cfg),
        run_id=f"test-{which}",
        code_version="test",
    )


@lru_cache(maxsize=4)
def evaluated(which: str) -> Any:
    from tasks.evaluate import evaluate

    return evaluate(
        pipeline_cfg().eval, *heldout(), exported(which), root() / f"eval-{which}", cpu()
    )
