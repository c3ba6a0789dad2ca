"""The trainer callback: forwards the trainer's events to the stage's tracker (each
step once, across resumes), commits and rotates checkpoints, and generates a few
held-out answers at each evaluation."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from tasks.core.eval_metrics import exact_match
from tasks.core.interrupt import deferred
from tasks.core.models import generate_greedy, render_prompt
from tasks.core.refs import write_json_atomic
from tasks.core.tracking import Tracker
from tasks.train.checkpoints import CHECKPOINT_PREFIX, LOSS_SUM_FILE, LossSum, mark_complete, rotate
from tasks.train.perf import GpuPerf, TokenCounter

log = logging.getLogger(__name__)


class StepJournal:
    """Which (kind, step) metric points have been sent to the tracker, on disk, so each
    reaches it exactly once across kills and resumes.

    A resumed attempt replays the steps between its checkpoint and the kill. Before a
    point is sent, an intent line with its values and timestamp is appended (flushed,
    fsynced); after the tracker call returns, a confirmation. On resume a confirmed
    point is skipped. A point with an intent but no confirmation was being sent when the
    process died (a SIGKILL inside the tracker call, which takes milliseconds against
    a database): it is sent again *as recorded*, same values and same timestamp, and
    MLflow's store drops a point identical to one it holds, so it ends up there once
    whether or not the first send landed. Other signals are held until the
    confirmation is written (:func:`~tasks.core.interrupt.deferred`).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: set[tuple[str, int]] = set()
        self.pending: dict[tuple[str, int], tuple[dict[str, float], int]] = {}
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                    key = (rec["kind"], int(rec["step"]))
                    if rec.get("state") == "sending":
                        self.pending[key] = (dict(rec["metrics"]), int(rec["ts"]))
                    else:  # a confirmation (older journals hold only these)
                        self.done.add(key)
                except (ValueError, KeyError, TypeError):
                    continue  # a torn last line from a kill: that line never happened

    def seen(self, kind: str, step: int) -> bool:
        return (kind, step) in self.done

    def log_metrics_once(
        self, tracker: Tracker, kind: str, step: int, metrics: dict[str, float]
    ) -> None:
        """``tracker.log_metrics(metrics, step)`` unless ``(kind, step)`` was confirmed
        before; an unconfirmed earlier send is repeated as it was (class docstring)."""
        if self.seen(kind, step):
            return
        key = (kind, step)
        with deferred():
            if key in self.pending:
                metrics, ts = self.pending[key]
            else:
                ts = int(time.time() * 1000)
                self._append(
                    {"kind": kind, "step": step, "state": "sending", "ts": ts, "metrics": metrics}
                )
                self.pending[key] = (metrics, ts)
            tracker.log_metrics(metrics, step=step, timestamp_ms=ts)
            self.record(kind, step)

    def record(self, kind: str, step: int) -> None:
        self.done.add((kind, step))
        self.pending.pop((kind, step), None)
        self._append({"kind": kind, "step": step})

    def _append(self, rec: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())


#: The trainer's log keys kept under another name (the rest keep theirs).
_RENAME = {"loss": "train_loss"}


class TrackerHooks:
    """Forwards the trainer's events to the stage's :class:`Tracker`; commits and
    rotates checkpoints; generates a few held-out answers at each evaluation."""

    def __init__(
        self,
        tracker: Tracker,
        journal: StepJournal,
        ckpt_dir: Path,
        keep: int,
        samples: list[dict[str, Any]],
        tokenizer: Any,
        max_new_tokens: int,
        tokens: TokenCounter,
        loss_sum: LossSum,
        perf: GpuPerf | None = None,
    ) -> None:
        self.perf = perf
        self.tokens = tokens  # the trainer's: only its training_step adds to it
        self.loss_sum = loss_sum  # the trainer's too
        self.tracker = tracker
        self.journal = journal
        self.ckpt_dir = ckpt_dir
        self.keep = keep
        self.samples = samples
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self._step_t0 = 0.0
        self._busy_s = 0.0
        self._tokens_at_log = 0
        self.resumed_from_step = 0
        self.tokens_at_begin = 0  # restored from a checkpoint on resume
        self.busy_total_s = 0.0  # this attempt's time inside optimizer steps

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._tokens_at_log = self.tokens_at_begin = state.num_input_tokens_seen
        self.resumed_from_step = state.global_step

    # Only the time inside optimizer steps counts for tokens/s: evaluation,
    # sample generation and checkpoint writes would otherwise dilute it.
    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.perf is not None:
            self.perf.step_begin()
        else:
            self._step_t0 = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.perf is None:
            self._add_busy(time.perf_counter() - self._step_t0)
            state.num_input_tokens_seen += self.tokens.take()
            return
        # CUDA runs ahead of Python: the step's time comes from its events, and both
        # it and the token count (a device sum) are read only when this step ends in
        # a log, a save, an evaluation or the stop, where the trainer syncs anyway
        # (DefaultFlowCallback, which sets those flags, runs before this callback).
        self.perf.step_end()
        if (
            control.should_log
            or control.should_save
            or control.should_evaluate
            or control.should_training_stop
            or state.global_step >= state.max_steps
        ):
            self.flush(state)

    def flush(self, state: Any) -> None:
        """Fold the steps since the last flush into the busy time and the trainer state
        (so a checkpoint carries the token count and a resume continues it)."""
        if self.perf is not None:
            self._add_busy(self.perf.take_busy_s())
        state.num_input_tokens_seen += self.tokens.take()

    def _add_busy(self, busy: float) -> None:
        self._busy_s += busy
        self.busy_total_s += busy

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.flush(state)  # an early stop between flags; a no-op when nothing is pending

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        logs = logs or {}
        step = state.global_step
        # The trainer's one-off summary (the line with train_loss) is left out:
        # `train` logs the final metrics itself, once.
        if "train_loss" in logs:
            return
        if "loss" in logs:
            self.loss_sum.total()  # the trainer has just synced for this loss
        if any(k.startswith("eval_") for k in logs):
            kind = "eval"
            metrics = {
                _RENAME.get(k, k): float(v)
                for k, v in logs.items()
                if _is_number(v) and k.startswith("eval_")
            }
        else:
            kind = "train"
            metrics = {_RENAME.get(k, k): float(v) for k, v in logs.items() if _is_number(v)}
            tokens = state.num_input_tokens_seen
            metrics["num_input_tokens_seen"] = float(tokens)
            if self._busy_s > 0:
                metrics["tokens_per_s"] = (tokens - self._tokens_at_log) / self._busy_s
            self._tokens_at_log, self._busy_s = tokens, 0.0
            if self.perf is not None:
                metrics.update(self.perf.window(metrics.get("tokens_per_s")))
        if metrics:
            self.journal.log_metrics_once(self.tracker, kind, step, metrics)

    def on_evaluate(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        model = kw.get("model")
        if not self.samples or model is None:
            return
        step = state.global_step
        try:
            out = generate_samples(model, self.tokenizer, self.samples, self.max_new_tokens)
        except Exception:  # diagnostics only: never lose a training run to them
            log.warning("step %d: sample generation failed", step, exc_info=True)
            return
        match = sum(exact_match(o["generated"], o["expected"]) for o in out) / len(out)
        self.tracker.log_dict({"step": step, "samples": out}, f"samples/step-{step:06d}.json")
        self.journal.log_metrics_once(
            self.tracker, "samples", step, {"eval_samples_exact_match": match}
        )
        for o in out:
            log.info(
                "step %d sample: %r -> %r (want %r)",
                step,
                o["prompt"][-60:],
                o["generated"],
                o["expected"],
            )

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        ckpt = self.ckpt_dir / f"{CHECKPOINT_PREFIX}{state.global_step}"
        if ckpt.is_dir():
            # inside the checkpoint, before its marker: committed with it or not at all
            write_json_atomic(
                ckpt / LOSS_SUM_FILE,
                {"step": state.global_step, "train_loss_sum": self.loss_sum.total()},
            )
            mark_complete(ckpt)
        best = Path(state.best_model_checkpoint) if state.best_model_checkpoint else None
        for p in rotate(self.ckpt_dir, self.keep, best):
            log.debug("removed old checkpoint %s", p.name)


def train_callback_cls() -> type:
    """:class:`TrackerHooks` as a ``TrainerCallback``, built on first use so importing
    this module does not import transformers."""
    from transformers import TrainerCallback

    return type("TrackerCallback", (TrackerHooks, TrainerCallback), {})


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))


def generate_samples(
    model: Any, tokenizer: Any, rows: list[dict[str, Any]], max_new_tokens: int
) -> list[dict[str, str]]:
    """Greedy answers to held-out prompts (the chat rows minus their last answer), with
    the same rendering and generation as export's checks."""
    was_training = model.training
    model.eval()
    try:
        prompts = [render_prompt(tokenizer, row["messages"]) for row in rows]
        new_ids = generate_greedy(model, tokenizer, prompts, max_new_tokens)
    finally:
        model.train(was_training)
    return [
        {
            "prompt": row["messages"][-2]["content"],
            "expected": row["messages"][-1]["content"].strip(),
            "generated": tokenizer.decode(ids, skip_special_tokens=True).strip(),
        }
        for row, ids in zip(rows, new_ids, strict=True)
    ]
