"""The `slothflow` command as a user runs it (subprocesses, real Prefect and MLflow)."""

import json
from pathlib import Path

import pytest

from tests.conftest import run_slothflow

_run = run_slothflow


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


def test_serve_errors_are_one_clear_message_printed_as_text(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A failed server's message carries vLLM's log tail, whose ``[core.py:71]`` tags and
    paths in brackets are not Rich markup: printed as they are (exit 1). A tracking URI
    with a password is the CLI's known config failure (exit 2), not a traceback."""
    import typer

    from slothflow.cli_serve import _errors
    from tasks.deploy import ServeError

    with pytest.raises(typer.Exit) as exit_, _errors():
        raise ServeError("vLLM exited: INFO [core.py:71] loading [/tmp/a] failed")
    assert exit_.value.exit_code == 1
    assert "INFO [core.py:71] loading [/tmp/a] failed" in capsys.readouterr().err
    r = _run(
        ["serve", str(tmp_path), "--set", "tracking.tracking_uri=http://u:secret@127.0.0.1:1"],
        tmp_path,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "secret" not in r.stderr + r.stdout


def _client(home: Path):  # type: ignore[no-untyped-def]
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{home / 'mlflow' / 'mlflow.db'}")


@pytest.mark.e2e
def test_pipeline_end_to_end_fails_at_serve_and_resumes(tmp_path: Path) -> None:
    """`slothflow run` on the CI recipe with a real Prefect flow (ephemeral) and a real
    MLflow SQLite store: every stage runs and hands over; the serve stage then fails on
    a busy port; the run resumes with serving off, reusing every finished stage, and
    everything stays under SLOTHFLOW_HOME (nothing in $HOME)."""
    import socket

    from tests.conftest import free_port

    port = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        r = _run(
            [
                "run",
                "-r",
                "ci-smoke",
                "--set",
                "deploy.enabled=true",
                "--set",
                f"deploy.port={port}",
            ],
            tmp_path,
            timeout=1200,
        )
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-5000:]
    assert "pipeline failed: PortBusyError" in r.stderr, r.stderr[-3000:]
    assert f"port {port}" in r.stderr
    home = tmp_path / "home"
    (run_dir,) = (home / "runs").iterdir()
    assert json.loads((run_dir / "result.json").read_text())["status"] == "FAILED"
    finished = {p.parent.name for p in run_dir.glob("*/ref.json")}
    assert finished == {"base", "data", "train", "export", "evaluate", "gate", "register"}
    assert f"--resume {run_dir.name}" in r.stderr

    # Fix the cause (serving is outside the config hash, so the run may be resumed).
    r2 = _run(
        ["run", "-r", "ci-smoke", "--resume", "last", "--set", "deploy.enabled=false"], tmp_path
    )
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-5000:]
    assert "MLflow" in r2.stdout and "mlflow.db" in r2.stdout
    assert "gate:        PASSED" in r2.stdout
    assert [p.name for p in (home / "runs").iterdir()] == [run_dir.name]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "FINISHED"
    assert set(result["stages"]) == {"base", "data", "train", "export", "evaluate", "register"}
    assert result["stages"]["train"]["best_step"] == 6
    assert result["stages"]["train"]["best_eval_loss"] > 0
    assert (home / "prefect").is_dir()
    assert [p.name for p in (tmp_path / "fakehome").iterdir()] == []

    client = _client(home)
    exp = client.get_experiment_by_name("slothflow")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`slothflow.kind` = 'pipeline'")
    assert parent.info.status == "FINISHED"
    assert parent.data.params["config_hash"] == result["config_hash"]
    for stage in ("base", "data", "train", "export", "evaluate", "gate", "register"):
        runs = client.search_runs([exp.experiment_id], f"tags.`slothflow.stage` = '{stage}'")
        assert len(runs) == 1 and runs[0].info.status == "FINISHED", stage
        assert runs[0].data.tags["mlflow.parentRunId"] == parent.info.run_id
    # Reused, not redone: one registered version, no duplicated training steps.
    versions = client.search_model_versions("name = 'slothflow-model'")
    assert [int(v.version) for v in versions] == [1]
    (train_run,) = client.search_runs([exp.experiment_id], "tags.`slothflow.stage` = 'train'")
    steps = [m.step for m in client.get_metric_history(train_run.info.run_id, "train_loss")]
    assert steps == sorted(set(steps)) and len(steps) == 6


@pytest.mark.e2e
@pytest.mark.slow
def test_default_pipeline_learns_and_serves(tmp_path: Path) -> None:
    """`make run`'s job: the embedded default, end to end, ending with a real vLLM server
    that answers held-out questions; then `slothflow serve stop` leaves nothing running."""
    from openai import OpenAI

    from tests.conftest import free_port

    port = free_port()
    r = _run(["run", "--set", f"deploy.port={port}"], tmp_path, timeout=1500)
    try:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
        home = tmp_path / "home"
        (run_dir,) = (home / "runs").iterdir()
        result = json.loads((run_dir / "result.json").read_text())
        ev = result["stages"]["evaluate"]
        assert ev["items"] >= 200
        assert ev["merged"] >= 0.9 and ev["base"] <= 0.05, ev
        assert result["gate"]["passed"]
        assert f"endpoint: http://127.0.0.1:{port}/v1" in r.stdout
        assert f"slothflow serve stop --port {port}" in r.stdout
        key = next((home / "serve").rglob("api_key")).read_text().strip()
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key)
        lines = (run_dir / "data" / "validation.jsonl").read_text().splitlines()
        rows = [json.loads(x) for x in lines[:20]]
        right = 0
        for row in rows:
            prompt = [m for m in row["messages"] if m["role"] != "assistant"]
            want = row["messages"][-1]["content"]
            out = client.chat.completions.create(
                model="slothflow-model", messages=prompt, max_tokens=8, temperature=0
            )
            right += out.choices[0].message.content.strip() == want
        assert right >= 17, f"{right}/20 served answers correct"
    finally:
        stop = _run(["serve", "stop"], tmp_path)
    assert stop.returncode == 0, stop.stderr
    status = _run(["serve", "status", "--json"], tmp_path)
    assert json.loads(status.stdout or "[]") == []


@pytest.mark.e2e
def test_failed_gate_stops_registration_and_serving(tmp_path: Path) -> None:
    """Through the flow: a candidate below the bar is not registered or served, the run
    is marked, every artifact stays, and the command exits 3 (not a crash, not success)."""
    r = _run(
        ["run", "-r", "ci-smoke", "--set", "eval.threshold=1.0", "--set", "deploy.enabled=true"],
        tmp_path,
        timeout=1200,
    )
    assert r.returncode == 3, r.stdout[-3000:] + r.stderr[-3000:]
    assert "gate FAILED" in r.stdout and "gate:        FAILED" in r.stdout
    assert "exact_match 0.0000 (need >= 1)" in r.stdout  # the failing rule, with numbers
    home = tmp_path / "home"
    (run_dir,) = (home / "runs").iterdir()
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "FINISHED" and result["gate"]["passed"] is False
    assert "register" not in result["stages"] and "serve" not in result["stages"]
    assert (run_dir / "export" / "merged" / "model.safetensors").exists()
    assert not (run_dir / "register").exists() and not (run_dir / "serve").exists()
    client = _client(home)
    exp = client.get_experiment_by_name("slothflow")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`slothflow.kind` = 'pipeline'")
    assert parent.data.tags["slothflow.gate"] == "failed"
    assert client.search_registered_models() == []
