"""GPU merge: a trained LoRA adapter folded into its base, saved as 16-bit safetensors.

For the export stage on CUDA (issue 6 calls :func:`merge_16bit`). Unsloth's
``save_pretrained_merged(save_method="merged_16bit")`` reads the base's original
16-bit weights from disk (not the 4-bit copy the adapter was trained against), adds
the adapter's scaled ``B @ A`` to each targeted projection and writes ordinary
safetensors plus the tokenizer: a folder that plain ``transformers`` (and vLLM) loads
with no PEFT and no Unsloth. Verified on an H200 by ``tests/test_train_gpu.py``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from tasks.core.hardware import import_unsloth, reset_gpu_window
from tasks.core.models import LOAD_KWARGS
from tasks.core.refs import BaseModelRef

log = logging.getLogger(__name__)


def _adapter_for_base(adapter_dir: Path, base: BaseModelRef, work: Path) -> Path:
    """A copy of the adapter whose config names ``base`` as it is on this machine.

    PEFT records the base by the path it was loaded from at training time; the merge
    must read the very base the :class:`BaseModelRef` names, wherever it now lives.
    """
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(adapter_dir, work)
    cfg_path = work / "adapter_config.json"
    blob = json.loads(cfg_path.read_text(encoding="utf-8"))
    blob["base_model_name_or_path"] = base.name_or_path
    cfg_path.write_text(json.dumps(blob, indent=2), encoding="utf-8")
    return work


def merge_16bit(
    base: BaseModelRef,
    adapter_dir: str | Path,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    dtype: str = "bfloat16",
    max_seq_length: int = 2048,
) -> dict[str, Any]:
    """Merge ``adapter_dir`` into ``base`` on the GPU; write ``out_dir`` atomically.

    ``dtype`` is the merged weights' dtype (``bfloat16`` or ``float16``). Returns what
    happened: the output folder, its files, seconds and peak GPU memory.
    """
    if dtype not in ("bfloat16", "float16"):
        raise ValueError(
            f"Unsloth's merged save writes bfloat16 or float16, not {dtype!r}; PEFT's merge "
            "(tasks.export.merge_peft) merges an Unsloth adapter in any dtype"
        )
    import_unsloth()
    import torch
    from transformers import AutoTokenizer
    from unsloth import FastLanguageModel

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.work"
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    reset_gpu_window()  # this merge's own peak, keeping the stage's
    try:
        adapter = _adapter_for_base(Path(adapter_dir), base, work / "adapter")
        model, _ = FastLanguageModel.from_pretrained(
            model_name=str(adapter),
            max_seq_length=max_seq_length,
            dtype=getattr(torch, dtype),
            load_in_4bit=True,  # the merge reads the 16-bit originals; 4-bit saves memory
            **LOAD_KWARGS,
        )
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), **LOAD_KWARGS)
        model.save_pretrained_merged(
            str(tmp),
            tokenizer,
            save_method="merged_16bit",
            temporary_location=str(work / "buffers"),
        )
        del model
        cast_saved(tmp, dtype)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    info = {
        "path": str(out),
        "files": sorted(p.name for p in out.iterdir()),
        "seconds": time.perf_counter() - t0,
        "peak_gpu_mem_gb": torch.cuda.max_memory_allocated() / 2**30,
    }
    log.info("merged %s into %s in %.1f s", adapter_dir, out, info["seconds"])
    return info


def saved_dtype(folder: str | Path) -> str | None:
    """The dtype a saved model's ``config.json`` declares (transformers 5: ``dtype``)."""
    blob = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    value = blob.get("dtype") or blob.get("torch_dtype")
    return str(value) if value else None


def cast_saved(folder: Path, dtype: str) -> bool:
    """Re-save the model in ``folder`` in ``dtype`` when it was saved in another one.

    Unsloth's merged save folds the adapter into the base's weights as they are stored
    on disk: a float32 base (the embedded default's) comes out float32 whatever dtype
    was asked for (seen on the H200). The export's manifest and vLLM's ``--dtype``
    promise the asked dtype, so the weights are cast once, here, before the folder is
    renamed into place. The tokenizer and generation files stay as the merge wrote them.
    Returns whether it cast.
    """
    import torch
    from transformers import AutoModelForCausalLM

    have = saved_dtype(folder)
    if have == dtype:
        return False
    log.info("merge: Unsloth saved %s weights; casting them to %s", have, dtype)
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=getattr(torch, dtype), use_safetensors=True, **LOAD_KWARGS
    )
    cast = folder.parent / f".{folder.name}.cast"
    shutil.rmtree(cast, ignore_errors=True)
    model.save_pretrained(cast, safe_serialization=True)
    del model
    for old in folder.glob("*.safetensors*"):
        old.unlink()
    for new in cast.iterdir():
        if new.name == "config.json" or new.name.startswith("model"):
            shutil.move(str(new), folder / new.name)
    shutil.rmtree(cast, ignore_errors=True)
    return True
