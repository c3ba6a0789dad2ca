"""The registry stage: register the gated candidate as a version of the exported model.

The policy around MLflow's model registry; the registry client itself (aliases,
specs, downloads, ``resolve``) is :mod:`tasks.core.tracking.registry`.

Every registered version holds ``merged/`` and ``adapter/``, each with its
``manifest.json`` — updated at registration with the evaluation metrics and the gate's
decision — and lineage tags (run, data, config, base revision, the gate's numbers).
``register`` aliases it ``challenger``; the rollout moves ``champion``.

**Guard rail.** Every version records the bar its gate applied (:class:`GateBar`:
primary metric, threshold, base margin) as version tags. A run whose bar is looser than
that of the model's ``champion`` or ``challenger`` may not register into that model
(:func:`check_can_register`, called before the long stages and again at registration):
a recipe whose gate cannot fail must never move an alias of a model a stricter recipe
serves. A version without the tags has an unknown bar and counts as stricter.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tasks.core.artifacts import read_manifest
from tasks.core.config import ConfigError
from tasks.core.orchestration import retry_transient, stage_task
from tasks.core.refs import (
    EvalRef,
    ExportRef,
    GateBar,
    GateRef,
    RegistryRef,
    ResolvedModel,
    RunContext,
    record_ref,
    sha256_json,
)
from tasks.core.tracking import NullTracker, Tracker
from tasks.core.tracking import registry as reg
from tasks.core.tracking.registry import (
    CHALLENGER,
    GUARDED_ALIASES,
    TAG_ARTIFACT,
    TAG_GATE_MARGIN,
    TAG_GATE_METRIC,
    TAG_GATE_THRESHOLD,
    TAG_RUN_ID,
)

log = logging.getLogger(__name__)


class GateNotPassedError(RuntimeError):
    """Registration was asked for a candidate that failed the gate."""


class WeakerGateError(ConfigError):
    """This run's gate is looser than the one that admitted the model's champion or
    challenger: registering would let a weaker candidate move an alias of that model."""


def _flat_scores(ev: EvalRef) -> dict[str, float]:
    return {f"eval.{model}.{k}": v for model, s in ev.scores.items() for k, v in s.items()}


def lineage_tags(export: ExportRef, ev: EvalRef, gate: GateRef, run_id: str) -> dict[str, str]:
    m = ev.primary_metric
    return {
        TAG_RUN_ID: run_id,
        "data_fingerprint": export.data_fingerprint,
        "config_hash": export.config_hash,
        "base_model": export.base.name_or_path,
        "base_revision": export.base.revision,
        "kind": "merged" if export.merged_path else "adapter",
        "primary_metric": m,
        f"eval.{m}": f"{gate.candidate:.6g}",
        f"eval.base.{m}": f"{gate.base:.6g}",
        "eval.n_items": str(ev.n_items),
        "gate": "passed" if gate.passed else "failed",
    }


def gate_bar_tags(bar: GateBar) -> dict[str, str]:
    # repr round-trips a float exactly: the comparison reads back the very bar.
    return {
        TAG_GATE_METRIC: bar.primary_metric,
        TAG_GATE_THRESHOLD: repr(bar.threshold),
        TAG_GATE_MARGIN: repr(bar.base_margin),
    }


def gate_bar_of(tags: dict[str, str]) -> GateBar | None:
    """The recorded bar of a version, or None when it has none (or an unreadable one)."""
    try:
        return GateBar(
            primary_metric=tags[TAG_GATE_METRIC],
            threshold=float(tags[TAG_GATE_THRESHOLD]),
            base_margin=float(tags[TAG_GATE_MARGIN]),
        )
    except (KeyError, ValueError):
        return None


def _refuse_looser_gate(client: Any, name: str, bar: GateBar) -> None:
    """Raise :class:`WeakerGateError` when ``bar`` is looser than the bar of the version
    an alias in :data:`GUARDED_ALIASES` points at."""
    aliases = reg.model_aliases(client, name)
    if aliases is None:
        return  # no such model yet: this run creates it
    problems = []
    for alias in GUARDED_ALIASES:
        if alias not in aliases:
            continue
        version = aliases[alias]
        theirs = gate_bar_of(reg.version_tags(client, name, version))
        if theirs is None:
            problems.append(
                f"its {alias} (version {version}) has no recorded gate (version tags "
                f"{TAG_GATE_METRIC}, {TAG_GATE_THRESHOLD}, {TAG_GATE_MARGIN}), so its bar is "
                "unknown and may be stricter"
            )
        elif looser := bar.looser_than(theirs):
            problems.append(
                f"its {alias} (version {version}) was gated by {theirs.describe()}, this run "
                f"only by {bar.describe()} (looser: {', '.join(looser)})"
            )
    if problems:
        raise WeakerGateError(
            f"refusing to register into {name!r}: "
            + "; ".join(problems)
            + ". A looser gate must not move an alias of a model a stricter one admitted: "
            "register into a model of this recipe's own (tracking.registered_model; by "
            "default slothflow-<name>, one per recipe) or apply that model's bar "
            "(eval.primary_metric, eval.threshold, eval.base_margin)."
        )


def check_can_register(registered_model: str, bar: GateBar, tracking_uri: str) -> None:
    """Refuse, before any stage runs, a run whose gate ``bar`` is looser than the one
    that admitted the champion or challenger of ``registered_model``
    (:class:`WeakerGateError`, a :class:`ConfigError`). Reads only; a local store that
    does not exist yet is not created. :func:`register` checks again, since the aliases
    may move while the run trains."""
    if reg.store_missing(tracking_uri):
        return
    _refuse_looser_gate(reg.client(tracking_uri), registered_model, bar)


def register(
    registered_model: str,
    bar: GateBar,
    export: ExportRef,
    ev: EvalRef,
    gate: GateRef,
    *,
    tracking_uri: str,
    mlflow_run_id: str,
    run_id: str,
    tracker: Tracker | None = None,
) -> RegistryRef:
    """Upload merged + adapter to the MLflow run ``mlflow_run_id``, create a new version
    of ``registered_model`` with lineage tags and ``bar`` (the rules the gate decided
    with), alias it ``challenger``. Raises :class:`WeakerGateError` (before uploading anything) when
    this run's gate is looser than the bar of the model's champion or challenger."""
    if not gate.passed:
        raise GateNotPassedError(
            "refusing to register a candidate that failed the gate: " + "; ".join(gate.reasons)
        )
    tracker = tracker or NullTracker()
    client = reg.client(tracking_uri)
    name = registered_model
    _refuse_looser_gate(client, name, bar)
    metrics = _flat_scores(ev)
    artifacts = {
        kind: Path(folder)
        for kind, folder in (("merged", export.merged_path), ("adapter", export.adapter_path))
        if folder is not None
    }
    manifests = {kind: read_manifest(folder) for kind, folder in artifacts.items()}
    artifact_key = sha256_json({kind: m.get("files", {}) for kind, m in manifests.items()})
    reg.ensure_registered_model(client, name)
    # A retry after a failure between creating the version and aliasing it must not
    # register the same candidate twice.
    mv = reg.find_version(client, name, run_id, artifact_key)
    if mv is not None:
        log.info("%s version %s already holds this run's candidate: reusing it", name, mv.number)
    else:
        for manifest in manifests.values():
            # The registered copy's manifest also carries what evaluation and the gate found.
            manifest["metrics"] = {**manifest.get("metrics", {}), **metrics}
            manifest["gate"] = {"passed": gate.passed, "reasons": gate.reasons}
        mv = reg.create_version(
            client,
            name,
            mlflow_run_id,
            artifacts,
            manifests,
            tags={
                **lineage_tags(export, ev, gate, run_id),
                **gate_bar_tags(bar),
                TAG_ARTIFACT: artifact_key,
            },
            description=f"run {run_id}: {gate.primary_metric} {gate.candidate:.4f} "
            f"(base {gate.base:.4f}) on {ev.n_items} held-out items",
        )
    version, source = mv.number, mv.source
    reg.set_alias(client, name, CHALLENGER, version)
    tracker.set_tags({"slothflow.registered": f"{name}/{version}"})
    log.info("registered %s version %d as %r (%s)", name, version, CHALLENGER, source)
    return RegistryRef(
        stage="register",
        path=source,
        name=name,
        version=version,
        alias=CHALLENGER,
        model_uri=f"models:/{name}/{version}",
        source=source,
    )


@stage_task(name="champion", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def champion_task(ctx: RunContext, registered_model: str) -> ResolvedModel | None:
    """Prefect task: the registry's current ``champion`` of ``registered_model`` on this
    machine, for the evaluate stage to re-score on this run's held-out split. None when
    the run has no tracking or the registry has no champion. A registry that cannot be
    asked raises: the gate must not take an outage for "no champion yet"."""
    if ctx.tracking is None:
        return None
    from tasks.core.home import resolve_home

    # A remote store's champion is downloaded once into the home's cache.
    uri = ctx.tracking["tracking_uri"]
    return reg.current_champion(registered_model, uri, reg.cache_dir(resolve_home(), uri))


def _retry_unless_refused(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a failed registration unless it was refused: a refusal (a looser gate, a
    failed gate, a bad spec) answers the same every time, a store's hiccup may not."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as err:
        exc = err
    return not isinstance(exc, ConfigError | GateNotPassedError)


@stage_task(
    name="register", retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_unless_refused
)
def register_task(
    ctx: RunContext,
    registered_model: str,
    bar: GateBar,
    export: ExportRef,
    ev: EvalRef,
    gate: GateRef,
) -> RegistryRef | None:
    """Prefect task: register the gated candidate as ``challenger`` of
    ``registered_model``; ``bar`` is the gate's (``GateBar.of(config.eval)``). Returns
    None (and registers nothing) when the gate failed or the run has no tracking.
    Retried: a tracking server's hiccup should not lose a passed candidate; a refusal is
    not retried."""
    from tasks.core.run import stage

    if not gate.passed:
        log.warning("not registering: the gate failed (%s)", "; ".join(gate.reasons))
        return None
    if ctx.tracking is None:
        log.warning("not registering: this run has no MLflow tracking")
        return None
    # Not cached by Prefect: registering sets an alias, which must happen in every run
    # that passes; a retry or a resume finds this run's version (register's find_version)
    # instead of creating a second one.
    out = ctx.stage_dir("register")
    with stage(ctx, "register") as tracker:
        ref = register(
            registered_model,
            bar,
            export,
            ev,
            gate,
            tracking_uri=ctx.tracking["tracking_uri"],
            mlflow_run_id=tracker.mlflow_run_id or "",
            run_id=ctx.run_id,
            tracker=tracker,
        )
    record_ref(out, ref)
    return ref


@stage_task(name="retention")
def retention_task(ctx: RunContext, registered_model: str, keep: int) -> dict[str, Any] | None:
    """Prefect task: retention for ``registered_model`` after a registration — the
    artifacts of versions without an alias beyond the newest ``keep`` are deleted
    (:mod:`tasks.core.tracking.retention`). Tags the run's parent MLflow run with what it
    pruned. A failure is logged and the run goes on: what was not pruned now is the next
    run's (or ``slothflow models prune``'s) to prune, and must not hold back serving."""
    from tasks.core import tracking
    from tasks.core.home import resolve_home
    from tasks.core.tracking import retention

    if ctx.tracking is None:
        return None
    ref = tracking.TrackingRef.model_validate(ctx.tracking)
    parent = tracking.pipeline_tracker(ref)
    try:
        plan = retention.plan(registered_model, ref.tracking_uri, resolve_home(), keep)
        done = retention.apply(plan, ref.tracking_uri)
    except Exception as exc:
        log.warning(
            "retention of %s failed (%s: %s); the next run or `slothflow models prune` tries again",
            registered_model,
            type(exc).__name__,
            exc,
        )
        parent.set_tags({"slothflow.retention": f"failed: {type(exc).__name__}"})
        return None
    pruned = [o.version for o in done if o.skipped is None]
    freed = sum(o.freed for o in done)
    for o in done:
        if o.skipped is not None:
            log.info("retention: kept %s version %d: %s", registered_model, o.version, o.skipped)
    log.info(
        "retention of %s (aliases + newest %d): pruned %s, %s freed",
        registered_model,
        keep,
        ", ".join(f"v{v}" for v in pruned) or "nothing",
        retention.human_bytes(freed),
    )
    parent.set_tags(
        {
            "slothflow.retention": "done",
            "slothflow.pruned_versions": ",".join(map(str, pruned)) or "none",
            "slothflow.pruned_bytes": str(freed),
        }
    )
    return {"pruned": pruned, "freed": retention.human_bytes(freed)}
