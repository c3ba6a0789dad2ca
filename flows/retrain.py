"""The ``retrain`` deployment: train again only when the data changed.

    fingerprint (listing first) -> same as a run before? -> stop: "No new data" / "Already trained"
                                -> else the pipeline (finetune, as a subflow) -> gate passed?
                                   -> the ``rollout`` deployment for the new version

Started by its cron schedule (prefect.yaml), by the ``on-new-data`` trigger on a
``slothflow.data.updated`` event (``slothflow data notify``), or by hand. Prefect's
trigger may create a flow run per event and the schedule may fire during a retrain; the
deployment's concurrency limit of one (ENQUEUE) runs them one after another, and each
compares its data fingerprint with the recipe's runs in MLflow, so one fingerprint is
trained once: a run that finds it trained (or in training) ends without training and
names that run.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.pipeline import DEFAULT_FORM, finetune
from tasks.core import home as home_mod
from tasks.core import settings, tracking
from tasks.core.config import PipelineConfig, PipelineForm
from tasks.core.home import Home
from tasks.data.fingerprint import Fingerprint, fingerprint

#: Where a host's worker remembers the content hashes of the sources it listed.
RECORD = "source-hashes.json"

#: States a retrain that trained nothing ends in (Completed, with these names in the UI).
NO_NEW_DATA = "No new data"
ALREADY_TRAINED = "Already trained"


# Never cached or persisted: the listing is the point, and it is cheap.
@task(
    name="fingerprint",
    retries=2,
    retry_delay_seconds=10,
    cache_policy=NO_CACHE,
    persist_result=False,
)
def fingerprint_task(sources: list[str], home: Home) -> dict[str, Any]:
    """The data's fingerprint; only new or changed sources are read (see
    :mod:`tasks.data.fingerprint`)."""
    fp = fingerprint(sources, home.cache / RECORD)
    get_run_logger().info(
        "data fingerprint %s: %d sources listed, %d read (%s)",
        fp.value[:12],
        fp.listed,
        fp.read,
        ", ".join(fp.changed) or "none changed",
    )
    return fp.summary()


def _flow_run_over(flow_run_id: str) -> bool:
    """Whether the Prefect flow run is over (a pipeline run whose process was killed
    stays RUNNING in MLflow; its flow run says it crashed or failed)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            state = client.read_flow_run(flow_run_id).state
        except ObjectNotFound:
            return True
    return state is None or state.is_final()


def trained_before(
    config: PipelineConfig, home: Home, value: str, since_ms: int
) -> tuple[str, str] | None:
    """(state name, message) when the recipe's runs already cover fingerprint ``value``:
    the last finished run has it (no new data), or a run in progress or finished since
    this retrain was asked for has it (already trained). None: train."""
    runs = tracking.pipeline_runs(config.tracking, home, config.name)
    finished = [r for r in runs if r.status == "FINISHED"]
    for r in runs:
        if r.source_fingerprint != value:
            continue
        if r.status == "RUNNING" and not (r.flow_run_id and _flow_run_over(r.flow_run_id)):
            return ALREADY_TRAINED, f"already trained: run {r.run_id} is training on this data"
        if r.status == "FINISHED":
            if r.start_time_ms >= since_ms or finished[0].run_id != r.run_id:
                return ALREADY_TRAINED, f"already trained: run {r.run_id} trained on this data"
            return NO_NEW_DATA, f"no new data since run {r.run_id}"
    return None


def _asked_at_ms() -> int:
    """When this retrain was asked for: its flow run's creation (a run that waited for the
    deployment's concurrency slot was asked for before the run it waited on), else now."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    if flow_run.id:
        with get_client(sync_client=True) as client:
            created = client.read_flow_run(flow_run.id).created
        if created is not None:
            return int(created.timestamp() * 1000)
    return int(time.time() * 1000)


def _artifact(config: PipelineConfig, fp: dict[str, Any], outcome: str, extra: list[str]) -> None:
    from prefect.artifacts import create_markdown_artifact

    lines = [
        f"# retrain {config.name}: {outcome}",
        "",
        f"- data fingerprint: `{fp['fingerprint'][:16]}` ({fp['sources']} sources listed, "
        f"{fp['read']} read)",
        *extra,
    ]
    create_markdown_artifact(
        markdown="\n".join(lines), key=f"retrain-{config.name}", description=outcome
    )


@flow(name="slothflow-retrain", validate_parameters=True)
def retrain(config: PipelineForm = DEFAULT_FORM, reason: str = "manual") -> Any:
    """Retrain ``config`` when its data (``data.sources``: files, folders, globs or URL
    prefixes) changed since the recipe's last run; hand a version that passes the gate to
    the ``rollout`` deployment (when ``deploy.enabled``). ``reason``: what started it
    (the schedule, a data event), for the record."""
    from prefect.states import Completed

    logger = get_run_logger()
    home = home_mod.resolve_home()
    full = settings.complete(config, settings.from_env())
    settings.require_shared_tracking(full, home, "a retrain runs on a worker")
    asked = _asked_at_ms()
    fp = fingerprint_task(full.data.sources, home)
    if found := trained_before(full, home, fp["fingerprint"], asked):
        name, message = found
        url = tracking.record_check(
            full.tracking,
            home,
            f"retrain-check-{config.name}",
            {
                tracking.TAG_RECIPE: config.name,
                tracking.TAG_SOURCE_FINGERPRINT: fp["fingerprint"],
                "slothflow.retrain.decision": name,
                "slothflow.retrain.reason": reason,
            },
            {**fp, "decision": name, "message": message, "reason": reason},
        )
        _artifact(full, fp, name, [f"- {message}", f"- MLflow: {url}"])
        logger.info("%s (fingerprint %s)", message, fp["fingerprint"][:12])
        return Completed(name=name, message=f"{message} (fingerprint {fp['fingerprint'][:12]})")

    # Serving is the rollout deployment's: the pipeline registers, the rollout promotes.
    form = config.model_copy(update={"deploy": config.deploy.model_copy(update={"enabled": False})})
    summary = finetune(config=form)
    if not isinstance(summary, dict):
        return summary  # a final state of its own (cancelled): this retrain ends with it
    gate = summary.get("gate", {})
    registered = summary.get("stages", {}).get("register")
    extra = [
        f"- run {summary['run_id']}: gate {'passed' if gate.get('passed') else 'blocked'}",
        f"- new rows: {summary['stages']['data'].get('new_rows')}",
    ]
    if registered and full.deploy.enabled:
        rollout = _start_rollout(registered["model"], config)
        summary["rollout_flow_run"] = rollout
        extra.append(f"- rollout of {registered['model']}: flow run {rollout}")
    _artifact(full, fp, "trained", extra)
    return summary


def _start_rollout(model: str, config: PipelineForm) -> str:
    """Start the ``rollout`` deployment for ``model`` and return its flow run's name; not
    waited for (it queues behind any rollout in progress on the endpoint). Its
    idempotency key makes a retried retrain attach to the rollout it started."""
    from prefect.deployments import run_deployment

    run = run_deployment(
        "slothflow-rollout/rollout",
        parameters={"model": model, "config": config.model_dump(mode="json")},
        timeout=0,
        as_subflow=False,
        idempotency_key=f"rollout:{model}",
    )
    get_run_logger().info("rollout of %s: flow run %s", model, run.name)
    return str(run.name)


__all__ = ["Fingerprint", "retrain", "trained_before"]
