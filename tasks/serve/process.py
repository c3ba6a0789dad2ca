"""The server as a managed process: state file, process group, start/stop/reap,
health wait, port checks, API key."""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from tasks.core.config import ConfigError, DeployConfig
from tasks.core.home import Home
from tasks.core.refs import ResolvedModel, write_json_atomic
from tasks.serve.command import build_command, server_environment
from tasks.serve.errors import PortBusyError, ServeError, ServerStartError

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
LOG_FILE = "server.log"
KEY_FILE = "api_key"


class ServerState(BaseModel):
    """One managed server, as written to ``serve/<port>/state.json``."""

    model_config = ConfigDict(extra="forbid")

    pid: int
    create_time: float  # with pid, identifies the process (pids are reused)
    port: int
    host: str
    phase: Literal["starting", "ready"]
    owner_pid: int  # the slothflow process that started it
    started_at: float
    model_spec: str
    model_path: str
    served_model_name: str
    version: str
    kind: str
    api_key_source: str  # "env:NAME", "prefect-block:NAME" or "file:PATH" (never the key)
    log_path: str
    command: list[str]
    run_id: str | None = None
    endpoint_port: int | None = None  # the stable endpoint this server runs behind

    @property
    def base_url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.port}/v1"


def serve_root(home: Home) -> Path:
    return home.root / "serve"


def server_dir(home: Home, port: int) -> Path:
    return serve_root(home) / str(port)


def _url_host(host: str) -> str:
    # A wildcard bind is reachable on loopback; clients on this machine use that.
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_state(path: Path) -> ServerState | None:
    try:
        return ServerState.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def process_alive(pid: int, create_time: float | None = None) -> bool:
    """True while ``pid`` runs (not a zombie) and is the process we started."""
    import psutil

    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        return create_time is None or abs(p.create_time() - create_time) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``."""
    import psutil

    members = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(p.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return members


def kill_group(pgid: int, timeout_s: float) -> None:
    """Stop process group ``pgid`` (led by pid ``pgid``): SIGTERM, grace, SIGKILL.

    SIGTERM goes to the leader alone while it lives: vLLM's API server then shuts
    its engine down in order (a SIGTERM to every process at once kills the engine
    first and fills the log with EngineDeadError). Whatever is left after the grace
    period - or everything, when the leader is already gone - gets the signal
    group-wide.
    """
    try:
        if process_alive(pgid):
            os.kill(pgid, signal.SIGTERM)
        else:
            os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if _wait_group_gone(pgid, timeout_s):
        return
    log.warning("server group %d still running %.0fs after SIGTERM; killing it", pgid, timeout_s)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    if not _wait_group_gone(pgid, 30.0):  # a loaded 2-core machine took over 10 s
        raise ServeError(f"server process group {pgid} survived SIGKILL")


def _wait_group_gone(pgid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while group_members(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def stop_server(state: ServerState, home: Home, timeout_s: float = 20.0) -> None:
    """Stop one managed server and forget it (idempotent)."""
    if process_alive(state.pid, state.create_time):
        log.info("stopping vLLM server pid %d on port %d", state.pid, state.port)
        kill_group(state.pid, timeout_s)  # pid == pgid: it leads its own session
    elif group_members(state.pid):
        kill_group(state.pid, timeout_s)  # leader gone, engine children left behind
    d = server_dir(home, state.port)
    (d / STATE_FILE).unlink(missing_ok=True)
    (d / KEY_FILE).unlink(missing_ok=True)


def servers(home: Home, reap: bool = True) -> list[ServerState]:
    """Managed servers of this home that are alive; forgets dead ones, stops orphans.

    An orphan is a server still in phase "starting" whose owner process is gone: the
    deploy that started it was interrupted and nobody will ever check it.
    """
    found = []
    for path in sorted(serve_root(home).glob(f"*/{STATE_FILE}")):
        state = read_state(path)
        if state is None:
            continue
        if not process_alive(state.pid, state.create_time):
            if reap:
                stop_server(state, home)  # also cleans children the leader left
            continue
        if reap and state.phase == "starting" and not process_alive(state.owner_pid):
            log.warning(
                "stopping orphaned vLLM server pid %d (its deploy, pid %d, was interrupted)",
                state.pid,
                state.owner_pid,
            )
            stop_server(state, home)
            continue
        found.append(state)
    return found


def stop_servers(home: Home, port: int | None = None, timeout_s: float = 20.0) -> list[ServerState]:
    """Stop every managed server of this home (or the one on ``port``)."""
    stopped = []
    for state in servers(home):
        if port is None or state.port == port:
            stop_server(state, home, timeout_s)
            stopped.append(state)
    return stopped


def log_tail(path: Path | str, lines: int = 40) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no server log)"
    return "\n".join(text.splitlines()[-lines:])


def api_key_of(state: ServerState) -> str:
    """The key clients send to this server, read from where the state says it lives."""
    kind, _, where = state.api_key_source.partition(":")
    if kind == "file":
        return Path(where).read_text(encoding="utf-8").strip()
    if kind == "env":
        value = os.environ.get(where)
        if value:
            return value
        raise ConfigError(f"the server's API key is read from ${where}, which is unset here")
    from tasks.core.config import SecretRef

    return str(SecretRef(prefect_block=where).resolve())


# --------------------------------------------------------------------------- start


def port_in_use(host: str, port: int) -> bool:
    """Whether binding ``host:port`` would fail (what the server is about to do)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # Like uvicorn: TIME_WAIT leftovers of a stopped server do not block a bind.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _api_key(cfg: DeployConfig, folder: Path) -> tuple[str, str]:
    """(key, where it lives). Configured secret, else a fresh key in a 0600 file."""
    if cfg.api_key is not None:
        value, source = cfg.api_key.resolve_with_source(required=True)
        assert value is not None  # required=True raises instead
        return value, source
    return new_api_key(folder)


@dataclass
class Server:
    """A started server: its state plus the key clients need (kept out of the state)."""

    state: ServerState
    api_key: str = field(repr=False)

    @property
    def base_url(self) -> str:
        return self.state.base_url


def _health(url: str, timeout_s: float) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError, TimeoutError):
        return False


def start_server(
    cfg: DeployConfig,
    model: ResolvedModel,
    home: Home,
    *,
    host: str | None = None,
    port: int | None = None,
    run_id: str | None = None,
    api_key: tuple[str, str] | None = None,
    endpoint_port: int | None = None,
) -> Server:
    """Start vLLM for ``model`` and wait until ``/health`` answers.

    Fails within ``cfg.health_timeout_s`` with the log tail, stopping the server,
    when it exits or stays unhealthy; a busy port or a missing environment fail
    before anything starts. ``api_key`` (key, where it lives) is the endpoint's, shared
    by the versions behind it; else the configured key or a fresh one for this server.
    """
    host = host or cfg.host
    port = port or cfg.port
    if not is_loopback(host):
        log.warning("serving on %s: reachable beyond this machine (API key required)", host)
    argv = build_command(cfg, model, host, port)  # checks the environment first
    _free_port(cfg, home, host, port)

    folder = server_dir(home, port)
    folder.mkdir(parents=True, exist_ok=True)
    key, key_source = api_key or _api_key(cfg, folder)
    log_path = folder / LOG_FILE
    log.info("starting vLLM on %s:%d for %s: %s", host, port, model.spec, " ".join(argv))
    proc = _spawn(argv, server_environment(cfg, home, key, model), model.path, log_path)
    try:  # from here on, any way out but success stops what was started
        state = ServerState(
            pid=proc.pid,
            create_time=_create_time(proc.pid),
            port=port,
            host=host,
            phase="starting",
            owner_pid=os.getpid(),
            started_at=time.time(),
            model_spec=model.spec,
            model_path=str(model.path),
            served_model_name=model.served_model_name,
            version=model.label,
            kind=model.kind,
            api_key_source=key_source,
            log_path=str(log_path),
            command=argv,
            run_id=run_id,
            endpoint_port=endpoint_port,
        )
        write_json_atomic(folder / STATE_FILE, state.model_dump(mode="json"))
        wait_healthy(proc, state, cfg.health_timeout_s)
    except BaseException:
        kill_group(proc.pid, cfg.stop_timeout_s)
        proc.wait(timeout=10)
        (folder / STATE_FILE).unlink(missing_ok=True)
        (folder / KEY_FILE).unlink(missing_ok=True)
        raise
    return Server(state, key)


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free now (a backend binds it a moment later)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def new_api_key(folder: Path) -> tuple[str, str]:
    """A fresh random key in a 0600 file in ``folder``: (key, where it lives)."""
    key = secrets.token_urlsafe(32)
    path = folder / KEY_FILE
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key, f"file:{path}"


def _free_port(cfg: DeployConfig, home: Home, host: str, port: int) -> None:
    """Make ``port`` free for the new server: a server of this home on it is stopped
    when ``cfg.replace``, anything else there is refused."""
    for state in servers(home):
        if state.port == port:
            if not cfg.replace:
                raise PortBusyError(
                    f"port {port} already serves {state.model_spec} (pid {state.pid}); stop it "
                    f"with `slothflow serve stop --port {port}` or set deploy.replace=true"
                )
            log.info("replacing %s on port %d", state.model_spec, port)
            stop_server(state, home, cfg.stop_timeout_s)
    if port_in_use(host, port):
        raise PortBusyError(
            f"port {port} on {host} is already in use by another program; choose another "
            "with --port / deploy.port"
        )


def _spawn(
    argv: list[str], env: dict[str, str], cwd: Path, log_path: Path
) -> subprocess.Popen[bytes]:
    """The server process, its output in ``log_path``."""
    with open(log_path, "wb") as log_file:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            # Relative paths in a manifest's vllm_args are relative to the artifact.
            cwd=cwd,
            # Own session: one killpg reaches the engine processes too, and a Ctrl-C
            # in the user's terminal is ours to handle, not delivered to vLLM.
            start_new_session=True,
        )


def _create_time(pid: int) -> float:
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return time.time()


def wait_healthy(proc: subprocess.Popen[bytes], state: ServerState, timeout_s: float) -> None:
    url = f"http://{_url_host(state.host)}:{state.port}/health"
    deadline = time.monotonic() + timeout_s
    while True:
        code = proc.poll()
        if code is not None:
            raise ServerStartError(
                f"vLLM exited with code {code} before it became healthy. Last lines of "
                f"{state.log_path}:\n{log_tail(state.log_path)}"
            )
        if _health(url, timeout_s=2.0):
            return
        if time.monotonic() > deadline:
            raise ServerStartError(
                f"vLLM did not answer {url} within {timeout_s:g}s (deploy.health_timeout_s). "
                f"Last lines of {state.log_path}:\n{log_tail(state.log_path)}"
            )
        time.sleep(0.5)


def mark_ready(state: ServerState, home: Home) -> ServerState:
    ready = state.model_copy(update={"phase": "ready"})
    write_json_atomic(server_dir(home, state.port) / STATE_FILE, ready.model_dump(mode="json"))
    return ready
