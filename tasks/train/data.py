"""The train stage's view of cleaned data: chat rows, a DataRef for a cleaned folder,
and how many rows the trainer truncated or dropped."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tasks.core.config import ConfigError, TrainConfig
from tasks.core.refs import DataRef, data_fingerprint, sha256_file

log = logging.getLogger(__name__)


def read_chat_rows(path: str | Path) -> list[dict[str, Any]]:
    """Chat rows of a DataRef split, as the trainer wants them (``messages`` only)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            blob = json.loads(line)
            if "messages" not in blob:
                raise ConfigError(f"{path}:{n}: not a chat row (no 'messages'); run the data stage")
            rows.append({"messages": blob["messages"]})
    if not rows:
        raise ConfigError(f"{path}: no rows")
    return rows


def data_ref_from_folder(folder: Path) -> DataRef:
    """A :class:`DataRef` for an already-cleaned folder (``slothflow train --data DIR``)."""
    folder = folder.resolve()
    marker = folder / "ref.json"
    if marker.is_file():  # the data stage's own output folder
        return DataRef.model_validate(json.loads(marker.read_text(encoding="utf-8"))["ref"])
    train_p, val_p = folder / "train.jsonl", folder / "validation.jsonl"
    for p in (train_p, val_p):
        if not p.is_file():
            raise ConfigError(
                f"--data {folder}: missing {p.name} (chat rows, as the data stage writes)"
            )
    return DataRef(
        stage="data",
        path=str(folder),
        train_path=str(train_p),
        validation_path=str(val_p),
        fingerprint=data_fingerprint(sha256_file(train_p), sha256_file(val_p)),
        train_rows=_count_rows(train_p),
        validation_rows=_count_rows(val_p),
        report_path=str(folder / "report.json"),
    )


def _count_rows(path: Path) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def length_fit(
    t: TrainConfig, max_seq_length: int, lengths: list[int], n_prepared: int
) -> dict[str, int]:
    """How many training rows TRL truncated to ``model.max_seq_length`` and how many it
    dropped (truncated until no answer token was left), logged as a warning: rows the
    data stage kept should all fit (``data.max_tokens <= model.max_seq_length``), but
    data cleaned by another tokenizer or with other limits may not."""
    limit = max_seq_length
    over = sum(n > limit for n in lengths)
    # Packing chunks rows instead of filtering them, so it never drops one.
    dropped = 0 if t.packing else len(lengths) - n_prepared
    if over:
        log.warning(
            "train: %d of %d training rows are longer than model.max_seq_length=%d tokens: "
            "%d truncated, %d dropped (no answer token left); clean the data with the base "
            "model's tokenizer and data.max_tokens <= model.max_seq_length",
            over,
            len(lengths),
            limit,
            over - dropped,
            dropped,
        )
    return {"train_rows_truncated": over - dropped, "train_rows_dropped": dropped}
