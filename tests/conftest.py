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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

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
        # no job runners (GenAI jobs and trace roll-ups, which slothflow does not use):
        # five idle processes fewer beside the tests on two cores
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    uri = f"http://127.0.0.1:{port}"
    _wait_http(uri + "/health", proc, root / "server.log", timeout=90)
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


@dataclass
class S3Server:
    """A real S3-compatible server (moto in server mode) on loopback, with one bucket."""

    endpoint: str
    bucket: str

    @property
    def env(self) -> dict[str, str]:
        """What a client of it needs: AWS's standard variables (boto3, s3fs and the
        workers all read them); throwaway credentials moto accepts."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "slothflow-test",
            "AWS_SECRET_ACCESS_KEY": "slothflow-test-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
        }


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    import signal
    import urllib.request

    root = tmp_path_factory.mktemp("s3-server")
    port = free_port()
    log = open(root / "server.log", "w")  # noqa: SIM115 (closed in teardown)
    proc = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = S3Server(endpoint=f"http://127.0.0.1:{port}", bucket="slothflow-runs")
    _wait_http(f"{server.endpoint}/moto-api/", proc, root / "server.log", timeout=60)
    req = urllib.request.Request(f"{server.endpoint}/{server.bucket}", method="PUT")
    with urllib.request.urlopen(req, timeout=10):  # the bucket (moto takes unsigned requests)
        pass
    yield server
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=10)
    log.close()


# --------------------------------------------------------------------------- Prefect stack

PREFECT_AUTH = "slothflow-ci:not-a-real-secret"  # a throwaway server's basic-auth pair


@dataclass
class PrefectStack:
    """A real Prefect server with the repo's pools and deployments, and one process worker
    per pool, as the README's Operations section sets them up."""

    api_url: str
    home: Path  # the cpu worker's SLOTHFLOW_HOME (the pipeline's run folders)
    gpu_home: Path  # the gpu worker's: another host's, sharing only the run storage
    env: dict[str, str]  # what a client of this server needs (API URL, auth)
    root: Path
    start_worker: Any = None  # (pool) -> Popen: starts (or restarts) the pool's worker
    workers: dict[str, subprocess.Popen[bytes]] | None = None
    # A folder the workers' allowlist accepts besides the repository's data/ (new data)
    data: Path | None = None

    def call(self, method: str, path: str, body: object = None) -> Any:
        import base64
        import json
        import urllib.request

        req = urllib.request.Request(
            self.api_url + path,
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={
                "content-type": "application/json",
                "authorization": "Basic " + base64.b64encode(PREFECT_AUTH.encode()).decode(),
            },
        )
        import urllib.error

        for attempt in range(5):
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    return json.loads(r.read() or b"null")
            except urllib.error.HTTPError as exc:
                # A busy SQLite server answers 503 for a moment; Prefect's own client
                # retries those too (PREFECT_CLIENT_MAX_RETRIES).
                if exc.code != 503 or attempt == 4:
                    raise
                time.sleep(1 + attempt)
        raise AssertionError("unreachable")

    def deployment_id(self, name: str) -> str:
        found = self.call(
            "POST", "/deployments/filter", {"deployments": {"name": {"any_": [name]}}}
        )
        return str(found[0]["id"])

    def wait(self, flow_run_id: str, timeout: float = 400) -> dict[str, Any]:
        deadline = time.time() + timeout
        while True:
            run = self.call("GET", f"/flow_runs/{flow_run_id}")
            if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                return dict(run)
            if time.time() > deadline:
                raise TimeoutError(f"flow run {flow_run_id} still {run['state']['type']}")
            time.sleep(1)


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"{url} did not come up:\n" + log.read_text()[-3000:])
        time.sleep(0.5)


def stack_client_env(root: Path, api: str) -> dict[str, str]:
    """What a client of a test Prefect server needs: this environment without Prefect's
    and slothflow's variables, a fake $HOME under ``root``, the API URL and its auth."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "SLOTHFLOW_"))}
    return {
        **base,
        "HOME": str(root / "fakehome"),
        "PREFECT_HOME": str(root / "client"),
        "PREFECT_API_URL": api,
        "PREFECT_API_AUTH_STRING": PREFECT_AUTH,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }


def _all_ok(commands: list[list[str]], env: dict[str, str]) -> None:
    """Run ``commands`` side by side; raise with the output of any that failed."""
    procs = [
        (argv, subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT))
        for argv in commands
    ]  # fmt: skip
    for argv, proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[1:3])} failed:\n{out.decode()[-3000:]}")


def _stop(proc: subprocess.Popen[bytes], sig: int, grace: float = 15) -> None:
    import signal

    if proc.poll() is not None:
        return
    os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="session")
def prefect_stack(
    tmp_path_factory: pytest.TempPathFactory, mlflow_server: str, s3_server: S3Server
) -> Iterator[PrefectStack]:
    """One Prefect server (basic auth on, SQLite), the ``cpu`` and ``gpu`` process pools
    from ``infra/work-pools/process.json``, ``prefect deploy --all`` of ``prefect.yaml``,
    the crash automations, and a worker per pool (the gpu one with ``--limit 1``, as one
    worker per GPU would run). Each worker has a home of its own, as on two hosts: they
    share the session's MLflow server and a run storage on the S3 server, nothing else."""
    import signal

    root = tmp_path_factory.mktemp("prefect-stack")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    client = stack_client_env(root, api)
    server_env = {
        **client,
        "PREFECT_HOME": str(root / "server"),
        "PREFECT_SERVER_API_AUTH_STRING": PREFECT_AUTH,
        "PREFECT_UI_API_URL": api,
    }
    procs: list[tuple[subprocess.Popen[bytes], int]] = []
    logs = []

    def start(name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = open(root / f"{name}.log", "ab")  # noqa: SIM115 (closed in teardown)
        logs.append(log)
        proc = subprocess.Popen(
            argv, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        # The worker ignores SIGTERM for 10 s and stops on SIGINT (ENVIRONMENT.md).
        procs.append((proc, signal.SIGINT if name.startswith("worker") else signal.SIGTERM))
        return proc

    try:
        server = start(
            "server",
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            server_env,
        )
        _wait_http(api + "/health", server, root / "server.log")
        # Each `prefect` command pays Prefect's import (seconds on two cores): the
        # independent ones run side by side.
        _all_ok([
            [str(BIN / "prefect"), "work-pool", "create", pool, "--type", "process",
             "--base-job-template", str(REPO / "infra" / "work-pools" / "process.json")]
            for pool in ("cpu", "gpu")
        ], client)  # fmt: skip
        home, gpu_home = root / "home", root / "gpu-home"
        worker = {
            **client,
            **s3_server.env,
            "SLOTHFLOW_RUN_STORAGE": f"s3://{s3_server.bucket}/stack",
            "PREFECT_API_URL": api,
            "PREFECT_API_AUTH_STRING": PREFECT_AUTH,
            "PREFECT_HOME": str(root / "worker"),
            "MLFLOW_TRACKING_URI": mlflow_server,
            # Heartbeats every 30 s (the least Prefect allows): what the crash automation
            # watches.
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
            "PREFECT_WORKER_QUERY_SECONDS": "2",  # as the README sets it
            # the stable endpoint of a rollout on this worker (tests run side by side)
            "SLOTHFLOW_SERVE_PORT": str(free_port()),
            # the repository's data, a folder where tests drop new data, and a bucket prefix
            "SLOTHFLOW_ALLOWED_SOURCES": ",".join(
                [str(REPO / "data"), str(root / "data"), f"s3://{s3_server.bucket}/incoming/"]
            ),
        }
        (root / "data").mkdir()
        (root / "fakehome").mkdir(exist_ok=True)
        # The crash automations, as the README creates them, with a shorter silence window
        # (40 s rather than 90 s: the least that still spans a 30 s heartbeat) so the
        # killed-worker test does not wait three minutes.
        automations = yaml.safe_load((REPO / "infra/automations/crashed-runs.yaml").read_text())
        automations["automations"][0]["trigger"]["within"] = 40
        (root / "automations.yaml").write_text(yaml.safe_dump(automations))
        workers: dict[str, subprocess.Popen[bytes]] = {}

        def start_worker(pool: str) -> subprocess.Popen[bytes]:
            own = clean_env(gpu_home if pool == "gpu" else home, root / "fakehome")
            env = {**own, **worker, **({"CUDA_VISIBLE_DEVICES": ""} if pool == "gpu" else {})}
            workers[pool] = start(
                f"worker-{pool}",
                [str(BIN / "prefect"), "worker", "start", "--pool", pool,
                 "--name", f"ci-{pool}-0", *(["--limit", "1"] if pool == "gpu" else [])],
                env,
            )  # fmt: skip
            return workers[pool]

        for pool in ("cpu", "gpu"):
            start_worker(pool)
        # While the workers start (they poll their pools, which exist): the deployments
        # and the automations.
        _all_ok([
            [str(BIN / "prefect"), "--no-prompt", "deploy", "--all"],
            [str(BIN / "prefect"), "automation", "create", "--from-file",
             str(root / "automations.yaml")],
        ], client)  # fmt: skip
        stack = PrefectStack(
            api_url=api, home=home, gpu_home=gpu_home, env=client, root=root,
            start_worker=start_worker, workers=workers, data=root / "data",
        )  # fmt: skip
        # The retrain schedule stays off here: a run it fired during the session would
        # train the default recipe beside the tests (they start retrain runs themselves).
        retrain = stack.call("GET", "/deployments/name/slothflow-retrain/retrain")
        for schedule in retrain["schedules"]:
            stack.call(
                "PATCH", f"/deployments/{retrain['id']}/schedules/{schedule['id']}",
                {"active": False},
            )  # fmt: skip
        deadline = time.time() + 60
        while len(stack.call("POST", "/work_pools/gpu/workers/filter", {})) < 1 or not stack.call(
            "POST", "/work_pools/cpu/workers/filter", {}
        ):
            if time.time() > deadline:
                raise RuntimeError("the workers did not register")
            time.sleep(0.5)
        yield stack
    finally:
        # Workers first (they would report to the server), all at once: each waits out
        # its own grace, and a sequential stop cost half a minute.
        import concurrent.futures

        workers_first = [p for p in procs if p[1] == signal.SIGINT]
        with concurrent.futures.ThreadPoolExecutor() as pool_:
            list(pool_.map(lambda p: _stop(p[0], p[1], grace=5), workers_first))
        for proc, sig in reversed(procs):
            _stop(proc, sig, grace=5)
        for log in logs:
            log.close()
