"""Stage ``train`` on CUDA with the Unsloth backend (marked ``gpu``: skipped without CUDA).

Run on the GPU device with the kit that ``make gpu-kit`` builds here (``.gpu/``, carried;
it holds everything these tests import, MLflow and orjson included):

    source .gpu/setup.sh && python3 -m pytest tests/test_train_gpu.py -m gpu -v

Everything here is real: the hardware decision comes from probing the machine, models
are built on the device (no download), Unsloth and bitsandbytes do the work. Numbers,
not "it ran": each test asserts losses, memory, MFU, step counts or logit parity, and
prints what it measured (``-s`` shows it; the device log keeps it).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bench.sample_data import write_split
from tasks.base_model import prepare_base
from tasks.core.config import PipelineConfig, load_config
from tasks.core.hardware import HardwareDecision, decide, probe
from tasks.core.home import Home
from tasks.core.refs import BaseModelRef, DataRef, TrainRef
from tests.conftest import REPO
from tests.recording import RecordingTracker
from tests.train_fixtures import run_train

pytestmark = pytest.mark.gpu

# The embedded default recipe, shortened: 60 steps of batch 32 on the topic task.
TINY_SETS = [
    "train.max_steps=60",
    "train.eval_steps=30",
    "train.save_steps=30",
    "train.logging_steps=5",
    "train.sample_generations=2",
    # the recipe says "off" (for CPU); on the GPU let the stage size it
    "train.gradient_checkpointing=auto",
]
QLORA_1B_SETS = [
    "model.load_in_4bit=true",
    "train.optimizer=paged_adamw_8bit",
    "train.lora.r=16",
    "train.lora.alpha=16",
    "train.lora.use_rslora=true",
    "train.learning_rate=1e-3",
    "train.micro_batch_size=16",
    "train.gradient_checkpointing=unsloth",
    "train.max_steps=40",
    "train.eval_steps=20",
    "train.save_steps=20",
    "train.logging_steps=2",
    "train.sample_generations=1",
]


@pytest.fixture(scope="module", autouse=True)
def unsloth_first() -> None:
    """Unsloth patches transformers/PEFT/TRL when imported: import it before they are."""
    from tasks.core.hardware import import_unsloth

    import_unsloth()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> DataRef:
    return write_split(tmp_path_factory.mktemp("data"))


def _hw(cfg: PipelineConfig) -> HardwareDecision:
    hw = decide(cfg, probe())
    assert hw.device == "cuda" and hw.backend == "unsloth", hw
    return hw


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _report(name: str, **numbers: Any) -> None:
    print(f"\nGPU-TEST {name}: " + json.dumps(numbers, default=str), flush=True)


# --------------------------------------------------------------------------- embedded default


@pytest.fixture(scope="module")
def tiny_run(
    session_home: Home, data: DataRef, tmp_path_factory: pytest.TempPathFactory
) -> tuple[TrainRef, RecordingTracker, HardwareDecision, float]:
    cfg = load_config("default", TINY_SETS)
    hw = _hw(cfg)
    base = prepare_base(cfg.model, session_home)
    rec = RecordingTracker()
    t0 = time.perf_counter()
    ref = run_train(cfg, base, data, tmp_path_factory.mktemp("tiny"), hw, rec)
    return ref, rec, hw, time.perf_counter() - t0


def test_unsloth_fine_tunes_the_embedded_default(
    tiny_run: tuple[TrainRef, RecordingTracker, HardwareDecision, float],
) -> None:
    ref, rec, hw, wall = tiny_run
    losses = [v for _, v in rec.series("train_loss")]
    evals = rec.series("eval_loss")
    _report(
        "embedded",
        hw=hw.reason,
        wall_s=round(wall, 1),
        losses=[round(x, 3) for x in losses],
        evals=evals,
        tokens_per_s=[round(v) for _, v in rec.series("tokens_per_s")],
        peak_gb=ref.metrics.get("gpu_peak_mem_gb"),
        gc=rec.tags.get("slothflow.gradient_checkpointing_reason"),
        samples=rec.dicts.get("samples/step-000060.json"),
    )
    assert ref.backend == "unsloth" and rec.params["train.backend"] == "unsloth"
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    # a random 2-layer base: LoRA alone must carry the task; the loss falls by > 1 nat
    assert _mean(losses[-3:]) < _mean(losses[:3]) - 1.0, losses
    assert [s for s, _ in evals] == [30, 60]
    assert evals[1][1] < evals[0][1], evals
    assert ref.best_step == min(evals, key=lambda e: e[1])[0]
    # the GPU measurements reach the tracker at every logging step
    for key in ("gpu_peak_mem_gb", "gpu_peak_reserved_gb", "tokens_per_s"):
        assert len(rec.series(key)) == 12, key
    assert all(0 < v < 140 for _, v in rec.series("gpu_peak_mem_gb"))
    # seq 128 on the H200: the activations fit, so 'auto' turns checkpointing off
    assert rec.tags["slothflow.gradient_checkpointing"] == "off"
    assert rec.tags["slothflow.gradient_checkpointing_reason"].endswith("off, no recompute")
    assert {"samples/step-000030.json", "samples/step-000060.json"} <= set(rec.dicts)


# --------------------------------------------------------------------------- Llama-3.2-1B shape


@pytest.fixture(scope="module")
def base_1b(session_home: Home) -> BaseModelRef:
    """A random-weight Llama-3.2-1B-shaped model over the embedded tokenizer (its few
    hundred ids are a subset of the 128,256), built on the spot by the base stage:
    ``embedded:llama-3.2-1b`` (tasks/core/embedded.py, configs/gpu-1b.yaml)."""
    from safetensors import safe_open

    cfg = load_config("default", ["model.name_or_path=embedded:llama-3.2-1b", *QLORA_1B_SETS])
    ref = prepare_base(cfg.model, session_home)
    n = 0
    for shard in Path(ref.name_or_path).glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            n += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118
    _report("build-1b", params=n)
    assert 1.2e9 < n < 1.3e9
    return ref


@pytest.fixture(scope="module")
def run_1b(
    base_1b: BaseModelRef, data: DataRef, tmp_path_factory: pytest.TempPathFactory
) -> tuple[TrainRef, RecordingTracker, PipelineConfig]:
    cfg = load_config("default", [f"model.name_or_path={base_1b.name_or_path}", *QLORA_1B_SETS])
    rec = RecordingTracker()
    ref = run_train(cfg, base_1b, data, tmp_path_factory.mktemp("qlora-1b"), _hw(cfg), rec)
    return ref, rec, cfg


def test_unsloth_qlora_learns_on_a_llama_1b_shape(
    run_1b: tuple[TrainRef, RecordingTracker, PipelineConfig],
) -> None:
    ref, rec, _cfg = run_1b
    losses = [v for _, v in rec.series("train_loss")]
    mfu = [v for _, v in rec.series("mfu")]
    _report(
        "qlora-1b",
        losses=[round(x, 3) for x in losses],
        evals=rec.series("eval_loss"),
        tokens_per_s=[round(v) for _, v in rec.series("tokens_per_s")],
        mfu=[round(v, 4) for v in mfu],
        peak_gb=ref.metrics.get("gpu_peak_mem_gb"),
        trainable=rec.params["train.trainable_params"],
        gc=rec.tags.get("slothflow.gradient_checkpointing_reason"),
    )
    assert ref.backend == "unsloth"
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    # starts near ln(128256) = 11.76 (random logits); the topic answers are learnable
    assert losses[0] > 9.0, losses
    assert _mean(losses[-3:]) < _mean(losses[:3]) - 3.0, losses
    evals = [v for _, v in rec.series("eval_loss")]
    assert len(evals) == 2 and evals[-1] < losses[0] - 3.0, evals
    # LoRA r=16 on the seven projections of 16 layers: 16 * 16 * (2048*7 ... ) = 11.3M
    assert rec.params["train.trainable_params"] == 16 * 16 * (
        (2048 + 2048) + 2 * (2048 + 512) + (2048 + 2048) + 2 * (2048 + 8192) + (8192 + 2048)
    )
    # 4-bit 1B: weights ~1 GB; the whole run stays far below a 16-bit load's footprint
    assert 0.5 < ref.metrics["gpu_peak_mem_gb"] < 20, ref.metrics
    assert mfu and all(0 < v < 1 for v in mfu)
    assert rec.tags["slothflow.gradient_checkpointing"] == "unsloth"


def test_merged_16bit_save_reloads_in_plain_transformers(
    base_1b: BaseModelRef,
    run_1b: tuple[TrainRef, RecordingTracker, PipelineConfig],
    data: DataRef,
    tmp_path: Path,
) -> None:
    """Unsloth's merged 16-bit save of the QLoRA adapter, loaded by transformers alone
    (a fresh process without Unsloth), against the base + adapter through PEFT."""
    from tasks.export.gpu_merge import merge_16bit

    ref, _rec, _cfg = run_1b
    info = merge_16bit(
        base_1b, ref.adapter_path, ref.tokenizer_path, tmp_path / "merged", "bfloat16", 128
    )
    _report("merge", **info)
    assert any(f.endswith(".safetensors") for f in info["files"]), info
    assert "adapter_config.json" not in info["files"]
    rows = [json.loads(x) for x in Path(data.validation_path).read_text().splitlines()[:8]]
    probe_file = tmp_path / "probe.json"
    probe_file.write_text(json.dumps([r["messages"] for r in rows]))
    code = _PARITY_SCRIPT.format(
        merged=info["path"],
        base=base_1b.name_or_path,
        adapter=ref.adapter_path,
        tok=ref.tokenizer_path,
        probe=str(probe_file),
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # no Unsloth there
    env["PYTHONPATH"] = ":".join(
        p for p in os.environ.get("PYTHONPATH", "").split(":") if p and "site" not in p
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    _report("merge-parity", **result)
    assert result["unsloth_imported"] is False
    assert result["merged_dtype"] in ("torch.bfloat16", "torch.float16")
    # the merged bf16 weights differ from W + BA only by rounding: logits agree closely
    assert result["rel_err"] < 2e-2, result
    assert result["argmax_agree"] >= 0.97, result
    assert result["greedy_equal"] >= result["prompts"] - 1, result


_PARITY_SCRIPT = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
tok = AutoTokenizer.from_pretrained({tok!r})
merged = AutoModelForCausalLM.from_pretrained({merged!r}, device_map={{"": 0}})
merged_dtype = str(merged.dtype)
merged = merged.float().eval()
ref = AutoModelForCausalLM.from_pretrained({base!r}, dtype=torch.float32, device_map={{"": 0}})
ref = PeftModel.from_pretrained(ref, {adapter!r}).eval()
msgs = json.load(open({probe!r}))
num = den = agree = total = greedy = 0.0
for m in msgs:
    enc = tok.apply_chat_template(m[:-1], add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True).to("cuda")
    with torch.no_grad():
        a = merged(**enc).logits.float()
        b = ref(**enc).logits.float()
        ga = merged.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        gb = ref.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    num += (a - b).pow(2).sum().item(); den += b.pow(2).sum().item()
    agree += (a.argmax(-1) == b.argmax(-1)).sum().item(); total += a.shape[1]
    greedy += bool(torch.equal(ga, gb))
print(json.dumps({{"rel_err": (num / den) ** 0.5, "argmax_agree": agree / total,
                  "greedy_equal": greedy, "prompts": len(msgs), "merged_dtype": merged_dtype,
                  "unsloth_imported": "unsloth" in sys.modules}}))
"""


# --------------------------------------------------------------------------- kill and resume

RESUME_SETS = [
    "train.max_steps=12",
    "train.eval_steps=3",
    "train.save_steps=3",
    "train.logging_steps=1",
    "train.sample_generations=0",
]


def _child(argv: list[str]) -> None:
    """``python -m tests.test_train_gpu child BASE DATA OUT``: train, and SIGKILL this very
    process (no clean-up, no flush) once checkpoint-6 is committed and step 7 reached
    the tracker: a GPU step of this model takes milliseconds, too fast to aim a kill
    from outside."""
    import threading

    from tasks.core.hardware import import_unsloth
    from tasks.train import COMPLETE_MARKER

    import_unsloth()
    base = BaseModelRef.model_validate_json(Path(argv[0]).read_text())
    data = DataRef.model_validate_json(Path(argv[1]).read_text())
    out = Path(argv[2])
    cfg = load_config("default", RESUME_SETS)

    def killer() -> None:
        marker = out / "checkpoints" / "checkpoint-6" / COMPLETE_MARKER
        journal = out / "tracked_steps.jsonl"
        while True:
            if marker.exists() and journal.exists() and '"step": 7' in journal.read_text():
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.001)

    threading.Thread(target=killer, daemon=True).start()
    run_train(cfg, base, data, out, decide(cfg, probe()))
    raise SystemExit(3)  # finished without being killed: the test fails on this code


def test_kill_and_resume_on_gpu(session_home: Home, data: DataRef, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from tasks.train import COMPLETE_MARKER

    cfg = load_config("default", RESUME_SETS)
    base = prepare_base(cfg.model, session_home)
    (tmp_path / "base.json").write_text(base.model_dump_json())
    (tmp_path / "data.json").write_text(data.model_dump_json())
    out = tmp_path / "killed"
    child = subprocess.run(
        [
            sys.executable,
            *("-m", "tests.test_train_gpu", "child"),
            *(str(tmp_path / "base.json"), str(tmp_path / "data.json"), str(out)),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == -signal.SIGKILL, child.stdout[-2000:] + child.stderr[-3000:]
    assert (out / "checkpoints" / "checkpoint-6" / COMPLETE_MARKER).exists()
    assert not (out / "checkpoints" / "checkpoint-12" / COMPLETE_MARKER).exists()
    assert not (out / "adapter").exists()

    resumed_rec = RecordingTracker()
    resumed = run_train(cfg, base, data, out, _hw(cfg), resumed_rec)
    whole_rec = RecordingTracker()
    whole = run_train(cfg, base, data, tmp_path / "whole", _hw(cfg), whole_rec)

    a = load_file(str(Path(resumed.adapter_path) / "adapter_model.safetensors"))
    b = load_file(str(Path(whole.adapter_path) / "adapter_model.safetensors"))
    num = sum(float((a[k].float() - b[k].float()).pow(2).sum()) for k in a)
    den = sum(float(b[k].float().pow(2).sum()) for k in b)
    rel = math.sqrt(num / den)
    resumed_losses = dict(resumed_rec.series("train_loss"))
    whole_losses = dict(whole_rec.series("train_loss"))
    loss_gap = max(abs(resumed_losses[s] - whole_losses[s]) for s in resumed_losses)
    _report(
        "resume",
        resumed_from=resumed.metrics["resumed_from_step"],
        adapter_rel_diff=rel,
        max_loss_gap=loss_gap,
        resumed_steps=sorted(resumed_losses),
        best=(resumed.best_step, whole.best_step),
        eval=(resumed.metrics["best_eval_loss"], whole.metrics["best_eval_loss"]),
    )
    assert 6 <= resumed.metrics["resumed_from_step"] < 12
    assert resumed.metrics["global_step"] == 12 == whole.metrics["global_step"]
    # the resumed attempt trained from the checkpoint on, and logged only the steps the
    # killed one had not logged already
    assert min(resumed_losses) > resumed.metrics["resumed_from_step"]
    assert max(resumed_losses) == 12
    assert a.keys() == b.keys() and a
    # GPU kernels (attention backward) are not bit-reproducible; the resumed adapter
    # still matches an uninterrupted run's to well under a percent
    assert rel < 1e-2, rel
    assert loss_gap < 1e-2, (resumed_losses, whole_losses)
    assert resumed.best_step == whole.best_step
    assert resumed.metrics["best_eval_loss"] == pytest.approx(
        whole.metrics["best_eval_loss"], rel=1e-2
    )


# --------------------------------------------------------------------------- out of memory


def test_cuda_oom_retries_once_then_names_the_knobs(
    base_1b: BaseModelRef, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A real CUDA OOM: 64 rows of ~1,000 tokens a micro-batch with checkpointing off
    needs ~100 GB of activations on the 1B shape, and a buffer leaves the run 8 GB."""
    import torch

    from tasks.train import TrainOutOfMemoryError

    data = _long_rows(tmp_path / "long")
    cfg = load_config(
        "default",
        [
            f"model.name_or_path={base_1b.name_or_path}",
            "model.load_in_4bit=true",
            "model.max_seq_length=1024",
            "train.micro_batch_size=64",
            "train.grad_accum=1",
            "train.max_steps=2",
            "train.gradient_checkpointing=off",
            "train.sample_generations=0",
            "train.assistant_only_loss=false",
        ],
    )
    free, _ = torch.cuda.mem_get_info()
    hog = torch.empty(free - 8 * 2**30, dtype=torch.uint8, device="cuda")
    try:
        with (
            caplog.at_level(logging.WARNING, logger="tasks.train"),
            pytest.raises(TrainOutOfMemoryError) as err,
        ):
            run_train(cfg, base_1b, data, tmp_path / "oom", _hw(cfg))
    finally:
        del hog
        torch.cuda.empty_cache()
    msg = str(err.value)
    _report("oom", message=msg, log=[r.getMessage() for r in caplog.records][-3:])
    assert "micro_batch_size 64 -> 32, grad_accum 1 -> 2" in caplog.text
    # the message is about the retried (halved) settings and names every knob
    for knob in (
        "train.micro_batch_size=32",
        "train.grad_accum=2",
        "model.max_seq_length=1024",
        "train.lora.r=",
        "train.gradient_checkpointing=unsloth",
    ):
        assert knob in msg, (knob, msg)
    free_after, _ = torch.cuda.mem_get_info()
    assert free_after > free - 4 * 2**30  # the failed attempts gave their memory back


def _long_rows(folder: Path, n: int = 256, words: int = 250) -> DataRef:
    """Rows of ~1,000 tokens (topic words) with a one-word answer: activations scale
    with the micro-batch, so memory is easy to aim at."""
    from tasks.train import data_ref_from_folder

    rows = []
    for i in range(n):
        text = " ".join(f"topic {j % 97} item {i}" for j in range(words))
        rows.append(
            {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "x"}]}
        )
    folder.mkdir(parents=True, exist_ok=True)
    for split, part in (("train", rows), ("validation", rows[:8])):
        with open(folder / f"{split}.jsonl", "w") as f:
            for r in part:
                f.write(json.dumps(r) + "\n")
    return data_ref_from_folder(folder)


def test_cuda_oom_retry_with_half_the_micro_batch_finishes_the_run(
    base_1b: BaseModelRef, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The retry that works: measure the peak of micro-batch 16, then leave the run room
    for 1.5x that. Micro-batch 32 (about twice the activations) runs out of memory, the
    stage retries with 16 x 2 accumulation (the same effective batch) and finishes."""
    import torch

    data = _long_rows(tmp_path / "long")
    sets = [
        f"model.name_or_path={base_1b.name_or_path}",
        "model.load_in_4bit=true",
        "model.max_seq_length=1024",
        "train.grad_accum=1",
        "train.max_steps=2",
        "train.eval_steps=2",
        "train.save_steps=2",
        "train.logging_steps=1",
        "train.gradient_checkpointing=off",
        "train.sample_generations=0",
        "train.assistant_only_loss=false",
    ]
    probe_cfg = load_config("default", [*sets, "train.micro_batch_size=16"])
    sized = run_train(probe_cfg, base_1b, data, tmp_path / "sizing", _hw(probe_cfg))
    peak16 = sized.metrics["gpu_peak_mem_gb"] * 2**30
    del sized
    gc.collect()  # the sizing run's model and trainer, before measuring what is free
    torch.cuda.empty_cache()

    cfg = load_config("default", [*sets, "train.micro_batch_size=32"])
    free, _ = torch.cuda.mem_get_info()
    room = int(1.5 * peak16)
    hog = torch.empty(free - room, dtype=torch.uint8, device="cuda")
    rec = RecordingTracker()
    try:
        with caplog.at_level(logging.WARNING, logger="tasks.train"):
            ref = run_train(cfg, base_1b, data, tmp_path / "retried", _hw(cfg), rec)
    finally:
        del hog
        torch.cuda.empty_cache()
    _report(
        "oom-retry-ok",
        peak_mb16_gb=round(peak16 / 2**30, 2),
        room_gb=round(room / 2**30, 2),
        retry=rec.tags.get("slothflow.oom_retry"),
        metrics={k: ref.metrics[k] for k in ("global_step", "oom_retry_micro_batch_size")},
        losses=[round(v, 3) for _, v in rec.series("train_loss")],
    )
    assert "micro_batch_size 32 -> 16, grad_accum 1 -> 2" in caplog.text
    assert rec.tags["slothflow.oom_retry"].startswith("micro_batch_size 32 -> 16")
    assert ref.metrics["oom_retry_micro_batch_size"] == 16
    assert ref.metrics["global_step"] == 2
    assert all(math.isfinite(v) for _, v in rec.series("train_loss"))
    assert (Path(ref.adapter_path) / "adapter_model.safetensors").exists()


# --------------------------------------------------------------------------- PEFT fallback


def test_auto_falls_back_to_peft_for_an_architecture_unsloth_lacks(
    session_home: Home, data: DataRef, tmp_path: Path
) -> None:
    """An OLMo-2 model (random weights, built here, the embedded tokenizer): Unsloth has
    no kernels for it, so ``train.backend=auto`` trains it with transformers + PEFT on
    the GPU, says why, and still learns."""
    import torch
    from transformers import AutoTokenizer, Olmo2Config, Olmo2ForCausalLM

    tiny = prepare_base(load_config("default").model, session_home)
    tok = AutoTokenizer.from_pretrained(tiny.tokenizer_path)
    folder = tmp_path / "olmo2"
    config = Olmo2Config(
        vocab_size=len(tok),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    Olmo2ForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    cfg = load_config("default", [f"model.name_or_path={folder}", *TINY_SETS])
    hw = _hw(cfg)  # before the architecture is known: Unsloth
    base = prepare_base(cfg.model, session_home)
    rec = RecordingTracker()
    ref = run_train(cfg, base, data, tmp_path / "train", hw, rec)
    losses = [v for _, v in rec.series("train_loss")]
    _report(
        "peft-fallback",
        reason=rec.params["train.backend_reason"],
        losses=[round(x, 3) for x in losses],
        evals=rec.series("eval_loss"),
        gc=rec.tags.get("slothflow.gradient_checkpointing_reason"),
        peak_gb=ref.metrics.get("gpu_peak_mem_gb"),
    )
    assert ref.backend == "peft" and rec.params["train.backend"] == "peft"
    assert rec.params["train.device"] == "cuda"
    assert "Unsloth has no kernels for model_type 'olmo2'" in rec.params["train.backend_reason"]
    assert len(losses) == 12 and _mean(losses[-3:]) < _mean(losses[:3]) - 1.0, losses
    # PEFT on CUDA under 'auto': checkpointing on (the safe default there)
    assert rec.tags["slothflow.gradient_checkpointing"] == "on"
    assert 0 < ref.metrics["gpu_peak_mem_gb"] < 10


# --------------------------------------------------------------------------- export on the GPU


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_export_stage_merges_an_unsloth_adapter_on_the_gpu(
    tiny_run: tuple[TrainRef, RecordingTracker, HardwareDecision, float],
    data: DataRef,
    tmp_path: Path,
    dtype: str,
) -> None:
    """The export stage itself on CUDA: bfloat16 goes through Unsloth's merged 16-bit save,
    float32 (the default recipe's) through PEFT's merge in float32; either way the merged
    folder passes the stage's parity check against base + adapter and its stop check."""
    from tasks.core.artifacts import MANIFEST, read_manifest
    from tasks.export import export
    from tasks.export.gpu_merge import saved_dtype

    ref, _rec, hw, _wall = tiny_run
    cfg = load_config("default", [*TINY_SETS, f"export.dtype={dtype}", "export.stop_check=warn"])
    out = export(
        cfg.export,
        ref,
        data,
        tmp_path / "export",
        hw,
        served_model_name=cfg.tracking.registered_model,
        max_new_tokens=cfg.eval.max_new_tokens,
        max_seq_length=cfg.model.max_seq_length,
        run_id="gpu-test",
        code_version="test",
    )
    merged = Path(out.merged_path or "")
    manifest = read_manifest(merged)
    _report(
        f"export-{dtype}",
        parity=out.parity_max_abs_diff,
        atol=out.parity_atol,
        stop_fraction=out.stop_fraction,
        merge_s=out.metrics.get("export.merge_seconds"),
        files=sorted(p.name for p in merged.iterdir()),
    )
    assert (merged / MANIFEST).exists() and manifest["kind"] == "merged"
    assert any(p.suffix == ".safetensors" for p in merged.iterdir())
    assert not (merged / "adapter_config.json").exists()
    assert out.parity_max_abs_diff is not None and out.parity_max_abs_diff <= out.parity_atol
    # the embedded base is stored in float32: Unsloth's merge keeps that, merge_16bit casts
    assert saved_dtype(merged) == dtype
    assert manifest["dtype"] == dtype and manifest["run_id"] == "gpu-test"


# --------------------------------------------------------------------------- MLflow system metrics


def test_mlflow_records_gpu_system_metrics_while_training(
    session_home: Home, data: DataRef, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stage's MLflow run gets MLflow's own GPU system metrics (utilisation, memory)
    sampled while the trainer runs, beside the training metrics (MLflow carried to the
    device as wheels, a SQLite store in the test's folder)."""
    pytest.importorskip("mlflow", reason="MLflow comes with the GPU kit: make gpu-kit")
    from mlflow.tracking import MlflowClient

    from tasks import train as train_mod
    from tasks.core.tracking import MlflowTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("gpu", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(exp).info.run_id
    monkeypatch.setattr(train_mod, "SYSTEM_METRICS_INTERVAL_S", 1.0)
    cfg = load_config("default", TINY_SETS)
    base = prepare_base(cfg.model, session_home)
    t0 = time.perf_counter()
    run_train(cfg, base, data, tmp_path / "train", _hw(cfg), MlflowTracker(uri, run_id))
    wall = time.perf_counter() - t0
    keys = set(client.get_run(run_id).data.metrics)
    util = client.get_metric_history(run_id, "system/gpu_0_utilization_percentage")
    mem = client.get_metric_history(run_id, "system/gpu_0_memory_usage_megabytes")
    _report(
        "mlflow-system-metrics",
        wall_s=round(wall, 1),
        system_keys=sorted(k for k in keys if k.startswith("system/")),
        gpu_util=[m.value for m in util],
        gpu_mem_mb=[m.value for m in mem],
    )
    assert len(util) >= 2 and max(m.value for m in util) > 0, util
    assert mem and max(m.value for m in mem) > 100, mem
    assert len(client.get_metric_history(run_id, "train_loss")) == 12
    assert {"gpu_peak_mem_gb", "tokens_per_s", "eval_loss"} <= keys


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
    _child(sys.argv[2:])
