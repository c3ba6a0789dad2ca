"""Test-session set-up.

Every test shares one SLOTHFLOW_HOME in a temporary folder, activated *before* any
test module imports Prefect, MLflow or Hugging Face (they read their environment at
import time), so the suite never writes to $HOME or the working tree.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

_SESSION_HOME = Path(tempfile.mkdtemp(prefix="slothflow-test-home-"))
atexit.register(shutil.rmtree, _SESSION_HOME, ignore_errors=True)
os.environ["SLOTHFLOW_HOME"] = str(_SESSION_HOME)
# Offline by construction: nothing in the suite may reach the Hugging Face Hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

from tasks.core import home as home_mod  # noqa: E402

home_mod.activate(_SESSION_HOME)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def pytest_sessionstart(session: pytest.Session) -> None:
    # Locally the vLLM tests skip without `.venv-vllm`; in CI that would hide the serving
    # stage, so a missing environment is an error there (`make test` builds it).
    if os.environ.get("CI") == "true" and not (REPO / ".venv-vllm" / "bin" / "python").exists():
        pytest.exit("CI needs the vLLM environment (.venv-vllm): run `make test`", returncode=3)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on the GPU device)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def session_home() -> home_mod.Home:
    return home_mod.resolve_home(_SESSION_HOME)


@pytest.fixture
def fresh_home(tmp_path: Path) -> home_mod.Home:
    """A home of the test's own, for tests that inspect what a home contains."""
    return home_mod.Home(tmp_path / "home")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(home: Path, fake_home: Path) -> dict[str, str]:
    """Environment for a `slothflow` subprocess: own SLOTHFLOW_HOME and a fake $HOME,
    with every variable the parent's home set removed, so the child derives them."""
    derived = set(home_mod.environment_for(home_mod.Home(home)))
    env = {k: v for k, v in os.environ.items() if k not in derived}
    env.update(SLOTHFLOW_HOME=str(home), HOME=str(fake_home), HF_HUB_OFFLINE="1")
    return env


def run_slothflow(
    args: list[str], tmp_path: Path, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run the `slothflow` command as a user would: its own SLOTHFLOW_HOME under
    ``tmp_path/home`` and a fake, empty $HOME (tests check nothing lands there)."""
    fake_home = tmp_path / "fakehome"
    fake_home.mkdir(exist_ok=True)
    return subprocess.run(
        [str(BIN / "slothflow"), *args],
        env=clean_env(tmp_path / "home", fake_home),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
    )


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` process on loopback (SQLite backend), shared by the session."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = open(root / "server.log", "w")  # noqa: SIM115 (closed in teardown)
    proc = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its workers form a group we can stop together
    )
    uri = f"http://127.0.0.1:{port}"
    import urllib.request

    deadline = time.time() + 90
    while True:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(
                "mlflow server did not start:\n" + (root / "server.log").read_text()[-3000:]
            )
        time.sleep(0.5)
    yield uri
    import signal

    # SIGINT stops uvicorn at once; MLflow's job-runner children (huey) ignore it for
    # ~10 s, and a throwaway test server needs no graceful drain: SIGKILL the group.
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=2)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.close()
