"""Stopping, failing fast and resuming, as an operator meets them: real signals sent to a
real `slothflow run` (real Prefect temporary server, real MLflow store, real vLLM)."""

from __future__ import annotations

import fcntl
import glob
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tasks.train import COMPLETE_MARKER
from tests.conftest import BIN, clean_env, free_port, run_slothflow

# A run long enough that a signal lands while it trains (ci-smoke's 6 steps end in a
# blink); every invocation below uses the same hash-covered values, so each may resume.
LONG = ["-r", "ci-smoke", "--set", "train.max_steps=60"]
STOP_WITHIN_S = 15.0


def _start(args: list[str], tmp_path: Path, log_name: str) -> tuple[subprocess.Popen[str], Path]:
    fake_home = tmp_path / "fakehome"
    fake_home.mkdir(exist_ok=True)
    log = tmp_path / log_name
    proc = subprocess.Popen(
        [str(BIN / "slothflow"), *args],
        env=clean_env(tmp_path / "home", fake_home),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
        start_new_session=True,  # its own group, like a shell job: killpg == Ctrl-C
    )
    return proc, log


def _wait_for(proc: subprocess.Popen[str], pattern: str, log: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not glob.glob(pattern):
        assert proc.poll() is None, f"exited {proc.returncode} early:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"{pattern} never appeared:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


def _stopped_within(proc: subprocess.Popen[str], log: Path, seconds: float) -> tuple[int, float]:
    t0 = time.monotonic()
    try:
        rc = proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"still running {seconds:g}s after the signal:\n{log.read_text()[-4000:]}")
    return rc, time.monotonic() - t0


def _left_behind(home: Path) -> list[str]:
    """Live processes started for this home: they carry SLOTHFLOW_HOME in their
    environment (Prefect's server, vLLM and its engine, dataloader workers)."""
    found = []
    for p in psutil.process_iter(["pid", "status", "cmdline"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if p.environ().get("SLOTHFLOW_HOME") == str(home):
                found.append(" ".join(p.info["cmdline"] or [])[:200])
        except (psutil.Error, OSError):
            continue
    return found


def _assert_clean_exit(home: Path) -> None:
    deadline = time.monotonic() + 5  # a SIGKILLed group is reaped by init, not at once
    while (left := _left_behind(home)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == [], left
    with open(home / "home.lock", "a+") as f:  # the lock is free again
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _client(home: Path):  # type: ignore[no-untyped-def]
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{home / 'mlflow' / 'mlflow.db'}")


@pytest.mark.e2e
@pytest.mark.slow
def test_signals_stop_cleanly_and_the_run_resumes(tmp_path: Path) -> None:
    """Start-up, training and serving start, each stopped by a real signal the way a
    terminal, systemd or Kubernetes sends it; then a resume on another port finishes."""
    home = tmp_path / "home"

    # 1. SIGTERM to the process group while Prefect's temporary server starts.
    proc, log = _start(["run", *LONG], tmp_path, "startup.log")
    _wait_for(proc, str(home / "prefect" / "temporary-server.log"), log)
    os.killpg(proc.pid, signal.SIGTERM)
    rc, _ = _stopped_within(proc, log, STOP_WITHIN_S)
    assert rc in (143, -signal.SIGTERM), log.read_text()[-3000:]
    _assert_clean_exit(home)

    # 1b. Even SIGKILL to the main pid leaves no Prefect server behind (PDEATHSIG).
    proc, log = _start(["run", *LONG], tmp_path, "sigkill.log")
    _wait_for(proc, str(home / "prefect" / "temporary-server.log"), log)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL
    _assert_clean_exit(home)
    assert not list(home.glob("runs/*/run.json")), "killed before the run was opened"

    # 2. Ctrl-C (SIGINT to the group) while training, after its first checkpoint.
    proc, log = _start(["run", *LONG], tmp_path, "train.log")
    # The first checkpoint, complete (its marker is written last).
    ckpt = home / "runs" / "*" / "train" / "checkpoints" / "checkpoint-3" / COMPLETE_MARKER
    _wait_for(proc, str(ckpt), log)
    os.killpg(proc.pid, signal.SIGINT)
    rc, _ = _stopped_within(proc, log, STOP_WITHIN_S)
    text = log.read_text()
    assert rc == 130, text[-3000:]
    assert "interrupted by SIGINT" in text and "--resume " in text
    assert "ConnectError" not in text and "Traceback" not in text, text[-3000:]
    _assert_clean_exit(home)
    (run_dir,) = (home / "runs").iterdir()
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "INTERRUPTED" and "train" not in result["completed_stages"]
    client = _client(home)
    exp = client.get_experiment_by_name("slothflow")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`slothflow.kind` = 'pipeline'")
    assert parent.info.status == "KILLED"
    (train_run,) = client.search_runs([exp.experiment_id], "tags.`slothflow.stage` = 'train'")
    assert train_run.info.status == "KILLED"
    # A resume with another config is refused at once, naming both hashes.
    r = run_slothflow(["run", *LONG, "--set", "train.max_steps=61", "--resume", "last"], tmp_path)
    assert r.returncode == 2 and "cannot resume" in r.stderr and "Traceback" not in r.stderr

    # 3. Resume, serving on port A; SIGTERM to the main pid alone (what systemd and
    #    Kubernetes send) while vLLM starts. Training went on from its checkpoint.
    port_a, port_b = free_port(), free_port()
    # the load test is test_deploy's; here serving has to start, stop and start again
    serve = ["--set", "deploy.enabled=true", "--set", "deploy.load_test.enabled=false"]
    proc, log = _start(
        ["run", *LONG, "--resume", "last", *serve, "--set", f"deploy.port={port_a}"],
        tmp_path,
        "serve.log",
    )
    # the version's own server behind the endpoint on port_a (its port is chosen free)
    backend_state = str(home / "serve" / "[0-9]*" / "state.json")
    _wait_for(proc, backend_state, log)
    os.kill(proc.pid, signal.SIGTERM)
    rc, _ = _stopped_within(proc, log, STOP_WITHIN_S + 20)  # + vLLM's own stop grace
    text = log.read_text()
    assert rc == 143, text[-3000:]
    assert "resuming from checkpoint-" in " ".join(text.split()), text[-3000:]  # Rich wraps
    _assert_clean_exit(home)
    assert json.loads((run_dir / "result.json").read_text())["status"] == "INTERRUPTED"
    # Past export, nothing resumes the training: its checkpoints are gone, its adapter not.
    assert not (run_dir / "train" / "checkpoints").exists()
    assert (run_dir / "train" / "adapter" / "adapter_model.safetensors").exists()
    assert not glob.glob(backend_state)
    assert not (home / "serve" / f"endpoint-{port_a}" / "endpoint.json").exists()

    # 4. Resume once more with only a new port: serving stays on (the run's own setting,
    #    said out loud), the port changes without clashing with the logged params.
    r = run_slothflow(
        ["run", *LONG, "--resume", "last", "--set", f"deploy.port={port_b}"], tmp_path, 900
    )
    try:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
        assert "deploy.enabled=True" in r.stderr, r.stderr[-3000:]
        assert f"endpoint: http://127.0.0.1:{port_b}/v1" in r.stdout
    finally:
        run_slothflow(["serve", "stop"], tmp_path)
    assert [p.name for p in (home / "runs").iterdir()] == [run_dir.name]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "FINISHED"
    # the finished training, its checkpoints deleted, is still served from the cache
    assert {"train", "export", "evaluate"} <= set(result["cached_stages"]), result
    (parent,) = client.search_runs([exp.experiment_id], "tags.`slothflow.kind` = 'pipeline'")
    assert parent.info.status == "FINISHED"
    assert parent.data.params["config_hash"] == result["config_hash"]
    for stage in ("base", "data", "train", "export", "evaluate", "gate", "register", "serve"):
        runs = client.search_runs([exp.experiment_id], f"tags.`slothflow.stage` = '{stage}'")
        assert len(runs) == 1 and runs[0].info.status == "FINISHED", stage
        assert runs[0].data.tags["mlflow.parentRunId"] == parent.info.run_id
        # what the stage cost (run.stage logs it; on CUDA its peak GPU memory too)
        assert runs[0].data.metrics["stage_seconds"] > 0, stage
        assert "stage_gpu_peak_gb" not in runs[0].data.metrics
    (serve_run,) = client.search_runs([exp.experiment_id], "tags.`slothflow.stage` = 'serve'")
    params = serve_run.data.params
    assert params["serve.port"] == str(port_a) and params["serve.port.attempt2"] == str(port_b)
    # Reused, not redone: one model version, each training step logged once.
    assert len(client.search_model_versions()) == 1
    (train_run,) = client.search_runs([exp.experiment_id], "tags.`slothflow.stage` = 'train'")
    steps = [m.step for m in client.get_metric_history(train_run.info.run_id, "train_loss")]
    assert steps == sorted(set(steps)) and len(steps) == 60
    assert [p.name for p in (tmp_path / "fakehome").iterdir()] == []
    _assert_clean_exit(home)


def test_bad_runs_fail_at_once_and_leave_nothing_to_resume(tmp_path: Path) -> None:
    """What can be checked before the first long stage fails then: one line, exit 2, no
    retries, no traceback, and no run folder or MLflow run that `--resume last` would pick."""
    import socket

    home = tmp_path / "home"

    def refused(args: list[str], *expect: str) -> None:
        t0 = time.monotonic()
        r = run_slothflow(["run", "-r", "ci-smoke", *args], tmp_path, timeout=120)
        took = time.monotonic() - t0
        assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
        for e in expect:
            assert e in r.stderr, r.stderr[-3000:]
        assert "Traceback" not in r.stderr and "Retrying" not in r.stderr, r.stderr[-3000:]
        assert len(r.stderr.strip().splitlines()) <= 4, r.stderr
        assert "temporary server" not in r.stderr.lower(), "Prefect started before the checks"
        assert not list(home.glob("runs/*")), "a failed check left a run folder"
        assert not (home / "mlflow" / "mlflow.db").exists(), "a failed check opened MLflow"
        assert took < 60, f"took {took:.0f}s"

    refused(["--set", "model.name_or_path=/nonexistent"], "model.name_or_path", "/nonexistent")
    refused(["--resume", "nope-20260101-000000-abc"], "cannot resume 'nope-", "no such run")
    refused(["--resume", "last"], "--resume last: no runs")
    with socket.socket() as busy:
        port = free_port()
        busy.bind(("127.0.0.1", port))
        busy.listen()
        refused(["--set", "deploy.enabled=true", "--set", f"deploy.port={port}"], f"{port}")
    refused(
        ["--set", "deploy.enabled=true", "--set", "deploy.vllm_command=[/no/such/python]"],
        "/no/such/python",
    )
    refused(
        ["--set", f"tracking.tracking_uri=http://127.0.0.1:{free_port()}"],
        "unreachable",
    )


def test_a_signal_inside_a_deferred_block_waits_for_its_end() -> None:
    """A metric sent to MLflow and its journal line are not torn apart by Ctrl-C: the
    interrupt is held until the block is done, then raised."""
    from tasks.core.interrupt import Interrupted, deferred, signals_as_interrupt

    done = []
    with pytest.raises(Interrupted) as caught, signals_as_interrupt():
        with deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)  # the handler has run by now
            done.append("sent")
            done.append("recorded")
        done.append("after the block")  # never reached: the held interrupt is raised
    assert done == ["sent", "recorded"]
    assert caught.value.signum == signal.SIGINT and caught.value.exit_code == 130
