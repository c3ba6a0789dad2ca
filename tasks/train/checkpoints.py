"""Checkpoints of the train stage: commit (completion marker), find the last complete
one, rotate, the loss summed over the steps a checkpoint covers, and removing them all
once the run has passed export.

A checkpoint counts only once it carries the completion marker written after every file
in it has been flushed, so a folder half-written when the process died is ignored (and
removed) in favour of the previous one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from tasks.core.refs import write_json_atomic

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
COMPLETE_MARKER = ".slothflow-complete"
_CKPT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


def checkpoint_step(path: Path) -> int | None:
    m = _CKPT_RE.match(path.name)
    return int(m.group(1)) if m else None


def is_complete(ckpt: Path) -> bool:
    return (ckpt / COMPLETE_MARKER).is_file()


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def mark_complete(ckpt: Path) -> None:
    """Commit a checkpoint: flush its files, then write the marker atomically.

    The trainer writes checkpoint files in place; the marker (written last, by
    rename) is what makes the folder count, so a crash mid-write leaves a folder
    without it, which :func:`last_complete_checkpoint` ignores.
    """
    _fsync_tree(ckpt)
    write_json_atomic(ckpt / COMPLETE_MARKER, {"step": checkpoint_step(ckpt), "time": time.time()})


def _checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    if not ckpt_dir.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in ckpt_dir.iterdir() if p.is_dir()]
    return sorted((s, p) for s, p in found if s is not None)


def last_complete_checkpoint(ckpt_dir: Path, remove_incomplete: bool = True) -> Path | None:
    """The newest complete checkpoint; incomplete ones are removed (the trainer would
    otherwise write into them again, or rotate a complete one away in their favour)."""
    last = None
    for _, p in _checkpoints(ckpt_dir):
        if is_complete(p):
            last = p
        elif remove_incomplete:
            log.warning("ignoring half-written checkpoint %s (no completion marker)", p.name)
            shutil.rmtree(p, ignore_errors=True)
    return last


def rotate(ckpt_dir: Path, keep: int, best: Path | None) -> list[Path]:
    """Keep the last ``keep`` complete checkpoints plus the best one; return the removed.

    The marker goes first, so a crash mid-removal leaves an incomplete folder (ignored
    on resume), never a complete-looking one with files missing.
    """
    complete = [p for _, p in _checkpoints(ckpt_dir) if is_complete(p)]
    protected = set(complete[-keep:])
    if best is not None:
        protected.add(best)
    removed = []
    for p in complete:
        if p not in protected:
            (p / COMPLETE_MARKER).unlink(missing_ok=True)
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


#: In each committed checkpoint: the training loss summed over its steps (:class:`LossSum`).
LOSS_SUM_FILE = "slothflow-loss-sum.json"


class LossSum:
    """The training loss summed over every optimizer step of the run, resumes included.

    transformers' ``train_loss`` is what ``training_step`` returned, summed over the
    micro-batches *this process* trained and divided by ``global_step``: after a resume
    the sum lacks the steps before the checkpoint while the divisor counts them. This
    sums the same values (each micro-batch's loss already scaled for gradient
    accumulation, so a step's micro-batches add up to that step's loss), on top of what
    the checkpoint carried. Like the trainer, it sums on the device and folds into a
    host float only where the trainer syncs anyway (logging, checkpoints), so an
    uninterrupted run and a resumed one add the same numbers in the same groups.
    """

    def __init__(self, carried: float = 0.0) -> None:
        self.carried = carried  # steps up to the resumed checkpoint, then folded ones
        self._pending: Any = None

    def add(self, loss: Any) -> None:
        loss = loss.detach().float()
        self._pending = loss if self._pending is None else self._pending + loss

    def total(self) -> float:
        if self._pending is not None:
            self.carried += float(self._pending)
            self._pending = None
        return self.carried


def carried_loss_sum(ckpt: Path | None) -> float:
    """The loss summed over the steps up to checkpoint ``ckpt`` (0.0 for a fresh start)."""
    if ckpt is None:
        return 0.0
    saved = ckpt / LOSS_SUM_FILE
    if saved.exists():
        return float(json.loads(saved.read_text(encoding="utf-8"))["train_loss_sum"])
    # Written before checkpoints carried the sum: rebuild it from the logged losses,
    # each the mean over its logging window.
    state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
    total, last = 0.0, 0
    for entry in state.get("log_history", []):
        if "loss" in entry and entry.get("step", 0) > last:
            total += float(entry["loss"]) * (entry["step"] - last)
            last = entry["step"]
    if last < state.get("global_step", 0):
        log.warning(
            "train: %s stores no loss sum and logged up to step %d only: train_loss "
            "misses steps %d-%d",
            ckpt.name,
            last,
            last + 1,
            state["global_step"],
        )
    return total


def prepare_checkpoints(ckpt_dir: Path, key: str) -> Path | None:
    """The checkpoint to resume from, or None; checkpoints of other inputs are discarded."""
    stamp = ckpt_dir / "inputs.json"
    if ckpt_dir.exists():
        old = json.loads(stamp.read_text()).get("inputs_hash") if stamp.exists() else None
        if old != key:
            log.warning("train: checkpoints in %s are for other inputs; starting over", ckpt_dir)
            shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(stamp, {"inputs_hash": key})
    return last_complete_checkpoint(ckpt_dir)


def replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)


def remove_checkpoints(train_dir: Path) -> int:
    """Delete ``train_dir/checkpoints`` once the run has passed export; returns the bytes
    freed. Checkpoints only serve to resume an unfinished training: the finished stage's
    reference names the best adapter (``adapter/``, which export copied) and the
    tokenizer, never a checkpoint, so its cached result stays valid, and a training that
    must run again (``--refresh train``) starts over."""
    ckpt_dir = train_dir / "checkpoints"
    # Renamed aside first: a removal cut short must not leave a checkpoint that still
    # carries its completion marker with files missing (a resume would load it).
    aside = sorted(train_dir.glob(".checkpoints.removing-*"))
    if ckpt_dir.is_dir():
        target = train_dir / f".checkpoints.removing-{os.getpid()}-{time.time_ns()}"
        os.rename(ckpt_dir, target)
        aside.append(target)
    freed = 0
    for folder in aside:
        freed += sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        shutil.rmtree(folder)
    if freed:
        log.info("train: removed the checkpoints in %s (%.1f MB)", train_dir, freed / 1e6)
    return freed
