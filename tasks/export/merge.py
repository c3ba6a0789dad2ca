"""The merge itself: which method writes the merged model (PEFT's ``merge_and_unload`` or
Unsloth's merged 16-bit save), and each one writing its weights to a folder."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from tasks.core.models import hub_load_revision, load_causal_lm, torch_dtype
from tasks.core.refs import TrainRef


def merge_peft(train: TrainRef, dtype: str, device: str, out: Path) -> None:
    """PEFT ``merge_and_unload``. The merge itself runs in float32 (W + s·BA rounded
    once), then the weights are cast to the export dtype."""
    from peft import PeftModel

    base = load_causal_lm(train.base.name_or_path, "float32", device, hub_load_revision(train.base))
    merged = PeftModel.from_pretrained(base, train.adapter_path).merge_and_unload()
    merged = merged.to(torch_dtype(dtype))
    merged.save_pretrained(out, safe_serialization=True)


MergeMethod = Literal["unsloth", "peft"]


def merge_method(backend: str, dtype: str) -> tuple[MergeMethod, str]:
    """Which merge writes the merged model, and why (for the log): ``"unsloth"``
    (:func:`merge_unsloth`, the GPU 16-bit save) for an Unsloth-trained adapter exported
    in bfloat16/float16, else ``"peft"`` (:func:`merge_peft`).

    Unsloth's merged save writes 16-bit weights only, but the adapter Unsloth saves is an
    ordinary PEFT LoRA adapter, so PEFT's merge (float32 on the stage's device, then cast)
    handles any backend's adapter in any dtype. Refusing float32 for Unsloth instead
    would fail the default recipe (``export.dtype: float32``, ``train.backend: auto``) on
    every CUDA machine after training had already run.
    """
    if backend == "unsloth" and dtype in ("bfloat16", "float16"):
        return "unsloth", "an Unsloth adapter exported in 16-bit: Unsloth's merged 16-bit save"
    if backend == "unsloth":
        return "peft", (
            "Unsloth's merged save writes 16-bit only, and the Unsloth adapter is a plain "
            f"PEFT adapter: PEFT merge_and_unload in float32, saved as {dtype}"
        )
    return "peft", "PEFT merge_and_unload in float32, then cast"


def merge_unsloth(train: TrainRef, dtype: str, max_seq_length: int, out: Path) -> None:
    """Unsloth's merged 16-bit save (GPU), through :func:`tasks.export.gpu_merge.merge_16bit`:
    the adapter's base path rewritten to ``train.base``, Unsloth's buffers kept beside
    ``out`` (not in the cwd), ``out`` written atomically.

    Only for a 16-bit ``export.dtype`` (see :func:`merge_method`). This path is exercised
    on the device by ``tests/test_train_gpu.py`` (merge_16bit on a real Unsloth adapter);
    the CPU tests cover the argument plumbing.
    """
    from tasks.export import gpu_merge  # core imports only; unsloth and torch load inside the call

    # A non-16-bit dtype is a ValueError; without unsloth installed this raises
    # BackendNotReadyError (a ConfigError) saying so.
    gpu_merge.merge_16bit(
        train.base,
        train.adapter_path,
        train.tokenizer_path,
        out,
        dtype=dtype,
        max_seq_length=max_seq_length,
    )
