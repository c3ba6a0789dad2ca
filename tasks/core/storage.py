"""Run outputs on shared storage: how a worker on another host finds an earlier stage's output.

Without a run storage the workers of one run share a home (a shared folder) and a stage's
reference is handed over through the run's folder (:func:`tasks.core.refs.record_ref`).
With one (``SLOTHFLOW_RUN_STORAGE``: an fsspec URL such as ``s3://bucket/prefix``, or a
folder every host mounts), each worker keeps its own home and the flow hands references
over through the storage:

* **publish** (after a stage, on the worker that ran it, or was served it from the
  cache): every file under the home that the reference names is stored once by content
  (``blobs/<sha256>``), and a hand-over record ``handover/<run id>/<stage>.json`` holds
  the reference with home-relative paths plus each file's path, hash and size. The record
  is written last, so a reader never sees a half-published stage.
* **take** (on the worker of the next stage): the record is read, each file that is
  missing or different in this worker's home is downloaded and its hash checked before it
  is moved into place, and the reference comes back with this home's paths.

Content addressing makes publishing a stage served from the cache, or a second run with
the same base model, upload nothing new. Paths outside the home (a model folder under an
allowlisted root, a data source) are not copied: every worker must see them at the same
path. Checkpoints are not published (a run resumed on another host trains again from
its last published stage).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from tasks.core.home import Home
from tasks.core.refs import sha256_file

log = logging.getLogger(__name__)

T = TypeVar("T", bound=BaseModel)

#: Stands for the home's root in a stored reference.
HOME_TOKEN = "${SLOTHFLOW_HOME}"
#: The home's folders a hand-over may write to (run outputs, built base models, the hub's
#: download cache); anything else in a record is refused.
HANDED_OVER = frozenset({"runs", "models", "cache"})
#: Folders never published: resumable training state, locks and caches.
SKIPPED_DIRS = frozenset({"checkpoints", "__pycache__", ".cache"})


class StorageError(RuntimeError):
    """The run storage is missing a hand-over, or holds a file whose hash does not match."""


class RunStorage:
    """One run storage, seen from one worker's home."""

    def __init__(self, url: str, home: Home) -> None:
        import fsspec

        self.url = url.rstrip("/")
        self.fs, root = fsspec.core.url_to_fs(self.url)
        self.root = root.rstrip("/")
        self.home = home

    def _remote(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    # ---------------------------------------------------------------- publish

    def publish(self, run_id: str, stage: str, ref: BaseModel) -> dict[str, Any]:
        """Store what ``ref`` names under the home and its hand-over record; returns the
        record."""
        home = self.home.root.resolve()
        files: dict[str, dict[str, Any]] = {}
        uploaded = 0
        for path in _files_of(_home_paths(ref, home)):
            rel = path.relative_to(home).as_posix()
            digest = sha256_file(path)
            size = path.stat().st_size
            files[rel] = {"sha256": digest, "size": size}
            blob = self._remote("blobs", digest)
            if not self.fs.exists(blob):
                # Under a temporary name first: a blob is only ever whole (a publish cut
                # short would otherwise leave a truncated blob every later one skips).
                part = self._remote("blobs", f".{digest}.{secrets.token_hex(6)}.part")
                self.fs.put_file(str(path), part)
                self.fs.mv(part, blob)
                uploaded += size
        tokens = _tokenize(ref.model_dump(mode="json"), str(home))
        record = {
            "run_id": run_id,
            "stage": stage,
            "ref_type": type(ref).__name__,
            "ref": tokens,
            "files": files,
        }
        # By the reference's content too, so a worker served this reference from a shared
        # cache can find its files without knowing which run made it (:meth:`localize`).
        self._write_json(self._remote("refs", f"{_ref_digest(tokens)}.json"), record)
        self._write_json(self._remote("handover", run_id, f"{stage}.json"), record)
        log.info(
            "%s: published %d files (%.1f MB new) to %s",
            stage,
            len(files),
            uploaded / 1e6,
            self.url,
        )
        return record

    def _write_json(self, remote: str, obj: Any) -> None:
        blob = json.dumps(obj, indent=2, sort_keys=True).encode("utf-8")
        self.fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
        with self.fs.open(remote, "wb") as f:
            f.write(blob)

    # ---------------------------------------------------------------- take

    def take(self, run_id: str, stage: str, model: type[T]) -> T:
        """The reference stage ``stage`` of run ``run_id`` handed over, with its files in
        this home (downloaded where missing or different, every hash checked)."""
        remote = self._remote("handover", run_id, f"{stage}.json")
        record = self._read_json(
            remote,
            f"stage {stage} of run {run_id} has not been handed over: no {self.url}/"
            f"handover/{run_id}/{stage}.json",
        )
        return model.model_validate(self._fetch(record, remote))

    def localize(self, ref: T) -> T:
        """``ref`` (with this home's paths, as a shared cache hands it back) with its files
        in this home: fetched from the storage where missing, every hash checked."""
        home = self.home.root.resolve()
        tokens = _tokenize(ref.model_dump(mode="json"), str(home))
        remote = self._remote("refs", f"{_ref_digest(tokens)}.json")
        record = self._read_json(
            remote,
            f"{type(ref).__name__}: the cached reference's files were never published to "
            f"{self.url}",
        )
        return type(ref).model_validate(self._fetch(record, remote))

    def _read_json(self, remote: str, missing: str) -> dict[str, Any]:
        try:
            with self.fs.open(remote, "rb") as f:
                return dict(json.loads(f.read()))
        except FileNotFoundError:
            raise StorageError(missing) from None

    def _fetch(self, record: dict[str, Any], remote: str) -> Any:
        """Bring a record's files into this home; its reference with this home's paths."""
        stage, run_id = record["stage"], record["run_id"]
        home = self.home.root.resolve()
        fetched = 0
        for rel, meta in record["files"].items():
            local = home / rel
            if not _inside(local, home):
                raise StorageError(f"hand-over {remote} names a path outside the home: {rel}")
            if Path(rel).parts[0] not in HANDED_OVER:
                # Only stage outputs and models: never the home's stores, caches of
                # records, or servers' keys, whatever a record in the storage says.
                raise StorageError(f"hand-over {remote} names {rel}, which is not a stage output")
            same_size = local.is_file() and local.stat().st_size == meta["size"]
            if same_size and sha256_file(local) == meta["sha256"]:
                continue
            self._download(meta["sha256"], local)
            fetched += meta["size"]
        log.info("%s: took %s from %s (%.1f MB fetched)", stage, run_id, self.url, fetched / 1e6)
        return _untokenize(record["ref"], str(home))

    def _download(self, digest: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.parent / f".{local.name}.{secrets.token_hex(6)}.part"
        try:
            self.fs.get_file(self._remote("blobs", digest), str(tmp))
            got = sha256_file(tmp)
            if got != digest:
                # Removed, so the next publish of that content stores it again.
                self.fs.rm_file(self._remote("blobs", digest))
                raise StorageError(
                    f"{self.url}/blobs/{digest} holds content with sha256 {got}: the stored "
                    f"file for {local} is corrupt or was replaced"
                )
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)


def for_home(url: str | None, home: Home) -> RunStorage | None:
    """The run storage at ``url`` (None: hand over through the shared home)."""
    return RunStorage(url, home) if url else None


# ------------------------------------------------------------------------ helpers


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root)
    except ValueError:
        return False
    return True


def _home_paths(ref: BaseModel, home: Path) -> set[Path]:
    """Every path under ``home`` that ``ref`` (and the references inside it) names."""
    found: set[Path] = set()

    def walk(value: Any) -> None:
        if isinstance(value, BaseModel):
            for _, v in value:
                walk(v)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list | tuple):
            for v in value:
                walk(v)
        elif isinstance(value, str) and value.startswith("/"):
            p = Path(value)
            if p.exists() and _inside(p, home):
                found.add(p.resolve())

    walk(ref)
    # Only the outermost: a stage folder covers the files inside it.
    return {p for p in found if not any(q != p and q in p.parents for q in found)}


def _files_of(roots: set[Path]) -> Iterator[Path]:
    for root in sorted(roots):
        if root.is_file():
            yield root
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS)
            for name in sorted(filenames):
                if not name.endswith((".lock", ".part", ".tmp")):
                    yield Path(dirpath) / name


def _ref_digest(tokens: Any) -> str:
    blob = json.dumps(tokens, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def tokenize(obj: Any, home: str) -> Any:
    """``obj`` (JSON) with the home's root in every path replaced by :data:`HOME_TOKEN`."""
    return _tokenize(obj, home)


def untokenize(obj: Any, home: str) -> Any:
    """The inverse of :func:`tokenize`, for this worker's home."""
    return _untokenize(obj, home)


def _tokenize(obj: Any, home: str) -> Any:
    if isinstance(obj, dict):
        return {k: _tokenize(v, home) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_tokenize(v, home) for v in obj]
    if isinstance(obj, str) and (obj == home or obj.startswith(home + "/")):
        return HOME_TOKEN + obj[len(home) :]
    return obj


def _untokenize(obj: Any, home: str) -> Any:
    if isinstance(obj, dict):
        return {k: _untokenize(v, home) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_untokenize(v, home) for v in obj]
    if isinstance(obj, str) and obj.startswith(HOME_TOKEN):
        return home + obj[len(HOME_TOKEN) :]
    return obj
