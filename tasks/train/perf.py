"""Throughput, memory and out-of-memory handling of the train stage: MFU, peak memory
per logging window, the gradient-checkpointing decision sized against free GPU memory,
the sync-free token counter, and CUDA out-of-memory detection and advice.
"""

from __future__ import annotations

import gc
import re
from dataclasses import dataclass
from typing import Any

from tasks.core import hardware
from tasks.core.config import ConfigError, TrainConfig
from tasks.core.hardware import HardwareDecision


class TrainOutOfMemoryError(ConfigError):
    """CUDA ran out of memory; the message names the settings that shrink the need.

    A :class:`ConfigError`, so the Prefect task does not retry it as transient: the
    same settings run out of memory the same way again.
    """


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
        self._begin: Any = None
        self._pending: list[tuple[Any, Any]] = []
        hardware.reset_gpu_window()

    @property
    def run_peak_gb(self) -> float:
        """Peak allocated GPU memory over the whole run (all windows and now)."""
        return max(self._run_peak, self._torch.cuda.max_memory_allocated()) / 2**30

    # Step time from CUDA events instead of a synchronize per optimizer step: a sync
    # drains the GPU, which then idles while the trainer fetches and collates the next
    # micro-batches and launches their kernels (raw Unsloth never syncs). The events are
    # read only where the trainer syncs anyway (a log, a save, an evaluation, the end).
    def step_begin(self) -> None:
        self._begin = self._torch.cuda.Event(enable_timing=True)
        self._begin.record()

    def step_end(self) -> None:
        end = self._torch.cuda.Event(enable_timing=True)
        end.record()
        self._pending.append((self._begin, end))

    def take_busy_s(self) -> float:
        """Seconds the GPU spent inside the optimizer steps since the last call, from
        each step's begin event to its end event (waits for the last one)."""
        if not self._pending:
            return 0.0
        self._pending[-1][1].synchronize()
        busy = sum(b.elapsed_time(e) for b, e in self._pending) / 1e3
        self._pending.clear()
        return busy

    def window(self, tokens_per_s: float | None) -> dict[str, float]:
        cuda = self._torch.cuda
        self._run_peak = max(self._run_peak, cuda.max_memory_allocated())
        out = {
            "gpu_peak_mem_gb": cuda.max_memory_allocated() / 2**30,
            "gpu_peak_reserved_gb": cuda.max_memory_reserved() / 2**30,
        }
        hardware.reset_gpu_window()  # keeps the stage's peak (run.stage logs it)
        if tokens_per_s and self.peak:
            out["mfu"] = tokens_per_s * self.flops_per_token / self.peak
        return out


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
    t: TrainConfig,
    max_seq_length: int,
    hw: HardwareDecision,
    config: Any,
    free_bytes: int | None,
) -> CheckpointingChoice:
    """``train.gradient_checkpointing`` resolved for this run, with the reason.

    ``auto`` on the Unsloth backend turns checkpointing off when the estimated
    activations (with margin) fit in the free GPU memory after the model loaded: the
    recompute (a third of the work) is then pure cost. Otherwise Unsloth's offloading
    checkpointing. ``auto`` elsewhere: off on CPU (memory is not the constraint there,
    the recompute is pure cost), on with PEFT on CUDA (the safe choice).
    """
    mode = t.gradient_checkpointing
    if mode != "auto":
        choice: bool | str = {"on": True, "off": False}.get(mode, mode)
        return CheckpointingChoice(choice, f"train.gradient_checkpointing={mode} as configured")
    if hw.backend != "unsloth" or free_bytes is None:
        on = hw.device == "cuda"
        why = "CUDA with PEFT: on (safe default)" if on else "CPU: recompute would be pure cost"
        return CheckpointingChoice(on, f"auto: {why}")
    need = activation_bytes(config, t.micro_batch_size, max_seq_length) * _MARGIN
    budget = free_bytes * _FREE_SHARE
    sizes = (
        f"activations ~{need / 2**30:.1f} GiB (estimate x{_MARGIN} for micro-batch "
        f"{t.micro_batch_size} x {max_seq_length} tokens) vs "
        f"{budget / 2**30:.1f} GiB usable of {free_bytes / 2**30:.1f} GiB free"
    )
    if need <= budget:
        return CheckpointingChoice(False, f"auto: {sizes}: off, no recompute")
    return CheckpointingChoice("unsloth", f"auto: {sizes}: unsloth (offloaded) checkpointing")


class TokenCounter:
    """Trained tokens (non-padding), summed where the batch lives and read once per
    optimizer step.

    transformers' own counter (``include_num_input_tokens_seen``) calls ``.item()`` on
    every micro-batch: on CUDA a host sync that stalls the CPU until the GPU drains,
    so the next batch is collated and launched only then. Here the sum stays a device
    tensor until :meth:`take`, which the callback calls only at the end of a step that
    logs, saves, evaluates or stops, where the trainer synchronises anyway.
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


def is_cuda_oom(exc: BaseException) -> bool:
    """A CUDA out-of-memory error, also as the RuntimeError compiled kernels raise."""
    if type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and "CUDA out of memory" in str(exc)


def oom_message(
    t: TrainConfig, max_seq_length: int, hw: HardwareDecision, exc: BaseException
) -> str:
    """What ran out, and the settings that shrink the need."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (
        f"CUDA out of memory on {hw.gpu_name} ({first[:200]}) with train.micro_batch_size="
        f"{t.micro_batch_size}, train.grad_accum={t.grad_accum}, model.max_seq_length="
        f"{max_seq_length}, train.lora.r={t.lora.r}, train.gradient_checkpointing="
        f"{t.gradient_checkpointing}. Lower train.micro_batch_size (raise train.grad_accum to "
        "keep the effective batch), model.max_seq_length or train.lora.r, or set "
        "train.gradient_checkpointing=unsloth (or on)"
        + ("" if hw.load_in_4bit else ", or model.load_in_4bit=true")
    )


def release_cuda_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
