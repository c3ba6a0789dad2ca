"""Benchmark: the project's training stage on a random-weight Llama-3-8B shape, on CUDA,
beside ``baseline_bench.py``'s raw Unsloth and HF QLoRA arms, in one call.

On the GPU device, with the kit that ``make gpu-kit`` builds here (``.gpu/``, carried;
it holds ``baseline_bench.py`` with ``bench/baseline_bench.patch`` applied). One command
per measurement, each fitting one 10-minute call (results in ``$OUT/bench``)::

    # the three ratios: best setting and equal setting vs raw Unsloth, vs HF QLoRA (~9 min)
    source .gpu/setup.sh && python3 bench/train_gpu.py all
    # checkpointing off on both sides (what 'auto' picks on the H200) (~5 min)
    source .gpu/setup.sh && python3 bench/train_gpu.py all --arms base:unsloth_nogc,project:auto
    # what TRL's fused LM head costs the stage (~5 min)
    source .gpu/setup.sh && python3 bench/train_gpu.py all --arms project:unsloth,project:unsloth:trl

Every arm runs in its own process (clean memory statistics) on the same model folder
(``baseline_bench.py make --shape 8b``: random bf16 weights, a word-level tokenizer)
and sequence length (2048). A ``project:GC`` arm runs the real stage functions,
``prepare_base`` + ``tasks.train.train`` with the ``llama3-8b-qlora`` recipe, shortened
to a few optimizer steps, with ``train.gradient_checkpointing=GC``: Unsloth loader, TRL
``SFTTrainer``, torch AdamW, the tracker callback, checkpoints off (steps past the
run), one evaluation and the adapter export at the end. Its rows are random words of
the tokenizer, each cut at 2048 tokens, so every micro-batch is 4 x 2048 real tokens
like the baseline's (no padding, no packing) and the loss is on every token
(``assistant_only_loss=false``), as the baseline's ``labels=input_ids``.

tokens/s of a project arm: tokens of the optimizer steps after the first four (compile
and warm-up; 16 micro-batches measured), over the wall time between the tracker's log
calls that close them (``wall``), and over the stage's own busy time inside those steps
(``busy``, from CUDA events). Both include everything the stage does per step
(callbacks, logging). The arm logs every 4 steps (``--log-every``; the recipe's default
is 10): a log is a host sync (the trainer reads the loss), and logging every step, as
this bench did until 2026-12-04, drained the GPU once per optimizer step, a cost a
real run pays once per ``train.logging_steps``. ``project:GC:trl``
is the same arm with ``train.token_metrics=true`` (TRL's fused LM head computes the
loss, entropy and token accuracy, with its host syncs): the cost of that head;
``project:GC:padded`` sets ``train.padding_free=off`` (padded batches: on the H200 Unsloth
otherwise picks padding-free, whose variable-length path skips its compiled decoder blocks).
``base:unsloth_nogc`` is raw Unsloth with gradient checkpointing off, an arm the kit's
``baseline_bench.py`` gets from ``bench/baseline_bench.patch``
(``patch .gpu/baseline_bench.py bench/baseline_bench.patch``): beside
``project:auto`` (which turns checkpointing off on the H200) it is the same-setting
comparison for the setting the stage actually runs with. The same patch makes
``PROFILE_OUT=FILE`` write a ``torch.profiler`` table of four measured micro-batches of
a raw arm; ``project --profile FILE`` does it for one optimizer step of the stage.

Writes ``OUT/train_gpu-<UTC time>.json`` with the date, the device, every arm's numbers
and the top-level ratios; prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tasks.train import PEAK_FLOPS  # noqa: E402 (after the path; imports no transformers)

#: Arm suffixes (``project:GC:VARIANT``): the stage with one setting changed.
#: ``trl``: TRL's fused LM head for the loss plus its entropy/accuracy metrics (the
#: stage's behaviour before it used the model's own loss), to measure what it costs.
#: ``padded``: padded batches instead of the padding-free ones Unsloth picks on an H200
#: (whose variable-length path skips its compiled decoder blocks).
VARIANTS = {
    "trl": "train.token_metrics=true",
    "padded": "train.padding_free=off",
    # the seed tutorial's paged 8-bit AdamW instead of the recipe's torch AdamW (1.5%
    # slower on an H100: train_gpu-optimizer-ablation-20261207T170942Z.json, whose
    # arms were named before the recipe changed: project:unsloth there is this variant)
    "paged8bit": "train.optimizer=paged_adamw_8bit",
}

MODELS_DIR = Path(os.environ.get("GP_MODELS", "/tmp/gp_models"))
SEQ = 2048
# Renders the rows' words as they are: no role tokens, nothing the word-level
# tokenizer would not know. The loss is on every token, so no generation markers.
TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['content'] }} {% endfor %}"


class TimedTracker:
    """A tracker that keeps metrics in memory with the wall time of each call."""

    def __init__(self) -> None:
        self.metrics: list[tuple[int | None, float, dict[str, float]]] = []
        self.params: dict[str, Any] = {}
        self.tags: dict[str, str] = {}

    def log_params(self, params: Any) -> None:
        self.params.update(params)

    def log_metrics(
        self, metrics: Any, step: int | None = None, timestamp_ms: int | None = None
    ) -> None:
        self.metrics.append((step, time.perf_counter(), dict(metrics)))

    def log_artifact(self, path: Any, artifact_path: str | None = None) -> None:
        pass

    def log_dict(self, obj: Any, name: str) -> None:
        pass

    def log_text(self, text: str, name: str) -> None:
        pass

    def set_tags(self, tags: Any) -> None:
        self.tags.update(tags)

    def log_input(self, *args: Any, **kwargs: Any) -> None:
        pass

    def system_metrics(self, interval_s: float) -> Any:
        import contextlib

        return contextlib.nullcontext()  # no sampler thread beside the measured steps

    def train_steps(self) -> list[tuple[int, float, dict[str, float]]]:
        return [(s, t, m) for s, t, m in self.metrics if s is not None and "train_loss" in m]


def _rows(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [f"w{rng.randrange(1020)}" for _ in range(SEQ + 64)]
        half = len(words) // 2
        out.append(
            {
                "messages": [
                    {"role": "user", "content": " ".join(words[:half])},
                    {"role": "assistant", "content": " ".join(words[half:])},
                ]
            }
        )
    return out


def _write_split(folder: Path, n_train: int, n_val: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", _rows(n_train, 1234)), ("validation", _rows(n_val, 99))):
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


# --------------------------------------------------------------------------- one project arm


def cmd_project(a: argparse.Namespace) -> None:
    from tasks.core.hardware import import_unsloth

    import_unsloth()  # before transformers, as the stage does on CUDA
    import torch

    from tasks.base_model import prepare_base
    from tasks.core import home as home_mod
    from tasks.core.config import config_hash, dump_config, load_config
    from tasks.core.hardware import decide, probe
    from tasks.train import activation_bytes, data_ref_from_folder, flops_per_token, train

    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="slothflow-bench-gpu-"))
    home = home_mod.activate(work / "home")
    (work / "template.jinja").write_text(TEMPLATE)
    base_sets = [
        f"model.name_or_path={a.model}",
        "model.revision=null",
        f"model.chat_template={work / 'template.jinja'}",
        f"model.max_seq_length={SEQ}",
    ]
    overrides = [
        f"train.max_steps={a.steps}",
        "train.num_epochs=1",
        f"train.logging_steps={a.log_every}",
        "train.eval_steps=1000",
        "train.save_steps=1000",
        "train.early_stopping_patience=null",
        "train.sample_generations=0",
        "train.packing=false",
        "train.assistant_only_loss=false",
        f"train.gradient_checkpointing={a.gc}",
        *a.sets,
    ]
    cfg = load_config("llama3-8b-qlora", [*base_sets, *overrides])
    t = cfg.train
    _write_split(work / "data", a.steps * t.micro_batch_size * t.grad_accum + 8, 4)
    data = data_ref_from_folder(work / "data")
    hw = decide(cfg, probe())
    base = prepare_base(cfg.model, home)
    setup_s = time.perf_counter() - t0
    rec = TimedTracker()
    if a.profile:
        _profile_one_step(a.profile, step=a.skip + 1)
    ref = train(
        cfg.train,
        cfg.model,
        base,
        data,
        work / "train",
        hw,
        rec,
        max_new_tokens=cfg.eval.max_new_tokens,
        config_hash=config_hash(cfg),
        resolved_config=dump_config(cfg),
        system_metrics=cfg.tracking.system_metrics,
    )

    steps = rec.train_steps()
    tokens_step = t.micro_batch_size * t.grad_accum * SEQ
    # the window: from the log call that closes step --skip to the last one; each log
    # record covers the steps since the previous one
    start = next(i for i, (s, _, _) in enumerate(steps) if s >= a.skip)
    meas = steps[start + 1 :]
    n_meas = meas[-1][0] - steps[start][0]
    wall = meas[-1][1] - steps[start][1]
    prev = [steps[start][0]] + [s for s, _, _ in meas[:-1]]
    busy = sum(
        (s - p) * tokens_step / m["tokens_per_s"] for (s, _, m), p in zip(meas, prev, strict=True)
    )
    from transformers import AutoConfig

    mcfg = AutoConfig.from_pretrained(a.model)
    res = {
        "arm": a.name or f"project:{a.gc}",
        "recipe": "llama3-8b-qlora",
        "overrides": overrides,
        "hardware_decision": hw.reason,
        "backend": ref.backend,
        "gradient_checkpointing": rec.tags.get("slothflow.gradient_checkpointing"),
        "gradient_checkpointing_reason": rec.tags.get("slothflow.gradient_checkpointing_reason"),
        "padding_free": rec.tags.get("slothflow.padding_free"),
        "padding_free_reason": rec.tags.get("slothflow.padding_free_reason"),
        "micro_batch": t.micro_batch_size,
        "grad_accum": t.grad_accum,
        "seq": SEQ,
        "optimizer": t.optimizer,
        "lora": t.lora.model_dump(),
        "steps": len(steps),
        "logging_steps": a.log_every,
        "measured_steps": n_meas,
        "measured_micro_batches": n_meas * t.grad_accum,
        "tokens_per_s": n_meas * tokens_step / wall,
        "tokens_per_s_busy": n_meas * tokens_step / busy,
        "step_tokens_per_s": [m["tokens_per_s"] for _, _, m in steps],
        "mfu_per_step": [m.get("mfu") for _, _, m in steps],
        "gpu_peak_mem_gb_per_step": [m.get("gpu_peak_mem_gb") for _, _, m in steps],
        "peak_alloc_gb_train": max(m.get("gpu_peak_mem_gb", 0.0) for _, _, m in meas),
        "peak_reserved_gb_train": max(m.get("gpu_peak_reserved_gb", 0.0) for _, _, m in meas),
        "run_peak_gb": ref.metrics.get("gpu_peak_mem_gb"),
        "activation_estimate_gb": activation_bytes(mcfg, t.micro_batch_size, SEQ) / 2**30,
        "losses": [m["train_loss"] for _, _, m in steps],
        "trainable_params": rec.params.get("train.trainable_params"),
        # the stage's own count (the baseline's: 4 N_frozen + 6 N_lora + attention)
        "flops_per_token": flops_per_token(mcfg, SEQ, int(rec.params["train.trainable_params"])),
        "setup_s": setup_s,
        "train_wall_s": ref.metrics["train_wall_s"],
        "total_s": time.perf_counter() - t0,
        "torch": torch.__version__,
    }
    print(
        f"RESULT {res['arm']}: {res['tokens_per_s']:.0f} tok/s (busy "
        f"{res['tokens_per_s_busy']:.0f}), peak {res['peak_alloc_gb_train']:.2f} GB, "
        f"gc {res['gradient_checkpointing']}, losses {res['losses'][0]:.3f} -> "
        f"{res['losses'][-1]:.3f}",
        flush=True,
    )
    Path(a.json).write_text(json.dumps(res, indent=1))


def _profile_one_step(out: str, step: int) -> None:
    """Diagnostics: ``torch.profiler`` over optimizer step ``step`` (its micro-batches),
    the kernels' table written to ``out``. Hooks a callback into the stage's trainer."""
    import torch
    from transformers import TrainerCallback

    from tasks import train as train_mod

    class Profile(TrainerCallback):  # type: ignore[misc]
        prof: Any = None

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step + 1 == step:
                torch.cuda.synchronize()
                acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
                self.prof = torch.profiler.profile(activities=acts)
                self.prof.__enter__()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.prof is not None:
                torch.cuda.synchronize()
                self.prof.__exit__(None, None, None)
                table = self.prof.key_averages().table(
                    sort_by="cuda_time_total", row_limit=45, max_name_column_width=90
                )
                Path(out).write_text(table)
                self.prof = None

    build = train_mod.build_trainer

    def build_with_profile(*args: Any, **kwargs: Any) -> Any:
        trainer = build(*args, **kwargs)
        trainer.add_callback(Profile())
        return trainer

    train_mod.build_trainer = build_with_profile  # type: ignore[assignment]


# --------------------------------------------------------------------------- orchestration


def _run(tag: str, argv: list[str], timeout: float, log: Any) -> int | str:
    """argv in its own process group, output to the log and echoed; killed at timeout."""
    print(f"[{time.strftime('%H:%M:%S')}] START {tag} (timeout {timeout:.0f}s)", flush=True)
    log.write(f"===== {tag}: {' '.join(argv)}\n")
    log.flush()
    p = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    tail: list[str] = []

    def pump() -> None:
        assert p.stdout is not None
        for line in p.stdout:
            log.write(line)
            tail.append(line)
            del tail[:-40]
            if (
                line.startswith(("RESULT", "ARM", "MAKE", "[", "Traceback", "  "))
                or "Error" in line
            ):
                print("    " + line.rstrip()[:300], flush=True)

    th = threading.Thread(target=pump, daemon=True)
    th.start()
    rc: int | str
    try:
        rc = p.wait(timeout=max(5.0, timeout))
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # only the group started here
        p.wait()
        rc = "timeout"
    th.join(timeout=10)
    log.flush()
    print(f"[{time.strftime('%H:%M:%S')}] END {tag}: rc={rc}", flush=True)
    if rc != 0:
        print("".join("    | " + x for x in tail[-15:]), flush=True)
    return rc


def cmd_all(a: argparse.Namespace) -> None:
    t0 = time.time()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "bench_log.txt", "a")  # noqa: SIM115 (closed at the end)
    left = lambda: a.deadline - (time.time() - t0)  # noqa: E731
    arms = [x.split(":") for x in a.arms.split(",") if x]
    unknown = {v for kind, _, *vs in arms if kind == "project" for v in vs} - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown arm variant(s) {sorted(unknown)}: one of {[*VARIANTS]}")
    base_arms = [arm[0] for kind, *arm in arms if kind == "base"]
    model = MODELS_DIR / "llama_8b"
    result: dict[str, Any] = {
        "bench": "train_gpu",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "shape": "Llama-3-8B (random weights), seq 2048, micro-batch 4, LoRA r=16 on q,k,v,o,gate,up,down",
        "arms": {},
    }
    baseline: dict[str, Any] = {}
    f = out / "base" / "results.json"
    if base_arms and a.reuse and f.exists():
        print(f"reusing {f} (an earlier call of this lease)", flush=True)
    elif base_arms:
        plan = ",".join(f"8b:{x}" for x in base_arms)
        argv = [sys.executable, a.baseline, "all", "--out", str(out / "base")]
        argv += ["--deadline", str(a.base_deadline), "--plan", plan, "--xformers-probe", "0"]
        # the raw arms' window matched to the project arms' by default: as many warm-up
        # micro-batches as the project skips, as many measured as it measures
        mb = 4  # the recipe's grad_accum: micro-batches per project step
        warm = a.base_warmup if a.base_warmup is not None else a.skip * mb
        steps = a.base_steps if a.base_steps is not None else (a.steps - a.skip) * mb
        argv += ["--warmup", str(warm), "--steps", str(steps)]
        _run("baseline " + plan, argv, a.base_deadline + 30, log)
    if base_arms and f.exists():
        baseline = json.loads(f.read_text())
        for r in baseline.get("arms", []):
            result["arms"][f"base:{r['arm']}"] = {
                k: v for k, v in r.items() if k not in ("losses", "error_tail")
            } | ({"error_tail": r["error_tail"][-1500:]} if "error_tail" in r else {})
        result["env"] = baseline.get("env")
    if not (model / "config.json").exists():
        _run(
            "make 8b",
            [sys.executable, a.baseline, "make", "--shape", "8b", "--out", str(model)],
            240,
            log,
        )
    for kind, gc, *variant in arms:
        if kind != "project":
            continue
        name = ":".join(["project", gc, *variant])
        if left() < 100:
            result["arms"][name] = {"status": f"skipped: {left():.0f}s left"}
            continue
        jf = out / f"{name.replace(':', '_')}.json"
        if a.reuse and jf.exists():
            print(f"reusing {jf} (an earlier call of this lease)", flush=True)
            result["arms"][name] = json.loads(jf.read_text()) | {"status": "ok"}
            continue
        argv = [sys.executable, __file__, "project", "--model", str(model), "--gc", gc]
        argv += ["--steps", str(a.steps), "--skip", str(a.skip), "--json", str(jf)]
        argv += ["--log-every", str(a.log_every)]
        for s in [*a.sets, *(VARIANTS[v] for v in variant)]:
            argv += ["--set", s]
        argv += ["--name", name]
        rc = _run(name, argv, min(a.project_timeout, left() - 10), log)
        if rc == 0 and jf.exists():
            rec = json.loads(jf.read_text())
            rec["status"] = "ok"
            result["arms"][name] = rec
        else:
            result["arms"][name] = {"status": f"failed rc={rc}"}
    _summarise(result, baseline)
    name = f"train_gpu-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    (out / name).write_text(json.dumps(result, indent=1) + "\n")
    log.close()
    print("\n".join(["", "=" * 100, *result["table"], f"wrote {out / name}"]), flush=True)


def _summarise(result: dict[str, Any], baseline: dict[str, Any]) -> None:
    env = baseline.get("env") or {}
    ceiling = (env.get("matmul_8192_bf16_tflops_median") or 790.0) * 1e12
    result["device"] = env.get("gpu") or _gpu_name()
    result["measured_matmul_tflops"] = ceiling / 1e12
    arms = result["arms"]
    for name, r in arms.items():
        if name.startswith("project:") and r.get("status") == "ok":
            fpt = r["flops_per_token"]
            r["mfu_vs_989"] = r["tokens_per_s"] * fpt / PEAK_FLOPS["H100"]  # H100/H200 sheet
            r["mfu_vs_measured"] = r["tokens_per_s"] * fpt / ceiling
    ok = {k: r for k, r in arms.items() if r.get("status") == "ok"}
    projects = {k: r for k, r in ok.items() if k.startswith("project:")}
    best = max(projects.values(), key=lambda r: r["tokens_per_s"], default=None)
    raw_u, raw_h = ok.get("base:unsloth"), ok.get("base:hf_qlora")
    if best is not None:
        result["best_project_arm"] = best["arm"]
        if raw_u:
            result["ratio_vs_unsloth"] = best["tokens_per_s"] / raw_u["tokens_per_s"]
        if raw_h:
            result["ratio_vs_hf_qlora"] = best["tokens_per_s"] / raw_h["tokens_per_s"]
    same = projects.get("project:unsloth")
    if same and raw_u:
        # the pipeline's overhead: the same checkpointing as the raw Unsloth arm
        result["ratio_same_setting_vs_unsloth"] = same["tokens_per_s"] / raw_u["tokens_per_s"]
    nogc, auto = ok.get("base:unsloth_nogc"), projects.get("project:auto")
    if nogc and auto and auto.get("gradient_checkpointing") == "off":
        # the same comparison with checkpointing off (what 'auto' picks on the H200)
        result["ratio_same_setting_gc_off_vs_unsloth"] = auto["tokens_per_s"] / nogc["tokens_per_s"]
    padded = projects.get("project:unsloth:padded")
    if padded and raw_u:
        result["ratio_padded_same_setting_vs_unsloth"] = (
            padded["tokens_per_s"] / raw_u["tokens_per_s"]
        )
    padded_off = projects.get("project:auto:padded")
    if padded_off and nogc and padded_off.get("gradient_checkpointing") == "off":
        result["ratio_padded_gc_off_vs_unsloth"] = padded_off["tokens_per_s"] / nogc["tokens_per_s"]
    trl = projects.get("project:unsloth:trl")
    if same and trl:
        # what TRL's fused head (loss + entropy/accuracy metrics) costs the stage
        result["ratio_own_loss_vs_trl_head"] = same["tokens_per_s"] / trl["tokens_per_s"]
    rows = [f"{'arm':22} {'tok/s':>8} {'peak GB':>8} {'MFU 989':>8} {'MFU meas':>9}  note"]
    for name, r in arms.items():
        if r.get("status") != "ok":
            rows.append(f"{name:22} {str(r.get('status'))[:60]}")
            continue
        note = r.get("gradient_checkpointing") or ""
        rows.append(
            f"{name:22} {r['tokens_per_s']:8.0f} {r['peak_alloc_gb_train']:8.2f} "
            f"{100 * r['mfu_vs_989']:7.1f}% {100 * r['mfu_vs_measured']:8.1f}%  gc={note}"
        )
    for k in (
        "ratio_vs_unsloth",
        "ratio_vs_hf_qlora",
        "ratio_same_setting_vs_unsloth",
        "ratio_same_setting_gc_off_vs_unsloth",
        "ratio_own_loss_vs_trl_head",
        "ratio_padded_same_setting_vs_unsloth",
        "ratio_padded_gc_off_vs_unsloth",
    ):
        if k in result:
            rows.append(f"{k} = {result[k]:.3f}")
    result["table"] = rows


def _gpu_name() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        return None


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sp = ap.add_subparsers(dest="cmd", required=True)
    p = sp.add_parser("project", help="one project arm (its own process)")
    p.add_argument("--model", required=True)
    p.add_argument("--gc", default="auto", choices=["auto", "unsloth", "on", "off"])
    p.add_argument("--steps", type=int, default=8, help="optimizer steps (x grad_accum 4)")
    p.add_argument(
        "--skip",
        type=_positive,
        default=4,
        help="first steps left out (compile, warm-up), >= 1: the clock starts at the log "
        "call that closes the last of them (a multiple of --log-every)",
    )
    p.add_argument("--log-every", type=_positive, default=4, help="train.logging_steps")
    p.add_argument("--json", required=True)
    p.add_argument("--name", default=None, help="the arm's name in the results")
    p.add_argument("--profile", default=None, help="write a torch.profiler table of one step here")
    p.add_argument("--set", dest="sets", action="append", default=[])
    p = sp.add_parser("all", help="baseline arms, then project arms; JSON + table")
    # $OUT on the device: what comes back from the call
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "/tmp"), "bench"))
    # make gpu-kit copies it there, with bench/baseline_bench.patch applied
    p.add_argument("--baseline", default=str(REPO / ".gpu" / "baseline_bench.py"))
    p.add_argument(
        "--arms",
        # the three ratios in one call; more arms do not fit 10 minutes
        default="base:unsloth,base:hf_qlora,project:auto,project:unsloth",
    )
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--skip", type=_positive, default=4)
    p.add_argument("--log-every", type=_positive, default=4)
    p.add_argument(
        "--base-warmup",
        type=int,
        default=None,
        help="raw arms' warm-up micro-batches (default: --skip x 4, the project's)",
    )
    p.add_argument(
        "--base-steps",
        type=int,
        default=None,
        help="raw arms' measured micro-batches (default: (--steps - --skip) x 4)",
    )
    p.add_argument("--deadline", type=float, default=560)
    # three base arms take ~100 s each with their model loads (two fit in 300 s)
    p.add_argument("--base-deadline", type=float, default=420)
    p.add_argument("--project-timeout", type=float, default=200)
    p.add_argument("--set", dest="sets", action="append", default=[])
    p.add_argument(
        "--reuse",
        action="store_true",
        help="keep arms whose results are already in --out (a device call is limited to "
        "10 minutes: split the arms over consecutive calls on the same warm machine)",
    )
    a = ap.parse_args()
    {"project": cmd_project, "all": cmd_all}[a.cmd](a)


if __name__ == "__main__":
    main()
