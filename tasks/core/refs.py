"""Small references that stages pass to each other, and the run they belong to.

Stages exchange paths/URIs plus content hashes, never models or DataFrames: the
references stay small, Prefect can show and retry them, and a stage can run on
another machine. A finished stage writes its reference to ``<stage dir>/ref.json``
together with the hash of its inputs; re-running the stage with the same inputs
returns that reference instead of redoing the work. The marker lives beside the
artifacts it points at, so it cannot outlive them (Prefect's result cache would
sit in a separate store and could point at deleted files).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from pydantic import BaseModel, ConfigDict

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


def load_done(stage_dir: Path, inputs_hash: str, model: type[T]) -> T | None:
    """The stage's reference if it already finished with these exact inputs."""
    marker = stage_dir / MARKER
    if not marker.exists():
        return None
    try:
        blob = json.loads(marker.read_text(encoding="utf-8"))
        if blob.get("inputs_hash") != inputs_hash:
            log.info("%s: inputs changed since the last completion; redoing it", stage_dir.name)
            return None
        return model.model_validate(blob["ref"])
    except (ValueError, KeyError) as exc:
        log.warning("%s: unreadable %s (%s); redoing the stage", stage_dir.name, MARKER, exc)
        return None


def mark_done(stage_dir: Path, inputs_hash: str, ref: BaseModel) -> None:
    write_json_atomic(
        stage_dir / MARKER, {"inputs_hash": inputs_hash, "ref": ref.model_dump(mode="json")}
    )


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
