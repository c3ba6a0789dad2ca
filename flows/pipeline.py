"""The pipeline flow: it only composes stage tasks.

One parameter, a ``PipelineConfig``, so the Prefect UI renders the whole recipe as a
form with every field's description as help text. Stages hand each other small
references (paths + hashes); each stage task reuses its own finished result when a
run is resumed. There is no other runner: ``slothflow run`` calls this flow.

    base -> data -> train -> export -> evaluate -> gate -> register -> serve
"""

from __future__ import annotations

import logging
from typing import Any

from prefect import flow, get_run_logger

from tasks.base_model import prepare_base_task
from tasks.core import home as home_mod
from tasks.core import run as run_mod
from tasks.core import tracking
from tasks.core.config import PipelineConfig, dump_config
from tasks.core.home import Home
from tasks.core.refs import DataRef, ExportRef, GateBar, RunContext
from tasks.data import clean_task
from tasks.evaluate import evaluate_task
from tasks.export import export_task
from tasks.gate import gate_task
from tasks.registry import champion_task, register_task
from tasks.serve import deploy_task, summary_lines
from tasks.train import train_task

log = logging.getLogger(__name__)


# No log_prints: it patches print() and breaks libraries that capture their own stdout
# (dill disassembles functions through print while datasets fingerprints a map).
@flow(name="slothflow-pipeline", validate_parameters=True)
def pipeline(config: PipelineConfig, resume_run_id: str | None = None) -> dict[str, Any]:
    """Run the whole pipeline for one recipe.

    ``resume_run_id`` re-opens an earlier run of the *same* config: finished stages
    are skipped (their outputs are reused), the failed one runs again.
    """
    logger = get_run_logger()
    home = home_mod.resolve_home()
    ctx = run_mod.open_run(config, home, resume_run_id)
    logger.info("run %s (config %s) — %s", ctx.run_id, ctx.config_hash[:12], ctx.hardware["reason"])
    results: dict[str, Any] = {}
    summary: dict[str, Any] = {
        "run_id": ctx.run_id,
        "run_dir": ctx.run_dir,
        "config_hash": ctx.config_hash,
        "hardware": ctx.hardware["reason"],
        "stages": results,
    }
    if ctx.tracking:
        summary["mlflow"] = tracking.run_url(tracking.TrackingRef.model_validate(ctx.tracking))
    try:
        data, exported = _build(config, home, ctx, results)
        _release(config, ctx, data, exported, summary, results)
    except BaseException as exc:
        # A signal marks the run INTERRUPTED (resumable, nothing failed), anything else FAILED.
        status = run_mod.status_of(exc)
        run_mod.finish(ctx, status, {**summary, "completed_stages": sorted(results)})
        raise
    run_mod.finish(ctx, "FINISHED", summary)
    return summary


def _build(
    config: PipelineConfig, home: Home, ctx: RunContext, results: dict[str, Any]
) -> tuple[DataRef, ExportRef]:
    """base -> data -> train -> export: everything up to the candidate artifact."""
    base = prepare_base_task(ctx, config.model)
    results["base"] = {"model": base.name_or_path, "revision": base.revision[:19]}

    previous = run_mod.previous_output(home, ctx, config.name, "data", "manifest.jsonl")
    data = clean_task(ctx, config.data, base, previous)
    results["data"] = {
        "train": data.train_rows,
        "validation": data.validation_rows,
        "fingerprint": data.fingerprint[:12],
    }

    trained = train_task(
        ctx,
        config.train,
        config.model,
        base,
        data,
        max_new_tokens=config.eval.max_new_tokens,
        resolved_config=dump_config(config),
        system_metrics=config.tracking.system_metrics,
    )
    results["train"] = {
        "best_step": trained.best_step,
        **_rounded(trained.metrics, "best_eval_loss", "train_loss"),
    }

    exported = export_task(
        ctx,
        config.export,
        trained,
        data,
        served_model_name=config.tracking.registered_model,
        max_new_tokens=config.eval.max_new_tokens,
        max_seq_length=config.model.max_seq_length,
    )
    results["export"] = {
        "merged": exported.merged_path,
        "parity_max_abs_diff": exported.parity_max_abs_diff,
    }
    return data, exported


def _release(
    config: PipelineConfig,
    ctx: RunContext,
    data: DataRef,
    exported: ExportRef,
    summary: dict[str, Any],
    results: dict[str, Any],
) -> None:
    """evaluate -> gate -> register -> serve: what decides whether the candidate ships."""
    champion = champion_task(ctx, config.tracking.registered_model)
    ev = evaluate_task(ctx, config.eval, data, exported, champion)
    metric = ev.primary_metric
    results["evaluate"] = {
        label: round(scores[metric], 4) for label, scores in ev.scores.items() if metric in scores
    } | {"items": ev.n_items}

    decision = gate_task(ctx, config.eval, ev)
    summary["gate"] = {
        "passed": decision.passed,
        "reasons": decision.reasons,
        "metric": metric,
        "candidate": decision.candidate,
        "base": decision.base,
        "champion": decision.champion,
    }
    if not decision.passed:
        return  # registration and serving stop here; every artifact so far is kept

    name = config.tracking.registered_model
    registered = register_task(ctx, name, GateBar.of(config.eval), exported, ev, decision)
    if registered is not None:
        results["register"] = {
            "model": f"{registered.name}/{registered.version}",
            "alias": registered.alias,
        }
    if not config.deploy.enabled:
        return
    spec = f"{registered.name}/{registered.version}" if registered else exported.candidate_path
    served = deploy_task(ctx, config.deploy, spec, heldout_path=data.validation_path, evaluation=ev)
    if served is not None:
        results["serve"] = {"endpoint": served.endpoint}
        summary["serving"] = summary_lines(served)


def _rounded(metrics: dict[str, float], *keys: str) -> dict[str, float]:
    return {k: round(metrics[k], 4) for k in keys if k in metrics}
