"""Prefect's temporary API server for a ``slothflow run`` with no server configured.

Prefect starts one by itself when ``PREFECT_API_URL`` is unset (``SubprocessASGIServer``),
but as a plain child in *our* process group: one Ctrl-C in the terminal kills it at the
same instant as the flow, so the flow engine then spends ~75 s retrying to report the
crash to a dead server and hangs at exit; and a SIGTERM to our pid alone (systemd,
Kubernetes) leaves it running with the home's ``prefect.db`` open. So we start the very
same app (Prefect's ``create_app`` under uvicorn, as ``SubprocessASGIServer`` does) in a
session of its own, tied to our life by ``PR_SET_PDEATHSIG`` (it dies with us, even when
we are SIGKILLed), and stop it ourselves, last, after Prefect has reported the run's
final state and flushed its logs and events.

This module must not import Prefect: ``PREFECT_API_URL`` has to be in the environment
before Prefect is first imported (its settings, and the threads of its log and event
workers, read it from there). Importing a stage module imports Prefect, and the checks
that run before the server is worth starting import stage modules; so :func:`reserve`
claims a port and exports the URL first, and :func:`temporary_server` starts the server
on it. The server takes 6-10 s to boot (imports and its database's migrations, in its own
process): the caller runs the checks and its own imports meanwhile and only then waits
for it (the ``ready`` callable it yields), so a run does not wait for both in turn.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

API_URL_ENV = "PREFECT_API_URL"
STARTUP_TIMEOUT_S = 120.0  # a loaded 2-core machine took >20 s (Prefect's own default)
STOP_TIMEOUT_S = 5.0


class TemporaryServerError(RuntimeError):
    """Prefect's temporary server did not start."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that asks Linux to SIGTERM the child when its parent dies."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1

    def preexec() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)

    return preexec


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError, TimeoutError):
        return False


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _url(port: int) -> str:
    return f"http://127.0.0.1:{port}/api"


def reserve() -> int:
    """Pick the temporary server's port and export its URL as ``PREFECT_API_URL``, before
    anything imports Prefect. Returns the port for :func:`temporary_server`."""
    port = _free_port()
    os.environ[API_URL_ENV] = _url(port)
    return port


@contextlib.contextmanager
def temporary_server(
    prefect_home: Path, port: int, timeout_s: float = STARTUP_TIMEOUT_S
) -> Iterator[Callable[[], str]]:
    """Start serving Prefect's API on loopback ``port`` (from :func:`reserve`) at once,
    until the block exits; yields ``ready``, which waits until the server answers and
    returns its URL (call it before the first API call: work that needs no API can go
    first and overlap the server's boot). The server's log goes to
    ``prefect_home/temporary-server.log``.
    """
    spec = importlib.util.find_spec("prefect")
    if spec is None or spec.origin is None:
        raise TemporaryServerError("Prefect is not installed")
    app_dir = Path(spec.origin).parent.parent
    url = _url(port)
    prefect_home.mkdir(parents=True, exist_ok=True)
    log_path = prefect_home / "temporary-server.log"
    argv = [
        sys.executable,
        "-m",
        "uvicorn",
        "--app-dir",
        str(app_dir),
        "--factory",
        "prefect.server.api.server:create_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "error",
        "--lifespan",
        "on",
    ]
    # What SubprocessASGIServer sets: no UI, and the server knows it is ephemeral.
    env = {
        **os.environ,
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
    }
    env.pop(API_URL_ENV, None)
    started = time.monotonic()
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            # Own session: a Ctrl-C in the terminal is ours to handle; the server must
            # outlive the flow's last report. PDEATHSIG: gone with us, even on SIGKILL.
            start_new_session=True,
            preexec_fn=_die_with_parent(),
        )
    answered = False

    def ready() -> str:
        nonlocal answered
        waited = time.monotonic()
        while not answered and not _healthy(url):
            if proc.poll() is not None:
                raise TemporaryServerError(
                    f"Prefect's temporary server exited with code {proc.returncode} while "
                    f"starting. Last lines of {log_path}:\n{_log_tail(log_path)}"
                )
            if time.monotonic() - started > timeout_s:
                raise TemporaryServerError(
                    f"Prefect's temporary server did not answer {url}/health within "
                    f"{timeout_s:g}s. Last lines of {log_path}:\n{_log_tail(log_path)}"
                )
            time.sleep(0.1)
        if not answered:
            log.debug(
                "Prefect temporary server on %s (%.1fs after its start, %.1fs waited)",
                url, time.monotonic() - started, time.monotonic() - waited,
            )  # fmt: skip
        answered = True
        return url

    try:
        yield ready
    finally:
        if answered:  # nothing was sent to a server that never answered
            _flush_prefect_services()
        _stop(proc)


def _flush_prefect_services() -> None:
    """Send what Prefect's background workers still hold (logs, events) while the server
    still answers; afterwards their exit handlers find nothing to send."""
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        try:
            service.drain_all(timeout=STOP_TIMEOUT_S)
        except Exception as exc:  # a flush failure must not hide the run's own outcome
            log.debug("could not flush %s: %s", service.__name__, exc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's group, SIGKILL what is left after a short grace."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        log.warning(
            "Prefect's temporary server ignored SIGTERM for %gs; killing it", STOP_TIMEOUT_S
        )
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
