"""Retention: which registered versions keep their bytes, and deleting the others'.

Scheduled retraining piles up versions, and a merged 8B model is ~16 GB. A version's
bytes lie in three places: its artifacts in the tracking store (``model/``, with
``merged/`` and ``adapter/``, under the MLflow run that registered it), its download in
the home's registry cache (:func:`~tasks.core.tracking.registry.cache_dir`; remote
stores only) and the export outputs in its pipeline run's folder (``runs/<run>/export``).

:func:`plan` keeps every version that holds an alias (champion, previous, challenger or
any other) and the newest ``keep`` versions; :func:`apply` deletes the others' bytes in
those three places and tags each :data:`~tasks.core.tracking.registry.TAG_PRUNED`. The
version's record stays, with its lineage and metrics, but
:func:`~tasks.core.tracking.registry.resolve` refuses it, so it is never served,
promoted or rolled back to again. A version that holds an alias by the time its turn
comes is left whole, whatever the plan said.

Left alone: the run storage's blobs (content-addressed and shared by every run whose
files have the same bytes; telling which are no longer needed is another job), the
run's other stage folders, and the MLflow runs themselves.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.core.home import Home
from tasks.core.tracking import TAG_RUN_ID
from tasks.core.tracking import registry as reg

log = logging.getLogger(__name__)

# Run ids as tasks.core.run makes them: a tag that is not one names no folder of the home.
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_ASIDE = ".pruning-"


@dataclass(frozen=True)
class Deletion:
    """One thing to delete: ``what`` (``artifacts``, ``cache``, ``run export``), where it
    is (a URI or a path) and its size in bytes."""

    what: str
    where: str
    size: int


@dataclass(frozen=True)
class VersionPlan:
    """What happens to one version: ``keep`` (``why``: its aliases, or the newest K),
    ``prune`` (``deletions``), or ``pruned`` already."""

    version: int
    aliases: tuple[str, ...]
    action: str
    why: str
    deletions: tuple[Deletion, ...] = ()

    @property
    def size(self) -> int:
        return sum(d.size for d in self.deletions)


@dataclass(frozen=True)
class RetentionPlan:
    """Every version of registered model ``name``, newest first, with what happens to it."""

    name: str
    keep: int
    versions: tuple[VersionPlan, ...]  # newest first

    @property
    def to_prune(self) -> list[VersionPlan]:
        return [v for v in self.versions if v.action == "prune"]

    @property
    def size(self) -> int:
        return sum(v.size for v in self.to_prune)


@dataclass(frozen=True)
class Outcome:
    """What :func:`apply` did with one planned version: ``freed`` bytes, or why it was
    left whole after all (``skipped``)."""

    version: int
    freed: int = 0
    skipped: str | None = None


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def now_utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# --------------------------------------------------------------------------- plan


def plan(name: str, tracking_uri: str, home: Home, keep: int) -> RetentionPlan:
    """Which versions of ``name`` keep their bytes (an alias, or among the newest
    ``keep``) and what deleting each other one frees. Reads only."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, not {keep}")
    versions = reg.list_versions(name, tracking_uri)  # newest first
    newest = {v["version"] for v in versions[:keep]}
    kept_sources: dict[str, str] = {}
    rows: list[tuple[dict[str, Any], str, str]] = []
    for v in versions:
        tags, aliases = v["tags"], v["aliases"]
        if reg.TAG_PRUNED_BYTES in tags:
            rows.append((v, "pruned", f"pruned on {tags.get(reg.TAG_PRUNED, '?')}"))
            continue
        if aliases:
            action, why = "keep", ", ".join(aliases)
        elif v["version"] in newest:
            action, why = "keep", f"newest {keep}"
        else:
            action, why = "prune", ""
        if action == "keep":
            kept_sources.setdefault(v["source"], f"v{v['version']}")
        rows.append((v, action, why))

    client = reg.client(tracking_uri)
    store = reg.cache_dir(home, tracking_uri)
    out = []
    for v, action, why in rows:
        deletions: tuple[Deletion, ...] = ()
        if action == "prune":
            if reason := _not_ours(client, name, v, kept_sources):
                action, why = "keep", reason
            else:
                deletions = _deletions(v, tracking_uri, home, store / name / str(v["version"]))
        out.append(VersionPlan(v["version"], tuple(v["aliases"]), action, why, deletions))
    return RetentionPlan(name=name, keep=keep, versions=tuple(out))


def _not_ours(
    client: Any, name: str, v: dict[str, Any], kept_sources: dict[str, str]
) -> str | None:
    """Why the artifacts of version ``v`` must not be deleted although it would be
    pruned, or None. Only what registration uploaded (``model/`` of the version's own
    MLflow run) is deleted: a version registered by hand may point at any folder."""
    run = v.get("run_id")
    if reg.TAG_ARTIFACT not in v["tags"] or not run or "'" in run:
        return "not registered by slothflow: its artifacts are not retention's to delete"
    if v["source"] != client.get_run(run).info.artifact_uri.rstrip("/") + "/model":
        return "its source is not its run's model/ folder: not retention's to delete"
    # Two versions of one MLflow run (one run registered into two models) share its
    # model/ folder: deleting it for one would take the other's files too.
    if other := kept_sources.get(v["source"]):
        return f"shares its artifacts with {other}"
    for mv in client.search_model_versions(f"run_id = '{run}'"):
        if mv.name != name and str(mv.source) == v["source"]:
            return f"shares its artifacts with {mv.name}/{mv.version}"
    return None


def _deletions(
    v: dict[str, Any], tracking_uri: str, home: Home, cached: Path
) -> tuple[Deletion, ...]:
    found = [Deletion("artifacts", v["source"], _artifacts_size(v["source"], tracking_uri))]
    run_id = v["tags"].get(TAG_RUN_ID, "")
    local = [("cache", cached)]
    if _RUN_ID.match(run_id):
        local.append(("run export", home.run_dir(run_id) / "export"))
    for what, path in local:
        if _leftovers(path) or path.exists():
            found.append(Deletion(what, str(path), _tree_size(path)))
    return tuple(found)


def _artifact_repo(source: str, tracking_uri: str) -> tuple[Any, str]:
    """The artifact repository of the folder that holds ``source``, and ``source``'s name
    in it: local folders, S3 and an MLflow server's proxied artifacts alike."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    parent, _, leaf = source.rstrip("/").rpartition("/")
    return get_artifact_repository(parent, tracking_uri=tracking_uri), leaf


def _artifacts_size(source: str, tracking_uri: str) -> int:
    repo, leaf = _artifact_repo(source, tracking_uri)
    total, todo = 0, [leaf]
    while todo:
        for info in repo.list_artifacts(todo.pop()):
            if info.is_dir:
                todo.append(info.path)
            else:
                total += int(info.file_size or 0)
    return total


def _leftovers(path: Path) -> list[Path]:
    """Folders an earlier removal set aside (:func:`_remove_tree`) but did not finish."""
    return list(path.parent.glob(f".{path.name}{_ASIDE}*")) if path.parent.is_dir() else []


def _tree_size(path: Path) -> int:
    total = 0
    for root in [path, *_leftovers(path)]:
        if root.is_file():
            total += root.stat().st_size
        for dirpath, _, files in os.walk(root):
            total += sum((Path(dirpath) / f).lstat().st_size for f in files)
    return total


def _remove_tree(path: Path) -> None:
    """Remove ``path`` and what an earlier removal left of it. Renamed aside first, so it
    is gone at once: a half-deleted folder under its own name would pass for whole (the
    registry cache serves any ``model/`` it finds, a cached stage result any path that
    exists)."""
    if path.exists():
        os.rename(path, path.with_name(f".{path.name}{_ASIDE}{secrets.token_hex(4)}"))
    for aside in _leftovers(path):
        shutil.rmtree(aside)


# --------------------------------------------------------------------------- apply


def apply(plan: RetentionPlan, tracking_uri: str) -> list[Outcome]:
    """Delete what ``plan`` lists, version by version, and tag each version pruned. Each
    version's aliases are read again right before: one that holds an alias now is left
    whole. Deleting again what was deleted already is harmless, so a run cut short is
    finished by the next one."""
    client = reg.client(tracking_uri)
    name = plan.name
    outcomes = []
    for vp in plan.to_prune:
        version = str(vp.version)
        if held := _aliases_of(client, name, vp.version):
            outcomes.append(Outcome(vp.version, skipped=f"it holds {', '.join(held)} now"))
            continue
        tags = reg.version_tags(client, name, vp.version)
        if reg.TAG_PRUNED_BYTES in tags:
            outcomes.append(Outcome(vp.version, skipped="pruned meanwhile"))
            continue
        # Tagged first: from here on resolve refuses it, so nothing starts serving it.
        client.set_model_version_tag(
            name, version, reg.TAG_PRUNED, tags.get(reg.TAG_PRUNED) or now_utc()
        )
        if held := _aliases_of(client, name, vp.version):
            # An alias set between the first look and the tag: the version stays whole
            # (unless an earlier attempt had begun deleting it: then it stays refused).
            if reg.TAG_PRUNED not in tags:
                client.delete_model_version_tag(name, version, reg.TAG_PRUNED)
            outcomes.append(Outcome(vp.version, skipped=f"it holds {', '.join(held)} now"))
            continue
        for d in vp.deletions:
            if d.what == "artifacts":
                repo, leaf = _artifact_repo(d.where, tracking_uri)
                repo.delete_artifacts(leaf)
            else:
                _remove_tree(Path(d.where))
        client.set_model_version_tag(name, version, reg.TAG_PRUNED_BYTES, str(vp.size))
        log.info(
            "retention: pruned %s version %d (%s: %s)",
            name,
            vp.version,
            human_bytes(vp.size),
            ", ".join(d.what for d in vp.deletions),
        )
        outcomes.append(Outcome(vp.version, freed=vp.size))
    return outcomes


def _aliases_of(client: Any, name: str, version: int) -> list[str]:
    return sorted(a for a, v in (reg.model_aliases(client, name) or {}).items() if v == version)
