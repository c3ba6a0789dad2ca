"""Load from vLLM's own benchmark tool, ``vllm bench serve``: the serving stage's load
test and the traffic of a rollout's canary steps.

The tool runs as its own process from ``deploy.bench_command`` (vLLM's environment; we
never import vllm) with an allowlisted environment: the API key reaches it as
``OPENAI_API_KEY`` (what its OpenAI backends send), never in argv. It streams every
request (``openai-chat``), draws random prompts of ``input_len`` tokens with the served
model's own tokenizer (a local folder: nothing is downloaded), and writes its result
JSON (per-request latencies, time to first token, output lengths and errors), which
:func:`parse_result` turns into a :class:`LoadReport`.

A stream cut short is not always an error to the tool (it counts a request as
successful once a first token came); with ``ignore_eos`` every answer must be exactly
``max_tokens`` long, so a shorter one is counted as ``truncated`` and as an error here.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from tasks.core.config import CanaryLoadConfig, DeployConfig, LoadTestConfig
from tasks.core.home import Home
from tasks.serve.command import REPO_ROOT, resolve_command, server_environment
from tasks.serve.errors import ServeError
from tasks.serve.process import kill_group, log_tail

log = logging.getLogger(__name__)

RESULT_FILE = "bench-result.json"
LOG_FILE = "bench.log"


class LoadReport(BaseModel):
    """What one run of the tool measured (seconds; rates per second)."""

    model_config = ConfigDict(extra="forbid")

    concurrency: int
    request_rate: float | None
    duration_s: float
    requests: int
    errors: int  # failed requests plus truncated streams
    truncated: int  # answered, but shorter than max_tokens with ignore_eos: a cut stream
    error_rate: float
    p50_s: float
    p90_s: float
    p99_s: float
    p99_ttft_s: float
    tokens_per_s: float
    requests_per_s: float
    error_samples: list[str]

    def metrics(self, prefix: str = "load") -> dict[str, float]:
        return {
            f"{prefix}_p50_latency_s": self.p50_s,
            f"{prefix}_p90_latency_s": self.p90_s,
            f"{prefix}_p99_latency_s": self.p99_s,
            f"{prefix}_p99_ttft_s": self.p99_ttft_s,
            f"{prefix}_tokens_per_s": self.tokens_per_s,
            f"{prefix}_requests_per_s": self.requests_per_s,
            f"{prefix}_error_rate": self.error_rate,
            f"{prefix}_requests": float(self.requests),
            f"{prefix}_concurrency": float(self.concurrency),
        }


@dataclass(frozen=True)
class LoadSpec:
    """One run of the tool: how much load, of what shape."""

    concurrency: int
    requests: int
    request_rate: float | None  # None: closed loop, as fast as the slots allow
    input_len: int
    max_tokens: int
    ignore_eos: bool
    timeout_s: float

    @classmethod
    def of_load_test(cls, lt: LoadTestConfig) -> LoadSpec:
        return cls(
            lt.concurrency,
            lt.requests,
            lt.request_rate,
            lt.input_len,
            lt.max_tokens,
            lt.ignore_eos,
            lt.timeout_s,
        )

    @classmethod
    def of_canary(cls, load: CanaryLoadConfig, window_s: float) -> LoadSpec:
        """Poisson arrivals at ``load.request_rate`` for about ``window_s`` plus the
        canary's settle before it (a fifth of the window, at most 5 s)."""
        return cls(
            load.concurrency,
            max(1, math.ceil(load.request_rate * (window_s + min(5.0, window_s / 5)))),
            load.request_rate,
            load.input_len,
            load.max_tokens,
            True,
            # the tool's own start (~10 s of imports on 2 cores) and a slow tail
            window_s * 3 + 120,
        )


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def resolve_bench_command(command: Sequence[str]) -> list[str]:
    """``deploy.bench_command`` with its executable checked; a relative ``.py`` script
    (the default's launcher) resolves against the repository, like the executable."""
    argv = resolve_command(command)
    return [
        argv[0],
        *(
            str(REPO_ROOT / a) if a.endswith(".py") and not os.path.isabs(a) else a
            for a in argv[1:]
        ),
    ]


def bench_argv(
    command: Sequence[str],
    base_url: str,
    model_name: str,
    tokenizer: str,
    spec: LoadSpec,
    out_dir: Path,
    seed: int = 0,
) -> list[str]:
    """The tool's command line. ``base_url`` is the server or endpoint root (no ``/v1``)."""
    argv = [
        *resolve_bench_command(command),
        *("--backend", "openai-chat", "--base-url", base_url),
        *("--endpoint", "/v1/chat/completions", "--model", model_name),
        *("--tokenizer", tokenizer, "--dataset-name", "random"),
        *("--random-input-len", str(spec.input_len), "--random-output-len", str(spec.max_tokens)),
        *("--num-prompts", str(spec.requests), "--max-concurrency", str(spec.concurrency)),
        *("--request-rate", "inf" if spec.request_rate is None else f"{spec.request_rate:g}"),
        *("--temperature", "0", "--seed", str(seed), "--disable-tqdm"),
        *("--percentile-metrics", "ttft,e2el", "--metric-percentiles", "50,90,99"),
        # the endpoint is proven healthy before any load: no ready-check loop
        *("--ready-check-timeout-sec", "0"),
        *("--save-result", "--save-detailed", "--result-dir", str(out_dir)),
        *("--result-filename", RESULT_FILE),
    ]
    if spec.ignore_eos:
        argv.append("--ignore-eos")
    return argv


def bench_environment(cfg: DeployConfig, home: Home, api_key: str) -> dict[str, str]:
    """The server's allowlisted environment (offline, the home's caches), the key as
    ``OPENAI_API_KEY`` alone."""
    env = server_environment(cfg, home, api_key)
    env.pop("VLLM_API_KEY", None)
    env["OPENAI_API_KEY"] = api_key
    return env


class LoadRun:
    """The tool, started; :meth:`wait` for its report, :meth:`stop` to cut it short."""

    def __init__(self, proc: subprocess.Popen[bytes], out_dir: Path, spec: LoadSpec) -> None:
        self.proc = proc
        self.out_dir = out_dir
        self.spec = spec
        self.started = time.monotonic()

    def wait(self) -> LoadReport:
        left = self.spec.timeout_s - (time.monotonic() - self.started)
        try:
            rc = self.proc.wait(timeout=max(left, 1.0))
        except subprocess.TimeoutExpired:
            self.stop()
            raise ServeError(
                f"vllm bench serve did not finish within {self.spec.timeout_s:g}s "
                f"({self.spec.requests} requests at concurrency {self.spec.concurrency}). "
                f"Last lines of its log:\n{log_tail(self.out_dir / LOG_FILE)}"
            ) from None
        path = self.out_dir / RESULT_FILE
        if rc != 0 or not path.exists():
            raise ServeError(
                f"vllm bench serve failed (exit {rc}). Last lines of "
                f"{self.out_dir / LOG_FILE}:\n{log_tail(self.out_dir / LOG_FILE)}"
            )
        return parse_result(json.loads(path.read_text(encoding="utf-8")), self.spec)

    def stop(self) -> None:
        if self.proc.poll() is None:
            kill_group(self.proc.pid, 5.0)
            self.proc.wait(timeout=10)


def start_load(
    cfg: DeployConfig,
    home: Home,
    base_url: str,
    api_key: str,
    model_name: str,
    tokenizer: str | os.PathLike[str],
    spec: LoadSpec,
    out_dir: Path,
    seed: int = 0,
) -> LoadRun:
    """Start the tool against ``base_url`` (its own process group, like the servers)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RESULT_FILE).unlink(missing_ok=True)
    argv = bench_argv(cfg.bench_command, base_url, model_name, str(tokenizer), spec, out_dir, seed)
    log.debug("load: %s", " ".join(argv))
    with open(out_dir / LOG_FILE, "wb") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=bench_environment(cfg, home, api_key),
            cwd=out_dir,
            start_new_session=True,  # one killpg stops it; a Ctrl-C reaches us first
        )
    return LoadRun(proc, out_dir, spec)


def run_load(
    cfg: DeployConfig,
    home: Home,
    base_url: str,
    api_key: str,
    model_name: str,
    tokenizer: str | os.PathLike[str],
    spec: LoadSpec,
    out_dir: Path,
) -> LoadReport:
    """Run the tool to the end (stopped on any exception, Ctrl-C included)."""
    run = start_load(cfg, home, base_url, api_key, model_name, tokenizer, spec, out_dir)
    try:
        return run.wait()
    finally:
        run.stop()


def parse_result(data: Mapping[str, Any], spec: LoadSpec) -> LoadReport:
    """The tool's ``--save-detailed`` result as a :class:`LoadReport`."""
    errors = [str(e) for e in data.get("errors", []) if e]
    latencies = [float(x) for x in data.get("latencies", []) if x]
    ttfts = [float(x) for x in data.get("ttfts", []) if x]
    out_lens = [int(x) for x in data.get("output_lens", [])]
    completed = int(data.get("completed", len(latencies)))
    failed = int(data.get("failed", len(errors)))
    truncated = sum(0 < n < spec.max_tokens for n in out_lens) if spec.ignore_eos else 0
    samples = list(dict.fromkeys(e.strip().splitlines()[-1][:200] for e in errors))[:5]
    if truncated:
        samples.append(f"{truncated} streamed answer(s) shorter than {spec.max_tokens} tokens")
    requests = completed + failed
    bad = failed + truncated
    duration = float(data.get("duration", 0.0))
    return LoadReport(
        concurrency=spec.concurrency,
        request_rate=spec.request_rate,
        duration_s=duration,
        requests=requests,
        errors=bad,
        truncated=truncated,
        error_rate=bad / requests if requests else 1.0,
        p50_s=percentile(latencies, 50),
        p90_s=percentile(latencies, 90),
        p99_s=percentile(latencies, 99),
        p99_ttft_s=percentile(ttfts, 99),
        tokens_per_s=float(data.get("output_throughput", 0.0)),
        requests_per_s=completed / duration if duration > 0 else 0.0,
        error_samples=samples,
    )
