"""Decide the hardware once, with the reason, before any stage runs.

The decision is a small frozen record: the device, the training backend, the
compute dtype and whether the base loads in 4-bit. Each stage reads it; only the
train stage refines it, once the base model's architecture is known (:func:`for_model`). A request the hardware cannot honour is a :class:`ConfigError`, never
a silently flipped flag.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from tasks.core.config import ConfigError, PipelineConfig

Backend = Literal["unsloth", "peft"]
Dtype = Literal["bfloat16", "float16", "float32"]


@dataclass(frozen=True)
class Probe:
    """What the machine offers; gathered once so the decision itself is a pure function."""

    cuda: bool
    cuda_bf16: bool = False
    gpu_name: str | None = None
    gpu_memory_gb: float | None = None
    unsloth_installed: bool = False
    bitsandbytes_installed: bool = False


@dataclass(frozen=True)
class HardwareDecision:
    device: Literal["cuda", "cpu"]
    backend: Backend
    dtype: Dtype
    load_in_4bit: bool
    reason: str
    gpu_name: str | None = None
    gpu_memory_gb: float | None = None

    def as_params(self) -> dict[str, str]:
        return {f"hardware.{k}": str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> HardwareDecision:
        """Back from :meth:`as_params` (with or without the ``hardware.`` prefix), as a
        stage reads the run's decision from its ``RunContext`` instead of re-deciding."""
        p = {k.removeprefix("hardware."): v for k, v in params.items()}

        def opt(key: str) -> str | None:
            v = p.get(key)
            return None if v in (None, "None") else str(v)

        mem = opt("gpu_memory_gb")
        return cls(
            device=p["device"],
            backend=p["backend"],
            dtype=p["dtype"],
            load_in_4bit=str(p["load_in_4bit"]) == "True",
            reason=str(p["reason"]),
            gpu_name=opt("gpu_name"),
            gpu_memory_gb=float(mem) if mem is not None else None,
        )


def probe() -> Probe:
    """Look at the machine. Unsloth is detected with ``find_spec``, not imported:
    importing it on a CPU without AVX-512 kills the process with SIGILL."""
    import torch

    cuda = torch.cuda.is_available()
    name = mem = None
    bf16 = False
    if cuda:
        props = torch.cuda.get_device_properties(0)
        name, mem = props.name, round(props.total_memory / 2**30, 1)
        bf16 = torch.cuda.is_bf16_supported()
    return Probe(
        cuda=cuda,
        cuda_bf16=bf16,
        gpu_name=name,
        gpu_memory_gb=mem,
        unsloth_installed=importlib.util.find_spec("unsloth") is not None,
        bitsandbytes_installed=importlib.util.find_spec("bitsandbytes") is not None,
    )


_CUDA_ONLY_OPTIMIZERS = {"adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"}


def decide(cfg: PipelineConfig, hw: Probe, *, trains_here: bool = True) -> HardwareDecision:
    """Pure: config + probe -> decision with its reason, or ``ConfigError``.

    ``trains_here=False``: this process orchestrates a run whose GPU stages run on
    ``orchestration.gpu_pool`` (a CPU node, typically): a GPU recipe is not refused for
    the GPU this machine lacks; the gpu worker decides for itself when it joins the run."""
    want = cfg.train.backend
    if not hw.cuda and not trains_here and cfg.orchestration.gpu_pool:
        return HardwareDecision(
            device="cpu",
            backend="peft",
            dtype="float32",
            load_in_4bit=False,
            reason=f"no CUDA on this worker: train, export and evaluate run on the "
            f"{cfg.orchestration.gpu_pool!r} pool, whose worker decides there",
        )
    if not hw.cuda:
        if want == "unsloth":
            raise ConfigError("train.backend='unsloth' needs a CUDA GPU; none is visible here")
        if cfg.model.load_in_4bit:
            raise ConfigError(
                "model.load_in_4bit=true needs CUDA (bitsandbytes 4-bit kernels); this machine "
                "has no GPU. Use a CPU recipe (e.g. --recipe default) or set model.load_in_4bit=false"
            )
        if cfg.train.optimizer in _CUDA_ONLY_OPTIMIZERS:
            raise ConfigError(
                f"train.optimizer={cfg.train.optimizer!r} needs CUDA (bitsandbytes); "
                "use train.optimizer=adamw_torch on CPU"
            )
        if cfg.model.dtype in ("bfloat16", "float16"):
            raise ConfigError(
                f"model.dtype={cfg.model.dtype!r} on CPU: this CPU has no native half-precision "
                "matmuls (training ran ~20x slower in bf16 here); use model.dtype=auto or float32"
            )
        return HardwareDecision(
            device="cpu",
            backend="peft",
            dtype="float32",
            load_in_4bit=False,
            reason="no CUDA device: transformers + PEFT in float32 (no native bf16 on CPU)",
        )

    dtype: Dtype
    if cfg.model.dtype == "auto":
        dtype = "bfloat16" if hw.cuda_bf16 else "float16"
    elif cfg.model.dtype == "bfloat16" and not hw.cuda_bf16:
        raise ConfigError(f"model.dtype='bfloat16' but {hw.gpu_name} does not support bf16")
    else:
        dtype = cfg.model.dtype
    if cfg.model.load_in_4bit and not hw.bitsandbytes_installed:
        raise ConfigError(
            "model.load_in_4bit=true needs bitsandbytes: pip install 'slothflow[gpu]'"
        )
    if want == "unsloth" and not hw.unsloth_installed:
        raise ConfigError(
            "train.backend='unsloth' but unsloth is not installed: pip install 'slothflow[gpu]'"
        )
    gpu = f"{hw.gpu_name} ({hw.gpu_memory_gb} GiB)"
    if want == "peft":
        backend: Backend = "peft"
        reason = f"CUDA {gpu}: transformers + PEFT as configured (train.backend=peft), {dtype}"
    elif hw.unsloth_installed:
        backend = "unsloth"
        reason = f"CUDA {gpu} and Unsloth installed: Unsloth kernels, {dtype}"
    else:
        backend = "peft"
        reason = f"CUDA {gpu} but Unsloth not installed: transformers + PEFT, {dtype}"
    return HardwareDecision(
        device="cuda",
        backend=backend,
        dtype=dtype,
        load_in_4bit=cfg.model.load_in_4bit,
        reason=reason,
        gpu_name=hw.gpu_name,
        gpu_memory_gb=hw.gpu_memory_gb,
    )


#: Model types for which Unsloth's ``FastLanguageModel`` has its own fused kernels
#: (unsloth 2026.10.9, ``unsloth/models/loader.py``). Any other type Unsloth would hand
#: to its generic ``FastModel`` compile path, which we have not verified.
UNSLOTH_MODEL_TYPES = frozenset({"llama", "mistral", "gemma", "gemma2", "qwen2", "qwen3"})


def for_model(requested: str, hw: HardwareDecision, model_type: str) -> HardwareDecision:
    """Refine the run's decision once the base model's architecture is known.

    Unsloth was chosen before the base stage resolved the model; an architecture it has
    no kernels for falls back to PEFT under ``train.backend=auto`` (reason recorded), and
    is an error when Unsloth was asked for explicitly. ``requested`` is ``train.backend``.
    """
    if hw.backend != "unsloth" or model_type in UNSLOTH_MODEL_TYPES:
        return hw
    why = (
        f"Unsloth has no kernels for model_type {model_type!r} "
        f"(supported: {', '.join(sorted(UNSLOTH_MODEL_TYPES))})"
    )
    if requested == "unsloth":
        raise ConfigError(f"train.backend='unsloth' but {why}; use train.backend=auto or peft")
    return replace(hw, backend="peft", reason=f"{hw.reason}; then {why}: transformers + PEFT")


# --------------------------------------------------------------------------- Unsloth import


class BackendNotReadyError(ConfigError):
    """The hardware decision chose a backend this machine cannot train with."""


def import_unsloth() -> Any:
    """Import Unsloth; call it before transformers, PEFT and TRL are used.

    Unsloth patches those libraries when imported (its trainer and kernels); imported
    after them it still works but warns that some optimisations are missing. GPU only:
    on a CPU without AVX-512 the import kills the process (SIGILL), hence no module-level
    import anywhere.
    """
    try:
        import unsloth
    except ImportError as err:
        raise BackendNotReadyError(
            f"the Unsloth backend needs the unsloth package ({err}); "
            "pip install 'slothflow[gpu]' or set train.backend=peft"
        ) from err
    return unsloth


# --------------------------------------------------------------------------- GPU memory
# torch keeps one peak-allocation counter per process; training resets it per logging
# window (its per-window metric). Windows fold their peak in here before each reset, so
# the stage's peak (``run.stage`` logs it) survives them.
_gpu_high_water = 0


def _cuda_in_use() -> Any:
    """torch, when this process has already put something on a GPU; else None (never
    imports torch or starts CUDA just to ask)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch


def start_gpu_peak() -> None:
    """A stage starts: its peak GPU memory counts from now."""
    global _gpu_high_water
    _gpu_high_water = 0
    if torch := _cuda_in_use():
        torch.cuda.reset_peak_memory_stats()


def reset_gpu_window() -> None:
    """Start a new peak window (training's per-log metric), keeping the stage's peak."""
    global _gpu_high_water
    if torch := _cuda_in_use():
        _gpu_high_water = max(_gpu_high_water, torch.cuda.max_memory_allocated())
        torch.cuda.reset_peak_memory_stats()


def gpu_peak_gb() -> float | None:
    """Peak allocated GPU memory since :func:`start_gpu_peak`, in GiB; None when this
    process never used a GPU."""
    torch = _cuda_in_use()
    if torch is None:
        return _gpu_high_water / 2**30 if _gpu_high_water else None
    return max(_gpu_high_water, torch.cuda.max_memory_allocated()) / 2**30
