"""Small references that stages pass to each other, and the run they belong to.

Stages exchange paths/URIs plus content hashes, never models or DataFrames: the
references stay small, Prefect can show and retry them, and a stage can run on
another machine. A finished stage records its reference in ``<stage dir>/ref.json`` (what a
stage on another worker of the same run reads). Reusing a finished stage is
Prefect's job: each stage task's cache key is its inputs hash
(:mod:`tasks.core.caching`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from tasks.core.config import EvalConfig

log = logging.getLogger(__name__)

T = TypeVar("T", bound=BaseModel)


class StageRef(BaseModel):
    """Base of every stage's output reference."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stage: str
    path: str  # the stage's output folder (or URI)


class RunContext(BaseModel):
    """Identity of one pipeline run, handed to every stage task."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_id: str
    run_dir: str
    config_hash: str
    code_version: str
    hardware: dict[str, Any]
    tracking: dict[str, str] | None = None  # a tracking.TrackingRef as a dict; None: no MLflow

    def stage_dir(self, stage: str) -> Path:
        d = Path(self.run_dir) / stage
        d.mkdir(parents=True, exist_ok=True)
        return d


def sha256_update_from(h: Any, f: BinaryIO, chunk: int = 1 << 20) -> None:
    """Feed everything left in the binary file ``f`` to the hash ``h``, ``chunk`` bytes at
    a time (the digest is the same for any chunk size; memory stays bounded)."""
    while block := f.read(chunk):
        h.update(block)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        sha256_update_from(h, f, chunk)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hash of a JSON-able object in canonical form (sorted keys, compact separators)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def data_fingerprint(train_sha256: str, validation_sha256: str) -> str:
    """The cleaned data's fingerprint from its two splits' file hashes. The one formula:
    the data stage writes it to ``report.json`` and ``slothflow train --data DIR``
    recomputes it, so lineage and caching agree however the data got there."""
    return sha256_json({"train": train_sha256, "validation": validation_sha256})


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON so a crash leaves the old file or the new one, never half of one. The
    file gets the permissions of any file the process creates (0644 under umask 022)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkstemp: it creates the file 0600, and the rename would keep that.
    tmp = str(path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True, ensure_ascii=False, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


MARKER = "ref.json"


def record_ref(stage_dir: Path, ref: BaseModel) -> None:
    """Record in the run's folder what a stage produced (or what the cache handed back for
    it): how a stage on another worker of the same run finds it (:func:`load_ref`)."""
    write_json_atomic(stage_dir / MARKER, {"ref": ref.model_dump(mode="json")})


def load_ref(stage_dir: Path, model: type[T]) -> T:
    """The reference a finished stage left in ``stage_dir``: how a worker picks up what a
    stage on another worker produced for the same run."""
    marker = stage_dir / MARKER
    if not marker.exists():
        raise FileNotFoundError(f"stage {stage_dir.name} has not finished: no {marker}")
    return model.model_validate(json.loads(marker.read_text(encoding="utf-8"))["ref"])


# --------------------------------------------------------------------------- stage references
# The contracts between stages. Each stage module returns one of these; the flow
# passes them on. Fields are paths/URIs, hashes and small numbers only.


class BaseModelRef(StageRef):
    """The resolved base model (stage ``base``): what ``from_pretrained`` gets."""

    name_or_path: str  # local folder or hub id, passed to from_pretrained as-is
    revision: str  # hub commit sha, or "sha256:<hex>" content hash of a local folder
    tokenizer_path: str  # folder or hub id for AutoTokenizer (the data stage's length filter)
    chat_template_sha256: str  # hash of the chat template the model is trained with
    license: str | None = None


class DataRef(StageRef):
    """Cleaned, deduplicated, split data (stage ``data``).

    ``train_path`` / ``validation_path`` are JSONL files of chat-shaped rows
    (``{"id": ..., "messages": [{"role", "content"}, ...]}``) that ``datasets`` loads
    with ``load_dataset("json", data_files=...)``.
    """

    train_path: str
    validation_path: str
    fingerprint: str  # sha256 of the canonical cleaned content (caching, new-data detection)
    train_rows: int
    validation_rows: int
    report_path: str  # report.json
    # Rows kept now that the previous run's manifest did not hold (all of them on a first
    # run); None for a reference written before this was recorded.
    new_rows: int | None = None
    # The raw inputs' fingerprint (tasks.data.fingerprint), what a retrain compares.
    source_fingerprint: str | None = None


class TrainRef(StageRef):
    """A trained adapter (stage ``train``): the *best* checkpoint by eval loss."""

    adapter_path: str  # PEFT adapter folder: adapter_model.safetensors + adapter_config.json
    tokenizer_path: str
    base: BaseModelRef
    data_fingerprint: str
    config_hash: str
    backend: str  # "peft" or "unsloth"
    best_step: int
    metrics: dict[str, float]


class ExportRef(StageRef):
    """What ``export`` produced: the adapter and merged artifacts and the check results."""

    adapter_path: str  # adapter artifact folder (adapter + tokenizer + manifest.json)
    merged_path: str | None  # merged artifact folder; None when export.merge is false
    base: BaseModelRef
    data_fingerprint: str
    config_hash: str
    dtype: str
    eos_token_ids: list[int]
    served_model_name: str
    parity_max_abs_diff: float | None  # None when nothing was merged
    parity_atol: float
    stop_fraction: float  # share of probe prompts whose greedy generation ended on EOS
    metrics: dict[str, float]  # train metrics carried over, plus the checks' numbers

    @property
    def candidate_path(self) -> str:
        """The artifact that gets evaluated as the candidate and deployed."""
        return self.merged_path or self.adapter_path


#: Metrics whose values must be finite for the gate (losses and perplexities).
FINITE_METRICS = ("answer_nll", "answer_perplexity")


class EvalRef(StageRef):
    """Scores per evaluated model on the held-out split, and where the details are."""

    n_items: int
    primary_metric: str
    candidate: str  # key into ``scores`` of what gets deployed: "merged" or "adapter"
    scores: dict[str, dict[str, float]]  # model label -> metric -> value
    champion: str | None = None  # "NAME vN" of the champion re-evaluated, if any
    agreement_max_diff: float | None = None  # adapter vs merged, worst metric
    train_metrics: dict[str, float] = Field(default_factory=dict)
    extra_tasks: dict[str, str] = Field(
        default_factory=dict
    )  # task name -> "ran" or why it was skipped
    results_path: str
    table_path: str
    validation_fingerprint: str


class GateRef(StageRef):
    passed: bool
    reasons: list[str]
    decision_path: str
    primary_metric: str
    candidate: float
    base: float
    champion: float | None


class GateBar(BaseModel):
    """How good the gate requires a candidate to be: the rules that compare two recipes'
    gates (``min_items`` and ``champion_tolerance`` say how sure and how stable, not how
    good). The registry records it on every version it registers."""

    primary_metric: str
    threshold: float
    base_margin: float

    @classmethod
    def of(cls, cfg: EvalConfig) -> GateBar:
        return cls(
            primary_metric=cfg.primary_metric,
            threshold=cfg.threshold,
            base_margin=cfg.base_margin,
        )

    def looser_than(self, other: GateBar) -> list[str]:
        """Where this bar is below ``other`` (empty: at least as strict). Thresholds on
        different metrics cannot be ordered, so a different metric counts as looser."""
        if self.primary_metric != other.primary_metric:
            return [f"primary_metric {self.primary_metric} vs {other.primary_metric}"]
        return [
            f"{rule} {mine:g} vs {theirs:g}"
            for rule, mine, theirs in (
                ("threshold", self.threshold, other.threshold),
                ("base_margin", self.base_margin, other.base_margin),
            )
            if mine < theirs
        ]

    def describe(self) -> str:
        return (
            f"{self.primary_metric} threshold {self.threshold:g} base_margin {self.base_margin:g}"
        )


class RegistryRef(StageRef):
    name: str
    version: int
    alias: str
    model_uri: str  # models:/NAME/VERSION
    source: str  # artifact URI of the version's folder (merged/ and adapter/ below it)


class DeployRef(StageRef):
    """A model being served (stage ``serve``): where, what, and how it did."""

    endpoint: str  # OpenAI base URL, e.g. http://127.0.0.1:8000/v1
    served_model_name: str
    host: str
    port: int
    pid: int
    model_spec: str
    model_path: str
    version: str
    api_key_source: str
    log_path: str
    startup_s: float
    metrics: dict[str, float]
    sample_prompt: str
    sample_answer: str
    # Behind the stable endpoint (``endpoint``/``port`` are then the endpoint's): the
    # version's own vLLM server on loopback. None: served directly on ``port``.
    backend_port: int | None = None
    # A registered version released behind the endpoint: the model's aliases after it
    # became champion. None: not a registered version (a folder), or not released.
    aliases: dict[str, int] | None = None


@dataclass(frozen=True)
class ResolvedModel:
    """A model artifact available on this machine: a local folder plus its manifest
    (export's contract). What ``slothflow serve`` serves, and what the registry hands
    back for ``NAME@alias`` / ``NAME/version`` (then ``name`` and ``number`` are set)."""

    spec: str  # what was asked for: a path, NAME@alias or NAME/version
    path: Path  # the servable artifact: merged/ when present, else adapter/
    manifest: dict[str, Any]  # path's manifest, with paths rewritten to this machine
    label: str  # "NAME/3 (champion)", the manifest's version, or "local:<folder>"
    name: str | None = None  # registered model name
    number: int | None = None  # registry version number
    aliases: list[str] = field(default_factory=list)
    adapter_path: Path | None = None
    merged_path: Path | None = None

    @property
    def kind(self) -> Literal["merged", "adapter"]:
        return "adapter" if self.manifest.get("kind") == "adapter" else "merged"

    @property
    def vllm_args(self) -> list[str]:
        args = (self.manifest.get("serving") or {}).get("vllm_args") or []
        return [str(a) for a in args]

    @property
    def base_model(self) -> str | None:
        """An adapter's base (export's ``serving.model``); vLLM gets it as ``--model``."""
        base = (self.manifest.get("serving") or {}).get("model")
        return str(base) if base else None

    @property
    def served_model_name(self) -> str:
        name = (self.manifest.get("serving") or {}).get("served_model_name")
        return str(name) if name else self.path.name
