"""Stage ``train``: supervised fine-tuning of a LoRA adapter with TRL's ``SFTTrainer``.

``train`` is the plain function (no Prefect, no MLflow: it records through a
:class:`~tasks.core.tracking.Tracker`); ``train_task`` is its Prefect task. The backend
comes from the hardware decision made once per run (``hw.backend``): ``peft``
(transformers + PEFT, any device) or ``unsloth`` (CUDA: Unsloth's 4-bit loader and
fused LoRA kernels under the same TRL trainer). Once the base model's architecture is
known, an Unsloth decision for a model Unsloth has no kernels for falls back to PEFT
under ``train.backend=auto`` (:func:`tasks.core.hardware.for_model`).

On CUDA the stage also sizes gradient checkpointing against free GPU memory on the
Unsloth backend (:func:`choose_gradient_checkpointing`; PEFT turns it on), logs peak GPU memory and an MFU estimate at
every logging step, and turns a CUDA out-of-memory error into one retry with half the
micro-batch (same effective batch) or a message naming the knobs.

Checkpoints and exact resume: the trainer writes ``checkpoints/checkpoint-N`` every
``train.save_steps``; a checkpoint counts only once it carries the completion marker
written after every file in it has been flushed, so a folder half-written when the
process died is ignored (and removed) in favour of the previous one. Re-running the
stage on the same output folder resumes from the last complete checkpoint:
adapter weights, optimizer, scheduler, RNG states and data position (the trainer
skips the batches it has already seen). Metrics a killed attempt had already sent
to the tracker are not sent again (see :class:`_StepJournal`). Checkpoints also carry
the loss summed over their steps, so the final ``train_loss`` of a resumed run is the
mean over all of its steps, like an uninterrupted run's (see :class:`LossSum`).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.core.config import ConfigError, PipelineConfig, config_hash, dump_config
from tasks.core.eval_metrics import exact_match
from tasks.core.hardware import (
    BackendNotReadyError,
    HardwareDecision,
    for_model,
    import_unsloth,
)
from tasks.core.interrupt import deferred
from tasks.core.models import (
    LOAD_KWARGS,
    hub_load_revision,
    load_base_tokenizer,
    template_sha256,
    template_text,
)
from tasks.core.orchestration import retry_transient, stage_task
from tasks.core.refs import (
    BaseModelRef,
    DataRef,
    RunContext,
    TrainRef,
    data_fingerprint,
    load_done,
    mark_done,
    sha256_file,
    sha256_json,
    write_json_atomic,
)
from tasks.core.tokens import chat_token_lengths
from tasks.core.tracking import NullTracker, Tracker

log = logging.getLogger(__name__)

STAGE = "train"
CHECKPOINT_PREFIX = "checkpoint-"
COMPLETE_MARKER = ".slothflow-complete"
_CKPT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


class TrainOutOfMemoryError(ConfigError):
    """CUDA ran out of memory; the message names the settings that shrink the need.

    A :class:`ConfigError`, so the Prefect task does not retry it as transient: the
    same settings run out of memory the same way again.
    """


# --------------------------------------------------------------------------- checkpoints


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


# --------------------------------------------------------------------------- GPU performance

#: Dense bf16/fp16 tensor-core peak by GPU family (vendor datasheets, no sparsity), for
#: the MFU estimate. The H200 is an H100 with more memory: the same 989 TFLOP/s.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
}


def peak_flops(gpu_name: str | None) -> float | None:
    """Datasheet dense half-precision peak of ``gpu_name`` or None when unknown."""
    for family, flops in PEAK_FLOPS.items():
        if gpu_name and family in re.split(r"[^A-Z0-9]+", gpu_name.upper()):
            return flops
    return None


def _shape(config: Any) -> tuple[int, int, int, int, int, int]:
    """(hidden, layers, intermediate, query width, key/value width, vocab) of a decoder."""
    h = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or h // heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    return (
        h,
        int(config.num_hidden_layers),
        int(config.intermediate_size),
        heads * head_dim,
        kv_heads * head_dim,
        int(config.vocab_size),
    )


def flops_per_token(config: Any, seq_len: int, n_trainable: int) -> float:
    """Model FLOPs per trained token of a LoRA fine-tune, without recompute.

    4 x the frozen matmul weights (forward + activation gradient), 6 x the trainable
    ones (plus their weight gradient), and causal attention's QK^T and AV (forward +
    backward). The same count as ``baseline_bench.py``, so MFUs compare across tools.
    """
    h, layers, inter, q, kv, vocab = _shape(config)
    matmul = layers * (h * q + 2 * h * kv + q * h + 3 * h * inter) + vocab * h
    return 4.0 * matmul + 6.0 * n_trainable + 6.0 * layers * seq_len * q


class GpuPerf:
    """Per logging window on CUDA: peak memory since the last log, and MFU."""

    def __init__(self, flops_per_token: float, peak: float | None) -> None:
        import torch

        self._torch = torch
        self.flops_per_token = flops_per_token
        self.peak = peak
        self._run_peak = 0
        torch.cuda.reset_peak_memory_stats()

    @property
    def run_peak_gb(self) -> float:
        """Peak allocated GPU memory over the whole run (all windows and now)."""
        return max(self._run_peak, self._torch.cuda.max_memory_allocated()) / 2**30

    def synchronize(self) -> None:
        self._torch.cuda.synchronize()

    def window(self, tokens_per_s: float | None) -> dict[str, float]:
        cuda = self._torch.cuda
        self._run_peak = max(self._run_peak, cuda.max_memory_allocated())
        out = {
            "gpu_peak_mem_gb": cuda.max_memory_allocated() / 2**30,
            "gpu_peak_reserved_gb": cuda.max_memory_reserved() / 2**30,
        }
        cuda.reset_peak_memory_stats()
        if tokens_per_s and self.peak:
            out["mfu"] = tokens_per_s * self.flops_per_token / self.peak
        return out


#: Seconds between MLflow system-metric samples while training on CUDA.
SYSTEM_METRICS_INTERVAL_S = 10.0


@contextlib.contextmanager
def _system_metrics(tracker: Tracker, hw: HardwareDecision, enabled: bool = True) -> Iterator[None]:
    """MLflow system metrics (GPU utilisation and memory, CPU, disk) while training on
    CUDA, when ``enabled`` (``tracking.system_metrics``) and the tracker writes to MLflow.
    Never fails the stage."""
    if not (enabled and hw.device == "cuda"):
        yield
        return
    with tracker.system_metrics(SYSTEM_METRICS_INTERVAL_S):
        yield


# --------------------------------------------------------------------------- checkpointing


@dataclass(frozen=True)
class CheckpointingChoice:
    """Gradient checkpointing for this run: ``False``, ``True`` (recompute) or
    ``"unsloth"`` (recompute, activations offloaded to host RAM), and why."""

    mode: bool | str
    reason: str

    @property
    def label(self) -> str:
        if isinstance(self.mode, bool):
            return "on" if self.mode else "off"
        return self.mode


#: Activations are estimated, not measured: spend at most this share of free memory
#: on them, and count them with this margin (allocator fragmentation, optimizer state).
_FREE_SHARE = 0.9
_MARGIN = 1.3


def activation_bytes(config: Any, micro_batch: int, seq_len: int, dtype_bytes: int = 2) -> int:
    """Activations Unsloth's Llama kernels keep for backward without checkpointing, for
    one micro-batch.

    Per token and layer: both norms' inputs and outputs, q/k/v, q/k after RoPE, the
    attention output, and the MLP's gate and up outputs (Unsloth's fused SwiGLU
    recomputes their product); plus fp32 logits and their gradient, which its chunked
    loss never holds at once (slack). Measured on an H200, Llama-3-8B shape, micro-batch
    4 x 2048: 35.7 GiB peak with ~5.5 GiB of 4-bit weights, against 27.5 GiB + 7.8 GiB
    of logits estimated here (``bench/results/train_gpu-*.json``).
    """
    h, layers, inter, q, kv, vocab = _shape(config)
    tokens = micro_batch * seq_len
    per_token_layer = (4 * h + 2 * q + 3 * kv + 2 * inter) * dtype_bytes
    return tokens * layers * per_token_layer + tokens * vocab * 4 * 2


def choose_gradient_checkpointing(
    cfg: PipelineConfig, hw: HardwareDecision, config: Any, free_bytes: int | None
) -> CheckpointingChoice:
    """``train.gradient_checkpointing`` resolved for this run, with the reason.

    ``auto`` on the Unsloth backend turns checkpointing off when the estimated
    activations (with margin) fit in the free GPU memory after the model loaded: the
    recompute (a third of the work) is then pure cost. Otherwise Unsloth's offloading
    checkpointing. ``auto`` elsewhere: off on CPU (memory is not the constraint there,
    the recompute is pure cost), on with PEFT on CUDA (the safe choice).
    """
    mode = cfg.train.gradient_checkpointing
    if mode != "auto":
        choice: bool | str = {"on": True, "off": False}.get(mode, mode)
        return CheckpointingChoice(choice, f"train.gradient_checkpointing={mode} as configured")
    if hw.backend != "unsloth" or free_bytes is None:
        on = hw.device == "cuda"
        why = "CUDA with PEFT: on (safe default)" if on else "CPU: recompute would be pure cost"
        return CheckpointingChoice(on, f"auto: {why}")
    t = cfg.train
    need = activation_bytes(config, t.micro_batch_size, cfg.model.max_seq_length) * _MARGIN
    budget = free_bytes * _FREE_SHARE
    sizes = (
        f"activations ~{need / 2**30:.1f} GiB (estimate x{_MARGIN} for micro-batch "
        f"{t.micro_batch_size} x {cfg.model.max_seq_length} tokens) vs "
        f"{budget / 2**30:.1f} GiB usable of {free_bytes / 2**30:.1f} GiB free"
    )
    if need <= budget:
        return CheckpointingChoice(False, f"auto: {sizes}: off, no recompute")
    return CheckpointingChoice("unsloth", f"auto: {sizes}: unsloth (offloaded) checkpointing")


# --------------------------------------------------------------------------- tracking


class _StepJournal:
    """Which (kind, step) pairs have already been sent to the tracker, on disk.

    A resumed attempt replays the steps between its checkpoint and the kill; their
    values are the same (exact resume), so they are skipped instead of logged twice.
    A line is appended (and flushed) right after the tracker call returns, and a signal
    in between is held until the line is written (:meth:`log_once`), so only a SIGKILL
    inside those few microseconds could log one step twice.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: set[tuple[str, int]] = set()
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                    self.done.add((rec["kind"], int(rec["step"])))
                except (ValueError, KeyError):
                    continue  # a torn last line from a kill: that step was not confirmed

    def seen(self, kind: str, step: int) -> bool:
        return (kind, step) in self.done

    def log_once(self, kind: str, step: int, send: Callable[[], None]) -> None:
        """``send()`` (a tracker call) unless ``(kind, step)`` was sent before, then record
        it; a signal in between is held until both are done (see interrupt.deferred)."""
        if self.seen(kind, step):
            return
        with deferred():
            send()
            self.record(kind, step)

    def record(self, kind: str, step: int) -> None:
        self.done.add((kind, step))
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"kind": kind, "step": step}) + "\n")
            f.flush()
            os.fsync(f.fileno())


class TokenCounter:
    """Trained tokens (non-padding), summed where the batch lives and read once per
    optimizer step.

    transformers' own counter (``include_num_input_tokens_seen``) calls ``.item()`` on
    every micro-batch: on CUDA a host sync that stalls the CPU until the GPU drains,
    so the next batch is collated and launched only then. Here the sum stays a device
    tensor until :meth:`take`, which the callback calls at the end of each optimizer
    step, where it synchronises anyway.
    """

    def __init__(self) -> None:
        self._pending: Any = None

    def add(self, inputs: Any) -> None:
        mask = inputs.get("attention_mask")
        # padding-free batches carry no mask and no padding: every id counts
        n = mask.sum() if mask is not None else inputs["input_ids"].numel()
        self._pending = n if self._pending is None else self._pending + n

    def take(self) -> int:
        n, self._pending = self._pending, None
        return 0 if n is None else int(n)


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


#: The trainer's log keys kept under another name (the rest keep theirs).
_RENAME = {"loss": "train_loss"}


def _train_callback_cls() -> type:
    """The ``TrainerCallback`` subclass, built on first use so importing this module
    does not import transformers."""
    from transformers import TrainerCallback

    class TrackerCallback(TrainerCallback):  # type: ignore[misc,unused-ignore]
        """Forwards the trainer's events to the stage's :class:`Tracker`; commits and
        rotates checkpoints; generates a few held-out answers at each evaluation."""

        def __init__(
            self,
            tracker: Tracker,
            journal: _StepJournal,
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
            self._step_t0 = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.perf is not None:
                # CUDA runs ahead of Python: wait for the step's kernels, or its time
                # would land in whichever later step happens to synchronise.
                self.perf.synchronize()
            busy = time.perf_counter() - self._step_t0
            self._busy_s += busy
            self.busy_total_s += busy
            # into the trainer state, so checkpoints carry it and a resume continues it
            state.num_input_tokens_seen += self.tokens.take()

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
                self.journal.log_once(
                    kind, step, lambda: self.tracker.log_metrics(metrics, step=step)
                )

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
            self.journal.log_once(
                "samples",
                step,
                lambda: self.tracker.log_metrics({"eval_samples_exact_match": match}, step=step),
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

    return TrackerCallback


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))


def generate_samples(
    model: Any, tokenizer: Any, rows: list[dict[str, Any]], max_new_tokens: int
) -> list[dict[str, str]]:
    """Greedy answers to held-out prompts (the chat rows minus their last answer)."""
    import torch

    was_training = model.training
    model.eval()
    out = []
    try:
        for row in rows:
            prompt_msgs, answer = row["messages"][:-1], row["messages"][-1]["content"]
            ids = tokenizer.apply_chat_template(
                prompt_msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            ids = {k: v.to(model.device) for k, v in ids.items()}
            with torch.no_grad():
                gen = model.generate(
                    **ids,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
            text = tokenizer.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
            out.append(
                {
                    "prompt": prompt_msgs[-1]["content"],
                    "expected": answer.strip(),
                    "generated": text.strip(),
                }
            )
    finally:
        model.train(was_training)
    return out


# --------------------------------------------------------------------------- data


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
    cfg: PipelineConfig, tokenizer: Any, train_rows: list[dict[str, Any]], n_prepared: int
) -> dict[str, int]:
    """How many training rows TRL truncated to ``model.max_seq_length`` and how many it
    dropped (truncated until no answer token was left), logged as a warning: rows the
    data stage kept should all fit (``data.max_tokens <= model.max_seq_length``), but
    data cleaned by another tokenizer or with other limits may not."""
    limit = cfg.model.max_seq_length
    lengths = chat_token_lengths(tokenizer, [r["messages"] for r in train_rows])
    over = sum(n > limit for n in lengths)
    # Packing chunks rows instead of filtering them, so it never drops one.
    dropped = 0 if cfg.train.packing else len(train_rows) - n_prepared
    if over:
        log.warning(
            "train: %d of %d training rows are longer than model.max_seq_length=%d tokens: "
            "%d truncated, %d dropped (no answer token left); clean the data with the base "
            "model's tokenizer and data.max_tokens <= model.max_seq_length",
            over,
            len(train_rows),
            limit,
            over - dropped,
            dropped,
        )
    return {"train_rows_truncated": over - dropped, "train_rows_dropped": dropped}


# --------------------------------------------------------------------------- backends


def load_peft(cfg: PipelineConfig, base: BaseModelRef, hw: HardwareDecision) -> tuple[Any, Any]:
    """transformers + PEFT: the base from safetensors, a fresh LoRA adapter on top."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, set_seed

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    kwargs: dict[str, Any] = {"dtype": dtype[hw.dtype], "use_safetensors": True, **LOAD_KWARGS}
    if hw.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype[hw.dtype],
        )
    rev = hub_load_revision(base)
    model = AutoModelForCausalLM.from_pretrained(base.name_or_path, revision=rev, **kwargs)
    tokenizer = load_base_tokenizer(base)
    lora = cfg.train.lora
    # The adapter's random init draws from torch's RNG: seed it here, since TRL would
    # otherwise wrap the model before the trainer seeds anything.
    set_seed(cfg.train.seed)
    model = get_peft_model(
        model,
        LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            use_rslora=lora.use_rslora,
            bias="none",
            task_type="CAUSAL_LM",
        ),
    )
    return model, tokenizer


def load_unsloth(cfg: PipelineConfig, base: BaseModelRef, hw: HardwareDecision) -> tuple[Any, Any]:
    """Unsloth (CUDA): the base through ``FastLanguageModel`` (4-bit when the hardware
    decision says so, its dtype, ``max_seq_length``), then its LoRA adapter with the
    configured rank, alpha, dropout, targets and rsLoRA, and gradient checkpointing as
    :func:`choose_gradient_checkpointing` sizes it against the memory left after loading.
    """
    if hw.device != "cuda":
        raise BackendNotReadyError(
            f"the Unsloth backend needs CUDA ({hw.reason}); set train.backend=peft"
        )
    import_unsloth()
    import torch
    from transformers import set_seed
    from unsloth import FastLanguageModel

    t, lora = cfg.train, cfg.train.lora
    rev = hub_load_revision(base)
    model, _ = FastLanguageModel.from_pretrained(
        model_name=base.name_or_path,
        revision=rev,
        max_seq_length=cfg.model.max_seq_length,
        dtype=getattr(torch, hw.dtype),
        load_in_4bit=hw.load_in_4bit,
        random_state=t.seed,
        **LOAD_KWARGS,
    )
    # The stage's own tokenizer (the one the base stage recorded, template included),
    # not the one Unsloth loads beside the weights.
    tokenizer = load_base_tokenizer(base)

    free, _total = torch.cuda.mem_get_info()
    choice = choose_gradient_checkpointing(cfg, hw, model.config, free)
    log.info("train: gradient checkpointing %s (%s)", choice.label, choice.reason)
    if lora.dropout > 0:
        log.warning(
            "train.lora.dropout=%s: Unsloth's fused LoRA kernels need dropout 0 and fall back "
            "to slower ones otherwise",
            lora.dropout,
        )
    set_seed(t.seed)
    model = FastLanguageModel.get_peft_model(
        model,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        use_gradient_checkpointing=choice.mode,
        random_state=t.seed,
        use_rslora=lora.use_rslora,
        max_seq_length=cfg.model.max_seq_length,
    )
    FastLanguageModel.for_training(model)
    model.slothflow_checkpointing = choice
    return model, tokenizer


BACKENDS: dict[str, Callable[[PipelineConfig, BaseModelRef, HardwareDecision], tuple[Any, Any]]] = {
    "peft": load_peft,
    "unsloth": load_unsloth,
}


def select_backend(
    hw: HardwareDecision,
) -> Callable[[PipelineConfig, BaseModelRef, HardwareDecision], tuple[Any, Any]]:
    try:
        return BACKENDS[hw.backend]
    except KeyError:
        raise ConfigError(f"unknown training backend {hw.backend!r}") from None


def check_settings(cfg: PipelineConfig, hw: HardwareDecision) -> None:
    """Configuration the trainer would reject late (or silently bend): fail first."""
    t = cfg.train
    if t.save_steps % t.eval_steps:
        raise ConfigError(
            f"train.save_steps={t.save_steps} must be a multiple of train.eval_steps="
            f"{t.eval_steps}: the best checkpoint is chosen among evaluated ones"
        )
    if t.gradient_checkpointing == "unsloth" and hw.backend != "unsloth":
        raise ConfigError(
            "train.gradient_checkpointing='unsloth' needs the Unsloth backend "
            f"(this run uses {hw.backend}); use 'on', 'off' or 'auto'"
        )
    if t.packing and t.padding_free == "off":
        raise ConfigError(
            "train.packing=true concatenates rows without padding: it cannot run with "
            "train.padding_free=off; set train.padding_free=auto or train.packing=false"
        )
    if t.token_metrics and hw.device != "cuda":
        raise ConfigError(
            "train.token_metrics=true needs CUDA: TRL computes them with a Triton kernel "
            f"(this run trains on {hw.device}); set train.token_metrics=false"
        )


def sft_config(
    cfg: PipelineConfig, hw: HardwareDecision, ckpt_dir: Path, has_eval: bool = True
) -> Any:
    """The ``SFTConfig`` for this run: every knob comes from the config or the hardware."""
    from trl import SFTConfig

    t = cfg.train
    return SFTConfig(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        num_train_epochs=t.num_epochs,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float < 1 is a share of the steps
        max_grad_norm=t.max_grad_norm,
        weight_decay=t.weight_decay,
        optim=t.optimizer,
        seed=t.seed,
        data_seed=t.seed,
        # Precision from the hardware decision, always explicit: left unset, bf16
        # autocast on this CPU (no native bf16) ran 20x slower (ENVIRONMENT.md).
        bf16=hw.dtype == "bfloat16",
        fp16=hw.dtype == "float16",
        use_cpu=hw.device == "cpu",
        # Unsloth arms its checkpointing in get_peft_model (load_unsloth): the trainer's
        # own flag is for the PEFT backend only.
        gradient_checkpointing=hw.backend != "unsloth"
        and bool(choose_gradient_checkpointing(cfg, hw, None, None).mode),
        max_length=cfg.model.max_seq_length,
        packing=t.packing,
        # 'auto' leaves it unset: Unsloth then chooses (its SFTConfig default is None),
        # TRL alone pads. Explicit padding-free without packing is Unsloth's own mode (TRL
        # refuses it: it would not enforce max_length), hence no 'on'.
        **({"padding_free": False} if t.padding_free == "off" else {}),
        assistant_only_loss=t.assistant_only_loss,
        logging_steps=t.logging_steps,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=None,  # rotation is ours: last K complete + best (see rotate)
        load_best_model_at_end=has_eval,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        prediction_loss_only=True,
        # Counted by TokenCounter instead: both of these would sync with the GPU on
        # every micro-batch. A NaN/inf loss is then logged as it is, not averaged away.
        include_num_input_tokens_seen="no",
        logging_nan_inf_filter=False,
        report_to="none",
        dataloader_num_workers=0,
        disable_tqdm=False,
    )


def _trainer_cls() -> type:
    from transformers import Trainer
    from trl import SFTTrainer

    class SlothSFTTrainer(SFTTrainer):  # type: ignore[misc,unused-ignore]
        """``SFTTrainer`` with the model's own loss and a sync-free token count.

        TRL 1.15 always computes the loss through its fused LM head
        (``trl.kernels.ChunkedLogProbFunction``), to get per-token entropy and top-1
        accuracy besides the log-probabilities. On CPU that head cannot run at all (a
        Triton kernel; no setting turns it off). On CUDA it costs an extra pass over
        the vocabulary and three ``.item()`` host syncs per micro-batch, while Unsloth's
        model already returns its fused chunked cross-entropy, the loss raw Unsloth
        trains with. TRL's own deprecation note says to subclass and override
        ``compute_loss``: we hand the loss back to ``transformers.Trainer.compute_loss``,
        the model's cross-entropy over the same labels (identical values; -100 positions
        ignored; normalised by ``num_items_in_batch`` under gradient accumulation).
        ``train.token_metrics=true`` keeps TRL's head and its metrics (CUDA only).
        """

        def __init__(
            self,
            *args: Any,
            token_metrics: bool,
            tokens: TokenCounter,
            loss_sum: LossSum,
            **kwargs: Any,
        ) -> None:
            super().__init__(*args, **kwargs)
            self.slothflow_token_metrics = token_metrics
            self.slothflow_tokens = tokens
            self.slothflow_loss_sum = loss_sum

        def compute_loss(
            self,
            model: Any,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            if self.slothflow_token_metrics:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            inputs = {**inputs, "use_cache": False}
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

        def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
            self.slothflow_tokens.add(inputs)
            loss = super().training_step(model, inputs, num_items_in_batch)
            self.slothflow_loss_sum.add(loss)
            return loss

    return SlothSFTTrainer


def build_trainer(
    cfg: PipelineConfig,
    hw: HardwareDecision,
    model: Any,
    tokenizer: Any,
    train_rows: list[dict[str, Any]],
    val_rows: list[dict[str, Any]],
    ckpt_dir: Path,
    callbacks: list[Any] | None = None,
    tokens: TokenCounter | None = None,
    loss_sum: LossSum | None = None,
) -> Any:
    """The configured TRL trainer (datasets tokenized, labels masked), not yet trained."""
    from datasets import Dataset
    from transformers import EarlyStoppingCallback

    cbs = list(callbacks or [])
    if cfg.train.early_stopping_patience:
        cbs.append(EarlyStoppingCallback(cfg.train.early_stopping_patience))
    return _trainer_cls()(
        token_metrics=cfg.train.token_metrics,
        tokens=tokens or TokenCounter(),
        loss_sum=loss_sum or LossSum(),
        model=model,
        args=sft_config(cfg, hw, ckpt_dir),
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(val_rows),
        processing_class=tokenizer,
        callbacks=cbs,
    )


# --------------------------------------------------------------------------- the stage


def inputs_hash(
    cfg: PipelineConfig, base: BaseModelRef, data: DataRef, hw: HardwareDecision
) -> str:
    """What determines the adapter: model + train config, base, data, backend, dtype."""
    return sha256_json(
        {
            "model": cfg.model.model_dump(mode="json"),
            "train": cfg.train.model_dump(mode="json"),
            "base": base.model_dump(mode="json"),
            "data": data.fingerprint,
            "backend": hw.backend,
            "dtype": hw.dtype,
            "load_in_4bit": hw.load_in_4bit,
        }
    )


def _prepare_checkpoints(ckpt_dir: Path, key: str) -> Path | None:
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


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)


def train(
    cfg: PipelineConfig,
    base: BaseModelRef,
    data: DataRef,
    out_dir: Path,
    hw: HardwareDecision,
    tracker: Tracker = NullTracker(),
) -> TrainRef:
    """Fine-tune a LoRA adapter on ``data``; export the best checkpoint's adapter.

    Re-running on the same ``out_dir`` with the same inputs resumes from the last
    complete checkpoint. Returns the :class:`TrainRef` (best step, final metrics).
    """
    hw = resolve_backend(cfg, base, hw)
    check_settings(cfg, hw)
    out_dir.mkdir(parents=True, exist_ok=True)
    key = inputs_hash(cfg, base, data, hw)
    ckpt_dir = out_dir / "checkpoints"
    resume = _prepare_checkpoints(ckpt_dir, key)
    log.info(
        "train: backend %s on %s (%s); %s",
        hw.backend,
        hw.device,
        hw.reason,
        f"resuming from {resume.name}" if resume else "starting fresh",
    )

    train_rows = read_chat_rows(data.train_path)
    val_rows = read_chat_rows(data.validation_path)
    run_cfg, retried = cfg, False
    while True:
        try:
            with _system_metrics(tracker, hw, cfg.tracking.system_metrics):
                return _fit(
                    cfg, run_cfg, base, data, out_dir, hw, tracker, resume, train_rows, val_rows
                )
        except Exception as exc:
            if not is_cuda_oom(exc):
                raise
            message = oom_message(run_cfg, hw, exc)
        # Outside the handler the traceback is gone, and with it the frames that held
        # the model and the trainer: only now can their memory be given back.
        _release_cuda_memory()
        t = run_cfg.train
        if retried or not cfg.train.oom_retry or t.micro_batch_size < 2:
            raise TrainOutOfMemoryError(message)
        smaller = t.model_copy(
            update={"micro_batch_size": t.micro_batch_size // 2, "grad_accum": t.grad_accum * 2}
        )
        run_cfg, retried = run_cfg.model_copy(update={"train": smaller}), True
        resume = last_complete_checkpoint(ckpt_dir)
        note = (
            f"micro_batch_size {t.micro_batch_size} -> {smaller.micro_batch_size}, "
            f"grad_accum {t.grad_accum} -> {smaller.grad_accum} (same effective batch)"
        )
        log.warning("train: CUDA out of memory; retrying once with %s", note)
        tracker.set_tags({"slothflow.oom_retry": note})


def resolve_backend(
    cfg: PipelineConfig, base: BaseModelRef, hw: HardwareDecision
) -> HardwareDecision:
    """The run's decision, refined once the base model's architecture is known.

    Only an Unsloth decision can change (see :func:`tasks.core.hardware.for_model`); Unsloth
    is imported here, before this stage touches transformers, since it patches it.
    """
    if hw.backend != "unsloth":
        return hw
    import_unsloth()
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        base.name_or_path, revision=hub_load_revision(base), **LOAD_KWARGS
    )
    refined = for_model(cfg, hw, config.model_type)
    if refined is not hw:
        log.warning("train: backend changed: %s", refined.reason)
    return refined


def is_cuda_oom(exc: BaseException) -> bool:
    """A CUDA out-of-memory error, also as the RuntimeError compiled kernels raise."""
    if type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and "CUDA out of memory" in str(exc)


def oom_message(cfg: PipelineConfig, hw: HardwareDecision, exc: BaseException) -> str:
    """What ran out, and the settings that shrink the need."""
    t = cfg.train
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (
        f"CUDA out of memory on {hw.gpu_name} ({first[:200]}) with train.micro_batch_size="
        f"{t.micro_batch_size}, train.grad_accum={t.grad_accum}, model.max_seq_length="
        f"{cfg.model.max_seq_length}, train.lora.r={t.lora.r}, train.gradient_checkpointing="
        f"{t.gradient_checkpointing}. Lower train.micro_batch_size (raise train.grad_accum to "
        "keep the effective batch), model.max_seq_length or train.lora.r, or set "
        "train.gradient_checkpointing=unsloth (or on)"
        + ("" if hw.load_in_4bit else ", or model.load_in_4bit=true")
    )


def _release_cuda_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def _fit(
    cfg: PipelineConfig,
    run_cfg: PipelineConfig,
    base: BaseModelRef,
    data: DataRef,
    out_dir: Path,
    hw: HardwareDecision,
    tracker: Tracker,
    resume: Path | None,
    train_rows: list[dict[str, Any]],
    val_rows: list[dict[str, Any]],
) -> TrainRef:
    """One attempt: load, train (resuming from ``resume``), export. ``run_cfg`` is what
    the trainer runs with (``cfg`` unless an out-of-memory retry shrank the micro-batch);
    ``cfg`` is what the run records."""
    ckpt_dir = out_dir / "checkpoints"
    model, tokenizer = select_backend(hw)(run_cfg, base, hw)
    own = template_text(tokenizer.chat_template)
    if own is None or template_sha256(own) != base.chat_template_sha256:
        raise ConfigError(
            f"the tokenizer at {base.tokenizer_path} no longer carries the chat template the "
            "base stage recorded; re-run the base stage"
        )

    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    choice = getattr(model, "slothflow_checkpointing", None) or choose_gradient_checkpointing(
        run_cfg, hw, None, None
    )
    tracker.set_tags(
        {
            "slothflow.backend": hw.backend,
            "slothflow.device": hw.device,
            # tags, not params: an out-of-memory retry may change them
            "slothflow.gradient_checkpointing": choice.label,
            "slothflow.gradient_checkpointing_reason": choice.reason,
        }
    )
    tracker.log_params(
        {
            "train.backend": hw.backend,
            "train.backend_reason": hw.reason,
            "train.device": hw.device,
            "train.dtype": hw.dtype,
            "train.trainable_params": n_trainable,
        }
    )
    perf = None
    if hw.device == "cuda":
        perf = GpuPerf(
            flops_per_token(model.config, cfg.model.max_seq_length, n_trainable),
            peak_flops(hw.gpu_name),
        )
    tracker.log_input("train", data.train_path, data.fingerprint, "training", data.train_rows)
    tracker.log_input(
        "validation", data.validation_path, data.fingerprint, "validation", data.validation_rows
    )

    tokens = TokenCounter()
    loss_sum = LossSum(carried_loss_sum(resume))
    tracker_cb = _train_callback_cls()(
        tracker=tracker,
        journal=_StepJournal(out_dir / "tracked_steps.jsonl"),
        ckpt_dir=ckpt_dir,
        keep=cfg.train.keep_checkpoints,
        samples=val_rows[: cfg.train.sample_generations],
        tokenizer=tokenizer,
        max_new_tokens=cfg.eval.max_new_tokens,
        perf=perf,
        tokens=tokens,
        loss_sum=loss_sum,
    )
    trainer = build_trainer(
        run_cfg,
        hw,
        model,
        tokenizer,
        train_rows,
        val_rows,
        ckpt_dir,
        [tracker_cb],
        tokens,
        loss_sum,
    )
    if len(trainer.train_dataset) == 0:
        raise ConfigError(
            f"no training row keeps any answer token within model.max_seq_length="
            f"{cfg.model.max_seq_length} (TRL drops rows whose answer was truncated away); "
            "raise model.max_seq_length or shorten the prompts"
        )
    fitted = length_fit(run_cfg, tokenizer, train_rows, len(trainer.train_dataset))
    t0 = time.perf_counter()
    # its TrainOutput's training_loss leaves out the steps before a resumed checkpoint
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    wall = time.perf_counter() - t0
    state = trainer.state
    # the mean step loss over the whole run, as transformers defines it uninterrupted
    train_loss = loss_sum.total() / max(state.global_step, 1)
    for entry in state.log_history:  # its summary line, in the exported trainer state
        if "train_loss" in entry:
            entry["train_loss"] = train_loss
    best_step = state.best_global_step or state.global_step
    best_eval = _best_eval_loss(state.log_history, best_step)
    if best_eval is None:
        best_eval = float(trainer.evaluate()["eval_loss"])
    log.info("train: best checkpoint is step %d (eval_loss %.4f)", best_step, best_eval)

    # Export the best adapter (the trainer loaded it at the end) and the tokenizer,
    # each renamed into place so a crash never leaves half of one.
    adapter_dir, tok_dir = out_dir / "adapter", out_dir / "tokenizer"
    tmp = out_dir / ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.model.save_pretrained(tmp, safe_serialization=True)
    _replace_dir(tmp, adapter_dir)
    tmp = out_dir / ".tokenizer.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(tmp)
    _replace_dir(tmp, tok_dir)
    state.save_to_json(str(out_dir / "trainer_state.json"))
    (out_dir / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")

    metrics = {
        "best_eval_loss": best_eval,
        "best_step": float(best_step),
        "global_step": float(state.global_step),
        "train_loss": train_loss,
        "epoch": float(state.epoch or 0.0),
        "train_wall_s": wall,  # this attempt's
        "resumed_from_step": float(tracker_cb.resumed_from_step),
        **{k: float(v) for k, v in fitted.items()},
    }
    if tracker_cb.busy_total_s > 0:
        # this attempt's tokens over its time inside optimizer steps, like the per-step
        # tokens_per_s (a resumed run's checkpoint tokens and evaluation time excluded)
        metrics["train_tokens_per_s"] = (
            state.num_input_tokens_seen - tracker_cb.tokens_at_begin
        ) / tracker_cb.busy_total_s
    if perf is not None:
        metrics["gpu_peak_mem_gb"] = perf.run_peak_gb
    if run_cfg is not cfg:
        metrics["oom_retry_micro_batch_size"] = float(run_cfg.train.micro_batch_size)
    journal = tracker_cb.journal  # a re-run after a crash here must not log these twice
    final = {f"final_{k}": v for k, v in metrics.items()}
    journal.log_once(
        "final", state.global_step, lambda: tracker.log_metrics(final, step=state.global_step)
    )
    tracker.set_tags({"slothflow.best_step": str(best_step)})
    tracker.log_artifact(adapter_dir, "adapter")
    tracker.log_artifact(tok_dir, "tokenizer")
    tracker.log_artifact(out_dir / "trainer_state.json", "trainer")
    tracker.log_text(dump_config(cfg), "config/resolved.yaml")

    return TrainRef(
        stage=STAGE,
        path=str(out_dir),
        adapter_path=str(adapter_dir),
        tokenizer_path=str(tok_dir),
        base=base,
        data_fingerprint=data.fingerprint,
        config_hash=config_hash(cfg),
        backend=hw.backend,
        best_step=int(best_step),
        metrics=metrics,
    )


def _best_eval_loss(history: list[dict[str, Any]], step: int) -> float | None:
    for entry in history:
        if entry.get("step") == step and "eval_loss" in entry:
            return float(entry["eval_loss"])
    return None


# --------------------------------------------------------------------------- in a run


def train_in_run(
    ctx: RunContext, cfg: PipelineConfig, base: BaseModelRef, data: DataRef
) -> TrainRef:
    """``train`` inside a run: tracked as stage ``train``; a finished stage is reused."""
    from tasks.core import run as run_mod

    hw = HardwareDecision.from_params(ctx.hardware)
    out = ctx.stage_dir(STAGE)
    key = inputs_hash(cfg, base, data, hw)
    done = load_done(out, key, TrainRef)
    if done is not None and Path(done.adapter_path).exists():
        log.info(
            "train: already done (best step %d); reusing %s", done.best_step, done.adapter_path
        )
        return done
    with run_mod.stage(ctx, STAGE) as tracker:
        ref = train(cfg, base, data, out, hw, tracker)
    mark_done(out, key, ref)
    return ref


@stage_task(name="train", retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient)
def train_task(ctx: RunContext, cfg: PipelineConfig, base: BaseModelRef, data: DataRef) -> TrainRef:
    """Prefect task of stage ``train``. A retry re-enters ``train`` on the same folder,
    which resumes from the last complete checkpoint instead of starting over."""
    return train_in_run(ctx, cfg, base, data)
