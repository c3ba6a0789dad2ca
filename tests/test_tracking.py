"""Tracking against real MLflow stores: SQLite in the home, and an `mlflow server` process."""

import json
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tasks.core import tracking
from tasks.core.config import TrackingConfig, load_config
from tasks.core.home import Home
from tasks.core.refs import RunContext
from tasks.core.run import open_run, stage


def _sqlite_cfg(tmp_path: Path) -> TrackingConfig:
    return TrackingConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="t")


def test_parent_and_nested_stage_runs_reattach_on_resume(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    cfg = _sqlite_cfg(tmp_path)
    ref = tracking.open_pipeline_run(cfg, home, run_id="r1")
    t = tracking.stage_tracker(ref, "data")
    t.log_params({"a": 1})
    t.log_metrics({"loss": 2.0}, step=3)
    t.end()
    # Same slothflow run id -> the same MLflow runs, not new ones.
    ref2 = tracking.open_pipeline_run(cfg, home, run_id="r1")
    t2 = tracking.stage_tracker(ref2, "data")
    assert (ref2.parent_run_id, t2.mlflow_run_id) == (ref.parent_run_id, t.mlflow_run_id)
    t2.log_params({"a": 1})  # re-logging the same value on resume is fine
    client = MlflowClient(cfg.tracking_uri)
    run = client.get_run(t.mlflow_run_id)
    assert run.data.tags["mlflow.parentRunId"] == ref.parent_run_id
    assert run.data.tags[tracking.TAG_STAGE] == "data"
    assert [m.step for m in client.get_metric_history(t.mlflow_run_id, "loss")] == [3]
    other = tracking.open_pipeline_run(cfg, home, run_id="r2")
    assert other.parent_run_id != ref.parent_run_id


def test_a_resumed_attempt_records_changed_settings_beside_the_first(tmp_path: Path) -> None:
    """Serving settings may change on resume: each attempt's values are kept and no
    logged param is rewritten (MLflow refuses that: 'Changing param values')."""
    home = Home(tmp_path / "home")
    cfg = _sqlite_cfg(tmp_path)
    ref = tracking.open_pipeline_run(cfg, home, run_id="r1")
    t = tracking.stage_tracker(ref, "serve")
    t.log_attempt_params({"serve.port": 8000, "serve.host": "127.0.0.1"})
    t.end("FAILED")
    t2 = tracking.stage_tracker(tracking.open_pipeline_run(cfg, home, run_id="r1"), "serve")
    t2.log_attempt_params({"serve.port": 8123, "serve.host": "127.0.0.1"})
    run = MlflowClient(cfg.tracking_uri).get_run(t2.mlflow_run_id)
    assert run.data.tags[tracking.TAG_ATTEMPT] == "2"
    params = {k: v for k, v in run.data.params.items() if k.startswith("serve.")}
    assert params == {
        "serve.port": "8000",
        "serve.host": "127.0.0.1",
        "serve.port.attempt2": "8123",
    }
    # A value covered by the config hash may not change: a clear error naming it.
    with pytest.raises(ValueError, match=r"serve\.port of this run is '8000'"):
        t2.log_params({"serve.port": 9000})


def test_resume_keeps_the_runs_own_serving_settings(tmp_path: Path) -> None:
    """A resume that does not repeat --set deploy.port=N serves on N again (not on the
    recipe's default), says so, and a new --set still wins."""
    from tasks.core.config import dump_config
    from tasks.core.run import resume_config

    home = Home(tmp_path / "home")
    started = load_config("ci-smoke", ["deploy.port=9123", "deploy.enabled=true"])
    run_dir = home.run_dir("r1")
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_config(started))
    fresh = load_config("ci-smoke")
    cfg, notes = resume_config(home, fresh, "r1", [])
    assert (cfg.deploy.port, cfg.deploy.enabled) == (9123, True)
    assert "deploy.port=9123 (the recipe says 8000)" in notes
    cfg, notes = resume_config(home, fresh, "r1", ["deploy.port=8124"])
    assert (cfg.deploy.port, cfg.deploy.enabled) == (8124, True)
    assert cfg.train == fresh.train  # only the sections outside the hash come from the run


def test_dataset_input_records_full_content_hash(tmp_path: Path) -> None:
    cfg = _sqlite_cfg(tmp_path)
    ref = tracking.open_pipeline_run(cfg, Home(tmp_path), run_id="r1")
    t = tracking.stage_tracker(ref, "data")
    data = tmp_path / "train.jsonl"
    data.write_text('{"a": 1}\n')
    digest = "ab" * 32
    t.log_input("train", str(data), digest, context="training", num_rows=1)
    run = MlflowClient(cfg.tracking_uri).get_run(t.mlflow_run_id)
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.name == "train" and inp.dataset.digest == digest[:16]
    assert json.loads(inp.dataset.source) == {"uri": data.resolve().as_uri()}
    assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "training"
    assert run.data.params["data.train.sha256"] == digest


def test_unreachable_server_fails_fast_with_clear_message(tmp_path: Path) -> None:
    from tests.conftest import free_port

    cfg = TrackingConfig(tracking_uri=f"http://127.0.0.1:{free_port()}", connect_timeout_s=2)
    t0 = time.time()
    with pytest.raises(tracking.TrackingUnavailableError, match="unreachable"):
        tracking.open_pipeline_run(cfg, Home(tmp_path), run_id="x")
    assert time.time() - t0 < 10


def test_credentials_never_ride_in_the_tracking_uri(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.core.config import ConfigError, build_config

    with pytest.raises(
        ConfigError, match=r"tracking\.tracking_uri: .*must not embed a password"
    ) as exc:
        build_config({"tracking": {"tracking_uri": "postgresql://u:hunter2@db/mlflow"}})
    assert "hunter2" not in str(exc.value)
    # From the environment too: the URI would end up in task parameters and run.json.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://u:hunter2@127.0.0.1:5000")
    with pytest.raises(tracking.TrackingUnavailableError, match="embeds a password") as exc2:
        tracking.resolve_tracking_uri(TrackingConfig(), Home(tmp_path))
    assert "hunter2" not in str(exc2.value) and "***" in str(exc2.value)


def test_open_run_logs_config_hash_hardware_and_code(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    cfg = load_config("ci-smoke", [f"tracking.tracking_uri=sqlite:///{tmp_path / 'm.db'}"])
    ctx = open_run(cfg, home)
    assert isinstance(ctx, RunContext)
    with stage(ctx, "data") as t:
        t.log_metrics({"rows": 5})
    ref = tracking.TrackingRef.model_validate(ctx.tracking)
    client = MlflowClient(ref.tracking_uri)
    parent = client.get_run(ref.parent_run_id)
    assert parent.data.params["config_hash"] == ctx.config_hash
    assert parent.data.params["hardware.backend"] == "peft"
    assert parent.data.tags["mlflow.source.git.commit"] == ctx.code_version
    assert parent.data.params["train.max_steps"] == "6"
    (child,) = client.search_runs(
        [ref.experiment_id], f"tags.`mlflow.parentRunId` = '{ref.parent_run_id}'"
    )
    assert child.info.status == "FINISHED" and child.data.metrics["rows"] == 5
    # A failing stage is marked FAILED and the error propagates.
    with pytest.raises(RuntimeError), stage(ctx, "train"):
        raise RuntimeError("boom")
    failed = client.search_runs([ref.experiment_id], "tags.`slothflow.stage` = 'train'")[0]
    assert failed.info.status == "FAILED"
    # Resume needs the same config.
    from tasks.core.config import ConfigError

    with pytest.raises(ConfigError, match="started with config"):
        open_run(load_config("ci-smoke", ["train.max_steps=9"]), home, resume_run_id=ctx.run_id)
    again = open_run(cfg, home, resume_run_id="last")
    assert again.run_id == ctx.run_id and again.tracking == ctx.tracking


def test_tracked_run_always_finishes_its_run(tmp_path: Path) -> None:
    """A command outside the flow (train, serve --track) leaves no run RUNNING: FINISHED
    with its summary, or FAILED when its body raises (the error propagates)."""
    from tasks.core.run import tracked_run

    home = Home(tmp_path / "home")
    cfg = load_config("ci-smoke", [f"tracking.tracking_uri=sqlite:///{tmp_path / 'm.db'}"])
    with tracked_run(cfg, home) as (ctx, summary):
        summary["serve"] = {"endpoint": "http://127.0.0.1:1"}
    ref = tracking.TrackingRef.model_validate(ctx.tracking)
    client = MlflowClient(ref.tracking_uri)
    assert client.get_run(ref.parent_run_id).info.status == "FINISHED"
    result = json.loads((Path(ctx.run_dir) / "result.json").read_text())
    assert result == {"status": "FINISHED", "run_id": ctx.run_id, "serve": summary["serve"]}
    with pytest.raises(RuntimeError, match="boom"), tracked_run(cfg, home) as (failed, _):
        raise RuntimeError("boom")
    fref = tracking.TrackingRef.model_validate(failed.tracking)
    assert client.get_run(fref.parent_run_id).info.status == "FAILED"
    assert json.loads((Path(failed.run_dir) / "result.json").read_text())["status"] == "FAILED"


def test_remote_mlflow_server_process(mlflow_server: str, tmp_path: Path) -> None:
    cfg = TrackingConfig(tracking_uri=mlflow_server, experiment="remote")
    ref = tracking.open_pipeline_run(cfg, Home(tmp_path), run_id="remote-1")
    t = tracking.stage_tracker(ref, "data")
    f = tmp_path / "report.json"
    f.write_text("{}")
    t.log_artifact(f, "reports")
    t.log_metrics({"kept": 10.0}, step=1)
    t.end()
    client = MlflowClient(mlflow_server)
    assert client.get_run(t.mlflow_run_id).data.metrics["kept"] == 10.0
    assert [a.path for a in client.list_artifacts(t.mlflow_run_id, "reports")] == [
        "reports/report.json"
    ]
    assert tracking.run_url(ref).startswith(mlflow_server)


def test_redact_uri() -> None:
    assert tracking.redact_uri("postgresql://u:secret@db:5432/m") == "postgresql://u:***@db:5432/m"
    assert tracking.redact_uri("sqlite:///x.db") == "sqlite:///x.db"


def test_sqlite_store_keeps_artifacts_beside_the_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # MLflow's fallback would be ./mlruns here
    cfg = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}", experiment="a")
    ref = tracking.open_pipeline_run(cfg, Home(tmp_path / "home"), run_id="r")
    t = tracking.stage_tracker(ref, "data")
    t.log_text("hello", "note.txt")
    assert (tmp_path / "db" / "artifacts").is_dir()
    assert not (tmp_path / "mlruns").exists()


def test_the_experiment_is_marked_as_model_training(tmp_path: Path) -> None:
    """MLflow 3.17's UI reads the experiment kind from this tag (without it, it opens
    the GenAI view); an experiment created before is marked too, a kind set by hand kept."""
    cfg = _sqlite_cfg(tmp_path)
    client = MlflowClient(cfg.tracking_uri)
    old = client.create_experiment("before", artifact_location=(tmp_path / "a").as_uri())
    chosen = client.create_experiment("chosen", artifact_location=(tmp_path / "b").as_uri())
    client.set_experiment_tag(chosen, "mlflow.experimentKind", "genai_development")
    for name, want in (
        ("t", "custom_model_development"),
        ("before", "custom_model_development"),
        ("chosen", "genai_development"),
    ):
        ref = tracking.open_pipeline_run(
            cfg.model_copy(update={"experiment": name}), Home(tmp_path), "r1"
        )
        assert client.get_experiment(ref.experiment_id).tags.get("mlflow.experimentKind") == want
    assert old == client.get_experiment_by_name("before").experiment_id


def test_a_server_run_link_opens_the_training_view() -> None:
    """MLflow 3.17's UI picks its view from ?workflowType (else GenAI): seen in Chromium,
    bench/results/mlflow-ui-experiment-*.png."""
    ref = tracking.TrackingRef(
        tracking_uri="http://u:pw@127.0.0.1:5000", experiment_id="3", parent_run_id="ab", run_id="r"
    )
    url = tracking.run_url(ref)
    assert (
        url == "http://u:***@127.0.0.1:5000/#/experiments/3/runs/ab?workflowType=machine_learning"
    )
