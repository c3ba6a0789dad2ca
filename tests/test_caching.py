"""Prefect-native reuse of finished stages (tasks/core/caching.py, flows/pipeline.py's
``_Stages``): the cache key, the JSON records in the home, refresh, records whose files are
gone, and file locks that a killed holder leaves behind. The flow tests run against a real
(temporary) Prefect server."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tasks.core.home import Home
from tasks.core.refs import BaseModelRef, DataRef, RunContext
from tests.conftest import S3Server
from tests.test_data import cfg_for, good_rows, tokenizer_dir, write_jsonl

__all__ = ["tokenizer_dir"]  # the fixture, imported for its use here

REPO = Path(__file__).resolve().parents[1]


def test_code_digest_follows_the_stages_own_code_and_the_core(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.core import caching

    tasks = tmp_path / "tasks"
    shutil.copytree(REPO / "tasks", tasks, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(caching, "_TASKS", tasks)
    monkeypatch.setattr(caching, "_CORE", tasks / "core")

    def digests() -> dict[str, str]:
        caching.code_digest.cache_clear()
        return {
            m: caching.code_digest(m) for m in ("tasks.data.clean", "tasks.train", "tasks.gate")
        }

    before = digests()
    assert len(set(before.values())) == 3  # each stage its own
    (tasks / "train" / "trainer.py").write_text(
        (tasks / "train" / "trainer.py").read_text() + "\n#"
    )
    after = digests()
    assert after["tasks.train"] != before["tasks.train"]  # a file anywhere in the package
    assert after["tasks.data.clean"] == before["tasks.data.clean"]  # another stage: kept
    (tasks / "core" / "refs.py").write_text((tasks / "core" / "refs.py").read_text() + "\n#")
    core = digests()
    assert all(core[m] != after[m] for m in core)  # the core: every stage
    caching.code_digest.cache_clear()


def test_missing_files_names_the_paths_that_are_gone(tmp_path: Path) -> None:
    from tasks.core.caching import _missing_files

    train = tmp_path / "train.jsonl"
    train.write_text("{}\n")
    ref = DataRef(
        stage="data",
        path=str(tmp_path),
        train_path=str(train),
        validation_path=str(tmp_path / "gone.jsonl"),
        fingerprint="f",
        train_rows=1,
        validation_rows=0,
        report_path="s3://bucket/report.json",  # remote: not checked here
    )
    assert _missing_files(ref) == [str(tmp_path / "gone.jsonl")]
    assert _missing_files(None) == []


def test_a_lock_left_by_a_killed_holder_is_taken_over(tmp_path: Path) -> None:
    """Prefect's holder is a task run id; the lock file also names the process."""
    from tasks.core.caching import HostLockManager

    code = (
        "import sys; from pathlib import Path; from tasks.core.caching import HostLockManager;"
        "HostLockManager(Path(sys.argv[1])).acquire_lock('k-dead', 'task-run-1')"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, cwd=REPO)
    taken = json.loads((tmp_path / "k-dead.lock").read_text())
    assert taken["holder"] == "task-run-1" and taken["host"] == socket.gethostname()
    locks = HostLockManager(tmp_path)
    locks.acquire_lock("k-live", "task-run-2")
    elsewhere = {"holder": "task-run-3", "expiration": None, "host": "elsewhere", "pid": 1}
    (tmp_path / "k-other-host.lock").write_text(json.dumps(elsewhere))
    fresh = HostLockManager(tmp_path)  # another process's view: no in-memory state
    assert not fresh.is_locked("k-dead")  # its process exited without releasing it
    assert not (tmp_path / "k-dead.lock").exists()
    assert fresh.is_locked("k-live")  # this process holds it
    assert fresh.is_locked("k-other-host")  # its holder may be alive on its own host
    assert fresh.acquire_lock("k-dead", "task-run-4", acquire_timeout=1)


def test_a_reused_pid_or_an_empty_lock_file_does_not_hold_a_lock_for_ever(tmp_path: Path) -> None:
    from tasks.core.caching import HostLockManager

    locks = HostLockManager(tmp_path)
    reused = {
        "holder": "t",
        "expiration": None,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": "1",
    }  # this pid, but not this process's start
    (tmp_path / "k-reused.lock").write_text(json.dumps(reused))  # fmt: skip
    assert not locks.is_locked("k-reused")
    (tmp_path / "k-empty.lock").write_bytes(b"")  # killed between creating and writing it
    assert locks.is_locked("k-empty")  # maybe still being written
    old = os.stat(tmp_path / "k-empty.lock").st_mtime - 120
    os.utime(tmp_path / "k-empty.lock", (old, old))
    assert not locks.is_locked("k-empty") and not (tmp_path / "k-empty.lock").exists()


def test_a_hub_id_is_not_a_missing_file() -> None:
    from tasks.core.caching import _missing_files

    ref = BaseModelRef(
        stage="base",
        path="Qwen/Qwen2.5-0.5B",
        name_or_path="Qwen/Qwen2.5-0.5B",
        revision="abc",
        tokenizer_path="Qwen/Qwen2.5-0.5B",
        chat_template_sha256="t",
    )
    assert _missing_files(ref) == []


def test_a_record_naming_another_serializer_is_dropped_unread(tmp_path: Path) -> None:
    """Prefect deserializes with the serializer a record names: a record saying pickle
    (written by whoever can write the cache's storage) must never be read."""
    from tasks.core.caching import StageInputs

    policy = StageInputs(stage="data", key_of=lambda a: "k", module="tasks.gate")
    policy.results = str(tmp_path)
    (tmp_path / "data-x").write_text(
        json.dumps({"metadata": {"serializer": {"type": "pickle"}}, "result": "gASV"})
    )
    (tmp_path / "data-y").write_text(
        json.dumps({"metadata": {"serializer": {"type": "json"}}, "result": "{}"})
    )
    policy._refuse_foreign("data-x")
    policy._refuse_foreign("data-y")
    assert not (tmp_path / "data-x").exists() and (tmp_path / "data-y").exists()
    assert policy.dropped == ["data-x"]


def test_a_folder_run_storage_keeps_the_cache_in_a_plain_folder(tmp_path: Path) -> None:
    from tasks.core.caching import _shared_results

    where = _shared_results(str(tmp_path / "mnt"))
    assert where == tmp_path / "mnt" / "stage-cache" / "results" and where.is_dir()


# --------------------------------------------------------------------------- in flows


@pytest.fixture(scope="module")
def harness() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _ctx(root: Path, run: str) -> RunContext:
    return RunContext(
        run_id=run, run_dir=str(root / "runs" / run), config_hash="x", code_version="x", hardware={}
    )


def _clean_twice(
    home: Home, src: Path, tokenizer: str, refresh: list[str] | None = None, runs: int = 2
) -> list[tuple[str, DataRef, list[str]]]:
    """The data stage as the pipeline calls it, in ``runs`` flow runs of their own (each
    with its own run folder); per run: the task run's state name, its ref, cached stages."""
    from prefect import flow

    from flows.pipeline import _stages
    from tasks.data import clean_task

    @flow(name="cache-test")
    def one(run: str) -> tuple[str, DataRef, list[str]]:
        stages = _stages(home, refresh)
        ref = stages(_ctx(home.root, run), clean_task, cfg_for(src, val_fraction=0.3), tokenizer)
        return ("Cached" if stages.cached else "Completed"), ref, stages.cached

    return [one(f"run-{i}-{os.urandom(3).hex()}") for i in range(runs)]


def test_the_same_inputs_are_served_from_the_cache(
    harness: None, tmp_path: Path, tokenizer_dir: str
) -> None:
    home = Home(tmp_path / "home")
    src = write_jsonl(tmp_path / "in.jsonl", good_rows(40))
    (first_state, first, _), (second_state, second, cached) = _clean_twice(home, src, tokenizer_dir)
    assert (first_state, second_state, cached) == ("Completed", "Cached", ["data"])
    assert second == first  # the first run's reference, files and all
    # the second run's folder records it, for a stage on another worker of that run
    (second_dir,) = [p for p in (home.root / "runs").iterdir() if p.name.startswith("run-1-")]
    assert json.loads((second_dir / "data" / "ref.json").read_text())["ref"] == first.model_dump(
        mode="json"
    )
    assert not (second_dir / "data" / "train.jsonl").exists()  # it did not clean again
    # the record is JSON in the home, not a pickle
    (record,) = (home.stage_cache / "results").iterdir()
    assert record.name.startswith("data-")
    blob = json.loads(record.read_text())
    assert blob["metadata"]["serializer"]["type"] == "json"

    # new content: a new key, the stage runs
    write_jsonl(src, good_rows(41))
    ((state, changed, _),) = _clean_twice(home, src, tokenizer_dir, runs=1)
    assert state == "Completed" and changed.fingerprint != first.fingerprint


def test_refresh_runs_a_cached_stage_again(
    harness: None, tmp_path: Path, tokenizer_dir: str
) -> None:
    home = Home(tmp_path / "home")
    src = write_jsonl(tmp_path / "in.jsonl", good_rows(30))
    _clean_twice(home, src, tokenizer_dir, runs=1)
    ((state, ref, _),) = _clean_twice(home, src, tokenizer_dir, refresh=["data"], runs=1)
    assert state == "Completed" and Path(ref.train_path).exists()
    ((state, again, _),) = _clean_twice(home, src, tokenizer_dir, runs=1)
    assert state == "Cached" and again == ref  # the refreshed result replaced the record

    from tasks.core.config import ConfigError

    with pytest.raises(ConfigError, match="refresh: gate is not a cached stage"):
        _clean_twice(home, src, tokenizer_dir, refresh=["gate"], runs=1)


def test_a_record_whose_files_are_gone_is_dropped(
    harness: None, tmp_path: Path, tokenizer_dir: str
) -> None:
    home = Home(tmp_path / "home")
    src = write_jsonl(tmp_path / "in.jsonl", good_rows(30))
    ((_, first, _),) = _clean_twice(home, src, tokenizer_dir, runs=1)
    shutil.rmtree(Path(first.path).parent)  # the run folder, deleted by hand
    ((state, again, _),) = _clean_twice(home, src, tokenizer_dir, runs=1)
    assert state == "Completed" and Path(again.train_path).exists()
    assert again.fingerprint == first.fingerprint


def _unused(*_: Any) -> None:  # keep imports honest for linters
    return None


def test_workers_with_their_own_homes_share_the_cache_through_the_run_storage(
    harness: None,
    tmp_path: Path,
    tokenizer_dir: str,
    s3_server: S3Server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two homes (two hosts) and one run storage on S3: what one computed, the other is
    served from the cache — the record read from the storage with its own home's paths,
    the files fetched into its home, their hashes checked."""
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("SLOTHFLOW_RUN_STORAGE", f"s3://{s3_server.bucket}/cache-{tmp_path.name}")
    src = write_jsonl(tmp_path / "in.jsonl", good_rows(30))
    host_a, host_b = Home(tmp_path / "a"), Home(tmp_path / "b")

    monkeypatch.setenv("SLOTHFLOW_HOME", str(host_a.root))
    ((state_a, on_a, _),) = _clean_twice(host_a, src, tokenizer_dir, runs=1)
    monkeypatch.setenv("SLOTHFLOW_HOME", str(host_b.root))
    ((state_b, on_b, _),) = _clean_twice(host_b, src, tokenizer_dir, runs=1)

    assert (state_a, state_b) == ("Completed", "Cached")
    assert on_b.fingerprint == on_a.fingerprint
    b_root = str(host_b.root.resolve())
    assert on_b.train_path.startswith(b_root) and on_a.train_path.startswith(
        str(host_a.root.resolve())
    )
    assert Path(on_b.train_path).read_bytes() == Path(on_a.train_path).read_bytes()
    assert not (host_b.stage_cache / "results").exists()  # the records are in the storage
