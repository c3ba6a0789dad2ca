"""The MLflow model registry client: versions, their tags and aliases, downloads.

What the registry stage (``tasks/registry.py``: the gate's guard rail, lineage,
registration) and the serving stage need from MLflow's model registry, and nothing of
their policy. MLflow is imported inside the functions, so this module imports without it.

Every registered version holds two artifacts under its source folder: ``merged/``
(what vLLM serves) and ``adapter/`` (the LoRA adapter it was merged from), each with
its ``manifest.json``.

**Aliases** (each names exactly one version of the registered model):

* ``challenger`` — passed the promotion gate and awaits rollout.
* ``champion`` — the version that serves now. Moved by the rollout (see :func:`promote`).
* ``previous`` — the champion before the current one, kept for a one-step rollback.

Model specs, as the serving stage passes them to :func:`resolve`: ``NAME@alias`` or
``NAME/version`` (an optional ``models:/`` prefix is accepted).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.core.artifacts import MANIFEST, read_manifest, relocate_manifest
from tasks.core.config import ConfigError
from tasks.core.home import Home
from tasks.core.refs import ResolvedModel
from tasks.core.tracking import TAG_RUN_ID

CHALLENGER = "challenger"
CHAMPION = "champion"
PREVIOUS = "previous"
ALIASES = {
    CHALLENGER: "passed the promotion gate; awaits rollout",
    CHAMPION: "the version that serves now",
    PREVIOUS: "the champion before the current one (rollback target)",
}
#: The aliases a looser gate may not move: what serves and what awaits rollout.
GUARDED_ALIASES = (CHAMPION, CHALLENGER)

#: Version tags that make registration idempotent: one version per (run, exported
#: artifact). ``TAG_RUN_ID`` is the pipeline run's id, the same tag its MLflow runs carry.
TAG_ARTIFACT = "slothflow.artifact_sha256"
#: The bar of the gate that admitted a version (see :class:`tasks.core.refs.GateBar`).
TAG_GATE_METRIC = "slothflow.gate.primary_metric"
TAG_GATE_THRESHOLD = "slothflow.gate.threshold"
TAG_GATE_MARGIN = "slothflow.gate.base_margin"
#: Set on a version whose artifacts retention deletes (the UTC time it started), before
#: anything is deleted: from then on :func:`resolve` refuses the version. The record
#: itself stays, with its lineage and metrics (:mod:`tasks.core.tracking.retention`).
TAG_PRUNED = "slothflow.pruned"
#: The bytes retention freed, set once every deletion is done: a version with
#: :data:`TAG_PRUNED` but without this one was cut short and is pruned again next time.
TAG_PRUNED_BYTES = "slothflow.pruned.bytes"

__all__ = [
    "ALIASES",
    "CHALLENGER",
    "CHAMPION",
    "GUARDED_ALIASES",
    "PREVIOUS",
    "TAG_ARTIFACT",
    "TAG_GATE_MARGIN",
    "TAG_GATE_METRIC",
    "TAG_GATE_THRESHOLD",
    "TAG_PRUNED",
    "TAG_PRUNED_BYTES",
    "TAG_RUN_ID",
    "NotRegisteredError",
    "PrunedVersionError",
    "RegisteredVersion",
    "cache_dir",
    "client",
    "create_version",
    "current_champion",
    "ensure_registered_model",
    "find_version",
    "is_spec",
    "list_versions",
    "model_aliases",
    "parse_spec",
    "promote",
    "resolve",
    "set_alias",
    "store_missing",
    "version_tags",
]

_SPEC = re.compile(r"^(?:models:/)?(?P<name>[^@/]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))$")


def is_spec(text: str) -> bool:
    """Whether ``text`` is a registry spec (``NAME@alias`` / ``NAME/version``), the form
    :func:`parse_spec` accepts."""
    return _SPEC.match(text.strip()) is not None


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


class NotRegisteredError(ConfigError):
    """The registry answered that the model, version or alias does not exist.

    Only this means "no such model": an unreachable store or a refused request raises
    MLflow's own exception, so a champion check never mistakes an outage for "none"."""


class PrunedVersionError(ConfigError):
    """The version exists, but retention deleted its artifacts: it cannot be served,
    promoted or rolled back to. Not a :class:`NotRegisteredError`: a pruned champion
    must stop the gate, not read as "no champion yet"."""


def _is_missing(exc: Exception) -> bool:
    """MLflow's answer for a registered model or version that does not exist."""
    return getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


def client(tracking_uri: str) -> Any:
    """An ``MlflowClient`` whose registry is the tracking store itself."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def store_missing(tracking_uri: str) -> bool:
    """A local SQLite store whose file does not exist yet: nothing is registered there,
    and any MLflow client pointed at it would create it (and migrate it, ~10 s)."""
    if not tracking_uri.startswith("sqlite:///"):
        return False
    path = tracking_uri.removeprefix("sqlite:///").split("?", 1)[0]
    return path not in ("", ":memory:") and not Path(path).exists()


# --------------------------------------------------------------------------- thin calls


@dataclass(frozen=True)
class RegisteredVersion:
    """A version as registration needs it: its number and its artifacts' source URI."""

    number: int
    source: str


def _version(mv: Any) -> RegisteredVersion:
    return RegisteredVersion(number=int(mv.version), source=str(mv.source))


def model_aliases(mlflow_client: Any, name: str) -> dict[str, int] | None:
    """The registered model's alias -> version map; None when the model does not exist.
    Any other failure (an unreachable store) raises."""
    from mlflow.exceptions import MlflowException

    try:
        aliases = mlflow_client.get_registered_model(name).aliases or {}
    except MlflowException as exc:
        if not _is_missing(exc):
            raise
        return None
    return {alias: int(v) for alias, v in aliases.items()}


def version_tags(mlflow_client: Any, name: str, version: int) -> dict[str, str]:
    return dict(mlflow_client.get_model_version(name, str(version)).tags or {})


def ensure_registered_model(mlflow_client: Any, name: str) -> None:
    """Create the registered model (its description lists the aliases) unless it exists."""
    if model_aliases(mlflow_client, name) is not None:
        return
    mlflow_client.create_registered_model(
        name,
        description="slothflow exports. Aliases: "
        + "; ".join(f"{a} = {d}" for a, d in ALIASES.items()),
    )


def find_version(
    mlflow_client: Any, name: str, run_id: str, artifact_key: str
) -> RegisteredVersion | None:
    """The version already registered for this run's artifact (tags :data:`TAG_RUN_ID`
    and :data:`TAG_ARTIFACT`), the oldest when several; None when there is none."""
    if "'" in run_id:
        raise ValueError(f"run id {run_id!r} cannot contain a quote")
    found = mlflow_client.search_model_versions(
        f"name = '{name}' and tag.`{TAG_RUN_ID}` = '{run_id}'"
    )
    same = [mv for mv in found if (mv.tags or {}).get(TAG_ARTIFACT) == artifact_key]
    return _version(min(same, key=lambda mv: int(mv.version))) if same else None


def create_version(
    mlflow_client: Any,
    name: str,
    mlflow_run_id: str,
    artifacts: dict[str, Path],
    manifests: dict[str, dict[str, Any]],
    *,
    tags: dict[str, str],
    description: str,
) -> RegisteredVersion:
    """Upload each ``artifacts[kind]`` folder to ``model/<kind>`` of the MLflow run, with
    ``manifests[kind]`` as its manifest (replacing the folder's own), and create a version
    of ``name`` whose source is the run's ``model`` folder."""
    for kind, folder in artifacts.items():
        mlflow_client.log_artifacts(mlflow_run_id, str(folder), f"model/{kind}")
        mlflow_client.log_dict(mlflow_run_id, manifests[kind], f"model/{kind}/{MANIFEST}")
    source = mlflow_client.get_run(mlflow_run_id).info.artifact_uri.rstrip("/") + "/model"
    mv = mlflow_client.create_model_version(
        name, source=source, run_id=mlflow_run_id, tags=tags, description=description
    )
    return _version(mv)


def set_alias(mlflow_client: Any, name: str, alias: str, version: int) -> None:
    mlflow_client.set_registered_model_alias(name, alias, version)


# --------------------------------------------------------------------------- aliases, lookups


def promote(name: str, version: int, tracking_uri: str) -> None:
    """Make ``version`` the champion; the old champion becomes ``previous``. For the
    rollout stage (and tests); clears ``challenger`` when it pointed at ``version``."""
    c = client(tracking_uri)
    aliases = {a: int(v) for a, v in (c.get_registered_model(name).aliases or {}).items()}
    old = aliases.get(CHAMPION)
    if old is not None and old != version:
        c.set_registered_model_alias(name, PREVIOUS, old)
    c.set_registered_model_alias(name, CHAMPION, version)
    if aliases.get(CHALLENGER) == version:
        c.delete_registered_model_alias(name, CHALLENGER)


def cache_dir(home: Home, tracking_uri: str) -> Path:
    """Where downloads from the registry of ``tracking_uri`` land: under the home's
    cache, one folder per tracking store (two stores both have a ``NAME/1``), named by a
    short hash of the URI (which may carry credentials that do not belong in a path).
    The champion lookup of a run, ``slothflow evaluate --champion`` and the serving
    stage all download here, so a version is fetched once."""
    store = hashlib.sha256(tracking_uri.rstrip("/").encode("utf-8")).hexdigest()[:16]
    return home.cache / "registry" / store


def _local_path(uri: str) -> Path | None:
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme == "file":
        return Path(urllib.parse.unquote(parts.path))
    if parts.scheme == "" and Path(uri).exists():
        return Path(uri)
    return None


def _fetch(
    mlflow_client: Any, source: str, cache_dir: Path | None, name: str, version: int
) -> Path:
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
            tracking_uri=mlflow_client._tracking_client.tracking_uri,
        )
        dst.mkdir(parents=True, exist_ok=True)
        Path(got).rename(dst / "model")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst / "model"


def resolve(spec: str, tracking_uri: str, cache_dir: Path | None = None) -> ResolvedModel:
    """``NAME@alias`` / ``NAME/version`` -> the artifact on this machine + its manifest.

    ``path`` is the merged model when the version has one, else the adapter; the
    manifest's ``serving.vllm_args`` point at the local copy. ``label`` is
    ``NAME/3`` plus its aliases, e.g. ``NAME/3 (champion)``."""
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_spec(spec)
    c = client(tracking_uri)
    try:
        if alias:
            # The model's alias map, not get_model_version_by_alias: a missing alias is
            # answered there with INVALID_PARAMETER_VALUE, which a bad request also gets.
            aliases = c.get_registered_model(name).aliases or {}
            if alias not in aliases:
                raise NotRegisteredError(
                    f"model {spec!r} not found in the registry: {name} has no alias {alias!r}"
                )
            version = int(aliases[alias])
        mv = c.get_model_version(name, str(version))
    except MlflowException as exc:
        if not _is_missing(exc):
            raise  # unreachable store, permission denied: not "no such model"
        raise NotRegisteredError(
            f"model {spec!r} not found in the registry: {exc.message}"
        ) from None
    v = int(mv.version)
    if pruned := (mv.tags or {}).get(TAG_PRUNED):
        raise PrunedVersionError(
            f"model {spec!r}: {name} version {v} was pruned on {pruned}; its artifacts are gone"
        )
    folder = _fetch(c, mv.source, cache_dir, name, v)
    merged = folder / "merged" if (folder / "merged" / MANIFEST).exists() else None
    adapter = folder / "adapter" if (folder / "adapter" / MANIFEST).exists() else None
    path = merged or adapter
    if path is None:
        raise ConfigError(f"model {spec!r} (version {v}) has no merged/ or adapter/ artifact")
    version_aliases = sorted(getattr(mv, "aliases", []) or [])
    shown = f" ({', '.join(version_aliases)})" if version_aliases else ""
    return ResolvedModel(
        spec=spec,
        path=path,
        manifest=relocate_manifest(read_manifest(path), path),
        label=f"{name}/{v}{shown}",
        name=name,
        number=v,
        aliases=version_aliases,
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

    c = client(tracking_uri)
    try:
        versions = c.search_model_versions(f"name = '{name}'")
        # search results leave `aliases` empty on some stores; the model's map is reliable.
        by_version: dict[int, list[str]] = {}
        for alias, v in (c.get_registered_model(name).aliases or {}).items():
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
