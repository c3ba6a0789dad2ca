"""The pipeline flows: they only compose stage tasks.

    base -> data -> [train -> export -> evaluate] -> gate -> register -> serve

Three entry points over one body (:func:`_run`), so there is no second runner:

* ``pipeline`` — what ``slothflow run`` calls, with a whole ``PipelineConfig``;
* ``finetune`` — the ``finetune`` deployment (prefect.yaml), started from the Prefect UI
  or API. Its one parameter is a ``PipelineForm``, rendered as a form with every field's
  description as help text; the worker adds its own commands, hosts and credentials;
* ``gpu_stages`` — the bracketed stages as the ``gpu-stages`` deployment on the ``gpu``
  pool, run by ``_run`` through ``run_deployment`` when ``orchestration.gpu_pool`` is set
  (in the same process otherwise).

Stages hand each other small references (paths + hashes) through the run's folder.
Prefect caches the stages that take time (base, data, train, export, evaluate) by their
inputs hash: a resumed run, or a new run with the same inputs, shows them as Cached and
skips them; ``refresh`` names stages to run again anyway.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from prefect import flow, get_run_logger
from pydantic import BaseModel

from flows import events
from flows.preflight import preflight
from tasks.base_model import prepare_base_task
from tasks.core import caching, settings, storage, tracking
from tasks.core import home as home_mod
from tasks.core import run as run_mod
from tasks.core.artifacts import InitAdapter, init_adapter_of
from tasks.core.config import (
    ConfigError,
    OrchestrationConfig,
    PipelineConfig,
    PipelineForm,
    dump_config,
    load_config,
)
from tasks.core.home import Home
from tasks.core.interrupt import Interrupted, signals_as_interrupt
from tasks.core.orchestration import CACHED_STAGES, check_refresh
from tasks.core.refs import (
    BaseModelRef,
    DataRef,
    EvalRef,
    ExportRef,
    GateBar,
    ResolvedModel,
    RunContext,
    TrainRef,
    load_ref,
    record_ref,
)
from tasks.data import clean_task
from tasks.evaluate import evaluate_task
from tasks.evaluate.report import scores_table
from tasks.export import export_task
from tasks.gate import gate_task
from tasks.registry import champion_task, register_task, retention_task
from tasks.serve import deploy_task, summary_lines
from tasks.serve.canary import CanaryError
from tasks.train import train_task
from tasks.train.checkpoints import remove_checkpoints

log = logging.getLogger(__name__)

T = TypeVar("T", bound=BaseModel)


class StageError(RuntimeError):
    """A stage run elsewhere (the GPU stages' deployment) did not complete."""


# No log_prints: it patches print() and breaks libraries that capture their own stdout
# (dill disassembles functions through print while datasets fingerprints a map).
@dataclass
class _Stages:
    """Calls stage tasks with the home's cache (:mod:`tasks.core.caching`) and notes which
    ones Prefect served from it; a served stage's reference is recorded in this run's
    folder, as if it had run here (what a stage on another worker reads)."""

    home: Home
    refresh: frozenset[str]
    store: storage.RunStorage | None = None  # None: the workers share the home
    cached: list[str] = field(default_factory=list)

    def __call__(self, ctx: RunContext, task: Any, *args: Any, **kwargs: Any) -> Any:
        stage = task.name
        configured = caching.configured(
            task,
            self.home.stage_cache,
            refresh=stage in self.refresh,
            shared=self.store.url if self.store else None,
        )
        state = configured(ctx, *args, return_state=True, **kwargs)
        result = state.result()  # raises the stage's own error when it failed
        if state.name == "Cached" and self.store is not None and result is not None:
            # The cache is shared by every worker: the files may be on another host. A
            # record whose files were never published (its worker died between the two)
            # is replaced by running the stage again.
            try:
                result = self.store.localize(result)
            except storage.StorageError as exc:
                get_run_logger().warning("%s: %s; running it again", stage, exc)
                again = caching.configured(
                    task, self.home.stage_cache, refresh=True, shared=self.store.url
                )
                state = again(ctx, *args, return_state=True, **kwargs)
                result = state.result()
        if state.name == "Cached":
            self.cached.append(stage)
            if result is not None:
                record_ref(ctx.stage_dir(stage), result)
        if self.store is not None and stage in CACHED_STAGES and result is not None:
            self.store.publish(ctx.run_id, stage, result)
        return result

    def take(self, ctx: RunContext, stage: str, model: type[T]) -> T:
        """What ``stage`` of this run handed over (it ran on another worker): from the run
        storage when there is one, else from the run's folder in the shared home."""
        if self.store is None:
            return load_ref(ctx.stage_dir(stage), model)
        ref = self.store.take(ctx.run_id, stage, model)
        record_ref(ctx.stage_dir(stage), ref)
        return ref


def _stages(home: Home, refresh: list[str] | None) -> _Stages:
    url = settings.from_env().run_storage
    return _Stages(home, check_refresh(refresh), storage.for_home(url, home))


@flow(name="slothflow-pipeline", validate_parameters=True)
def pipeline(
    config: PipelineConfig,
    resume_run_id: str | None = None,
    refresh: list[str] | None = None,
) -> dict[str, Any]:
    """Run the whole pipeline for one recipe (``slothflow run``).

    ``resume_run_id`` re-opens an earlier run of the *same* config: finished stages
    are served from the cache, the failed one runs again (training from its last
    checkpoint). ``refresh``: stages to run again even when cached.
    """
    home = home_mod.resolve_home()
    return _run(config, home, resume_run_id, _stages(home, refresh), refresh)


def _default_form() -> PipelineForm:
    form = settings.form_of(load_config("default"))
    return form.model_copy(update={"orchestration": OrchestrationConfig(gpu_pool="gpu")})


#: The run form's defaults: the default recipe, with the GPU stages on the ``gpu`` pool.
DEFAULT_FORM = _default_form()


@flow(name="slothflow-finetune", validate_parameters=True)
def finetune(
    config: PipelineForm = DEFAULT_FORM,
    resume_run_id: str | None = None,
    refresh: list[str] | None = None,
) -> Any:
    """The whole pipeline as the ``finetune`` deployment: a run started from the Prefect UI
    or API. Its parameters are the recipe without the operator's settings; this worker adds
    its own (``tasks.core.settings``) and checks every path the form names against its
    allowlist before anything runs. ``resume_run_id``: an earlier run of the same config to
    continue; ``refresh``: stages (base, data, train, export, evaluate) to run again even
    when their inputs are unchanged."""
    home = home_mod.resolve_home()
    stages = _stages(home, refresh)
    full = settings.complete(config, settings.from_env())
    settings.require_shared_tracking(full, home, "this run was started from a deployment")
    earlier = _earlier_attempt(home)  # always: it also enforces the attempt cap
    resume_run_id = resume_run_id or earlier
    plan = preflight(full, home, resume_run_id)
    # A cancel from the UI reaches this process as SIGTERM from the worker.
    try:
        with signals_as_interrupt():
            return _run(plan.config, home, plan.resume_run_id, stages, refresh or [])
    except Interrupted as stop:
        return _cancelled_or_raise(stop)


@flow(name="slothflow-gpu-stages", validate_parameters=True)
def gpu_stages(config: PipelineForm, run_id: str, refresh: list[str] | None = None) -> Any:
    """train -> export -> evaluate of run ``run_id``, on a ``gpu``-pool worker (the
    ``gpu-stages`` deployment, started by the pipeline when ``orchestration.gpu_pool`` is
    set). The run must exist and have started with this very config; its base and data
    stages' outputs are read from the run's folder, and this stage's go back there."""
    home = home_mod.resolve_home()
    stages = _stages(home, refresh)
    full = settings.complete(config, settings.from_env())
    settings.require_shared_tracking(full, home, "the GPU stages run on a worker")
    _earlier_attempt(home)  # the attempt cap; the run to resume is the parameter
    if ended := _parent_ended():
        # A rescheduled attempt whose pipeline run is over (cancelled, or failed while
        # this one was down): nothing would wait for what it trains.
        from prefect.states import Cancelled

        return Cancelled(message=f"the pipeline run it belongs to has ended ({ended})")
    ctx = run_mod.open_run(full, home, run_id, joining=True)
    base = stages.take(ctx, "base", BaseModelRef)
    data = stages.take(ctx, "data", DataRef)
    results: dict[str, Any] = {}
    try:
        with signals_as_interrupt():
            _gpu_part(full, ctx, base, data, results, stages)
    except Interrupted as stop:
        return _cancelled_or_raise(stop)
    return results


#: Attempts of one flow run (the crash automation reschedules a crashed run) before it
#: fails for good: Failed, not Crashed, so the automation does not reschedule it again.
MAX_ATTEMPTS = 3


def _earlier_attempt(home: Home) -> str | None:
    """The run an earlier attempt of this very flow run started (the crash automation in
    infra/automations/ rescheduled it after its worker died): resuming it reuses the
    finished stages and the last training checkpoint. None on a first attempt."""
    from prefect.runtime import flow_run

    if not flow_run.id:
        return None
    if flow_run.run_count > MAX_ATTEMPTS:
        raise StageError(
            f"flow run {flow_run.name} started {flow_run.run_count} times; giving up "
            f"after {MAX_ATTEMPTS} (see the earlier attempts' logs)"
        )
    run_id = run_mod.run_of_flow_run(home, flow_run.id)
    if run_id is not None:
        get_run_logger().warning(
            "attempt %d of flow run %s: resuming its run %s",
            flow_run.run_count,
            flow_run.name,
            run_id,
        )
    return run_id


def _parent_ended() -> str | None:
    """The final state of this flow run's parent flow run, if it has one and it ended."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    parent_id = flow_run.parent_flow_run_id
    if not parent_id:
        return None
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(parent_id).state
    return state.name if state is not None and (state.is_final() or state.is_cancelling()) else None


def _cancelled_or_raise(stop: Interrupted) -> Any:
    """A signal while this flow run is being cancelled ends it Cancelled (the run's folder
    and MLflow runs are already marked interrupted, so it can be resumed); any other
    signal (a node drained, a worker stopped) stays a crash, for the crash automation."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.runtime import flow_run
    from prefect.states import Cancelled

    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run.id).state
    if state is not None and state.type == StateType.CANCELLING:
        return Cancelled(message=f"cancelled ({stop}); resumable with resume_run_id")
    raise stop


def _run(
    config: PipelineConfig,
    home: Home,
    resume_run_id: str | None,
    stages: _Stages,
    refresh: list[str] | None = None,
) -> dict[str, Any]:
    logger = get_run_logger()
    pool = config.orchestration.gpu_pool
    if pool:  # before the run exists: a wrong pool or a local store fails in seconds
        settings.require_shared_tracking(config, home, f"orchestration.gpu_pool={pool}")
        _check_gpu_deployment(config)
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
    _link_flow_run(ctx, summary)
    try:
        base, data = _prepare(config, home, ctx, results, stages)
        if pool:
            exported, ev = _on_gpu_pool(config, ctx, results, stages, refresh or [])
        else:
            exported, ev = _gpu_part(config, ctx, base, data, results, stages)
        _release(config, ctx, data, exported, ev, summary, results, stages)
        if not summary["gate"]["passed"]:
            # for the notification automation (infra/automations/notifications.yaml)
            events.emit_from_flow(
                events.GATE_BLOCKED,
                events.model_resource(config.tracking.registered_model),
                {"run_id": ctx.run_id, "recipe": config.name, **summary["gate"]},
            )
        summary["cached_stages"] = stages.cached
        if stages.cached and ctx.tracking:
            tracking.pipeline_tracker(tracking.TrackingRef.model_validate(ctx.tracking)).set_tags(
                {"slothflow.cached_stages": ",".join(stages.cached)}
            )
        _report_artifact(ctx, summary, ev)
    except BaseException as exc:
        if isinstance(exc, CanaryError):
            events.emit_from_flow(
                events.ROLLED_BACK,
                events.model_resource(config.tracking.registered_model),
                {
                    "run_id": ctx.run_id,
                    "model": results.get("register", {}).get("model", ctx.run_id),
                    "reason": str(exc),
                },
            )
        # A signal marks the run INTERRUPTED (resumable, nothing failed), anything else FAILED.
        status = run_mod.status_of(exc)
        run_mod.finish(ctx, status, {**summary, "completed_stages": sorted(results)})
        raise
    run_mod.finish(ctx, "FINISHED", summary)
    return summary


def _prepare(
    config: PipelineConfig, home: Home, ctx: RunContext, results: dict[str, Any], stages: _Stages
) -> tuple[BaseModelRef, DataRef]:
    """base -> data: the CPU stages before training."""
    base = stages(ctx, prepare_base_task, config.model)
    results["base"] = {"model": base.name_or_path, "revision": base.revision[:19]}

    previous = run_mod.previous_output(home, ctx, config.name, "data", "manifest.jsonl")
    data = stages(ctx, clean_task, config.data, base, previous)
    results["data"] = {
        "train": data.train_rows,
        "validation": data.validation_rows,
        "new_rows": data.new_rows,
        "fingerprint": data.fingerprint[:12],
    }
    if ctx.tracking and data.source_fingerprint:
        # A retrain compares its inputs with this run's by this tag (flows/retrain.py).
        tracking.pipeline_tracker(tracking.TrackingRef.model_validate(ctx.tracking)).set_tags(
            {tracking.TAG_SOURCE_FINGERPRINT: data.source_fingerprint}
        )
    return base, data


def _gpu_part(
    config: PipelineConfig,
    ctx: RunContext,
    base: BaseModelRef,
    data: DataRef,
    results: dict[str, Any],
    stages: _Stages,
) -> tuple[ExportRef, EvalRef]:
    """train -> export -> evaluate: the stages that take a GPU, here or on a GPU worker."""
    name = config.tracking.registered_model
    # A warm start is gated against the very champion it started from: looked up once,
    # before training, even if another version becomes champion while it trains.
    warm = config.train.init_adapter == "champion"
    champion = stages(ctx, champion_task, name) if warm else None
    trained = stages(
        ctx,
        train_task,
        config.train,
        config.model,
        base,
        data,
        max_new_tokens=config.eval.max_new_tokens,
        resolved_config=dump_config(config),
        system_metrics=config.tracking.system_metrics,
        init_adapter=_warm_start(ctx, name, champion) if warm else None,
    )
    exported = stages(
        ctx,
        export_task,
        config.export,
        trained,
        data,
        served_model_name=config.tracking.registered_model,
        max_new_tokens=config.eval.max_new_tokens,
        max_seq_length=config.model.max_seq_length,
    )
    # Past export nothing resumes this training: its checkpoints go (the adapter stays).
    remove_checkpoints(Path(trained.path))
    if not warm:
        champion = stages(ctx, champion_task, name)
    ev = stages(ctx, evaluate_task, config.eval, data, exported, champion)
    _record_gpu_part(results, trained, exported, ev)
    return exported, ev


def _warm_start(ctx: RunContext, name: str, champion: ResolvedModel | None) -> InitAdapter | None:
    """What ``train.init_adapter=champion`` starts from: the champion's adapter; None (a
    fresh LoRA, said as a warning) when there is no champion yet, as on a project's first
    run. A champion with merged weights only is refused."""
    if champion is None:
        why = "this run is not tracked" if ctx.tracking is None else f"{name} has no champion yet"
        get_run_logger().warning(
            "train.init_adapter=champion: %s; training a fresh LoRA on the base model", why
        )
        return None
    init = init_adapter_of(champion)
    get_run_logger().info("train.init_adapter=champion: starting from %s's adapter", init.label)
    return init


def _record_gpu_part(
    results: dict[str, Any], trained: TrainRef, exported: ExportRef, ev: EvalRef
) -> None:
    results["train"] = {
        "best_step": trained.best_step,
        **_rounded(trained.metrics, "best_eval_loss", "train_loss"),
    }
    results["export"] = {
        "merged": exported.merged_path,
        "parity_max_abs_diff": exported.parity_max_abs_diff,
    }
    metric = ev.primary_metric
    results["evaluate"] = {
        label: round(scores[metric], 4) for label, scores in ev.scores.items() if metric in scores
    } | {"items": ev.n_items}


def _check_gpu_deployment(config: PipelineConfig) -> None:
    """The GPU stages' deployment exists and is on ``orchestration.gpu_pool``."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    name, pool = config.orchestration.gpu_deployment, config.orchestration.gpu_pool
    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise ConfigError(
                f"orchestration.gpu_deployment: no deployment {name!r} on the Prefect server; "
                "create it with `prefect deploy --all` (prefect.yaml)"
            ) from None
    if deployment.work_pool_name != pool:
        raise ConfigError(
            f"orchestration.gpu_pool={pool!r}, but deployment {name!r} runs on work pool "
            f"{deployment.work_pool_name!r}"
        )


#: How long a crashed GPU-stages run may stay Crashed before the pipeline stops waiting
#: for the crash automation to reschedule it.
RESCHEDULE_GRACE_S = 60.0


def _on_gpu_pool(
    config: PipelineConfig,
    ctx: RunContext,
    results: dict[str, Any],
    stages: _Stages,
    refresh: list[str],
) -> tuple[ExportRef, EvalRef]:
    """Run the GPU stages as the ``gpu-stages`` deployment and wait for it; its outputs come
    back through the run storage or the run's folder (paths plus hashes), not through
    Prefect results."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.runtime import flow_run
    from prefect.states import Cancelling

    # timeout=0: create the child and return, so this flow knows its id while it waits and
    # can cancel it when this run is cancelled or stopped (the GPU worker then stops
    # training, the child's slot frees, and both runs stay resumable).
    child = run_deployment(
        config.orchestration.gpu_deployment,
        parameters={
            "config": settings.form_of(config).model_dump(mode="json"),
            "run_id": ctx.run_id,
            "refresh": refresh,
        },
        timeout=0,
        as_subflow=True,
        # A rescheduled attempt of this flow run re-attaches to the GPU stages' run it
        # started before instead of starting a second one for the same run.
        idempotency_key=f"{ctx.run_id}:{flow_run.id}:gpu-stages",
    )
    with get_client(sync_client=True) as client:
        try:
            crashed_at: float | None = None
            while True:
                child = client.read_flow_run(child.id)
                state = child.state
                if state is not None and state.is_crashed():
                    # The crash automation reschedules a crashed run within seconds;
                    # wait for that before calling it the end.
                    crashed_at = crashed_at or time.monotonic()
                    if time.monotonic() - crashed_at > RESCHEDULE_GRACE_S:
                        break
                elif state is not None and state.is_final():
                    break
                else:
                    crashed_at = None
                time.sleep(2)
        except BaseException:
            client.set_flow_run_state(child.id, Cancelling(message="the parent run stopped"))
            raise
    state = child.state
    if state is None or not state.is_completed():
        raise StageError(
            f"the GPU stages ({config.orchestration.gpu_deployment}, flow run {child.name}) "
            f"ended {state.name if state else 'without a state'}: {state.message if state else ''}"
        )
    trained = stages.take(ctx, "train", TrainRef)
    exported = stages.take(ctx, "export", ExportRef)
    ev = stages.take(ctx, "evaluate", EvalRef)
    _record_gpu_part(results, trained, exported, ev)
    return exported, ev


def _release(
    config: PipelineConfig,
    ctx: RunContext,
    data: DataRef,
    exported: ExportRef,
    ev: EvalRef,
    summary: dict[str, Any],
    results: dict[str, Any],
    stages: _Stages,
) -> None:
    """gate -> register -> serve: what decides whether the candidate ships, and ships it."""
    metric = ev.primary_metric
    decision = stages(ctx, gate_task, config.eval, ev)
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
    registered = stages(ctx, register_task, name, GateBar.of(config.eval), exported, ev, decision)
    if registered is not None:
        results["register"] = {
            "model": f"{registered.name}/{registered.version}",
            "alias": registered.alias,
        }
        pruned = stages(ctx, retention_task, name, config.tracking.keep_versions)
        if pruned is not None:
            results["retention"] = pruned
    if not config.deploy.enabled:
        return
    spec = f"{registered.name}/{registered.version}" if registered else exported.candidate_path
    served = stages(
        ctx, deploy_task, config.deploy, spec, heldout_path=data.validation_path, evaluation=ev
    )
    if served is not None:
        results["serve"] = {"endpoint": served.endpoint}
        summary["serving"] = summary_lines(served)
        if served.aliases is not None:
            # Serving behind the endpoint is what made the registered version champion.
            results["promote"] = {"model": spec, "aliases": served.aliases}


def _link_flow_run(ctx: RunContext, summary: dict[str, Any]) -> None:
    """Tag the MLflow parent run with this Prefect flow run (id and UI link), so each UI
    leads to the other (the flow run's artifact links back: :func:`_report_artifact`)."""
    from prefect.runtime import flow_run

    if not flow_run.id:
        return
    run_mod.record_flow_run(ctx, flow_run.id)
    summary["prefect_flow_run"] = flow_run.id
    tags = {"prefect.flow_run_id": flow_run.id, "prefect.flow_run_name": flow_run.name}
    if flow_run.ui_url:
        summary["prefect_url"] = tags["prefect.flow_run_url"] = flow_run.ui_url
    if ctx.tracking:
        tracking.pipeline_tracker(tracking.TrackingRef.model_validate(ctx.tracking)).set_tags(tags)


def _report_artifact(ctx: RunContext, summary: dict[str, Any], ev: EvalRef) -> None:
    """The flow run's markdown artifact: the MLflow link, the evaluation table and the gate
    decision, on the run's page in the Prefect UI (key ``run-<id>``, so runs of one recipe
    line up under Artifacts)."""
    from prefect.artifacts import create_markdown_artifact

    gate = summary.get("gate", {})
    verdict = "PASSED" if gate.get("passed") else "FAILED"
    lines = [
        f"# {ctx.run_id}",
        "",
        f"MLflow run: {summary['mlflow']}" if "mlflow" in summary else "MLflow: not tracked",
        f"Config hash: `{ctx.config_hash[:12]}` — {ctx.hardware.get('reason', '')}",
        "",
        f"## Evaluation ({ev.n_items} held-out items, primary metric {ev.primary_metric})",
        "",
        scores_table(ev.scores),
        f"## Gate: {verdict}",
        "",
        *[f"- {reason}" for reason in gate.get("reasons", [])],
    ]
    if "register" in summary["stages"]:
        reg = summary["stages"]["register"]
        lines += ["", f"Registered: {reg['model']} @ {reg['alias']}"]
    key = "run-" + "".join(c if c.isalnum() else "-" for c in ctx.run_id.lower())
    create_markdown_artifact(
        markdown="\n".join(lines), key=key[:100], description=f"slothflow run {ctx.run_id}"
    )


def _rounded(metrics: dict[str, float], *keys: str) -> dict[str, float]:
    return {k: round(metrics[k], 4) for k in keys if k in metrics}
