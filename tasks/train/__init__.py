"""Stage ``train``: supervised fine-tuning of a LoRA adapter with TRL's ``SFTTrainer``.

``train`` is the plain function (no Prefect, no MLflow: it records through a
:class:`~tasks.core.tracking.Tracker`); ``train_task`` is its Prefect task. The backend
comes from the hardware decision made once per run (``hw.backend``): ``peft``
(transformers + PEFT, any device) or ``unsloth`` (CUDA: Unsloth's 4-bit loader and
fused LoRA kernels under the same TRL trainer). Once the base model's architecture is
known, an Unsloth decision for a model Unsloth has no kernels for falls back to PEFT
under ``train.backend=auto`` (:func:`tasks.core.hardware.for_model`).

On CUDA the stage also sizes gradient checkpointing against free GPU memory on the
Unsloth backend (:func:`~tasks.train.perf.choose_gradient_checkpointing`; PEFT turns it
on), logs peak GPU memory and an MFU estimate at every logging step, and turns a CUDA out-of-memory error into one retry with half the
micro-batch (same effective batch) or a message naming the knobs.

Checkpoints and exact resume: the trainer writes ``checkpoints/checkpoint-N`` every
``train.save_steps``; a checkpoint counts only once it carries the completion marker
written after every file in it has been flushed, so a folder half-written when the
process died is ignored (and removed) in favour of the previous one. Re-running the
stage on the same output folder resumes from the last complete checkpoint:
adapter weights, optimizer, scheduler, RNG states and data position (the trainer
skips the batches it has already seen). Metrics a killed attempt had already sent
to the tracker are not sent again (see :class:`~tasks.train.callback.StepJournal`). Checkpoints also carry
the loss summed over their steps, so the final ``train_loss`` of a resumed run is the
mean over all of its steps, like an uninterrupted run's (see
:class:`~tasks.train.checkpoints.LossSum`).

The package, by what each part does: :mod:`.backends` (PEFT and Unsloth loading),
:mod:`.trainer` (settings checks, ``SFTConfig``, the trainer subclass),
:mod:`.callback` (tracking, checkpoint commits, sample generations),
:mod:`.checkpoints` (markers, resume, rotation, the carried loss sum), :mod:`.perf`
(MFU, memory, the checkpointing decision, out-of-memory), :mod:`.data` (chat rows),
:mod:`.warm` (``train.init_adapter``: starting from the champion's adapter, its base
revision and LoRA shape checked before the base loads). This module is the stage
itself: one attempt, the out-of-memory retry, and the task.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.core.artifacts import InitAdapter
from tasks.core.config import ConfigError, ModelConfig, TrainConfig
from tasks.core.hardware import HardwareDecision
from tasks.core.models import template_sha256, template_text
from tasks.core.orchestration import retry_transient, stage_task
from tasks.core.refs import (
    BaseModelRef,
    DataRef,
    RunContext,
    TrainRef,
    record_ref,
    sha256_json,
)
from tasks.core.tokens import chat_token_lengths
from tasks.core.tracking import NullTracker, Tracker
from tasks.train.backends import BACKENDS, load_peft, load_unsloth, resolve_backend, select_backend
from tasks.train.callback import StepJournal, TrackerHooks, generate_samples, train_callback_cls
from tasks.train.checkpoints import (
    CHECKPOINT_PREFIX,
    COMPLETE_MARKER,
    LOSS_SUM_FILE,
    LossSum,
    carried_loss_sum,
    is_complete,
    last_complete_checkpoint,
    mark_complete,
    prepare_checkpoints,
    replace_dir,
    rotate,
)
from tasks.train.data import data_ref_from_folder, length_fit, read_chat_rows
from tasks.train.perf import (
    PEAK_FLOPS,
    CheckpointingChoice,
    GpuPerf,
    TokenCounter,
    TrainOutOfMemoryError,
    activation_bytes,
    choose_gradient_checkpointing,
    flops_per_token,
    is_cuda_oom,
    oom_message,
    peak_flops,
    release_cuda_memory,
)
from tasks.train.trainer import (
    PaddingChoice,
    build_trainer,
    check_settings,
    choose_padding,
    pad_waste,
    sft_config,
)
from tasks.train.warm import check_init_adapter, load_init_weights

# The stage's public names, wherever in the package they live: callers and tests import
# them from ``tasks.train``.
__all__ = [
    "BACKENDS",
    "CHECKPOINT_PREFIX",
    "COMPLETE_MARKER",
    "LOSS_SUM_FILE",
    "PEAK_FLOPS",
    "STAGE",
    "SYSTEM_METRICS_INTERVAL_S",
    "CheckpointingChoice",
    "GpuPerf",
    "LossSum",
    "StepJournal",
    "TokenCounter",
    "TrackerHooks",
    "TrainOutOfMemoryError",
    "activation_bytes",
    "build_trainer",
    "carried_loss_sum",
    "check_init_adapter",
    "check_settings",
    "choose_gradient_checkpointing",
    "choose_padding",
    "data_ref_from_folder",
    "flops_per_token",
    "generate_samples",
    "inputs_hash",
    "is_complete",
    "is_cuda_oom",
    "last_complete_checkpoint",
    "length_fit",
    "load_init_weights",
    "load_peft",
    "load_unsloth",
    "mark_complete",
    "oom_message",
    "pad_waste",
    "peak_flops",
    "read_chat_rows",
    "rotate",
    "sft_config",
    "train",
    "train_callback_cls",
    "train_in_run",
    "train_task",
]

log = logging.getLogger(__name__)

STAGE = "train"

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


def inputs_hash(
    cfg: TrainConfig,
    model: ModelConfig,
    base: BaseModelRef,
    data: DataRef,
    hw: HardwareDecision,
    init: InitAdapter | None = None,
) -> str:
    """What determines the adapter: model + train config, base, data, backend, dtype, and
    the adapter it starts from (its files' hashes: ``train.init_adapter=champion`` names
    another start each time the champion changes)."""
    return sha256_json(
        {
            "model": model.model_dump(mode="json"),
            "train": cfg.model_dump(mode="json"),
            "base": base.model_dump(mode="json"),
            "data": data.fingerprint,
            "backend": hw.backend,
            "dtype": hw.dtype,
            "load_in_4bit": hw.load_in_4bit,
            "init_adapter": init.files if init else None,
        }
    )


@dataclass(frozen=True)
class _Job:
    """What every attempt of one ``train`` call shares (an out-of-memory retry changes
    only the train section it runs with)."""

    cfg: TrainConfig  # as configured and recorded
    model_cfg: ModelConfig
    base: BaseModelRef
    data: DataRef
    out_dir: Path
    hw: HardwareDecision
    tracker: Tracker
    max_new_tokens: int
    config_hash: str
    resolved_config: str
    train_rows: list[dict[str, Any]]
    val_rows: list[dict[str, Any]]
    init: InitAdapter | None = None  # the adapter to start from; None: a fresh LoRA

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoints"


def train(
    cfg: TrainConfig,
    model: ModelConfig,
    base: BaseModelRef,
    data: DataRef,
    out_dir: Path,
    hw: HardwareDecision,
    tracker: Tracker = NullTracker(),
    *,
    max_new_tokens: int,
    config_hash: str,
    resolved_config: str,
    system_metrics: bool = True,
    init_adapter: InitAdapter | None = None,
) -> TrainRef:
    """Fine-tune a LoRA adapter on ``data``; export the best checkpoint's adapter.

    ``cfg`` and ``model`` are the recipe's train and model sections; the rest comes from
    the run: ``max_new_tokens`` for the sample generations (``eval.max_new_tokens``),
    the run's ``config_hash`` and its resolved YAML (recorded beside the adapter),
    ``system_metrics`` (``tracking.system_metrics``), and ``init_adapter``, the adapter
    to start from (``train.init_adapter=champion``; None: a fresh LoRA). Re-running on
    the same ``out_dir`` with the same inputs resumes from the last complete checkpoint.
    Returns the :class:`TrainRef` (best step, final metrics).
    """
    if init_adapter is not None:  # in seconds, before Unsloth or the base model load
        check_init_adapter(init_adapter, cfg.lora, base)
    hw = resolve_backend(cfg, base, hw)
    check_settings(cfg, hw)
    out_dir.mkdir(parents=True, exist_ok=True)
    key = inputs_hash(cfg, model, base, data, hw, init_adapter)
    ckpt_dir = out_dir / "checkpoints"
    resume = prepare_checkpoints(ckpt_dir, key)
    log.info(
        "train: backend %s on %s (%s); %s",
        hw.backend,
        hw.device,
        hw.reason,
        f"resuming from {resume.name}" if resume else "starting fresh",
    )
    job = _Job(
        cfg,
        model,
        base,
        data,
        out_dir,
        hw,
        tracker,
        max_new_tokens,
        config_hash,
        resolved_config,
        read_chat_rows(data.train_path),
        read_chat_rows(data.validation_path),
        init_adapter,
    )
    run_cfg, retried = cfg, False
    while True:
        try:
            with _system_metrics(tracker, hw, system_metrics):
                return _fit(job, run_cfg, resume)
        except Exception as exc:
            if not is_cuda_oom(exc):
                raise
            message = oom_message(run_cfg, model.max_seq_length, hw, exc)
        # Outside the handler the traceback is gone, and with it the frames that held
        # the model and the trainer: only now can their memory be given back.
        release_cuda_memory()
        if retried or not cfg.oom_retry or run_cfg.micro_batch_size < 2:
            raise TrainOutOfMemoryError(message)
        t = run_cfg
        run_cfg = t.model_copy(
            update={"micro_batch_size": t.micro_batch_size // 2, "grad_accum": t.grad_accum * 2}
        )
        retried = True
        resume = last_complete_checkpoint(ckpt_dir)
        note = (
            f"micro_batch_size {t.micro_batch_size} -> {run_cfg.micro_batch_size}, "
            f"grad_accum {t.grad_accum} -> {run_cfg.grad_accum} (same effective batch)"
        )
        log.warning("train: CUDA out of memory; retrying once with %s", note)
        tracker.set_tags({"slothflow.oom_retry": note})


def _fit(job: _Job, run_cfg: TrainConfig, resume: Path | None) -> TrainRef:
    """One attempt: load, train (resuming from ``resume``), export. ``run_cfg`` is what
    the trainer runs with (``job.cfg`` unless an out-of-memory retry shrank the
    micro-batch); ``job.cfg`` is what the run records."""
    model, tokenizer = _load(job, run_cfg)
    lengths = chat_token_lengths(tokenizer, [r["messages"] for r in job.train_rows])
    padding = choose_padding(run_cfg, job.hw, lengths, job.model_cfg.max_seq_length)
    perf = _record_setup(job, run_cfg, model, padding)
    tokens = TokenCounter()
    loss_sum = LossSum(carried_loss_sum(resume))
    hooks = train_callback_cls()(
        tracker=job.tracker,
        journal=StepJournal(job.out_dir / "tracked_steps.jsonl"),
        ckpt_dir=job.ckpt_dir,
        keep=job.cfg.keep_checkpoints,
        samples=job.val_rows[: job.cfg.sample_generations],
        tokenizer=tokenizer,
        max_new_tokens=job.max_new_tokens,
        perf=perf,
        tokens=tokens,
        loss_sum=loss_sum,
    )
    trainer = build_trainer(
        run_cfg.model_copy(update={"padding_free": padding.mode}),
        job.model_cfg,
        job.hw,
        model,
        tokenizer,
        job.train_rows,
        job.val_rows,
        job.ckpt_dir,
        [hooks],
        tokens,
        loss_sum,
    )
    _check_trainable(job, trainer)
    fitted = length_fit(run_cfg, job.model_cfg.max_seq_length, lengths, len(trainer.train_dataset))
    t0 = time.perf_counter()
    # its TrainOutput's training_loss leaves out the steps before a resumed checkpoint
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    wall = time.perf_counter() - t0
    train_loss, best_step, best_eval = _outcome(trainer, loss_sum)
    adapter_dir, tok_dir = _save(job, trainer, tokenizer)
    metrics = {
        "best_eval_loss": best_eval,
        "best_step": float(best_step),
        "global_step": float(trainer.state.global_step),
        "train_loss": train_loss,
        "epoch": float(trainer.state.epoch or 0.0),
        "train_wall_s": wall,  # this attempt's
        "resumed_from_step": float(hooks.resumed_from_step),
        **{k: float(v) for k, v in fitted.items()},
    }
    if hooks.busy_total_s > 0:
        # this attempt's tokens over its time inside optimizer steps, like the per-step
        # tokens_per_s (a resumed run's checkpoint tokens and evaluation time excluded)
        metrics["train_tokens_per_s"] = (
            trainer.state.num_input_tokens_seen - hooks.tokens_at_begin
        ) / hooks.busy_total_s
    if perf is not None:
        metrics["gpu_peak_mem_gb"] = perf.run_peak_gb
    if run_cfg is not job.cfg:
        metrics["oom_retry_micro_batch_size"] = float(run_cfg.micro_batch_size)
    _record_outputs(job, hooks.journal, trainer.state.global_step, metrics, best_step)
    return TrainRef(
        stage=STAGE,
        path=str(job.out_dir),
        adapter_path=str(adapter_dir),
        tokenizer_path=str(tok_dir),
        base=job.base,
        data_fingerprint=job.data.fingerprint,
        config_hash=job.config_hash,
        backend=job.hw.backend,
        best_step=int(best_step),
        metrics=metrics,
    )


def _check_trainable(job: _Job, trainer: Any) -> None:
    """Before the first step: a dataset TRL emptied fails here, not as a trainer error."""
    if len(trainer.train_dataset) == 0:
        raise ConfigError(
            f"no training row keeps any answer token within model.max_seq_length="
            f"{job.model_cfg.max_seq_length} (TRL drops rows whose answer was truncated away); "
            "raise model.max_seq_length or shorten the prompts"
        )


def _load(job: _Job, run_cfg: TrainConfig) -> tuple[Any, Any]:
    """The backend's model with its fresh adapter (holding the init adapter's weights on
    a warm start), and the tokenizer, checked to still carry the chat template the base
    stage recorded."""
    model, tokenizer = select_backend(job.hw)(run_cfg, job.model_cfg, job.base, job.hw)
    if job.init is not None:
        load_init_weights(model, job.init)
    own = template_text(tokenizer.chat_template)
    if own is None or template_sha256(own) != job.base.chat_template_sha256:
        raise ConfigError(
            f"the tokenizer at {job.base.tokenizer_path} no longer carries the chat template "
            "the base stage recorded; re-run the base stage"
        )
    return model, tokenizer


def _record_setup(
    job: _Job, run_cfg: TrainConfig, model: Any, padding: PaddingChoice
) -> GpuPerf | None:
    """Tags, params and inputs of this attempt; on CUDA the MFU/memory probe."""
    hw, tracker, data = job.hw, job.tracker, job.data
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    choice = getattr(model, "slothflow_checkpointing", None) or choose_gradient_checkpointing(
        run_cfg, job.model_cfg.max_seq_length, hw, None, None
    )
    tracker.set_tags(
        {
            "slothflow.backend": hw.backend,
            "slothflow.device": hw.device,
            # tags, not params: an out-of-memory retry may change them
            "slothflow.gradient_checkpointing": choice.label,
            "slothflow.gradient_checkpointing_reason": choice.reason,
            "slothflow.padding_free": padding.mode,
            "slothflow.padding_free_reason": padding.reason,
            # a tag too: a resumed run may start over from a newer champion
            "slothflow.init_adapter": job.init.label if job.init else "none",
        }
    )
    tracker.log_params(
        {
            "train.backend": hw.backend,
            "train.backend_reason": hw.reason,
            "train.device": hw.device,
            "train.dtype": hw.dtype,
            "train.load_in_4bit": hw.load_in_4bit,
            "train.trainable_params": n_trainable,
        }
    )
    tracker.log_input("train", data.train_path, data.fingerprint, "training", data.train_rows)
    tracker.log_input(
        "validation", data.validation_path, data.fingerprint, "validation", data.validation_rows
    )
    if hw.device != "cuda":
        return None
    return GpuPerf(
        flops_per_token(model.config, job.model_cfg.max_seq_length, n_trainable),
        peak_flops(hw.gpu_name),
    )


def _outcome(trainer: Any, loss_sum: LossSum) -> tuple[float, int, float]:
    """(train_loss over the whole run, best step, its eval loss) of a finished trainer."""
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
    return train_loss, int(best_step), best_eval


def _save(job: _Job, trainer: Any, tokenizer: Any) -> tuple[Path, Path]:
    """Export the best adapter (the trainer loaded it at the end) and the tokenizer,
    each renamed into place so a crash never leaves half of one; then the trainer
    state and the resolved config beside them."""
    out_dir = job.out_dir
    adapter_dir, tok_dir = out_dir / "adapter", out_dir / "tokenizer"
    tmp = out_dir / ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.model.save_pretrained(tmp, safe_serialization=True)
    replace_dir(tmp, adapter_dir)
    tmp = out_dir / ".tokenizer.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(tmp)
    replace_dir(tmp, tok_dir)
    trainer.state.save_to_json(str(out_dir / "trainer_state.json"))
    (out_dir / "config.yaml").write_text(job.resolved_config, encoding="utf-8")
    return adapter_dir, tok_dir


def _record_outputs(
    job: _Job, journal: StepJournal, step: int, metrics: dict[str, float], best_step: int
) -> None:
    tracker = job.tracker
    final = {f"final_{k}": v for k, v in metrics.items()}
    # a re-run after a crash here must not log these twice
    journal.log_metrics_once(tracker, "final", step, final)
    tracker.set_tags({"slothflow.best_step": str(best_step)})
    tracker.log_artifact(job.out_dir / "adapter", "adapter")
    tracker.log_artifact(job.out_dir / "tokenizer", "tokenizer")
    tracker.log_artifact(job.out_dir / "trainer_state.json", "trainer")
    tracker.log_text(job.resolved_config, "config/resolved.yaml")


def _best_eval_loss(history: list[dict[str, Any]], step: int) -> float | None:
    for entry in history:
        if entry.get("step") == step and "eval_loss" in entry:
            return float(entry["eval_loss"])
    return None


# --------------------------------------------------------------------------- in a run


def train_in_run(
    ctx: RunContext,
    cfg: TrainConfig,
    model: ModelConfig,
    base: BaseModelRef,
    data: DataRef,
    *,
    max_new_tokens: int,
    resolved_config: str,
    system_metrics: bool = True,
    init_adapter: InitAdapter | None = None,
) -> TrainRef:
    """``train`` inside a run: tracked as stage ``train``, its reference recorded in the
    run's folder. Re-entering the same run's folder resumes from the last complete
    checkpoint; reuse of a finished training is Prefect's (:func:`train_task`). The
    TrainRef records the run's config hash."""
    from tasks.core import run as run_mod

    hw = HardwareDecision.from_params(ctx.hardware)
    out = ctx.stage_dir(STAGE)
    with run_mod.stage(ctx, STAGE) as tracker:
        ref = train(
            cfg,
            model,
            base,
            data,
            out,
            hw,
            tracker,
            max_new_tokens=max_new_tokens,
            config_hash=ctx.config_hash,
            resolved_config=resolved_config,
            system_metrics=system_metrics,
            init_adapter=init_adapter,
        )
    record_ref(out, ref)
    return ref


def _cache_key(a: dict[str, Any]) -> str:
    hw = HardwareDecision.from_params(a["ctx"].hardware)
    return inputs_hash(a["cfg"], a["model"], a["base"], a["data"], hw, a.get("init_adapter"))


@stage_task(
    name="train",
    cache_key=_cache_key,
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=retry_transient,
)
def train_task(
    ctx: RunContext,
    cfg: TrainConfig,
    model: ModelConfig,
    base: BaseModelRef,
    data: DataRef,
    *,
    max_new_tokens: int,
    resolved_config: str,
    system_metrics: bool = True,
    init_adapter: InitAdapter | None = None,
) -> TrainRef:
    """Prefect task of stage ``train``. A retry re-enters ``train`` on the same folder,
    which resumes from the last complete checkpoint instead of starting over.
    ``init_adapter``: the champion's adapter to start from (``train.init_adapter``)."""
    return train_in_run(
        ctx,
        cfg,
        model,
        base,
        data,
        max_new_tokens=max_new_tokens,
        resolved_config=resolved_config,
        system_metrics=system_metrics,
        init_adapter=init_adapter,
    )
