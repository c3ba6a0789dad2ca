"""The stable endpoint: nginx in front of the versions' vLLM servers.

Clients keep one URL, ``deploy.host:deploy.port``, across versions. Each version's vLLM
server listens on a loopback port chosen free at its start (a *backend*); nginx, from
Debian's package, run as a child process with its own configuration and folder under
``serve/endpoint-<port>/``, routes ``/v1/`` and ``/health`` to the backends by weight.
Everything else (vLLM's ``/metrics``, its admin routes) answers 404 through the
endpoint. A switch rewrites the configuration, checks it with ``nginx -t`` and reloads
nginx with SIGHUP: new connections go to the new weights while the old workers finish
the requests (streams included) they carry, so a switch drops nothing.

Each answer names its version in ``X-Slothflow-Version`` (from the backend that served
it) and the configuration that routed it in ``X-Slothflow-Generation``. Backends share
the endpoint's API key, so clients keep one key across versions too. One rollout at a
time per endpoint: :func:`endpoint_lock`. During a canary the new version also has an
upstream of its own, reached with ``X-Slothflow-Route: canary`` (the quality probe).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from tasks.core.home import Home
from tasks.core.refs import write_json_atomic
from tasks.serve.errors import PortBusyError, ServeError
from tasks.serve.process import (
    _url_host,
    kill_group,
    log_tail,
    port_in_use,
    process_alive,
    serve_root,
)

log = logging.getLogger(__name__)

PREFIX = "endpoint-"
STATE_FILE = "endpoint.json"
CONF_FILE = "nginx.conf"
ERROR_LOG = "error.log"
ACCESS_LOG = "access.log"
KEY_FILE = "api_key"
VERSION_HEADER = "X-Slothflow-Version"
GENERATION_HEADER = "X-Slothflow-Generation"
#: ``X-Slothflow-Route: canary`` sends a request to the version under canary, whatever
#: the weights (the rollout's quality probe; nginx-ingress calls this canary-by-header).
ROUTE_HEADER = "X-Slothflow-Route"


class Backend(BaseModel):
    """One vLLM server behind the endpoint and its share of the traffic (0-100)."""

    model_config = ConfigDict(extra="forbid")

    port: int
    version: str
    model_spec: str
    weight: int
    canary: bool = False  # the version under canary: reachable by ROUTE_HEADER too


class EndpointState(BaseModel):
    """One endpoint, as written to ``serve/endpoint-<port>/endpoint.json``."""

    model_config = ConfigDict(extra="forbid")

    pid: int  # nginx's master process
    create_time: float
    host: str
    port: int
    served_model_name: str
    api_key_source: str  # where the key lives, never the key
    generation: int  # bumped by every configuration change
    backends: list[Backend]

    @property
    def base_url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.port}/v1"

    @property
    def serving(self) -> list[Backend]:
        return [b for b in self.backends if b.weight > 0]


def endpoint_dir(home: Home, port: int) -> Path:
    return serve_root(home) / f"{PREFIX}{port}"


def read_endpoint(home: Home, port: int) -> EndpointState | None:
    """The endpoint on ``port`` while its nginx runs; a dead one's state is dropped."""
    path = endpoint_dir(home, port) / STATE_FILE
    try:
        state = EndpointState.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not process_alive(state.pid, state.create_time):
        path.unlink(missing_ok=True)
        return None
    return state


def endpoints(home: Home) -> list[EndpointState]:
    found = []
    for d in sorted(serve_root(home).glob(f"{PREFIX}*")):
        port = d.name.removeprefix(PREFIX)
        if port.isdigit() and (state := read_endpoint(home, int(port))) is not None:
            found.append(state)
    return found


@contextmanager
def endpoint_lock(home: Home, port: int) -> Iterator[None]:
    """Held for a whole rollout to the endpoint on ``port``: a second one waits (a file
    lock, so it holds across processes and is released when its holder dies)."""
    d = endpoint_dir(home, port)
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "rollout.lock", "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            log.info("waiting for the rollout to port %d held by %s", port, f.read().strip())
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- configuration

_SAFE = re.compile(r"[^A-Za-z0-9._/@:+-]")


def _quoted(text: str) -> str:
    """A value nginx reads literally: anything outside a plain label's characters goes."""
    return '"' + _SAFE.sub("_", text)[:200] + '"'


def _listen(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def render_conf(d: Path, host: str, port: int, backends: Sequence[Backend], generation: int) -> str:
    """The nginx configuration of an endpoint routing to ``backends`` by weight."""
    serving = [b for b in backends if b.weight > 0]
    if not serving:
        raise ServeError("an endpoint needs at least one backend with a weight above 0")
    versions = "\n".join(
        f"        {_quoted(f'127.0.0.1:{b.port}')} {_quoted(b.version)};" for b in backends
    )
    upstreams = "\n".join(
        f"        server 127.0.0.1:{b.port} weight={b.weight} max_fails=0;" for b in serving
    )
    canary = [b for b in backends if b.canary]
    canary_upstream = canary_route = ""
    if canary:
        canary_upstream = f"""
    upstream slothflow_canary {{
        server 127.0.0.1:{canary[0].port} max_fails=0;
        keepalive 8;
    }}"""
        canary_route = "\n        canary slothflow_canary;"
    proxied = f"""            proxy_pass http://$slothflow_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # streamed answers reach the client token by token, never from a buffer file
            proxy_buffering off;
            proxy_max_temp_file_size 0;
            proxy_read_timeout 600s;
            # a backend that refuses the connection (stopping) is skipped; a request
            # already sent is never sent twice (nginx's rule for POST)
            proxy_next_upstream error timeout;
            add_header {VERSION_HEADER} $slothflow_version always;
            add_header {GENERATION_HEADER} {generation} always;"""
    return f"""# Written by slothflow (tasks/serve/endpoint.py); regenerated on every rollout step.
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/{ERROR_LOG} warn;
events {{
    worker_connections 1024;
}}
http {{
    log_format slothflow '$remote_addr [$time_iso8601] "$request" $status '
                         '$body_bytes_sent $request_time upstream=$upstream_addr '
                         'version=$slothflow_version';
    access_log {d}/{ACCESS_LOG} slothflow;
    server_tokens off;
    # request bodies stay in memory: the temp folders need not be writable by workers
    client_body_buffer_size 1m;
    client_max_body_size 1m;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    map $upstream_addr $slothflow_version {{
        default "";
{versions}
    }}
    upstream slothflow_backends {{
{upstreams}
        keepalive 32;
    }}{canary_upstream}
    map $http_{ROUTE_HEADER.lower().replace("-", "_")} $slothflow_upstream {{
        default slothflow_backends;{canary_route}
    }}
    # No keep-alive to clients: on each reload (every rollout step) an old worker closes
    # its idle keep-alive connections at once, and a client that sends its next request
    # on one at that moment gets a reset, which no client retries for a POST (measured:
    # one of 375 streamed requests lost across a rollout; nginx pull 437). A connection
    # per request costs a loopback/LAN handshake, nothing beside generating tokens.
    # A newer nginx's keepalive_min_timeout would allow keep-alive; Debian 12 has 1.22.
    keepalive_timeout 0;
    server {{
        listen {_listen(host, port)};
        location /v1/ {{
{proxied}
        }}
        location = /health {{
{proxied}
        }}
        # vLLM's /metrics and admin routes stay on the backends' loopback ports
        location / {{
            return 404;
        }}
    }}
}}
"""


def resolve_nginx(command: Sequence[str]) -> list[str]:
    """``deploy.nginx_command`` with its executable found, or a one-line error."""
    exe = shutil.which(command[0])
    if exe is None and os.sep not in command[0]:
        # Debian puts it in /usr/sbin, which a non-root PATH often lacks
        exe = shutil.which(command[0], path="/usr/sbin:/sbin")
    if exe is None:
        raise ServeError(
            f"deploy.nginx_command: {command[0]!r} not found. The stable endpoint is nginx: "
            "install Debian's package (`make system-deps`, or apt-get install nginx)"
        )
    return [exe, *command[1:]]


def _nginx(command: Sequence[str], d: Path, conf: Path, *extra: str) -> list[str]:
    return [
        *resolve_nginx(command),
        "-p",
        str(d),
        "-c",
        str(conf),
        "-e",
        str(d / ERROR_LOG),
        *extra,
    ]


def _write_checked(command: Sequence[str], d: Path, text: str) -> None:
    """Write the configuration only once ``nginx -t`` accepts it."""
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (d / "tmp" / sub).mkdir(parents=True, exist_ok=True)
    candidate = d / (CONF_FILE + ".new")
    candidate.write_text(text, encoding="utf-8")
    r = subprocess.run(
        _nginx(command, d, candidate, "-t", "-q"),
        capture_output=True,
        text=True,
        env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/bin")},
        check=False,
    )
    if r.returncode != 0:
        raise ServeError(f"nginx refused the endpoint's configuration: {r.stderr.strip()[-500:]}")
    candidate.replace(d / CONF_FILE)


# --------------------------------------------------------------------------- lifecycle


def _probe(host: str, port: int, timeout_s: float = 2.0) -> dict[str, str] | None:
    """The headers of ``/health`` through the endpoint, or None when it does not answer."""
    url = f"http://{_url_host(host)}:{port}/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as exc:
        return {k.lower(): v for k, v in exc.headers.items()}
    except (urllib.error.URLError, OSError, TimeoutError):
        return None


def _accepting_workers(master_pid: int) -> set[int]:
    """nginx's worker processes under ``master_pid`` that still accept connections:
    a worker told to quit after a reload retitles itself "worker process is shutting
    down" and closes its listening sockets, finishing only what it already holds."""
    import psutil

    try:
        children = psutil.Process(master_pid).children()
    except psutil.Error:
        return set()
    out = set()
    for c in children:
        try:
            title = " ".join(c.cmdline())
        except psutil.Error:
            continue
        if "worker process" in title and "shutting down" not in title:
            out.add(c.pid)
    return out


def _wait_generation(state: EndpointState, d: Path, proc_pid: int, timeout_s: float) -> None:
    """Until answers through the endpoint come from configuration ``generation``."""
    want = str(state.generation)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not process_alive(proc_pid):
            break
        headers = _probe(state.host, state.port)
        if headers is not None and headers.get(GENERATION_HEADER.lower()) == want:
            return
        time.sleep(0.1)
    raise ServeError(
        f"the endpoint on port {state.port} did not take configuration {want} within "
        f"{timeout_s:g}s. Last lines of its error log:\n{log_tail(d / ERROR_LOG)}"
    )


def start_endpoint(
    home: Home,
    command: Sequence[str],
    host: str,
    port: int,
    served_model_name: str,
    api_key_source: str,
    backends: Sequence[Backend],
    timeout_s: float = 30.0,
) -> EndpointState:
    """Start nginx on ``host:port`` routing to ``backends``; fails with its error log."""
    d = endpoint_dir(home, port)
    d.mkdir(parents=True, exist_ok=True)
    if port_in_use(host, port):
        raise PortBusyError(
            f"deploy.port {port} on {host} is already in use by another program; choose "
            "another with --set deploy.port=N (or stop that program)"
        )
    _write_checked(command, d, render_conf(d, host, port, backends, 1))
    with open(d / "nginx.out", "wb") as out:
        proc = subprocess.Popen(
            _nginx(command, d, d / CONF_FILE),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/bin")},
            start_new_session=True,  # one killpg reaches its workers; a Ctrl-C is ours
        )
    import psutil

    state = EndpointState(
        pid=proc.pid,
        create_time=psutil.Process(proc.pid).create_time(),
        host=host,
        port=port,
        served_model_name=served_model_name,
        api_key_source=api_key_source,
        generation=1,
        backends=list(backends),
    )
    try:
        _wait_generation(state, d, proc.pid, timeout_s)
    except BaseException:
        kill_group(proc.pid, 5.0)
        proc.wait(timeout=10)
        raise
    write_json_atomic(d / STATE_FILE, state.model_dump(mode="json"))
    log.info("endpoint %s (nginx pid %d) routes to %s", state.base_url, proc.pid, _routes(state))
    return state


def route(
    home: Home,
    command: Sequence[str],
    state: EndpointState,
    backends: Sequence[Backend],
    timeout_s: float = 30.0,
) -> EndpointState:
    """Route the endpoint to ``backends`` (new weights): rewrite, check, reload, and
    return once answers come from the new configuration."""
    d = endpoint_dir(home, state.port)
    new = state.model_copy(update={"backends": list(backends), "generation": state.generation + 1})
    _write_checked(command, d, render_conf(d, new.host, new.port, new.backends, new.generation))
    before = _accepting_workers(state.pid)
    os.kill(state.pid, signal.SIGHUP)  # nginx's graceful reload
    # Recorded before the wait: from here nginx may route by the new configuration, so a
    # rollout interrupted while waiting knows to route back (rollout._restore).
    write_json_atomic(d / STATE_FILE, new.model_dump(mode="json"))
    deadline = time.monotonic() + timeout_s
    _wait_generation(new, d, state.pid, timeout_s)
    # One answer from a new worker is not enough: until the master tells the old workers
    # to quit, they accept connections too, by the old weights and without the canary
    # route (measured: a probe right after a reload reached the serving version).
    while before & _accepting_workers(state.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    log.info("endpoint %s now routes to %s", new.base_url, _routes(new))
    return new


def stop_endpoint(home: Home, state: EndpointState, timeout_s: float = 20.0) -> None:
    """Stop nginx (in-flight requests get ``timeout_s``) and forget the endpoint."""
    d = endpoint_dir(home, state.port)
    if process_alive(state.pid, state.create_time):
        log.info("stopping the endpoint on port %d (nginx pid %d)", state.port, state.pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(state.pid, signal.SIGQUIT)  # graceful: finish what is in flight
        deadline = time.monotonic() + timeout_s
        while process_alive(state.pid, state.create_time) and time.monotonic() < deadline:
            time.sleep(0.2)
        kill_group(state.pid, 5.0)  # whatever is left: the workers too
    (d / STATE_FILE).unlink(missing_ok=True)


def _routes(state: EndpointState) -> str:
    return ", ".join(f"{b.version} (:{b.port}) {b.weight}%" for b in state.serving)
