"""Canary steps: a share of the endpoint's traffic to the new version, judged on the
servers' own Prometheus ``/metrics`` against the serving version, and a quality probe.

Each step (``deploy.canary``):

1. nginx routes ``step`` percent of new requests to the new version and the rest to
   the serving one(s) by weight; the new version is also reachable with
   ``X-Slothflow-Route: canary`` (:data:`~tasks.serve.endpoint.ROUTE_HEADER`).
2. Both servers' ``/metrics`` are read at the start and at the end of the window
   (``window_s``) while load flows through the endpoint: vLLM's benchmark tool
   (``deploy.canary.load``), or the clients' own traffic where it is off. At the
   first step the quality probe asks held-out items through the endpoint, routed to
   the new version, and compares the answers with the offline evaluation's.
3. The differences of the counters and histograms give each version's requests, error
   rate (non-2xx answers on ``/v1/`` from ``http_requests_total``, plus requests vLLM
   finished with ``error`` in ``vllm:request_success_total``), p99 end-to-end latency
   (``vllm:e2e_request_latency_seconds``) and p99 time to first token
   (``vllm:time_to_first_token_seconds``), quantiles computed from the buckets the way
   Prometheus' ``histogram_quantile`` does. The step holds when the new version's
   error rate is at most the serving one's plus ``max_error_rate_increase`` and its
   p99s at most ``max_p99_*_ratio`` times the serving one's (plus ``latency_slack_s``).

A step that does not hold raises :class:`CanaryError`; the rollout then routes every
request back to the serving version and stops the new one. Every step, its numbers
and its decision are printed, logged to the tracker as metrics (``canary_*`` at step
index ``i``) and collected in ``serve/canary.json``.
"""

from __future__ import annotations

import logging
import math
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.core.artifacts import split_row
from tasks.core.config import CanaryConfig, DeployConfig
from tasks.core.eval_metrics import exact_match
from tasks.core.home import Home
from tasks.core.tracking import Tracker
from tasks.serve.endpoint import ROUTE_HEADER, VERSION_HEADER, Backend, EndpointState
from tasks.serve.errors import ServeError
from tasks.serve.loadgen import LoadReport, LoadRun, LoadSpec, start_load

log = logging.getLogger(__name__)

E2E = "vllm:e2e_request_latency_seconds"
TTFT = "vllm:time_to_first_token_seconds"
SUCCESS = "vllm:request_success_total"
HTTP = "http_requests_total"


class CanaryError(ServeError):
    """A canary step did not hold: the new version is taken out of service."""


# --------------------------------------------------------------------------- /metrics


@dataclass
class Sample:
    """The counters and histograms of one server's ``/metrics`` that a step compares."""

    http: dict[str, float] = field(default_factory=dict)  # status class -> /v1/ requests
    finished: dict[str, float] = field(default_factory=dict)  # finished_reason -> requests
    e2e: dict[float, float] = field(default_factory=dict)  # le -> cumulative count
    ttft: dict[float, float] = field(default_factory=dict)

    def minus(self, before: Sample) -> Sample:
        """This sample's counters since ``before`` (a restarted server counts from 0)."""

        def d(a: dict[Any, float], b: dict[Any, float]) -> dict[Any, float]:
            out = {k: v - b.get(k, 0.0) for k, v in a.items()}
            return a if any(v < 0 for v in out.values()) else out

        return Sample(
            d(self.http, before.http),
            d(self.finished, before.finished),
            d(self.e2e, before.e2e),
            d(self.ttft, before.ttft),
        )


def parse_metrics(text: str) -> Sample:
    """The parts of a vLLM ``/metrics`` page a canary needs, summed over label sets
    (engines, model names), with Prometheus' own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    s = Sample()
    for family in text_string_to_metric_families(text):
        for m in family.samples:
            if m.name == f"{HTTP}" and m.labels.get("handler", "").startswith("/v1/"):
                status = m.labels.get("status", "")
                s.http[status[:1] + "xx"] = s.http.get(status[:1] + "xx", 0.0) + m.value
            elif m.name == SUCCESS:
                reason = m.labels.get("finished_reason", "")
                s.finished[reason] = s.finished.get(reason, 0.0) + m.value
            elif m.name in (f"{E2E}_bucket", f"{TTFT}_bucket"):
                le = float(m.labels["le"])
                hist: dict[float, float] = s.e2e if m.name.startswith(E2E) else s.ttft
                hist[le] = hist.get(le, 0.0) + m.value
    return s


def scrape(port: int, timeout_s: float = 5.0) -> Sample:
    """A backend's ``/metrics`` (loopback; never through the endpoint)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s) as r:
            return parse_metrics(r.read().decode("utf-8", "replace"))
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise CanaryError(f"the server on port {port} stopped answering /metrics: {exc}") from None


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float:
    """Prometheus' ``histogram_quantile`` over cumulative ``buckets`` (upper bound ->
    count): linear inside the bucket that holds rank ``q * total``; the highest finite
    bound when it falls in ``+Inf``; NaN without observations."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return math.nan
    total = buckets[bounds[-1]]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for b in bounds:
        count = buckets[b]
        if count >= rank:
            if math.isinf(b):
                return lower_bound
            if count == lower_count:
                return b
            return lower_bound + (b - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = b, count
    return lower_bound


@dataclass(frozen=True)
class VersionStats:
    """One version's figures over one step's window."""

    requests: float
    errors: float
    p99_latency_s: float
    p99_ttft_s: float

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @classmethod
    def of(cls, delta: Sample) -> VersionStats:
        requests = sum(delta.http.values())
        errors = requests - delta.http.get("2xx", 0.0) + delta.finished.get("error", 0.0)
        return cls(
            requests=requests,
            errors=min(errors, requests) if requests else errors,
            p99_latency_s=histogram_quantile(0.99, delta.e2e),
            p99_ttft_s=histogram_quantile(0.99, delta.ttft),
        )

    def as_dict(self) -> dict[str, float]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": self.error_rate,
            "p99_latency_s": self.p99_latency_s,
            "p99_ttft_s": self.p99_ttft_s,
        }


def merge(stats: Sequence[VersionStats], deltas: Sequence[Sample]) -> VersionStats:
    """The serving side when several versions share it: counters and buckets summed."""
    if len(deltas) == 1:
        return stats[0]
    total = Sample()

    def add(mine: dict[Any, float], theirs: Mapping[Any, float]) -> None:
        for k, v in theirs.items():
            mine[k] = mine.get(k, 0.0) + v

    for d in deltas:
        add(total.http, d.http)
        add(total.finished, d.finished)
        add(total.e2e, d.e2e)
        add(total.ttft, d.ttft)
    return VersionStats.of(total)


def judge_step(new: VersionStats, old: VersionStats, c: CanaryConfig) -> list[str]:
    """What the new version misses against the serving one (empty: the step holds)."""
    failures = []
    if new.requests < c.min_requests:
        failures.append(
            f"too little traffic to judge: the new version answered {new.requests:.0f} "
            f"requests (need {c.min_requests})"
        )
        return failures
    if new.error_rate > old.error_rate + c.max_error_rate_increase + 1e-12:
        failures.append(
            f"error rate {new.error_rate:.1%} vs {old.error_rate:.1%} serving "
            f"(allowed +{c.max_error_rate_increase:.1%})"
        )
    for what, mine, theirs, ratio in (
        ("p99 latency", new.p99_latency_s, old.p99_latency_s, c.max_p99_latency_ratio),
        ("p99 time to first token", new.p99_ttft_s, old.p99_ttft_s, c.max_p99_ttft_ratio),
    ):
        # no figure for the serving side (no requests in the window): nothing to compare
        if math.isfinite(theirs) and not mine <= theirs * ratio + c.latency_slack_s:
            slack = f" + {c.latency_slack_s:g}s" if c.latency_slack_s else ""
            failures.append(
                f"{what} {mine:.3f}s vs {theirs:.3f}s serving (allowed {ratio:g}x{slack})"
            )
    return failures


# --------------------------------------------------------------------------- quality probe


@dataclass(frozen=True)
class ProbeReport:
    rows: int
    score: float  # exact match of the answers through the endpoint
    offline_score: float  # the offline evaluation's on the same rows
    wrong_version: int  # answers that named another version than the new one
    failures: list[str]
    samples: list[dict[str, str]]

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "score": self.score,
            "offline_score": self.offline_score,
            "wrong_version": self.wrong_version,
            "failures": self.failures,
            "samples": self.samples,
        }


def probe(
    client: Any,
    model: str,
    version: str,
    rows: Sequence[Mapping[str, Any]],
    offline: Sequence[str],
    c: CanaryConfig,
    max_tokens: int,
) -> ProbeReport:
    """Held-out ``rows`` through the endpoint, routed to the new version by
    :data:`ROUTE_HEADER`, greedy; the exact match must be at least the offline
    evaluation's on the same rows minus ``probe_tolerance``."""
    served_ok: list[bool] = []
    offline_ok: list[bool] = []
    samples: list[dict[str, str]] = []
    wrong_version = 0
    for row, off in zip(rows, offline, strict=True):
        prompt, ref = split_row(row)
        raw = client.chat.completions.with_raw_response.create(
            model=model,
            messages=prompt,
            max_tokens=max_tokens,
            temperature=0.0,
            extra_headers={ROUTE_HEADER: "canary"},
        )
        if raw.headers.get(VERSION_HEADER) != version:
            wrong_version += 1
        answer = raw.parse().choices[0].message.content or ""
        served_ok.append(bool(exact_match(answer, ref)))
        offline_ok.append(bool(exact_match(off, ref)))
        if len(samples) < 3 and served_ok[-1] != offline_ok[-1]:
            samples.append({"prompt": prompt[-1]["content"], "answer": answer, "offline": off})
    n = len(served_ok)
    score = sum(served_ok) / n if n else math.nan
    offline_score = sum(offline_ok) / n if n else math.nan
    failures = []
    if wrong_version:
        failures.append(f"{wrong_version} probe answers did not come from {version}")
    if n and score < offline_score - c.probe_tolerance - 1e-12:
        failures.append(
            f"probe exact match {score:.3f} through the endpoint vs {offline_score:.3f} offline "
            f"on the same {n} items (allowed -{c.probe_tolerance:g})"
        )
    return ProbeReport(n, score, offline_score, wrong_version, failures, samples)


# --------------------------------------------------------------------------- steps


@dataclass
class CanaryInputs:
    """What the steps need beyond the configuration."""

    home: Home
    cfg: DeployConfig
    state: EndpointState  # as it serves before the canary
    new: Backend
    api_key: str
    served_model_name: str
    tokenizer: str  # the new version's folder: the load tool's prompts
    client: Any  # openai client on the endpoint
    rows: Sequence[Mapping[str, Any]] = ()
    offline: Sequence[str] | None = None
    out_dir: Path | None = None


def weights(old: Sequence[Backend], new: Backend, pct: int) -> list[Backend]:
    """``pct`` percent to ``new``, the rest shared by the serving ``old`` ones as before."""
    serving = [b for b in old if b.weight > 0]
    total = sum(b.weight for b in serving)
    out = [
        b.model_copy(update={"weight": max(1, round((100 - pct) * b.weight / total))})
        for b in serving
    ]
    return [*out, new.model_copy(update={"weight": pct, "canary": True})]


def run_canary(
    inp: CanaryInputs,
    route_to: Callable[[list[Backend]], EndpointState],
    tracker: Tracker,
) -> list[dict[str, Any]]:
    """Every step of ``inp.cfg.canary``; returns their records, raises
    :class:`CanaryError` at the first that does not hold (after recording it)."""
    c = inp.cfg.canary
    old = inp.state.serving
    records: list[dict[str, Any]] = []
    try:
        for i, pct in enumerate(c.steps):
            route_to(weights(old, inp.new, pct))
            record = _step(inp, i, pct, old)
            records.append(record)
            _report(record, tracker, i)
            if record["failures"]:
                raise CanaryError(
                    f"canary step {i + 1} ({pct}% to {inp.new.version}) failed: "
                    + "; ".join(record["failures"])
                    + f". Traffic returns to {', '.join(b.version for b in old)}"
                )
    finally:
        tracker.log_dict(
            {"steps": records, "config": c.model_dump(mode="json")}, "serve/canary.json"
        )
    return records


def _step(inp: CanaryInputs, i: int, pct: int, old: Sequence[Backend]) -> dict[str, Any]:
    c = inp.cfg.canary
    load: LoadRun | None = None
    report: LoadReport | None = None
    if c.load.enabled:
        # sized so the load lasts the window; the tool needs seconds to start, so the
        # window is timed from its first request (its log says so)
        spec = LoadSpec.of_canary(c.load, c.window_s)
        out = (inp.out_dir or Path(".")) / f"canary-{i + 1}"
        load = start_load(
            inp.cfg,
            inp.home,
            inp.state.base_url.removesuffix("/v1"),
            inp.api_key,
            inp.served_model_name,
            inp.tokenizer,
            spec,
            out,
            seed=i,
        )
        _wait_started(load)
    try:
        # The first requests of a new traffic mix meet cold paths (batch shapes the
        # version has not run yet): measured from after a short settle, as a dashboard
        # would read the window after a routing change.
        time.sleep(_settle_s(c.window_s))
        before = {b.port: scrape(b.port) for b in [*old, inp.new]}
        t0 = time.monotonic()
        probe_report = None
        if i == 0 and c.probe_rows and inp.rows and inp.offline is not None:
            n = min(c.probe_rows, len(inp.rows))
            probe_report = probe(
                inp.client,
                inp.served_model_name,
                inp.new.version,
                inp.rows[:n],
                inp.offline[:n],
                c,
                inp.cfg.smoke.max_tokens,
            )
        if load is not None:
            report = load.wait()
        deadline = t0 + c.window_s
        while True:  # the window, then longer (up to 3 windows) for enough requests
            time.sleep(max(0.0, deadline - time.monotonic()))
            after = {b.port: scrape(b.port) for b in [*old, inp.new]}
            new_delta = after[inp.new.port].minus(before[inp.new.port])
            new_stats = VersionStats.of(new_delta)
            if new_stats.requests >= c.min_requests or time.monotonic() >= t0 + 3 * c.window_s:
                break
            deadline = time.monotonic() + c.window_s / 2
    finally:
        if load is not None:
            load.stop()
    old_deltas = [after[b.port].minus(before[b.port]) for b in old]
    old_stats = merge([VersionStats.of(d) for d in old_deltas], old_deltas)
    failures = judge_step(new_stats, old_stats, c)
    if probe_report is not None:
        failures += probe_report.failures
    return {
        "step": i + 1,
        "percent": pct,
        "window_s": round(time.monotonic() - t0, 2),
        "new": {"version": inp.new.version, **new_stats.as_dict()},
        "serving": {"version": ", ".join(b.version for b in old), **old_stats.as_dict()},
        "probe": probe_report.as_dict() if probe_report is not None else None,
        "load": report.model_dump(mode="json") if report is not None else None,
        "failures": failures,
        "decision": "fail" if failures else "hold",
    }


def _settle_s(window_s: float) -> float:
    return min(5.0, window_s / 5)


def _wait_started(load: LoadRun, timeout_s: float = 120.0) -> None:
    """Until the tool sends its first request (or exits)."""
    deadline = time.monotonic() + timeout_s
    path = load.out_dir / "bench.log"
    while time.monotonic() < deadline and load.proc.poll() is None:
        try:
            if b"Starting main benchmark run" in path.read_bytes():
                return
        except OSError:
            pass
        time.sleep(0.2)
    if load.proc.poll() is not None:
        load.wait()  # raises with the tool's log


def _report(record: Mapping[str, Any], tracker: Tracker, i: int) -> None:
    new, old = record["new"], record["serving"]
    metrics = {
        "canary_percent": float(record["percent"]),
        "canary_new_requests": new["requests"],
        "canary_new_error_rate": new["error_rate"],
        "canary_new_p99_latency_s": new["p99_latency_s"],
        "canary_new_p99_ttft_s": new["p99_ttft_s"],
        "canary_serving_requests": old["requests"],
        "canary_serving_error_rate": old["error_rate"],
        "canary_serving_p99_latency_s": old["p99_latency_s"],
        "canary_serving_p99_ttft_s": old["p99_ttft_s"],
        "canary_passed": 0.0 if record["failures"] else 1.0,
    }
    if record["probe"] is not None:
        metrics["canary_probe_score"] = record["probe"]["score"]
        metrics["canary_probe_offline_score"] = record["probe"]["offline_score"]
    tracker.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, step=i)
    probe_note = ""
    if record["probe"] is not None:
        p = record["probe"]
        probe_note = f"; probe {p['score']:.3f} vs {p['offline_score']:.3f} offline"
    log.info(
        "canary step %d: %d%% to %s for %.0fs: %.0f requests, errors %.1f%% (serving %.1f%%), "
        "p99 %.3fs (serving %.3fs), p99 TTFT %.3fs (serving %.3fs)%s -> %s",
        record["step"],
        record["percent"],
        new["version"],
        record["window_s"],
        new["requests"],
        100 * new["error_rate"],
        100 * old["error_rate"],
        new["p99_latency_s"],
        old["p99_latency_s"],
        new["p99_ttft_s"],
        old["p99_ttft_s"],
        probe_note,
        "HOLD" if not record["failures"] else "FAIL: " + "; ".join(record["failures"]),
    )
