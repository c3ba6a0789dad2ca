"""The run storage (tasks/core/storage.py) against a real S3-compatible server on loopback
(moto in server mode): two homes, as on two hosts, hand stage outputs over through it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks.core.home import Home
from tasks.core.refs import BaseModelRef, DataRef, TrainRef

from .conftest import S3Server


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    yield s3_server


def _home_with_a_trained_run(root: Path) -> tuple[Home, TrainRef]:
    home = Home(root)
    model = root / "models" / "tiny"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"weights" * 1000)
    (model / "config.json").write_text("{}")
    train = root / "runs" / "r1" / "train"
    (train / "adapter").mkdir(parents=True)
    (train / "adapter" / "adapter_model.safetensors").write_bytes(b"adapter" * 500)
    (train / "checkpoints" / "checkpoint-10").mkdir(parents=True)
    (train / "checkpoints" / "checkpoint-10" / "state.pt").write_bytes(b"x" * 100)
    base = BaseModelRef(
        stage="base",
        path=str(model),
        name_or_path=str(model),
        revision="sha256:abc",
        tokenizer_path=str(model),
        chat_template_sha256="t",
    )
    ref = TrainRef(
        stage="train",
        path=str(train),
        adapter_path=str(train / "adapter"),
        tokenizer_path=str(model),
        base=base,
        data_fingerprint="f",
        config_hash="c",
        backend="peft",
        best_step=10,
        metrics={"best_eval_loss": 1.0},
    )
    return home, ref


def test_a_stage_is_handed_to_another_home_with_its_files_and_paths(
    s3_env: S3Server, tmp_path: Path
) -> None:
    from tasks.core.storage import RunStorage

    url = f"s3://{s3_env.bucket}/unit-{tmp_path.name}"
    home_a, ref = _home_with_a_trained_run(tmp_path / "a")
    record = RunStorage(url, home_a).publish("r1", "train", ref)
    assert "runs/r1/train/adapter/adapter_model.safetensors" in record["files"]
    assert "models/tiny/model.safetensors" in record["files"]  # the nested base reference
    assert not any("checkpoints" in f for f in record["files"])  # not published

    home_b = Home(tmp_path / "b")
    got = RunStorage(url, home_b).take("r1", "train", TrainRef)
    assert got.adapter_path == str(home_b.root.resolve() / "runs/r1/train/adapter")
    assert got.base.path == str(home_b.root.resolve() / "models/tiny")
    assert (Path(got.adapter_path) / "adapter_model.safetensors").read_bytes() == (
        Path(ref.adapter_path) / "adapter_model.safetensors"
    ).read_bytes()
    assert got.model_copy(
        update={"path": ref.path, "adapter_path": ref.adapter_path, "base": ref.base,
                "tokenizer_path": ref.tokenizer_path}
    ) == ref  # fmt: skip
    assert not (home_b.root / "runs/r1/train/checkpoints").exists()

    # Taking it again fetches nothing: the files are there with the right hashes.
    stamp = (Path(got.adapter_path) / "adapter_model.safetensors").stat().st_mtime_ns
    RunStorage(url, home_b).take("r1", "train", TrainRef)
    assert (Path(got.adapter_path) / "adapter_model.safetensors").stat().st_mtime_ns == stamp


def test_publishing_the_same_content_again_uploads_nothing(
    s3_env: S3Server, tmp_path: Path
) -> None:
    import s3fs

    from tasks.core.storage import RunStorage

    url = f"s3://{s3_env.bucket}/dedup-{tmp_path.name}"
    home, ref = _home_with_a_trained_run(tmp_path / "a")
    store = RunStorage(url, home)
    store.publish("r1", "train", ref)
    fs = s3fs.S3FileSystem()
    blobs = sorted(fs.ls(f"{s3_env.bucket}/dedup-{tmp_path.name}/blobs"))
    store.publish("r2", "train", ref)  # a run served the same stage from the cache
    assert sorted(fs.ls(f"{s3_env.bucket}/dedup-{tmp_path.name}/blobs")) == blobs
    assert fs.exists(f"{s3_env.bucket}/dedup-{tmp_path.name}/handover/r2/train.json")


def test_a_replaced_file_in_the_storage_is_refused(s3_env: S3Server, tmp_path: Path) -> None:
    import s3fs

    from tasks.core.storage import RunStorage, StorageError

    url = f"s3://{s3_env.bucket}/tamper-{tmp_path.name}"
    home, ref = _home_with_a_trained_run(tmp_path / "a")
    record = RunStorage(url, home).publish("r1", "train", ref)
    digest = record["files"]["runs/r1/train/adapter/adapter_model.safetensors"]["sha256"]
    fs = s3fs.S3FileSystem()
    fs.pipe(f"{s3_env.bucket}/tamper-{tmp_path.name}/blobs/{digest}", b"not the adapter")
    home_b = Home(tmp_path / "b")
    with pytest.raises(StorageError, match="corrupt or was replaced"):
        RunStorage(url, home_b).take("r1", "train", TrainRef)
    adapter = home_b.root / "runs/r1/train/adapter"
    assert not adapter.exists() or not any(adapter.iterdir())  # nothing half-written left
    assert not fs.exists(f"{s3_env.bucket}/tamper-{tmp_path.name}/blobs/{digest}")  # dropped
    RunStorage(url, home).publish("r1", "train", ref)  # so the next publish stores it again
    RunStorage(url, home_b).take("r1", "train", TrainRef)


def test_a_stage_not_handed_over_is_a_clear_error(s3_env: S3Server, tmp_path: Path) -> None:
    from tasks.core.storage import RunStorage, StorageError

    store = RunStorage(f"s3://{s3_env.bucket}/none-{tmp_path.name}", Home(tmp_path))
    with pytest.raises(StorageError, match=r"stage data of run r9 has not been handed over"):
        store.take("r9", "data", DataRef)


def test_a_hand_over_naming_a_path_outside_the_home_is_refused(
    s3_env: S3Server, tmp_path: Path
) -> None:
    import s3fs

    from tasks.core.storage import RunStorage, StorageError

    url = f"s3://{s3_env.bucket}/escape-{tmp_path.name}"
    home, ref = _home_with_a_trained_run(tmp_path / "a")
    RunStorage(url, home).publish("r1", "train", ref)
    fs = s3fs.S3FileSystem()
    key = f"{s3_env.bucket}/escape-{tmp_path.name}/handover/r1/train.json"
    record = json.loads(fs.cat(key))
    record["files"]["../../outside.txt"] = next(iter(record["files"].values()))
    fs.pipe(key, json.dumps(record).encode())
    with pytest.raises(StorageError, match="outside the home"):
        RunStorage(url, Home(tmp_path / "b")).take("r1", "train", TrainRef)
    assert not (tmp_path / "outside.txt").exists()

    # inside the home but not a stage output: the cache's records, Prefect's home, ...
    del record["files"]["../../outside.txt"]
    record["files"]["stage-cache/results/train-x"] = next(iter(record["files"].values()))
    fs.pipe(key, json.dumps(record).encode())
    with pytest.raises(StorageError, match="not a stage output"):
        RunStorage(url, Home(tmp_path / "b")).take("r1", "train", TrainRef)
    assert not (tmp_path / "b" / "stage-cache").exists()


def test_the_worker_setting_names_the_storage() -> None:
    from tasks.core import settings
    from tasks.core.config import ConfigError

    assert settings.from_env({"SLOTHFLOW_RUN_STORAGE": "s3://b/p"}).run_storage == "s3://b/p"
    assert settings.from_env({}).run_storage is None
    with pytest.raises(ConfigError, match="SLOTHFLOW_RUN_STORAGE"):
        settings.from_env({"SLOTHFLOW_RUN_STORAGE": "relative/folder"})
