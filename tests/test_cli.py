"""The `slothflow` command as a user runs it (subprocesses, real Prefect and MLflow)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import clean_env

SLOTHFLOW = str(Path(sys.executable).parent / "slothflow")


def _run(args: list[str], tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    fake_home = tmp_path / "fakehome"
    fake_home.mkdir(exist_ok=True)
    return subprocess.run(
        [SLOTHFLOW, *args],
        env=clean_env(tmp_path / "home", fake_home),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
    )


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["run"],
        ["info"],
        ["config"],
        ["config", "show"],
        ["config", "validate"],
        ["config", "schema"],
        ["config", "list"],
    ],
)
def test_help_reads_well(args: list[str], tmp_path: Path) -> None:
    r = _run([*args, "--help"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Usage: slothflow" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr


def test_config_validate_names_the_bad_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lora:\n    rnk: 8\n")
    r = _run(["config", "validate", str(bad)], tmp_path)
    assert r.returncode == 2
    assert "train.lora.rnk: unknown key" in r.stdout


def test_run_with_bad_override_is_a_clear_error(tmp_path: Path) -> None:
    r = _run(["run", "-r", "ci-smoke", "--set", "train.backend=tensorflow"], tmp_path)
    assert r.returncode == 2
    assert "train.backend" in r.stderr and "Traceback" not in r.stderr


def test_run_refuses_4bit_on_cpu(tmp_path: Path) -> None:
    r = _run(["run", "-r", "ci-smoke", "--set", "model.load_in_4bit=true"], tmp_path)
    assert r.returncode == 2
    assert "load_in_4bit=true needs CUDA" in r.stderr


def test_unreachable_tracking_server_fails_fast(tmp_path: Path) -> None:
    from tests.conftest import free_port

    r = _run(
        [
            "run",
            "-r",
            "ci-smoke",
            "--set",
            f"tracking.tracking_uri=http://127.0.0.1:{free_port()}",
            "--set",
            "tracking.connect_timeout_s=2",
        ],
        tmp_path,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "unreachable" in r.stderr


@pytest.mark.e2e
def test_pipeline_run_end_to_end(tmp_path: Path) -> None:
    """`slothflow run` on the CI recipe: a real Prefect flow (ephemeral) and a real MLflow
    SQLite store, everything under SLOTHFLOW_HOME and nothing written to $HOME."""
    r = _run(["run", "-r", "ci-smoke"], tmp_path, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "MLflow" in r.stdout and "mlflow.db" in r.stdout
    home = tmp_path / "home"
    (run_dir,) = (home / "runs").iterdir()
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "FINISHED"
    assert (run_dir / "config.yaml").exists()
    assert (home / "mlflow" / "mlflow.db").exists()
    assert (home / "prefect").is_dir()
    # Nothing leaked into the user's home directory.
    assert [p.name for p in (tmp_path / "fakehome").iterdir()] == []

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("slothflow")
    runs = client.search_runs([exp.experiment_id], "tags.`slothflow.kind` = 'pipeline'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["config_hash"] == result["config_hash"]
    for stage in result["stages"]:
        child = client.search_runs([exp.experiment_id], f"tags.`slothflow.stage` = '{stage}'")
        assert child and child[0].info.status == "FINISHED", stage
