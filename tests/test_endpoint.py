"""The stable endpoint: real nginx (Debian's package, started by the code under test) in
front of stand-in backends.

The backends here are small HTTP servers that answer like vLLM's routes (``/health``,
``/v1/models``, streamed ``/v1/chat/completions``, ``/metrics``), not vLLM: what is under
test is nginx's routing, reloads and stops, which do not depend on what answers behind
it, and starting two vLLM servers per test would cost a minute each. The real vLLM
servers behind the endpoint are tested in ``test_deploy.py`` and ``test_cli.py``.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tasks.core.home import Home
from tasks.serve import endpoint as ep
from tasks.serve import process

pytestmark = pytest.mark.skipif(
    shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(),
    reason="nginx missing: make nginx",
)
NGINX = ["nginx"]


class _Backend(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, version: str) -> None:
        self.version = version
        self.in_flight = 0
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Backend

    def log_message(self, *args: object) -> None:
        pass

    def _json(self, obj: object, status: int = 200) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/health":
            self._json({})
        elif self.path == "/v1/models":
            self._json({"data": [{"id": "m", "owned_by": self.server.version}]})
        elif self.path == "/metrics":
            text = f"vllm:num_requests_running {self.server.in_flight}\n".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            self.wfile.write(text)
        else:
            self._json({"error": "not found"}, 404)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with self.server.lock:
            self.server.in_flight += 1
        try:
            # a streamed answer of 10 chunks over ~0.5 s, as a chat completion streams
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(10):
                data = json.dumps({"v": self.server.version, "i": i})
                self._chunk(f"data: {data}\n\n".encode())
                time.sleep(0.05)
            self._chunk(b"data: [DONE]\n\n")
            self._chunk(b"")
        finally:
            with self.server.lock:
                self.server.in_flight -= 1

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


@pytest.fixture
def backends() -> Iterator[tuple[_Backend, _Backend]]:
    a, b = _Backend("m/1"), _Backend("m/2")
    yield a, b
    for s in (a, b):
        s.shutdown()
        s.server_close()


@pytest.fixture
def home(tmp_path: Path) -> Home:
    return Home(tmp_path / "home")


def _backend(s: _Backend, weight: int = 100) -> ep.Backend:
    return ep.Backend(port=s.port, version=s.version, model_spec=s.version, weight=weight)


@pytest.fixture
def endpoint(home: Home, backends: tuple[_Backend, _Backend]) -> Iterator[ep.EndpointState]:
    state = ep.start_endpoint(
        home, NGINX, "127.0.0.1", process.free_port(), "m", "file:/nowhere", [_backend(backends[0])]
    )
    yield state
    current = ep.read_endpoint(home, state.port)
    ep.stop_endpoint(home, current or state)


def _get(state: ep.EndpointState, path: str) -> tuple[int, dict[str, str], bytes]:
    url = f"http://127.0.0.1:{state.port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def _stream(state: ep.EndpointState) -> tuple[int, str, list[str]]:
    """One streamed POST through the endpoint: (status, version header, events)."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{state.port}/v1/chat/completions",
        data=b'{"stream": true}',
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        events = [line.decode().strip() for line in r if line.strip().startswith(b"data:")]
        return r.status, r.headers.get(ep.VERSION_HEADER, ""), events


def test_the_endpoint_names_the_version_and_hides_the_backends_other_routes(
    endpoint: ep.EndpointState,
) -> None:
    status, headers, body = _get(endpoint, "/v1/models")
    assert status == 200 and headers[ep.VERSION_HEADER] == "m/1"
    assert json.loads(body)["data"][0]["owned_by"] == "m/1"
    assert _get(endpoint, "/health")[0] == 200
    # vLLM's /metrics (and anything else off /v1/) stays on the backend's loopback port
    for path in ("/metrics", "/server_info", "/"):
        assert _get(endpoint, path)[0] == 404, path
    assert endpoint.base_url == f"http://127.0.0.1:{endpoint.port}/v1"


def test_a_switch_under_streaming_load_fails_no_request_and_moves_all_traffic(
    home: Home, endpoint: ep.EndpointState, backends: tuple[_Backend, _Backend]
) -> None:
    a, b = backends
    results: list[tuple[int, str, list[str]]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                results.append(_stream(endpoint))
            except BaseException as exc:  # recorded: the assertion names it
                errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    switched = ep.route(home, NGINX, endpoint, [_backend(b)])
    t_switch = len(results)
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors[:3]
    assert len(results) >= 20
    for status, version, events in results:
        assert status == 200
        # a whole stream, from one version: nothing cut by the reload
        assert events[-1] == "data: [DONE]" and len(events) == 11
        assert {json.loads(e[5:])["v"] for e in events[:-1]} == {version}
    assert {v for _, v, _ in results[:t_switch]} >= {"m/1"}
    assert results[-1][1] == "m/2" and {v for _, v, _ in results[t_switch + 4 :]} == {"m/2"}
    assert switched.generation == endpoint.generation + 1
    assert ep.read_endpoint(home, endpoint.port) == switched
    assert a.in_flight == 0  # drained: nginx sends the old version nothing new


def test_a_weighted_configuration_splits_traffic(
    home: Home, endpoint: ep.EndpointState, backends: tuple[_Backend, _Backend]
) -> None:
    a, b = backends
    state = ep.route(home, NGINX, endpoint, [_backend(a, 50), _backend(b, 50)])
    seen = [_get(state, "/v1/models")[1][ep.VERSION_HEADER] for _ in range(20)]
    assert set(seen) == {"m/1", "m/2"}, seen


def test_the_canary_header_reaches_the_canary_whatever_the_weights(
    home: Home, endpoint: ep.EndpointState, backends: tuple[_Backend, _Backend]
) -> None:
    """The quality probe's route: ``X-Slothflow-Route: canary`` goes to the version under
    canary even at a 10% share; without it the weights decide."""
    a, b = backends
    canary = _backend(b, 10).model_copy(update={"canary": True})
    state = ep.route(home, NGINX, endpoint, [_backend(a, 90), canary])

    def version(headers: dict[str, str]) -> str:
        req = urllib.request.Request(f"http://127.0.0.1:{state.port}/v1/models", headers=headers)
        with urllib.request.urlopen(req, timeout=10) as r:
            return str(r.headers[ep.VERSION_HEADER])

    assert {version({ep.ROUTE_HEADER: "canary"}) for _ in range(10)} == {"m/2"}
    # nginx's weighted round robin is exact (1 in 10), but right after a reload the old
    # worker, still on the previous weights, may take the first few: about 10%
    plain = [version({}) for _ in range(60)]
    assert 2 <= plain.count("m/2") <= 12, plain
    assert {version({ep.ROUTE_HEADER: "something-else"}) for _ in range(5)} <= {"m/1", "m/2"}


def test_a_configuration_nginx_refuses_changes_nothing(
    home: Home, endpoint: ep.EndpointState
) -> None:
    with pytest.raises(process.ServeError, match="at least one backend"):
        ep.route(home, NGINX, endpoint, [])
    assert ep.read_endpoint(home, endpoint.port) == endpoint
    assert _get(endpoint, "/v1/models")[1][ep.VERSION_HEADER] == "m/1"


def test_stop_leaves_no_process_and_frees_the_port(
    home: Home, backends: tuple[_Backend, _Backend]
) -> None:
    port = process.free_port()
    state = ep.start_endpoint(
        home, NGINX, "127.0.0.1", port, "m", "file:/nowhere", [_backend(backends[0])]
    )
    assert process.group_members(state.pid)
    assert ep.endpoints(home) == [state]
    ep.stop_endpoint(home, state)
    assert process.group_members(state.pid) == []
    assert not process.port_in_use("127.0.0.1", port)
    assert ep.read_endpoint(home, port) is None and ep.endpoints(home) == []


def test_a_busy_port_is_refused_before_nginx_starts(
    home: Home, backends: tuple[_Backend, _Backend]
) -> None:
    busy = backends[1].port
    with pytest.raises(process.PortBusyError, match=f"deploy.port {busy}"):
        ep.start_endpoint(home, NGINX, "127.0.0.1", busy, "m", "file:/x", [_backend(backends[0])])


def test_missing_nginx_is_a_one_line_error() -> None:
    with pytest.raises(process.ServeError, match="make system-deps"):
        ep.resolve_nginx(["no-such-nginx-binary"])


def test_two_rollouts_to_one_endpoint_never_interleave(home: Home) -> None:
    order: list[str] = []

    def rollout(name: str, hold: float) -> None:
        with ep.endpoint_lock(home, 8123):
            order.append(f"{name} in")
            time.sleep(hold)
            order.append(f"{name} out")

    first = threading.Thread(target=rollout, args=("a", 0.5))
    first.start()
    time.sleep(0.1)
    second = threading.Thread(target=rollout, args=("b", 0))
    second.start()
    first.join()
    second.join()
    assert order == ["a in", "a out", "b in", "b out"]


def test_a_rollout_that_fails_after_the_reload_routes_back_to_the_old_version(
    home: Home, endpoint: ep.EndpointState, backends: tuple[_Backend, _Backend]
) -> None:
    """What the rollout does when its switch is interrupted after nginx reloaded (a
    signal while it waits for the new configuration): the old routing comes back."""
    from tasks.core.config import DeployConfig
    from tasks.serve.rollout import _restore

    ep.route(home, NGINX, endpoint, [_backend(backends[1])])
    assert _get(endpoint, "/v1/models")[1][ep.VERSION_HEADER] == "m/2"
    _restore(home, DeployConfig(nginx_command=NGINX), endpoint)
    assert _get(endpoint, "/v1/models")[1][ep.VERSION_HEADER] == "m/1"
    restored = ep.read_endpoint(home, endpoint.port)
    assert restored is not None and restored.backends == endpoint.backends
