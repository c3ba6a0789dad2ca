"""Prefect-native reuse of finished stages: a cache policy per stage and its storage.

A stage task's cache key is the stage's own inputs hash (the function each stage module
already defines from content hashes: data fingerprint, the config sections the stage
reads, the base model's revision), plus a digest of the code the stage runs. Prefect
then does the rest: a task with a known key is not run again but shows as **Cached** in
the UI, its result (the stage's small reference, as JSON, never a pickle) is read from
the home's result storage, and a lock per key (SERIALIZABLE isolation) makes a second
run with the same inputs wait for the first instead of computing the same thing twice.

A reference points at files (an adapter, a merged model). A record whose files are gone
(a run folder deleted by hand or by retention) is dropped when its key is looked up, so
the stage runs again instead of handing on a path that no longer exists.

Imported only where Prefect is installed (:func:`tasks.core.orchestration.stage_task`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.filesystems import LocalFileSystem
from prefect.locking.filesystem import FileSystemLockManager
from prefect.results import ResultStore
from prefect.serializers import JSONSerializer
from pydantic import BaseModel, Field

from tasks.core.refs import sha256_json

log = logging.getLogger(__name__)

#: What a stage's key is made of: the task's bound arguments -> a JSON-able identity
#: (usually the stage's inputs hash).
KeyOf = Callable[[dict[str, Any]], Any]

_CORE = Path(__file__).resolve().parent
_TASKS = _CORE.parent


@cache
def code_digest(module: str) -> str:
    """Hash of the source a stage runs: its module (the whole package when it is one) and
    ``tasks/core``. Finer than the git commit on purpose: a docs change or an edit to
    another stage keeps this stage's cache; any edit to its own code or the core drops it
    (uncommitted edits too, which a ``-dirty`` commit id would not tell apart)."""
    rel = module.removeprefix("tasks.").split(".")[0]
    own = _TASKS / rel
    files = sorted(own.rglob("*.py")) if own.is_dir() else [own.with_suffix(".py")]
    files += sorted(_CORE.rglob("*.py"))
    h = hashlib.sha256()
    for f in dict.fromkeys(files):  # ordered, no repeats (a core module is listed once)
        h.update(str(f.relative_to(_TASKS)).encode() + b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()


def _missing_files(result: Any) -> list[str]:
    """The local paths a stage reference names that no longer exist."""
    if not isinstance(result, BaseModel):
        return []
    missing = []
    for name, value in result:
        if isinstance(value, BaseModel):
            missing += _missing_files(value)
        elif (name == "path" or name.endswith("_path")) and isinstance(value, str) and value:
            local = value.removeprefix("file://")
            # Only absolute local paths: a hub id ("org/model") or a URL is not a file here.
            if Path(local).is_absolute() and not Path(local).exists():
                missing.append(value)
    return missing


@dataclass
class StageInputs(CachePolicy):
    """Cache key of one stage: ``stage``, ``key_of(arguments)`` and the stage's code
    digest. ``results`` is the result store's folder, set by :func:`configured`, so a
    record whose files are gone can be dropped before Prefect looks it up."""

    stage: str = ""
    key_of: KeyOf | None = None
    module: str = ""
    results: str | None = None
    shared: str | None = None  # the run storage's results folder, when the cache is shared
    dropped: list[str] = field(default_factory=list)  # keys dropped (for tests and logs)

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        if self.key_of is None:
            return None
        key = f"{self.stage}-" + sha256_json(
            {"stage": self.stage, "inputs": self.key_of(inputs), "code": code_digest(self.module)}
        )
        self._refuse_foreign(key)
        self._drop_if_stale(key)
        return key

    def _refuse_foreign(self, key: str) -> None:
        """Drop a record that names another serializer than ours before Prefect reads it:
        Prefect deserializes with whatever the record's metadata says, and a record in
        shared storage saying ``pickle`` would run code on every worker that reads it."""
        import fsspec

        where, expected = (
            (f"{self.shared}/{key}", HomeJSONSerializer().type)
            if self.shared
            else (f"{self.results}/{key}", "json")
        )
        if self.results is None and self.shared is None:
            return
        fs, path = fsspec.core.url_to_fs(where)
        try:
            with fs.open(path, "rb") as f:
                kind = json.loads(f.read())["metadata"]["serializer"]["type"]
        except FileNotFoundError:
            return
        except (ValueError, KeyError, TypeError):
            kind = "unreadable"
        if kind != expected:
            log.warning("%s: cache record %s names serializer %r; dropped", self.stage, key, kind)
            fs.rm_file(path)
            self.dropped.append(key)

    def _drop_if_stale(self, key: str) -> None:
        if self.results is None:
            return
        record = Path(self.results) / key
        if not record.exists():
            return
        store = ResultStore(
            result_storage=LocalFileSystem(basepath=self.results), serializer=JSONSerializer()
        )
        try:
            missing = _missing_files(store.read(key).result)
        except Exception as exc:  # an unreadable record is as good as none
            missing = [f"unreadable record ({type(exc).__name__}: {exc})"]
        if missing:
            log.warning(
                "%s: cached result dropped, %s is gone; running it again", self.stage, missing[0]
            )
            record.unlink(missing_ok=True)
            self.dropped.append(key)


class HostLockManager(FileSystemLockManager):
    """File locks (one host, or a folder every worker mounts) that a killed holder does not
    leave behind. Prefect's lock files name the holder (a task run) but no process and, by
    default, no expiry; a worker killed mid-stage (SIGKILL, OOM, a lost node) never
    releases its lock, and the rescheduled run would wait on it for ever. So each lock
    also records the host, pid and start time of the process that took it, and a lock
    whose process on this host no longer runs (a reused pid has another start time) is
    taken over: renamed away atomically, and put back if it turns out to be a fresh lock
    someone else took meanwhile. A lock file left empty by a kill between its creation and
    its first write is stale after a minute. Locks taken on other hosts are left to their
    holders (across hosts the production-stack issue brings Redis locks)."""

    EMPTY_LOCK_STALE_S = 60.0

    def acquire_lock(
        self,
        key: str,
        holder: str,
        acquire_timeout: float | None = None,
        hold_timeout: float | None = None,
    ) -> bool:
        if not super().acquire_lock(key, holder, acquire_timeout, hold_timeout):
            return False
        path = Path(self._lock_path_for_key(key))
        info = json.loads(path.read_bytes())
        me = os.getpid()
        info |= {"host": socket.gethostname(), "pid": me, "started": _start_time(me)}
        path.write_text(json.dumps(info))
        return True

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        path = Path(self._lock_path_for_key(key))
        raw = b""
        try:
            raw = path.read_bytes()
            info = json.loads(raw) if raw else None
        except FileNotFoundError:
            self._locks.pop(key, None)
            return False
        except (OSError, ValueError):
            info = None
        if info is None:  # empty or half-written: being written, or its writer was killed
            try:
                age = time.time() - path.stat().st_mtime
            except FileNotFoundError:
                return False
            if age > self.EMPTY_LOCK_STALE_S:
                return not self._take_over(key, path, raw)
            return True
        if not super().is_locked(key, use_cache=use_cache):
            return False
        pid = info.get("pid")
        here = info.get("host") == socket.gethostname() and isinstance(pid, int)
        if here and not _same_process(pid, info.get("started")):
            log.warning("cache lock %s: its process %d is gone; taking the lock over", key, pid)
            return not self._take_over(key, path, raw)
        return True

    def _take_over(self, key: str, path: Path, seen: bytes) -> bool:
        """Remove the stale lock at ``path`` whose content was ``seen``; True if it is gone."""
        aside = path.with_name(f"{path.name}.stale-{secrets.token_hex(6)}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return True  # someone else took it over already
        if aside.read_bytes() != seen:  # a fresh lock taken in between: not ours to remove
            with contextlib.suppress(FileExistsError):
                os.link(aside, path)
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        self._locks.pop(key, None)
        return True


def _start_time(pid: int) -> str | None:
    """When process ``pid`` started, in clock ticks since boot (Linux), to tell a reused
    pid from the process that took a lock."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


def _same_process(pid: int, started: str | None) -> bool:
    if not _alive(pid):
        return False
    return started is None or _start_time(pid) in (None, started)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def stage_cache(stage: str, key_of: KeyOf, module: str) -> StageInputs:
    """The policy a stage task is declared with (storage comes later: :func:`configured`)."""
    return StageInputs(stage=stage, key_of=key_of, module=module, isolation_level="SERIALIZABLE")


class HomeJSONSerializer(JSONSerializer):
    """Prefect's JSON serializer with the home's root written as a token: a record in a
    cache that workers on several hosts share (the run storage) says ``${SLOTHFLOW_HOME}/
    runs/...`` and each worker reads it back with its own home's paths."""

    type: str = Field(default="slothflow-home-json", frozen=True)

    def dumps(self, obj: Any) -> bytes:
        from tasks.core import storage
        from tasks.core.home import resolve_home

        tree = json.loads(super().dumps(obj))
        home = str(resolve_home().root.resolve())
        return json.dumps(storage.tokenize(tree, home)).encode("utf-8")

    def loads(self, blob: bytes) -> Any:
        from tasks.core import storage
        from tasks.core.home import resolve_home

        home = str(resolve_home().root.resolve())
        return super().loads(json.dumps(storage.untokenize(json.loads(blob), home)).encode())


@cache
def _shared_results(url: str) -> Any:
    """The run storage's result folder as a Prefect block (a task's remote result storage
    must be a block saved on the server); saved once per process, under a name derived
    from the URL, holding no credentials (the worker's environment has them)."""
    from prefect.filesystems import RemoteFileSystem

    if "://" not in url:  # a folder every worker mounts: a plain path, no block needed
        folder = Path(url) / "stage-cache" / "results"
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    block = RemoteFileSystem(basepath=f"{url.rstrip('/')}/stage-cache/results")
    block.save("slothflow-stage-cache-" + sha256_json(url)[:12], overwrite=True)
    return block


def configured(
    task: Any, cache_root: Path, *, refresh: bool = False, shared: str | None = None
) -> Any:
    """``task`` with its cache in ``cache_root`` (``results/`` and ``locks/``): what the
    flow calls each stage with. ``refresh``: run the stage even with a record for its key,
    and overwrite the record (``slothflow run --refresh STAGE``). ``shared``: a run
    storage URL; the records then live there, shared by every worker, with home-relative
    paths (the files come from the storage: :meth:`tasks.core.storage.RunStorage.localize`);
    the locks stay per host."""
    policy = task.cache_policy
    if not isinstance(policy, StageInputs):
        return task.with_options(refresh_cache=refresh) if refresh else task
    policy = policy.configure(lock_manager=HostLockManager(cache_root / "locks"))
    if shared:
        policy.results = None  # files are checked when they are fetched, not here
        policy.shared = f"{shared.rstrip('/')}/stage-cache/results"
        return task.with_options(
            cache_policy=policy,
            result_storage=_shared_results(shared),
            result_serializer=HomeJSONSerializer(),
            refresh_cache=refresh,
        )
    results = cache_root / "results"
    results.mkdir(parents=True, exist_ok=True)
    policy.results = str(results)
    return task.with_options(
        cache_policy=policy,
        result_storage=results,  # a Path: a local folder, no block to save on the server
        refresh_cache=refresh,
    )
