"""Evaluation with lm-eval on what will be served: base, adapter, merged (and champion).

Tasks are generated from the held-out split (chat rows ``{"id", "messages"}``), one
folder per chat template, loaded with ``TaskManager(include_path=DIR)`` — no hub:

* ``<name>_gen`` — ``generate_until``: greedy answer, scored by exact match and token
  F1 (:mod:`tasks.core.eval_metrics`, copied in as ``utils.py``), stopping on the EOS /
  end-of-turn tokens;
* ``<name>_ll`` — ``loglikelihood`` of the reference answer *plus its end token*:
  ``answer_perplexity`` = exp(mean per-item negative log-likelihood) and
  ``answer_greedy_acc`` (the reference is the greedy continuation).

**Prompt rendering.** The prompt text is rendered here, with the model's own chat
template and generation prompt (``apply_chat_template(messages[:-1],
add_generation_prompt=True)``), and written into the task's data (``doc_to_text:
prompt``). lm-eval's ``apply_chat_template`` option would wrap ``doc_to_text`` as a
single user turn: it loses system prompts and earlier turns of multi-turn rows and
would not apply to the loglikelihood task the same way. Rendering ourselves gives
both tasks the exact string a chat request to vLLM produces, and the task folder
stays reproducible with the plain ``lm_eval`` CLI.

**Loading.** The base is loaded once (a Hub base at the commit the adapter was trained
on) and handed to lm-eval as a model object; the adapter is a PEFT wrapper around that
same object (what ``peft=`` does, without a second load), and the merged model is
loaded by lm-eval from the export folder, the artifact that gets served. The adapter's
and the merged model's scores must agree within ``eval.agreement_tolerance``;
otherwise the stage fails. ``eval.extra_tasks`` run on the candidate's lm-eval model
as it is (no reload). The champion, a registry download, is loaded by lm-eval from its
folder: a merged model, or an adapter with its own base at its recorded revision.
"""

from __future__ import annotations

import html
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from tasks.core import eval_metrics
from tasks.core.artifacts import GENERATIONS_FILE, read_manifest
from tasks.core.config import EvalConfig
from tasks.core.hardware import HardwareDecision
from tasks.core.models import (
    LOAD_KWARGS,
    chat_template_sha256,
    hub_load_revision,
    load_tokenizer,
    render_prompt,
)
from tasks.core.orchestration import stage_task
from tasks.core.refs import (
    DataRef,
    EvalRef,
    ExportRef,
    ResolvedModel,
    RunContext,
    load_done,
    mark_done,
    sha256_json,
    write_json_atomic,
)
from tasks.core.revision import is_hub_id
from tasks.core.tracking import NullTracker, Tracker

log = logging.getLogger(__name__)

TASK_PREFIX = "slothflow_heldout"


class EvalError(RuntimeError):
    """Evaluation could not produce trustworthy numbers (e.g. adapter and merged disagree)."""


# --------------------------------------------------------------------------- held-out -> tasks


def heldout_items(
    validation_path: str | Path, tokenizer: Any, limit: int | None = None
) -> list[dict[str, Any]]:
    """Held-out rows as task documents: rendered prompt, reference answer, and the
    loglikelihood target (answer + end-of-turn text). Rows whose last turn is not an
    assistant answer cannot be scored and are skipped."""
    items: list[dict[str, Any]] = []
    eos = tokenizer.eos_token or ""
    with open(validation_path, encoding="utf-8") as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            row = json.loads(line)
            messages = row["messages"]
            if not messages or messages[-1]["role"] != "assistant":
                continue
            answer = messages[-1]["content"]
            user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
            items.append(
                {
                    "id": str(row.get("id", n)),
                    "prompt": render_prompt(tokenizer, messages),
                    "question": user,
                    "answer": answer,
                    "target": answer + eos,
                }
            )
            if limit is not None and len(items) >= limit:
                break
    if not items:
        raise EvalError(f"no scorable held-out rows in {validation_path}")
    return items


def task_configs(
    name: str, data_file: Path, stop: list[str], max_new_tokens: int
) -> dict[str, dict[str, Any]]:
    """The two lm-eval task configs (YAML-ready dicts) over ``data_file``."""
    common = {
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "num_fewshot": 0,
        "doc_to_text": "prompt",
        "metadata": {"version": 1.0},
    }
    gen = {
        "task": f"{name}_gen",
        **common,
        "output_type": "generate_until",
        "doc_to_target": "answer",
        "generation_kwargs": {
            "until": stop,
            "max_gen_toks": max_new_tokens,
            "do_sample": False,
            "temperature": 0.0,
        },
        # lm-eval decodes without special tokens; whitespace at the start is not an answer.
        "filter_list": [
            {
                "name": "none",
                "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}],
            }
        ],
        "process_results": "!function utils.process_results",
        "metric_list": [
            {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True},
            {"metric": "f1", "aggregation": "mean", "higher_is_better": True},
        ],
    }
    ll = {
        "task": f"{name}_ll",
        **common,
        "output_type": "loglikelihood",
        "doc_to_target": "target",
        # The prompt ends with the generation prompt; the answer follows with no space.
        "target_delimiter": "",
        "metric_list": [
            {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
        ],
    }
    return {"gen": gen, "ll": ll}


def write_task_folder(
    folder: Path, items: list[dict[str, Any]], stop: list[str], max_new_tokens: int
) -> tuple[str, str]:
    """Write data + YAMLs + utils.py; returns the (generate, loglikelihood) task names.

    Task names carry the folder name so that two folders (candidate and champion
    templates) never register the same task twice."""
    folder.mkdir(parents=True, exist_ok=True)
    data_file = folder / "heldout.jsonl"
    with open(data_file, "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps(it, ensure_ascii=False) + "\n")
    name = f"{TASK_PREFIX}_{folder.name}".replace("-", "_")
    configs = task_configs(name, data_file, stop, max_new_tokens)
    for key, conf in configs.items():
        text = yaml.safe_dump(conf, sort_keys=False, allow_unicode=True)
        # `!function` is a YAML tag lm-eval resolves; safe_dump would quote it.
        text = text.replace("'!function utils.process_results'", "!function utils.process_results")
        (folder / f"{name}_{key}.yaml").write_text(text, encoding="utf-8")
    shutil.copyfile(eval_metrics.__file__, folder / "utils.py")
    return configs["gen"]["task"], configs["ll"]["task"]


# --------------------------------------------------------------------------- running lm-eval


def _hflm(pretrained: Any, tokenizer: Any, cfg: EvalConfig, hw: HardwareDecision, **kw: Any) -> Any:
    from lm_eval.models.huggingface import HFLM

    return HFLM(
        pretrained=pretrained,
        tokenizer=tokenizer,
        batch_size=cfg.batch_size,
        device=hw.device,
        **LOAD_KWARGS,  # HFLM hands them to each of its from_pretrained calls
        **kw,
    )


def revision_kwargs(revision: str | None) -> dict[str, str]:
    """``revision=`` for an lm-eval model whose base is a Hub id pinned to a commit;
    nothing otherwise (HFLM turns ``None`` into the string ``"None"``)."""
    return {"revision": revision} if revision else {}


def champion_lm_args(folder: Path, manifest: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """What lm-eval loads for a champion artifact: ``(pretrained, HFLM keyword arguments)``.

    A merged champion is its own folder. An adapter champion is its base (the manifest's
    ``serving.model``) plus ``peft=`` the adapter, the base pinned to the Hub commit the
    adapter was trained on (``base_model.revision``) when the base is a hub id: the
    branch head may have moved since. A local base's recorded revision is a content
    hash, not something to load by."""
    if manifest["kind"] == "merged":
        return str(folder), {"dtype": manifest["dtype"]}
    base = str(manifest["serving"]["model"])
    revision = manifest.get("base_model", {}).get("revision") if is_hub_id(base) else None
    return base, {"peft": str(folder), **revision_kwargs(revision)}


def run_tasks(lm: Any, task_dir: Path, task_names: list[str]) -> dict[str, Any]:
    """One lm-eval ``simple_evaluate`` over our generated tasks (built-ins not indexed)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    out = simple_evaluate(
        model=lm,
        tasks=task_names,
        task_manager=tm,
        log_samples=True,
        bootstrap_iters=0,  # stderr by bootstrap costs minutes; the gate uses point values
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
    )
    if out is None:  # only on non-zero ranks of a distributed run
        raise EvalError("lm-eval returned no results")
    return dict(out)


def scores_from(results: dict[str, Any], gen_task: str, ll_task: str) -> dict[str, float]:
    """Flat metric dict from lm-eval's results (keys ``metric,filter``)."""
    gen = results["results"][gen_task]
    ll = results["results"][ll_task]
    ppl = float(ll["perplexity,none"])
    return {
        "exact_match": float(gen["exact_match,none"]),
        "f1": float(gen["f1,none"]),
        "answer_perplexity": ppl,
        "answer_nll": math.log(ppl) if ppl > 0 and math.isfinite(ppl) else float("inf"),
        "answer_greedy_acc": float(ll["acc,none"]),
        "n_items": float(len(results["samples"][gen_task])),
    }


def generations(results: dict[str, Any], gen_task: str) -> dict[int, str]:
    """doc_id -> filtered generation."""
    out = {}
    for s in results["samples"][gen_task]:
        resp = s["filtered_resps"][0]
        out[int(s["doc_id"])] = resp if isinstance(resp, str) else str(resp)
    return out


def agreement(a: dict[str, float], b: dict[str, float]) -> float:
    """Worst disagreement between two models' scores: absolute for rates, relative for
    perplexity (its scale depends on the vocabulary)."""
    diffs = [abs(a[k] - b[k]) for k in ("exact_match", "f1", "answer_greedy_acc")]
    pa, pb = a["answer_perplexity"], b["answer_perplexity"]
    diffs.append(abs(pa - pb) / max(abs(pb), 1e-12) if math.isfinite(pa + pb) else float("inf"))
    return max(diffs)


# --------------------------------------------------------------------------- the side-by-side table


def _cell(text: str, width: int = 120) -> str:
    text = text.replace("\n", " ⏎ ").replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def side_by_side(
    items: list[dict[str, Any]],
    base: dict[int, str],
    candidate: dict[int, str],
    rows: int,
    candidate_label: str,
) -> tuple[str, str]:
    """Markdown and HTML tables of ``rows`` held-out prompts: expected, base, candidate."""
    md = [
        f"| # | prompt (last user turn) | expected | base | {candidate_label} | ok |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    body = []
    for i, it in enumerate(items[:rows]):
        got = candidate.get(i, "")
        ok = "✅" if eval_metrics.exact_match(got, it["answer"]) else "❌"
        md.append(
            f"| {i} | {_cell(it['question'])} | {_cell(it['answer'])} | "
            f"{_cell(base.get(i, ''))} | {_cell(got)} | {ok} |"
        )
        cells = (str(i), it["question"], it["answer"], base.get(i, ""), got, ok)
        body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    head = "".join(
        f"<th>{h}</th>"
        for h in ("#", "prompt (last user turn)", "expected", "base", candidate_label, "ok")
    )
    page = (
        "<!doctype html><meta charset='utf-8'><style>td,th{border:1px solid #ccc;padding:4px;"
        "vertical-align:top;white-space:pre-wrap}table{border-collapse:collapse}</style>"
        f"<table><tr>{head}</tr>{''.join(body)}</table>"
    )
    return "\n".join(md) + "\n", page


def scores_table(scores: dict[str, dict[str, float]]) -> str:
    keys = ["exact_match", "f1", "answer_perplexity", "answer_greedy_acc", "n_items"]
    lines = ["| model | " + " | ".join(keys) + " |", "|" + " --- |" * (len(keys) + 1)]
    for model, s in scores.items():
        lines.append(
            f"| {model} | " + " | ".join(f"{s.get(k, float('nan')):.4g}" for k in keys) + " |"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- extra tasks


def run_extra_tasks(lm: Any, names: list[str]) -> tuple[dict[str, str], dict[str, float]]:
    """Standard lm-eval tasks by name, each only if it is known and its data loads
    offline; otherwise the reason is reported and evaluation goes on. Failures while
    *running* a task that did load are real errors and propagate."""
    if not names:
        return {}, {}
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    status: dict[str, str] = {}
    metrics: dict[str, float] = {}
    tm = TaskManager()  # indexes lm-eval's built-in task YAMLs (~10 s here)
    for name in names:
        if name not in tm.all_tasks:
            status[name] = "skipped: no such lm-eval task"
            log.warning("extra task %s %s", name, status[name])
            continue
        try:
            tm.load([name])  # builds the dataset: fails offline without a local copy
        except Exception as exc:
            status[name] = (
                f"skipped: data not available offline ({type(exc).__name__}: {str(exc)[:200]})"
            )
            log.warning("extra task %s %s", name, status[name])
            continue
        out = simple_evaluate(
            model=lm, tasks=[name], task_manager=tm, bootstrap_iters=0, log_samples=False
        )
        status[name] = "ran"
        for task, res in (out or {}).get("results", {}).items():
            for k, v in res.items():
                if isinstance(v, int | float) and "_stderr" not in k:
                    metrics[f"{task}.{k.replace(',none', '')}"] = float(v)
    return status, metrics


# --------------------------------------------------------------------------- the stage


def _stop_strings(tokenizer: Any, eos_ids: list[int]) -> list[str]:
    return [t for t in tokenizer.convert_ids_to_tokens(eos_ids) if t]


def evaluate(
    cfg: EvalConfig,
    validation_path: str,
    validation_fingerprint: str,
    export: ExportRef,
    out_dir: Path,
    hw: HardwareDecision,
    *,
    champion_path: str | None = None,
    champion_label: str | None = None,
    tracker: Tracker | None = None,
) -> EvalRef:
    """Score base, adapter, merged (and the champion artifact at ``champion_path``, a
    registry download) on the held-out rows at ``validation_path`` (the data stage's
    split, fingerprinted ``validation_fingerprint``); write results, table, tasks."""
    tracker = tracker or NullTracker()
    out_dir = Path(out_dir)
    t0 = time.monotonic()
    tokenizer = load_tokenizer(export.candidate_path)
    items = heldout_items(validation_path, tokenizer, cfg.limit)
    task_dir = out_dir / "lm_eval_tasks"
    gen_t, ll_t = _write_candidate_tasks(task_dir, items, tokenizer, export, cfg)

    results, cand_lm = _run_candidate(
        cfg, export, hw, tokenizer, task_dir / "candidate", [gen_t, ll_t]
    )
    scores = {k: scores_from(v, gen_t, ll_t) for k, v in results.items()}
    candidate = "merged" if export.merged_path else "adapter"
    agree = _check_agreement(scores, cfg) if export.merged_path else None
    # After the agreement check: no point running more on a broken export. The extra
    # tasks run on the candidate still in memory, which is freed before the champion loads.
    extra_status = _run_candidate_extras(cand_lm, cfg, scores, candidate)
    del cand_lm

    champ_name = None
    if champion_path:
        champ_name = champion_label or "champion"
        scores["champion"] = _evaluate_champion(
            Path(champion_path), validation_path, cfg, hw, task_dir / "champion", tokenizer, items
        )

    ref = EvalRef(
        stage="evaluate",
        path=str(out_dir),
        n_items=len(items),
        primary_metric=cfg.primary_metric,
        candidate=candidate,
        scores=scores,
        champion=champ_name,
        agreement_max_diff=agree,
        train_metrics={k: v for k, v in export.metrics.items() if not k.startswith("export.")},
        extra_tasks=extra_status,
        results_path=str(out_dir / "results.json"),
        table_path=str(out_dir / "side_by_side.md"),
        validation_fingerprint=validation_fingerprint,
    )
    _write_outputs(ref, items, results, gen_t, cfg.table_rows, t0)
    _log_evaluation(tracker, ref, task_dir, t0)
    return ref


def _write_candidate_tasks(
    task_dir: Path, items: list[dict[str, Any]], tokenizer: Any, export: ExportRef, cfg: EvalConfig
) -> tuple[str, str]:
    """A fresh ``task_dir`` with the candidate's task folder; its (gen, ll) task names."""
    if task_dir.exists():
        shutil.rmtree(task_dir)
    return write_task_folder(
        task_dir / "candidate",
        items,
        _stop_strings(tokenizer, export.eos_token_ids),
        cfg.max_new_tokens,
    )


def _run_candidate(
    cfg: EvalConfig,
    export: ExportRef,
    hw: HardwareDecision,
    tokenizer: Any,
    task_dir: Path,
    tasks: list[str],
) -> tuple[dict[str, dict[str, Any]], Any]:
    """lm-eval results of base, adapter and (if exported) merged, and the candidate's
    lm-eval model (the merged one, else the adapter), still loaded for the extra tasks."""
    from peft import PeftModel

    from tasks.core.models import load_causal_lm

    results: dict[str, dict[str, Any]] = {}
    # Base once, as an object: evaluated bare first, then wrapped by PEFT for the adapter
    # (PEFT injects the LoRA layers into this same module tree; no second load).
    dtype = export.dtype if hw.device == "cuda" else "float32"
    # At the Hub commit the adapter was trained on (as export merged it), not the branch head.
    base_revision = hub_load_revision(export.base)
    base = load_causal_lm(export.base.name_or_path, dtype, hw.device, base_revision)
    results["base"] = run_tasks(_hflm(base, tokenizer, cfg, hw), task_dir, tasks)
    adapter = PeftModel.from_pretrained(base, export.adapter_path).eval()
    # The candidate's lm-eval model is kept for the extra tasks (no second load of it).
    cand_lm = _hflm(adapter, tokenizer, cfg, hw)
    results["adapter"] = run_tasks(cand_lm, task_dir, tasks)
    del adapter, base
    if export.merged_path:
        del cand_lm  # one model in memory at a time: the adapter goes before the merge loads
        cand_lm = _hflm(export.merged_path, tokenizer, cfg, hw, dtype=export.dtype)
        results["merged"] = run_tasks(cand_lm, task_dir, tasks)
    return results, cand_lm


def _check_agreement(scores: dict[str, dict[str, float]], cfg: EvalConfig) -> float:
    """The adapter/merged disagreement; :class:`EvalError` past ``eval.agreement_tolerance``."""
    agree = agreement(scores["adapter"], scores["merged"])
    if not agree <= cfg.agreement_tolerance:
        raise EvalError(
            f"adapter and merged scores disagree by {agree:.4g} (> eval.agreement_tolerance "
            f"{cfg.agreement_tolerance:g}): adapter {scores['adapter']}, merged "
            f"{scores['merged']}. The merged artifact does not behave like what was trained."
        )
    return agree


def _run_candidate_extras(
    cand_lm: Any, cfg: EvalConfig, scores: dict[str, dict[str, float]], candidate: str
) -> dict[str, str]:
    """``eval.extra_tasks`` on the candidate's lm-eval model; their metrics join the
    candidate's scores as ``extra.<task>.<metric>``. Returns each task's status."""
    if not cfg.extra_tasks:
        return {}
    extra_status, extra_metrics = run_extra_tasks(cand_lm, cfg.extra_tasks)
    scores[candidate] = {
        **scores[candidate],
        **{f"extra.{k}": v for k, v in extra_metrics.items()},
    }
    return extra_status


def _write_outputs(
    ref: EvalRef,
    items: list[dict[str, Any]],
    results: dict[str, dict[str, Any]],
    gen_t: str,
    table_rows: int,
    t0: float,
) -> None:
    """What ``ref`` points at: the side-by-side tables (Markdown and HTML) and
    ``results.json``; and the per-item generations next to them."""
    out_dir = Path(ref.path)
    md, page = side_by_side(
        items,
        generations(results["base"], gen_t),
        generations(results[ref.candidate], gen_t),
        table_rows,
        ref.candidate,
    )
    Path(ref.table_path).write_text(
        f"# Held-out side by side ({len(items)} items, first {min(table_rows, len(items))} shown)\n\n"
        + scores_table(ref.scores)
        + "\n"
        + md,
        encoding="utf-8",
    )
    (out_dir / "side_by_side.html").write_text(page, encoding="utf-8")
    write_json_atomic(
        Path(ref.results_path),
        {
            "scores": ref.scores,
            "agreement_max_diff": ref.agreement_max_diff,
            "extra_tasks": ref.extra_tasks,
            "champion": ref.champion,
            "lm_eval": {k: v["results"] for k, v in results.items()},
            "seconds": time.monotonic() - t0,
        },
    )
    # Per-item generations, for auditing a gate decision later.
    with open(out_dir / GENERATIONS_FILE, "w", encoding="utf-8") as f:
        gens = {k: generations(v, gen_t) for k, v in results.items()}
        for i, it in enumerate(items):
            f.write(
                json.dumps(
                    {
                        "id": it["id"],
                        "answer": it["answer"],
                        **{k: g.get(i) for k, g in gens.items()},
                    }
                )
                + "\n"
            )


def _log_evaluation(tracker: Tracker, ref: EvalRef, task_dir: Path, t0: float) -> None:
    """Scores, params and the written files to the tracker; the scores table to the log."""
    out_dir = Path(ref.path)
    for model, s in ref.scores.items():
        tracker.log_metrics({f"{model}.{k}": v for k, v in s.items() if math.isfinite(v)})
    tracker.log_params({"eval.n_items": ref.n_items, "eval.candidate": ref.candidate})
    tracker.log_artifact(Path(ref.table_path), "eval")
    tracker.log_artifact(out_dir / "side_by_side.html", "eval")
    tracker.log_artifact(Path(ref.results_path), "eval")
    tracker.log_artifact(task_dir, "eval/lm_eval_tasks")
    log.info(
        "evaluation (%d items, %.0f s):\n%s",
        ref.n_items,
        time.monotonic() - t0,
        scores_table(ref.scores),
    )


def _evaluate_champion(
    folder: Path,
    validation_path: str,
    ecfg: EvalConfig,
    hw: HardwareDecision,
    task_dir: Path,
    cand_tokenizer: Any,
    cand_items: list[dict[str, Any]],
) -> dict[str, float]:
    """The champion on the *current* held-out rows, prompted with its own chat template."""
    manifest = read_manifest(folder)
    tokenizer = load_tokenizer(str(folder))
    same = chat_template_sha256(tokenizer.chat_template) == chat_template_sha256(
        cand_tokenizer.chat_template
    )
    items = cand_items if same else heldout_items(validation_path, tokenizer, ecfg.limit)
    gen_t, ll_t = write_task_folder(
        task_dir,
        items,
        _stop_strings(tokenizer, list(manifest["eos_token_ids"])),
        ecfg.max_new_tokens,
    )
    pretrained, kwargs = champion_lm_args(folder, manifest)
    lm = _hflm(pretrained, tokenizer, ecfg, hw, **kwargs)
    return scores_from(run_tasks(lm, task_dir, [gen_t, ll_t]), gen_t, ll_t)


def evaluate_inputs_hash(
    cfg: EvalConfig, data_fingerprint: str, export: ExportRef, champion: str | None
) -> str:
    return sha256_json(
        {
            "eval": cfg.model_dump(mode="json"),
            "data": data_fingerprint,
            "export": export.model_dump(mode="json"),
            "champion": champion,
        }
    )


@stage_task(name="evaluate", retries=0)
def evaluate_task(
    ctx: RunContext,
    cfg: EvalConfig,
    data: DataRef,
    export: ExportRef,
    champion: ResolvedModel | None = None,
) -> EvalRef:
    """Prefect task: lm-eval under ``<run>/evaluate``, with ``champion`` (the registry's
    current champion, looked up by the flow's champion step) re-evaluated on this run's
    held-out split; resumable."""
    from tasks.core.run import stage

    out = ctx.stage_dir("evaluate")
    label = f"{champion.name} v{champion.number}" if champion else None
    key = evaluate_inputs_hash(cfg, data.fingerprint, export, label)
    done = load_done(out, key, EvalRef)
    if done is not None:
        log.info("evaluate: reusing %s", out)
        return done
    with stage(ctx, "evaluate") as tracker:
        ref = evaluate(
            cfg,
            data.validation_path,
            data.fingerprint,
            export,
            out,
            HardwareDecision.from_params(ctx.hardware),
            champion_path=str(champion.path) if champion else None,
            champion_label=label,
            tracker=tracker,
        )
    mark_done(out, key, ref)
    return ref
