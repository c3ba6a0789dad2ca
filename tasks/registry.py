"""The MLflow model registry: versions of the exported model, their lineage and aliases.

This module's job *is* MLflow, so unlike the stage modules it calls MLflow directly
(imported inside the functions, so the module imports without it).

Every registered version holds two artifacts under its source folder: ``merged/``
(what vLLM serves) and ``adapter/`` (the LoRA adapter it was merged from), each with
its ``manifest.json`` — updated at registration with the evaluation metrics and the
gate's decision.

**Aliases** (each names exactly one version of the registered model):

* ``challenger`` — passed the promotion gate and awaits rollout. Set by ``register``.
* ``champion`` — the version that serves now. Moved by the rollout (see :func:`promote`).
* ``previous`` — the champion before the current one, kept for a one-step rollback.

Model specs, as the serving stage passes them to :func:`resolve`: ``NAME@alias`` or
``NAME/version`` (an optional ``models:/`` prefix is accepted).

**Guard rail.** Every version records the bar its gate applied (:class:`GateBar`:
primary metric, threshold, base margin) as version tags. A run whose bar is looser than
that of the model's ``champion`` or ``challenger`` may not register into that model
(:func:`check_can_register`, called before the long stages and again at registration):
a recipe whose gate cannot fail must never move an alias of a model a stricter recipe
serves. A version without the tags has an unknown bar and counts as stricter.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.core.artifacts import MANIFEST, read_manifest, relocate_manifest
from tasks.core.config import ConfigError, PipelineConfig
from tasks.core.home import Home
from tasks.core.orchestration import stage_task
from tasks.core.refs import (
    EvalRef,
    ExportRef,
    GateBar,
    GateRef,
    RegistryRef,
    RunContext,
    load_done,
    mark_done,
    sha256_json,
)
from tasks.core.tracking import NullTracker, Tracker

log = logging.getLogger(__name__)

CHALLENGER = "challenger"
CHAMPION = "champion"
PREVIOUS = "previous"
ALIASES = {
    CHALLENGER: "passed the promotion gate; awaits rollout",
    CHAMPION: "the version that serves now",
    PREVIOUS: "the champion before the current one (rollback target)",
}

_SPEC = re.compile(r"^(?:models:/)?(?P<name>[^@/]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))$")


def is_spec(text: str) -> bool:
    """Whether ``text`` is a registry spec (``NAME@alias`` / ``NAME/version``), the form
    :func:`parse_spec` accepts."""
    return _SPEC.match(text.strip()) is not None


class GateNotPassedError(RuntimeError):
    """Registration was asked for a candidate that failed the gate."""


class WeakerGateError(ConfigError):
    """This run's gate is looser than the one that admitted the model's champion or
    challenger: registering would let a weaker candidate move an alias of that model."""


class NotRegisteredError(ConfigError):
    """The registry answered that the model, version or alias does not exist.

    Only this means "no such model": an unreachable store or a refused request raises
    MLflow's own exception, so a champion check never mistakes an outage for "none"."""


#: Tags that make registration idempotent: one version per (run, exported artifact).
TAG_RUN_ID = "slothflow.run_id"
TAG_ARTIFACT = "slothflow.artifact_sha256"

#: The bar of the gate that admitted a version (see :class:`tasks.gate.GateBar`).
TAG_GATE_METRIC = "slothflow.gate.primary_metric"
TAG_GATE_THRESHOLD = "slothflow.gate.threshold"
TAG_GATE_MARGIN = "slothflow.gate.base_margin"
#: The aliases a looser gate may not move: what serves and what awaits rollout.
GUARDED_ALIASES = (CHAMPION, CHALLENGER)


def _is_missing(exc: Exception) -> bool:
    """MLflow's answer for a registered model or version that does not exist."""
    return getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


@dataclass(frozen=True)
class ResolvedModel:
    """A registered version available on this machine."""

    name: str
    version: int
    path: Path  # the servable artifact: merged/ when present, else adapter/
    manifest: dict[str, Any]  # path's manifest, with paths rewritten to this machine
    aliases: list[str] = field(default_factory=list)
    adapter_path: Path | None = None
    merged_path: Path | None = None


def parse_spec(spec: str) -> tuple[str, str | None, int | None]:
    """``NAME@alias`` -> (name, alias, None); ``NAME/3`` -> (name, None, 3)."""
    m = _SPEC.match(spec.strip())
    if not m:
        raise ConfigError(
            f"model spec {spec!r} must be NAME@alias (e.g. slothflow-embedded@champion) or "
            "NAME/version (e.g. slothflow-embedded/3)"
        )
    version = m.group("version")
    return m.group("name"), m.group("alias"), int(version) if version else None


def _client(tracking_uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


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


def store_missing(tracking_uri: str) -> bool:
    """A local SQLite store whose file does not exist yet: nothing is registered there,
    and any MLflow client pointed at it would create it (and migrate it, ~10 s)."""
    if not tracking_uri.startswith("sqlite:///"):
        return False
    path = tracking_uri.removeprefix("sqlite:///").split("?", 1)[0]
    return path not in ("", ":memory:") and not Path(path).exists()


def _refuse_looser_gate(client: Any, name: str, bar: GateBar) -> None:
    """Raise :class:`WeakerGateError` when ``bar`` is looser than the bar of the version
    an alias in :data:`GUARDED_ALIASES` points at."""
    from mlflow.exceptions import MlflowException

    try:
        aliases = client.get_registered_model(name).aliases or {}
    except MlflowException as exc:
        if not _is_missing(exc):
            raise
        return  # no such model yet: this run creates it
    problems = []
    for alias in GUARDED_ALIASES:
        if alias not in aliases:
            continue
        version = int(aliases[alias])
        theirs = gate_bar_of(dict(client.get_model_version(name, str(version)).tags or {}))
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


def check_can_register(cfg: PipelineConfig, tracking_uri: str) -> None:
    """Refuse, before any stage runs, a run whose gate is looser than the one that
    admitted the champion or challenger of ``tracking.registered_model``
    (:class:`WeakerGateError`, a :class:`ConfigError`). Reads only; a local store that
    does not exist yet is not created. :func:`register` checks again, since the aliases
    may move while the run trains."""
    if store_missing(tracking_uri):
        return
    _refuse_looser_gate(_client(tracking_uri), cfg.tracking.registered_model, GateBar.of(cfg.eval))


def _ensure_registered_model(client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if not _is_missing(exc):
            raise
        client.create_registered_model(
            name,
            description="slothflow exports. Aliases: "
            + "; ".join(f"{a} = {d}" for a, d in ALIASES.items()),
        )


def register(
    cfg: PipelineConfig,
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
    of ``tracking.registered_model`` with lineage tags and the gate's bar, alias it
    ``challenger``. Raises :class:`WeakerGateError` (before uploading anything) when
    this run's gate is looser than the bar of the model's champion or challenger."""
    if not gate.passed:
        raise GateNotPassedError(
            "refusing to register a candidate that failed the gate: " + "; ".join(gate.reasons)
        )
    tracker = tracker or NullTracker()
    client = _client(tracking_uri)
    name = cfg.tracking.registered_model
    bar = GateBar.of(cfg.eval)  # the rules `gate` decided with (its key includes them)
    _refuse_looser_gate(client, name, bar)
    metrics = _flat_scores(ev)
    artifacts = {
        kind: Path(folder)
        for kind, folder in (("merged", export.merged_path), ("adapter", export.adapter_path))
        if folder is not None
    }
    manifests = {kind: read_manifest(folder) for kind, folder in artifacts.items()}
    artifact_key = sha256_json({kind: m.get("files", {}) for kind, m in manifests.items()})
    _ensure_registered_model(client, name)
    # A retry after a failure between creating the version and aliasing it must not
    # register the same candidate twice.
    mv = _version_of(client, name, run_id, artifact_key)
    if mv is not None:
        log.info("%s version %s already holds this run's candidate: reusing it", name, mv.version)
    else:
        for kind, folder in artifacts.items():
            client.log_artifacts(mlflow_run_id, str(folder), f"model/{kind}")
            # The registered copy's manifest also carries what evaluation and the gate found.
            manifest = manifests[kind]
            manifest["metrics"] = {**manifest.get("metrics", {}), **metrics}
            manifest["gate"] = {"passed": gate.passed, "reasons": gate.reasons}
            client.log_dict(mlflow_run_id, manifest, f"model/{kind}/{MANIFEST}")
        source = client.get_run(mlflow_run_id).info.artifact_uri.rstrip("/") + "/model"
        mv = client.create_model_version(
            name,
            source=source,
            run_id=mlflow_run_id,
            tags={
                **lineage_tags(export, ev, gate, run_id),
                **gate_bar_tags(bar),
                TAG_ARTIFACT: artifact_key,
            },
            description=f"run {run_id}: {gate.primary_metric} {gate.candidate:.4f} "
            f"(base {gate.base:.4f}) on {ev.n_items} held-out items",
        )
    version = int(mv.version)
    source = str(mv.source)
    client.set_registered_model_alias(name, CHALLENGER, version)
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


def _version_of(client: Any, name: str, run_id: str, artifact_key: str) -> Any | None:
    """The version already registered for this run's candidate, if any."""
    if "'" in run_id:
        raise ValueError(f"run id {run_id!r} cannot contain a quote")
    found = client.search_model_versions(f"name = '{name}' and tag.`{TAG_RUN_ID}` = '{run_id}'")
    same = [mv for mv in found if (mv.tags or {}).get(TAG_ARTIFACT) == artifact_key]
    return min(same, key=lambda mv: int(mv.version)) if same else None


def promote(name: str, version: int, tracking_uri: str) -> None:
    """Make ``version`` the champion; the old champion becomes ``previous``. For the
    rollout stage (and tests); clears ``challenger`` when it pointed at ``version``."""
    client = _client(tracking_uri)
    aliases = {a: int(v) for a, v in (client.get_registered_model(name).aliases or {}).items()}
    old = aliases.get(CHAMPION)
    if old is not None and old != version:
        client.set_registered_model_alias(name, PREVIOUS, old)
    client.set_registered_model_alias(name, CHAMPION, version)
    if aliases.get(CHALLENGER) == version:
        client.delete_registered_model_alias(name, CHALLENGER)


def cache_dir(home: Home, tracking_uri: str) -> Path:
    """Where downloads from the registry of ``tracking_uri`` land: under the home's
    cache, one folder per tracking store (two stores both have a ``NAME/1``), named by a
    short hash of the URI (which may carry credentials that do not belong in a path).
    The evaluation stage (the champion), ``slothflow evaluate --champion`` and the
    serving stage all download here, so a version is fetched once."""
    import hashlib

    store = hashlib.sha256(tracking_uri.rstrip("/").encode("utf-8")).hexdigest()[:16]
    return home.cache / "registry" / store


def _local_path(uri: str) -> Path | None:
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme == "file":
        return Path(urllib.parse.unquote(parts.path))
    if parts.scheme == "" and Path(uri).exists():
        return Path(uri)
    return None


def _fetch(client: Any, source: str, cache_dir: Path | None, name: str, version: int) -> Path:
    """The version's folder on this machine: the store's own folder when artifacts are
    local files (no copy of a multi-GB model), else a download into ``cache_dir``."""
    local = _local_path(source)
    if local is not None and local.exists():
        return local
    import mlflow.artifacts

    root = Path(cache_dir or tempfile.mkdtemp(prefix="slothflow-registry-"))
    dst = root / name / str(version)
    if (dst / "model").exists():
        return dst / "model"
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".download-"))
    try:
        got = mlflow.artifacts.download_artifacts(
            artifact_uri=source,
            dst_path=str(tmp),
            tracking_uri=client._tracking_client.tracking_uri,
        )
        dst.mkdir(parents=True, exist_ok=True)
        Path(got).rename(dst / "model")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst / "model"


def resolve(spec: str, tracking_uri: str, cache_dir: Path | None = None) -> ResolvedModel:
    """``NAME@alias`` / ``NAME/version`` -> the artifact on this machine + its manifest.

    ``path`` is the merged model when the version has one, else the adapter; the
    manifest's ``serving.vllm_args`` point at the local copy."""
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_spec(spec)
    client = _client(tracking_uri)
    try:
        if alias:
            # The model's alias map, not get_model_version_by_alias: a missing alias is
            # answered there with INVALID_PARAMETER_VALUE, which a bad request also gets.
            aliases = client.get_registered_model(name).aliases or {}
            if alias not in aliases:
                raise NotRegisteredError(
                    f"model {spec!r} not found in the registry: {name} has no alias {alias!r}"
                )
            version = int(aliases[alias])
        mv = client.get_model_version(name, str(version))
    except MlflowException as exc:
        if not _is_missing(exc):
            raise  # unreachable store, permission denied: not "no such model"
        raise NotRegisteredError(
            f"model {spec!r} not found in the registry: {exc.message}"
        ) from None
    v = int(mv.version)
    folder = _fetch(client, mv.source, cache_dir, name, v)
    merged = folder / "merged" if (folder / "merged" / MANIFEST).exists() else None
    adapter = folder / "adapter" if (folder / "adapter" / MANIFEST).exists() else None
    path = merged or adapter
    if path is None:
        raise ConfigError(f"model {spec!r} (version {v}) has no merged/ or adapter/ artifact")
    return ResolvedModel(
        name=name,
        version=v,
        path=path,
        manifest=relocate_manifest(read_manifest(path), path),
        aliases=sorted(getattr(mv, "aliases", []) or []),
        adapter_path=adapter,
        merged_path=merged,
    )


def current_champion(
    name: str, tracking_uri: str, cache_dir: Path | None = None
) -> ResolvedModel | None:
    """The ``champion`` version, or None when the registry says there is none (first
    rollout). A registry that cannot be asked raises: the gate must not take an outage
    for "no champion yet" and skip its champion rule."""
    try:
        return resolve(f"{name}@{CHAMPION}", tracking_uri, cache_dir)
    except NotRegisteredError:
        return None


def list_versions(name: str, tracking_uri: str) -> list[dict[str, Any]]:
    """Every version, newest first: aliases, metrics and lineage from its tags."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        versions = client.search_model_versions(f"name = '{name}'")
        # search results leave `aliases` empty on some stores; the model's map is reliable.
        by_version: dict[int, list[str]] = {}
        for alias, v in (client.get_registered_model(name).aliases or {}).items():
            by_version.setdefault(int(v), []).append(alias)
    except MlflowException as exc:
        if not _is_missing(exc):
            raise
        return []
    out = []
    for mv in sorted(versions, key=lambda m: int(m.version), reverse=True):
        out.append(
            {
                "version": int(mv.version),
                "aliases": sorted(by_version.get(int(mv.version), [])),
                "created": int(mv.creation_timestamp or 0),
                "run_id": mv.run_id,
                "source": mv.source,
                "tags": dict(mv.tags or {}),
            }
        )
    return out


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
    ctx: RunContext, cfg: PipelineConfig, export: ExportRef, ev: EvalRef, gate: GateRef
) -> RegistryRef | None:
    """Prefect task: register the gated candidate as ``challenger``. Returns None (and
    registers nothing) when the gate failed or the run has no tracking. Retried: a
    tracking server's hiccup should not lose a passed candidate; a refusal is not
    retried."""
    from tasks.core.run import stage

    if not gate.passed:
        log.warning("not registering: the gate failed (%s)", "; ".join(gate.reasons))
        return None
    if ctx.tracking is None:
        log.warning("not registering: this run has no MLflow tracking")
        return None
    out = ctx.stage_dir("register")
    key = sha256_json(
        {
            "export": export.model_dump(mode="json"),
            "gate": gate.model_dump(mode="json"),
            "name": cfg.tracking.registered_model,
        }
    )
    done = load_done(out, key, RegistryRef)
    if done is not None:
        return done
    with stage(ctx, "register") as tracker:
        ref = register(
            cfg,
            export,
            ev,
            gate,
            tracking_uri=ctx.tracking["tracking_uri"],
            mlflow_run_id=tracker.mlflow_run_id or "",
            run_id=ctx.run_id,
            tracker=tracker,
        )
    mark_done(out, key, ref)
    return ref
