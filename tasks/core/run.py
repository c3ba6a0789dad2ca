"""Opening a pipeline run: its id, folder, hardware decision and tracking.

Shared by the flow and by the CLI commands that run one stage alone, so a stage
run by hand is recorded exactly like one run by the pipeline.
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

from tasks.core import hardware, tracking
from tasks.core.config import (
    HASH_EXCLUDED_SECTIONS,
    ConfigError,
    PipelineConfig,
    config_hash,
    dump_config,
)
from tasks.core.home import Home
from tasks.core.interrupt import is_interrupt
from tasks.core.refs import RunContext, write_json_atomic
from tasks.core.tracking import NullTracker, Tracker

log = logging.getLogger(__name__)

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def new_run_id(cfg: PipelineConfig, chash: str) -> str:
    # The random tail keeps two runs started within one second apart.
    return f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{chash[:8]}{secrets.token_hex(2)}"


def latest_run_id(home: Home) -> str | None:
    runs = [p for p in home.runs.glob("*/run.json")]
    if not runs:
        return None
    return max(runs, key=lambda p: p.stat().st_mtime).parent.name


def resume_target(home: Home, cfg: PipelineConfig, resume_run_id: str) -> str:
    """The run id ``--resume`` names (``last``: the newest run of this home), checked: it
    exists and started with this very config (a run's finished stages are only valid for
    the config that produced them)."""
    import json

    if resume_run_id == "last":
        last = latest_run_id(home)
        if last is None:
            raise ConfigError(f"--resume last: no runs in {home.runs}")
        resume_run_id = last
    if not _RUN_ID.match(resume_run_id):
        raise ConfigError(f"cannot resume {resume_run_id!r}: not a run id")
    meta = home.run_dir(resume_run_id) / "run.json"
    if not meta.exists():
        known = sorted(p.parent.name for p in home.runs.glob("*/run.json"))[-3:]
        hint = f" (newest: {', '.join(known)})" if known else ""
        raise ConfigError(f"cannot resume {resume_run_id!r}: no such run in {home.runs}{hint}")
    chash = config_hash(cfg)
    started_with = json.loads(meta.read_text())["config_hash"]
    if started_with != chash:
        raise ConfigError(
            f"cannot resume {resume_run_id!r}: it started with config {started_with[:12]}, "
            f"this config is {chash[:12]} (see `slothflow config show`). Resume with the "
            "recipe and --set values it started with, or start a new run (drop --resume)."
        )
    return resume_run_id


def resume_config(
    home: Home, cfg: PipelineConfig, run_id: str, overrides: list[str]
) -> tuple[PipelineConfig, list[str]]:
    """``cfg`` with the sections outside the config hash (``deploy``, ``tracking``) taken
    from what run ``run_id`` was last started with, plus this command's ``--set`` values
    for them: a resume that does not repeat ``--set deploy.port=N`` serves on N again
    instead of falling back to the recipe's default. Returns the config and one line per
    field that differs from the recipe's, for the user to see."""
    from tasks.core.config import load_config

    mutable = sorted(HASH_EXCLUDED_SECTIONS - {"name"})
    own = [o for o in overrides if o.split("=", 1)[0].split(".", 1)[0].strip() in mutable]
    saved = home.run_dir(run_id) / "config.yaml"
    if not saved.exists():
        return cfg, []
    started = load_config(str(saved), own)
    merged = cfg.model_copy(update={s: getattr(started, s) for s in mutable})
    fresh = tracking.flatten_params(cfg.model_dump(mode="json", include=set(mutable)))
    kept = tracking.flatten_params(merged.model_dump(mode="json", include=set(mutable)))
    notes = [
        f"{k}={kept[k]} (the recipe says {fresh.get(k)})"
        for k in sorted(kept)
        if kept[k] != fresh.get(k)
    ]
    return merged, notes


def open_run(
    cfg: PipelineConfig,
    home: Home,
    resume_run_id: str | None = None,
    *,
    joining: bool = False,
) -> RunContext:
    """Create a run (or re-open ``resume_run_id``): folder, config, hardware, MLflow.

    Resuming checks that the configuration is the one the run started with: a run's
    finished stages are only valid for the config that produced them. ``joining``: this
    worker runs some stages of run ``resume_run_id``, which another worker started with
    its own home; the run's folder here is created on the first visit (its MLflow run is
    the one the other worker opened).
    """
    chash = config_hash(cfg)
    fresh_here = (
        resume_run_id is not None and not (home.run_dir(resume_run_id) / "run.json").exists()
    )
    if resume_run_id is not None and joining and fresh_here:
        if not _RUN_ID.match(resume_run_id):
            raise ConfigError(f"cannot join run {resume_run_id!r}: not a run id")
        run_id = resume_run_id
    elif resume_run_id is not None:
        run_id = resume_target(home, cfg, resume_run_id)
    else:
        run_id = new_run_id(cfg, chash)
    run_dir = home.run_dir(run_id)
    run_dir.mkdir(parents=True, exist_ok=True)

    # The pipeline's side of a gpu-pool run trains nothing here; the joining gpu worker does.
    trains_here = joining or not cfg.orchestration.gpu_pool
    decision = hardware.decide(cfg, hardware.probe(), trains_here=trains_here)
    log.info("hardware: %s", decision.reason)
    code = tracking.code_version()

    tref = tracking.open_pipeline_run(cfg.tracking, home, run_id)
    parent = tracking.pipeline_tracker(tref)
    parent.log_params(
        # Only what the config hash covers: a resumed run has the same values for
        # these (MLflow params are write-once), while the sections outside the hash
        # (deploy, tracking) may change on resume and live in config/resolved.yaml.
        tracking.flatten_params(cfg.model_dump(mode="json", exclude=set(HASH_EXCLUDED_SECTIONS)))
    )
    parent.log_params({"config_hash": chash})
    # The hardware may differ between attempts (a run resumed on another machine).
    parent.log_attempt_params(decision.as_params())
    parent.set_tags(
        {
            "slothflow.config_hash": chash,
            # what a retrain looks its recipe's last runs up by (tasks.core.tracking)
            tracking.TAG_RECIPE: cfg.name,
            "slothflow.hardware": decision.reason,
            "mlflow.source.git.commit": code,
            "slothflow.code_version": code,
        }
    )
    parent.log_text(dump_config(cfg), "config/resolved.yaml")

    ctx = RunContext(
        run_id=run_id,
        run_dir=str(run_dir),
        config_hash=chash,
        code_version=code,
        hardware={k.removeprefix("hardware."): v for k, v in decision.as_params().items()},
        tracking=tref.model_dump(),
    )
    (run_dir / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    write_json_atomic(run_dir / "run.json", ctx.model_dump(mode="json"))
    return ctx


@contextlib.contextmanager
def stage(ctx: RunContext, name: str) -> Iterator[Tracker]:
    """The tracker of one stage's nested MLflow run; marks it FAILED on error.

    The earlier stages' runs and artifacts are left as they are, so a failed
    pipeline can be resumed from the stage that failed.
    """
    if ctx.tracking is None:
        yield NullTracker()
        return
    ref = tracking.TrackingRef.model_validate(ctx.tracking)
    t = tracking.stage_tracker(ref, name)
    t.set_tags(
        {"slothflow.config_hash": ctx.config_hash, "mlflow.source.git.commit": ctx.code_version}
    )
    started = time.perf_counter()
    hardware.start_gpu_peak()
    try:
        yield t
    except BaseException as exc:
        t.end(mlflow_status("INTERRUPTED" if is_interrupt(exc) else "FAILED"))
        raise
    # What each stage costs, comparable across stages and runs (the run's timeline).
    costs = {"stage_seconds": time.perf_counter() - started}
    if (peak := hardware.gpu_peak_gb()) is not None:
        costs["stage_gpu_peak_gb"] = peak
    t.log_metrics(costs)
    t.end("FINISHED")


def mlflow_status(status: str) -> str:
    """MLflow's word for a run status of ours: an interrupted run is KILLED there."""
    return "KILLED" if status == "INTERRUPTED" else status


def status_of(exc: BaseException) -> str:
    """How a run that ended with ``exc`` is recorded: INTERRUPTED (a signal: resumable,
    nothing wrong with it) or FAILED."""
    return "INTERRUPTED" if is_interrupt(exc) else "FAILED"


def finish(ctx: RunContext, status: str, summary: dict[str, object] | None = None) -> None:
    """Record the run's end: ``result.json`` in its folder and the parent MLflow run's
    status (FINISHED, FAILED, or INTERRUPTED, which MLflow calls KILLED)."""
    write_json_atomic(Path(ctx.run_dir) / "result.json", {"status": status, **(summary or {})})
    if ctx.tracking is None:
        return
    ref = tracking.TrackingRef.model_validate(ctx.tracking)
    t = tracking.pipeline_tracker(ref)
    if summary:
        t.log_dict(summary, "summary.json")
    t.end(mlflow_status(status))


@contextlib.contextmanager
def tracked_run(
    cfg: PipelineConfig, home: Home, resume_run_id: str | None = None
) -> Iterator[tuple[RunContext, dict[str, object]]]:
    """A run of its own for a command outside the pipeline flow (``slothflow train``,
    ``slothflow serve --track``): opened, and always finished: FINISHED with the summary
    the caller fills in, or FAILED (and resumable) when the body raises."""
    ctx = open_run(cfg, home, resume_run_id)
    summary: dict[str, object] = {"run_id": ctx.run_id}
    try:
        yield ctx, summary
    except BaseException as exc:
        finish(ctx, status_of(exc), summary)
        raise
    finish(ctx, "FINISHED", summary)


def previous_output(
    home: Home, ctx: RunContext, recipe: str, stage: str, filename: str
) -> str | None:
    """A file from the same recipe's most recent *earlier* run whose ``stage`` finished
    (e.g. the data stage's manifest, so rows accepted before keep their place).

    The choice is recorded in the run folder the first time, so resuming this run
    later sees the same input even if newer runs have finished since.
    """
    import json

    record = Path(ctx.run_dir) / f"previous_{stage}_{filename}.json"
    if record.exists():
        return json.loads(record.read_text())["path"]
    own = re.compile(rf"^{re.escape(recipe)}-\d{{8}}-\d{{6}}-[0-9a-f]+$")  # not "recipe-x-..."
    candidates = [
        p
        for p in home.runs.glob(f"{recipe}-*/{stage}/{filename}")
        if own.match(p.parents[1].name)
        and p.parents[1].name != ctx.run_id
        and (p.parent / "ref.json").exists()
    ]
    chosen = str(max(candidates, key=lambda p: p.stat().st_mtime)) if candidates else None
    write_json_atomic(record, {"path": chosen})
    return chosen


FLOW_RUN_RECORD = "flow_run.json"


def record_flow_run(ctx: RunContext, flow_run_id: str) -> None:
    """Note in the run's folder the orchestrator's flow run that drives it, so a later
    attempt of that same flow run (rescheduled after its worker died) finds the run to
    resume: :func:`run_of_flow_run`."""
    write_json_atomic(Path(ctx.run_dir) / FLOW_RUN_RECORD, {"flow_run_id": flow_run_id})


def run_of_flow_run(home: Home, flow_run_id: str) -> str | None:
    """The run an earlier attempt of flow run ``flow_run_id`` started, if any."""
    import json

    for record in home.runs.glob(f"*/{FLOW_RUN_RECORD}"):
        try:
            if json.loads(record.read_text(encoding="utf-8")).get("flow_run_id") == flow_run_id:
                return record.parent.name
        except (OSError, ValueError):
            continue
    return None
