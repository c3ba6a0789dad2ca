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

**Modules.** This one is the stage (:func:`evaluate`, :func:`evaluate_task`, the
reuse hash) and loads the models; :mod:`~tasks.evaluate.heldout` turns the held-out
split into task folders, :mod:`~tasks.evaluate.harness` runs lm-eval and reads its
results, :mod:`~tasks.evaluate.report` renders the tables.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

from tasks.core.artifacts import GENERATIONS_FILE, read_manifest
from tasks.core.config import EvalConfig
from tasks.core.hardware import HardwareDecision
from tasks.core.models import (
    LOAD_KWARGS,
    chat_template_sha256,
    hub_load_revision,
    load_tokenizer,
)
from tasks.core.orchestration import stage_task
from tasks.core.refs import (
    DataRef,
    EvalRef,
    ExportRef,
    ResolvedModel,
    RunContext,
    record_ref,
    sha256_json,
    write_json_atomic,
)
from tasks.core.tracking import NullTracker, Tracker
from tasks.evaluate.errors import EvalError
from tasks.evaluate.harness import (
    agreement,
    champion_lm_args,
    generations,
    revision_kwargs,
    run_extra_tasks,
    run_tasks,
    scores_from,
)
from tasks.evaluate.heldout import TASK_PREFIX, heldout_items, task_configs, write_task_folder
from tasks.evaluate.report import scores_table, side_by_side

__all__ = [
    "TASK_PREFIX",
    "EvalError",
    "EvalRef",
    "agreement",
    "champion_lm_args",
    "evaluate",
    "evaluate_inputs_hash",
    "evaluate_task",
    "generations",
    "heldout_items",
    "revision_kwargs",
    "run_extra_tasks",
    "run_tasks",
    "scores_from",
    "scores_table",
    "side_by_side",
    "task_configs",
    "write_task_folder",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the stage


# lm-eval models are made here, by the stage; the harness is handed them ready-made.
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


def _label(champion: ResolvedModel | None) -> str | None:
    return f"{champion.name} v{champion.number}" if champion else None


def _cache_key(a: dict[str, Any]) -> str:
    champion = a.get("champion")
    return evaluate_inputs_hash(a["cfg"], a["data"].fingerprint, a["export"], _label(champion))


@stage_task(name="evaluate", cache_key=_cache_key, retries=0)
def evaluate_task(
    ctx: RunContext,
    cfg: EvalConfig,
    data: DataRef,
    export: ExportRef,
    champion: ResolvedModel | None = None,
) -> EvalRef:
    """Prefect task: lm-eval under ``<run>/evaluate``, with ``champion`` (the registry's
    current champion, looked up by the flow's champion step) re-evaluated on this run's
    held-out split; Cached when a finished evaluation has the same inputs hash (the
    champion's name and version are in it, so a new champion means a new evaluation)."""
    from tasks.core.run import stage

    out = ctx.stage_dir("evaluate")
    label = _label(champion)
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
    record_ref(out, ref)
    return ref
