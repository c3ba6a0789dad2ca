"""Benchmark: the embedded default's fine-tuning on this CPU, and what it learns.

    .venv/bin/python bench/train_cpu.py [--recipe default] [--set train.max_steps=100]

Runs the real stage functions (``prepare_base`` + ``train``) in a fresh temporary
SLOTHFLOW_HOME on a DataRef-format split of the shipped sample, then scores greedy
exact match on every held-out (validation) item for the base model and for the
base + trained adapter. Prints a table and writes
``bench/results/train_cpu-<UTC time>.json``. The machine's load (``uptime``) is
recorded with the numbers, since a shared machine is slower.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def greedy_exact_match(
    model: Any, tokenizer: Any, rows: list[dict[str, Any]], max_new_tokens: int, batch: int = 64
) -> tuple[float, list[dict[str, str]]]:
    """Share of rows whose greedy answer matches the reference by the evaluate stage's
    exact match (:func:`tasks.core.eval_metrics.exact_match`: case, spacing and end
    punctuation folded)."""
    import torch

    from tasks.core.eval_metrics import exact_match

    tokenizer.padding_side = "left"  # generation continues from the right edge
    model.eval()
    hits, shown = 0, []
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        prompts = [
            tokenizer.apply_chat_template(
                r["messages"][:-1], add_generation_prompt=True, tokenize=False
            )
            for r in chunk
        ]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        for r, g in zip(chunk, gen[:, enc["input_ids"].shape[1] :], strict=True):
            got = tokenizer.decode(g, skip_special_tokens=True).strip()
            want = r["messages"][-1]["content"].strip()
            hits += exact_match(got, want)
            if len(shown) < 5:
                shown.append({"expected": want, "generated": got})
    return hits / len(rows), shown


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="default")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--keep", action="store_true", help="Keep the temporary home.")
    args = ap.parse_args()

    load_start = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="slothflow-bench-train-"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    from tasks.core import home as home_mod

    home = home_mod.activate(tmp / "home")

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.sample_data import write_split
    from tasks.base_model import prepare_base
    from tasks.core import hardware
    from tasks.core.config import config_hash, dump_config, load_config
    from tasks.train import read_chat_rows, train

    cfg = load_config(args.recipe, args.sets)
    data = write_split(tmp / "data", val_fraction=cfg.data.val_fraction, salt=cfg.data.split_salt)
    t = time.perf_counter()
    base = prepare_base(cfg.model, home)
    build_s = time.perf_counter() - t
    hw = hardware.decide(cfg, hardware.probe())
    # CPU seconds as well as wall time: on a shared machine the wall time measures the
    # neighbours as much as the training; the CPU time does not.
    cpu0 = _cpu_s()
    ref = train(
        cfg.train,
        cfg.model,
        base,
        data,
        tmp / "train",
        hw,
        max_new_tokens=cfg.eval.max_new_tokens,
        config_hash=config_hash(cfg),
        resolved_config=dump_config(cfg),
    )
    train_cpu_s = _cpu_s() - cpu0
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    rows = read_chat_rows(data.validation_path)
    tok = AutoTokenizer.from_pretrained(ref.tokenizer_path)
    model = AutoModelForCausalLM.from_pretrained(base.name_or_path, dtype=torch.float32)
    n_new = cfg.eval.max_new_tokens
    base_em, _ = greedy_exact_match(model, tok, rows, n_new)
    tuned = PeftModel.from_pretrained(model, ref.adapter_path)
    t = time.perf_counter()
    tuned_em, examples = greedy_exact_match(tuned, tok, rows, n_new)
    eval_s = time.perf_counter() - t

    m = ref.metrics
    result = {
        "bench": "train_cpu",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "recipe": args.recipe,
        "overrides": args.sets,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_avg_at_start": load_start,
            "load_avg_at_end": os.getloadavg(),
        },
        "model": cfg.model.embedded.model_dump(),
        "train": {
            "rows": data.train_rows,
            "steps": int(m["global_step"]),
            "epochs": m["epoch"],
            "best_step": ref.best_step,
            "best_eval_loss": m["best_eval_loss"],
            "train_loss": m["train_loss"],
            "wall_s": round(m["train_wall_s"], 1),
            "cpu_s": round(train_cpu_s, 1),
            "tokens_per_s": round(m.get("train_tokens_per_s", 0.0), 1),
        },
        "base_build_s": round(build_s, 1),
        "peak_rss_mb": round(peak_rss_mb, 1),
        "heldout": {
            "items": len(rows),
            "base_exact_match": base_em,
            "tuned_exact_match": tuned_em,
            "eval_s": round(eval_s, 1),
            "examples": examples,
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"train_cpu-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"train_cpu ({args.recipe}, load {os.getloadavg()[0]:.2f})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in [
        ("fine-tuning wall time (s)", f"{m['train_wall_s']:.1f}"),
        ("fine-tuning CPU time (s)", f"{train_cpu_s:.1f}"),
        ("optimizer steps / epochs", f"{int(m['global_step'])} / {m['epoch']:.2f}"),
        ("tokens/s (non-padding)", f"{m.get('train_tokens_per_s', 0.0):.0f}"),
        ("peak RSS (MB)", f"{peak_rss_mb:.0f}"),
        ("best step (eval loss)", f"{ref.best_step} ({m['best_eval_loss']:.4f})"),
        ("held-out items", str(len(rows))),
        ("exact match, base", f"{base_em:.3f}"),
        ("exact match, fine-tuned", f"{tuned_em:.3f}"),
    ]:
        table.add_row(k, v)
    Console().print(table)
    print(f"wrote {path}")
    if not args.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
