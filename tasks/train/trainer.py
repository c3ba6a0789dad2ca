"""The configured TRL trainer: settings checked first, the ``SFTConfig``, and the
``SFTTrainer`` subclass with the model's own loss and a sync-free token count."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.core.config import ConfigError, ModelConfig, TrainConfig
from tasks.core.hardware import HardwareDecision
from tasks.train.checkpoints import LossSum
from tasks.train.perf import TokenCounter, choose_gradient_checkpointing


def check_settings(t: TrainConfig, hw: HardwareDecision) -> None:
    """Configuration the trainer would reject late (or silently bend): fail first."""
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


#: Below this share of pad tokens in a micro-batch, padded batches beat padding-free
#: ones on the Unsloth backend: padding-free batches skip Unsloth's compiled decoder
#: blocks, which cost 4-5% on an H200 (bench/results/train_gpu.md: 0.94x vs 0.98x the
#: raw loop at the same settings), more than padding that little wastes.
PADDED_BELOW_WASTE = 0.04


@dataclass(frozen=True)
class PaddingChoice:
    """``train.padding_free`` as the trainer runs it (``auto`` or ``off``), and why."""

    mode: str
    reason: str


def pad_waste(lengths: list[int], micro_batch: int, max_len: int, seed: int = 0) -> float:
    """Share of a padded micro-batch's tokens that are padding, over the training rows
    in shuffled order (as the trainer samples them): 1 - real / (rows x longest)."""
    import random

    order = [min(n, max_len) for n in lengths]
    random.Random(seed).shuffle(order)
    real = padded = 0
    for i in range(0, len(order), micro_batch):
        batch = order[i : i + micro_batch]
        real += sum(batch)
        padded += len(batch) * max(batch)
    return 1.0 - real / padded if padded else 0.0


def choose_padding(
    t: TrainConfig, hw: HardwareDecision, lengths: list[int], max_len: int
) -> PaddingChoice:
    """``auto`` on Unsloth without packing: padded batches (its compiled blocks run) when
    padding would waste under :data:`PADDED_BELOW_WASTE` of the tokens — rows of about
    one length, or cut at the limit — else Unsloth's own choice (padding-free on an
    H200). Explicit settings, packing and the PEFT backend are left as they are."""
    if t.padding_free == "off":
        return PaddingChoice("off", "train.padding_free=off: padded batches")
    if t.packing:
        return PaddingChoice("auto", "train.packing=true: packed rows are padding-free")
    if hw.backend != "unsloth":
        return PaddingChoice("auto", f"{hw.backend}: TRL pads each micro-batch")
    waste = pad_waste(lengths, t.micro_batch_size, max_len, t.seed)
    if waste < PADDED_BELOW_WASTE:
        return PaddingChoice(
            "off",
            f"padded batches: padding would be {waste:.1%} of the tokens, less than what "
            "Unsloth's compiled decoder blocks gain over padding-free ones",
        )
    return PaddingChoice("auto", f"Unsloth's choice: padding would be {waste:.1%} of the tokens")


def sft_config(
    t: TrainConfig, m: ModelConfig, hw: HardwareDecision, ckpt_dir: Path, has_eval: bool = True
) -> Any:
    """The ``SFTConfig`` for this run: every knob comes from the config or the hardware."""
    from trl import SFTConfig

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
        and bool(choose_gradient_checkpointing(t, m.max_seq_length, hw, None, None).mode),
        max_length=m.max_seq_length,
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
    t: TrainConfig,
    m: ModelConfig,
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
    if t.early_stopping_patience:
        cbs.append(EarlyStoppingCallback(t.early_stopping_patience))
    return _trainer_cls()(
        token_metrics=t.token_metrics,
        tokens=tokens or TokenCounter(),
        loss_sum=loss_sum or LossSum(),
        model=model,
        args=sft_config(t, m, hw, ckpt_dir),
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(val_rows),
        processing_class=tokenizer,
        callbacks=cbs,
    )
