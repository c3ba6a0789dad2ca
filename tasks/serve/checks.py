"""Proof before traffic: warm-up, the smoke test and its judgement, the load test,
percentiles and SLOs."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from tasks.core.artifacts import split_row
from tasks.core.config import DeployConfig, LoadTestConfig, SmokeConfig
from tasks.core.eval_metrics import exact_match
from tasks.core.home import Home
from tasks.core.tracking import Tracker
from tasks.serve.errors import SLOViolationError, SmokeTestError
from tasks.serve.loadgen import LoadReport, LoadSpec, run_load
from tasks.serve.process import Server, _url_host, server_dir

log = logging.getLogger(__name__)

# Smoke/warm-up requests are a few tokens: a server that needs a minute for one is
# broken, and the check should say so rather than hang.
_REQUEST_TIMEOUT_S = 60.0


def client_for(server: Server, timeout_s: float = _REQUEST_TIMEOUT_S) -> Any:
    """The official ``openai`` client for ``server``; no retries (they would hide errors)."""
    from openai import OpenAI

    return OpenAI(
        base_url=server.base_url, api_key=server.api_key, timeout=timeout_s, max_retries=0
    )


def warm_up(client: Any, model: str, prompts: Sequence[list[dict[str, str]]], n: int) -> float:
    """``n`` short requests so the first real user does not pay for cold paths; seconds."""
    t0 = time.perf_counter()
    for i in range(n):
        client.chat.completions.create(
            model=model, messages=prompts[i % len(prompts)], max_tokens=4, temperature=0.0
        )
    return time.perf_counter() - t0


class SmokeReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rows: int
    score: float  # exact match on the held-out sample
    # Compared with: "offline items" (per item, same rows), "offline score" (a figure
    # given by hand), or "none" (text and EOS only).
    compared_with: Literal["offline items", "offline score", "none"]
    expected_score: float | None  # the offline exact match (on these rows, per item)
    regressions: int | None  # items right offline, wrong when served (per item only)
    tolerance: float
    text_rate: float  # share of answers with some text
    stop_rate: float  # share that ended on EOS (finish_reason "stop")
    failures: list[str]
    samples: list[dict[str, str]]  # a few (prompt, answer, reference[, offline])

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass(frozen=True)
class SmokeJudgement:
    score: float
    text_rate: float
    stop_rate: float
    failures: list[str]
    expected_score: float | None = None
    regressions: list[int] = field(default_factory=list)  # indices into the answers


def judge_smoke(
    answers: Sequence[tuple[str, str | None]],
    references: Sequence[str],
    expected_score: float | None,
    smoke: SmokeConfig,
    offline: Sequence[str] | None = None,
) -> SmokeJudgement:
    """Judge answers ``(text, finish_reason)`` against their references.

    Exact match is ``tasks.core.eval_metrics.exact_match``, the offline evaluation's own
    normalisation. With ``offline`` (the offline evaluation's answers to the *same*
    rows, in order) the comparison is per item: the served model fails when more than
    ``smoke.tolerance`` x rows of the items the offline evaluation answered correctly
    come back wrong (with the default 0.05 and 32 rows: at most one). Both sides decode
    greedily, so only numerics may flip an answer (vLLM in bf16, evaluation in fp32);
    gains elsewhere do not buy back losses. Without ``offline``, a plain
    ``expected_score`` is a mean: the served exact match must reach
    ``expected_score - smoke.tolerance``.
    """
    n = len(answers)
    if n == 0:
        return SmokeJudgement(0.0, 0.0, 0.0, ["no held-out rows to test with"])
    text_rate = sum(bool(a.strip()) for a, _ in answers) / n
    stop_rate = sum(fr == "stop" for _, fr in answers) / n
    served_ok = [bool(exact_match(a, r)) for (a, _), r in zip(answers, references, strict=True)]
    score = sum(served_ok) / n
    failures = []
    if text_rate < smoke.min_rate:
        failures.append(f"only {text_rate:.0%} of answers contain text (need {smoke.min_rate:.0%})")
    if stop_rate < smoke.min_rate:
        failures.append(
            f"only {stop_rate:.0%} of answers stopped on EOS within {smoke.max_tokens} tokens "
            f"(need {smoke.min_rate:.0%})"
        )
    regressions: list[int] = []
    if offline is not None:
        offline_ok = [bool(exact_match(o, r)) for o, r in zip(offline, references, strict=True)]
        expected_score = sum(offline_ok) / n
        regressions = [i for i in range(n) if offline_ok[i] and not served_ok[i]]
        if len(regressions) > smoke.tolerance * n + 1e-9:
            failures.append(
                f"{len(regressions)} of {n} held-out items the offline evaluation answered "
                f"correctly are wrong when served (exact match {score:.3f} vs "
                f"{expected_score:.3f} offline on the same rows; tolerance {smoke.tolerance:g}"
                f" allows {math.floor(smoke.tolerance * n + 1e-9)})"
            )
    elif expected_score is not None and score < expected_score - smoke.tolerance:
        failures.append(
            f"held-out exact match {score:.3f} is below the offline evaluation's "
            f"{expected_score:.3f} minus the tolerance {smoke.tolerance:g}"
        )
    return SmokeJudgement(score, text_rate, stop_rate, failures, expected_score, regressions)


def smoke_test(
    client: Any,
    model: str,
    rows: Sequence[Mapping[str, Any]],
    expected_score: float | None,
    smoke: SmokeConfig,
    offline: Sequence[str] | None = None,
) -> SmokeReport:
    """Ask every held-out row greedily and compare with the offline evaluation.

    Passes when answers carry text, stop on EOS (``finish_reason == "stop"``, not
    "length") and the exact match holds up against the offline evaluation within
    ``smoke.tolerance`` (per item with ``offline``, see :func:`judge_smoke`).
    """
    prompts, refs, answers = [], [], []
    for row in rows:
        prompt, ref = split_row(row)
        r = client.chat.completions.create(
            model=model, messages=prompt, max_tokens=smoke.max_tokens, temperature=0.0
        )
        choice = r.choices[0]
        answers.append((choice.message.content or "", choice.finish_reason))
        prompts.append(prompt[-1]["content"])
        refs.append(ref)
    j = judge_smoke(answers, refs, expected_score, smoke, offline)
    first = [j.regressions, [i for i in range(len(answers)) if i not in j.regressions]]
    samples = []
    for i in [*first[0], *first[1]][:5]:  # regressions first: they explain a failure
        sample = {"prompt": prompts[i], "answer": answers[i][0], "reference": refs[i]}
        if offline is not None:
            sample["offline"] = offline[i]
        samples.append(sample)
    compared: Literal["offline items", "offline score", "none"] = (
        "offline items"
        if offline is not None
        else "offline score"
        if expected_score is not None
        else "none"
    )
    return SmokeReport(
        rows=len(answers),
        score=j.score,
        compared_with=compared,
        expected_score=j.expected_score,
        regressions=len(j.regressions) if offline is not None else None,
        tolerance=smoke.tolerance,
        text_rate=j.text_rate,
        stop_rate=j.stop_rate,
        failures=j.failures,
        samples=samples,
    )


def slo_violations(report: LoadReport, lt: LoadTestConfig) -> list[str]:
    """The SLOs ``report`` misses (empty: all met)."""
    out = []
    if report.requests == 0:
        out.append("the load test completed no requests")
    if report.error_rate > lt.slo_max_error_rate:
        out.append(
            f"error rate {report.error_rate:.2%} > SLO {lt.slo_max_error_rate:.2%} "
            f"({report.errors} of {report.requests}: {'; '.join(report.error_samples[:2])})"
        )
    if lt.slo_p99_s is not None and not report.p99_s <= lt.slo_p99_s:
        out.append(f"p99 latency {report.p99_s:.3f}s > SLO {lt.slo_p99_s:g}s")
    if lt.slo_p99_ttft_s is not None and not report.p99_ttft_s <= lt.slo_p99_ttft_s:
        out.append(f"p99 time to first token {report.p99_ttft_s:.3f}s > SLO {lt.slo_p99_ttft_s:g}s")
    if lt.slo_min_tokens_per_s is not None and report.tokens_per_s < lt.slo_min_tokens_per_s:
        out.append(f"{report.tokens_per_s:.1f} tokens/s < SLO {lt.slo_min_tokens_per_s:g}")
    return out


DEFAULT_PROMPTS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Say hello."}],
    [{"role": "user", "content": "Name the topic of the sentence: the soup was too salty."}],
]


def prove(
    server: Server,
    cfg: DeployConfig,
    rows: Sequence[Mapping[str, Any]],
    expected_score: float | None,
    tracker: Tracker,
    metrics: dict[str, float],
    offline: Sequence[str] | None = None,
    *,
    home: Home,
) -> tuple[str, str]:
    """Warm-up, smoke test, load test + SLOs against a healthy server; raises on a miss.
    The load comes from vLLM's benchmark tool (:mod:`tasks.serve.loadgen`).

    ``offline`` are the offline evaluation's answers to ``rows`` (same order), for the
    per-item comparison of :func:`judge_smoke`. Numbers go into ``metrics`` (and the
    tracker) as they come, so a failed check still records what it measured. Returns
    a (prompt, answer) sample for the user.
    """
    client = client_for(server)
    name = server.state.served_model_name
    prompts = [split_row(r)[0] for r in rows] or DEFAULT_PROMPTS
    try:
        metrics["warmup_s"] = warm_up(client, name, prompts, cfg.warmup_requests)
        if cfg.smoke.enabled:
            if not rows:
                log.warning("smoke test without held-out rows: text and EOS checked only")
            smoke = smoke_test(
                client,
                name,
                rows or _prompt_rows(prompts),
                expected_score if rows else None,
                cfg.smoke,
                offline if rows else None,
            )
            _judge_smoke_report(smoke, name, tracker, metrics)
        if cfg.load_test.enabled:
            st = server.state
            report = run_load(
                cfg,
                home,
                f"http://{_url_host(st.host)}:{st.port}",
                server.api_key,
                name,
                st.model_path,
                LoadSpec.of_load_test(cfg.load_test),
                server_dir(home, st.port) / "load",
            )
            _judge_load_report(report, cfg.load_test, tracker, metrics)
        return _sample(client, name, prompts[0])
    finally:
        tracker.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)})


def _judge_smoke_report(
    smoke: SmokeReport, name: str, tracker: Tracker, metrics: dict[str, float]
) -> None:
    """Record the smoke test's numbers and report; raise when it failed."""
    metrics |= {
        "smoke_score": smoke.score,
        "smoke_stop_rate": smoke.stop_rate,
        "smoke_text_rate": smoke.text_rate,
    }
    if smoke.expected_score is not None:
        metrics["smoke_expected_score"] = smoke.expected_score
    if smoke.regressions is not None:
        metrics["smoke_regressions"] = float(smoke.regressions)
    tracker.log_dict(smoke.model_dump(mode="json"), "serve/smoke.json")
    if not smoke.passed:
        raise SmokeTestError(
            f"smoke test of {name!r} failed: "
            + "; ".join(smoke.failures)
            + f". Samples: {smoke.samples[:3]}"
        )


def _judge_load_report(
    report: LoadReport, lt: LoadTestConfig, tracker: Tracker, metrics: dict[str, float]
) -> None:
    """Record the load test's numbers and report; raise when it missed an SLO."""
    metrics |= report.metrics()
    tracker.log_dict(report.model_dump(mode="json"), "serve/load.json")
    missed = slo_violations(report, lt)
    if missed:
        raise SLOViolationError(
            "load test missed its SLOs: "
            + "; ".join(missed)
            + f" ({report.requests} requests at concurrency {report.concurrency})"
        )


def _prompt_rows(prompts: Sequence[list[dict[str, str]]]) -> list[dict[str, Any]]:
    # Rows without a reference: the placeholder answer never matches, and without an
    # expected score the exact match is not judged.
    return [{"messages": [*p, {"role": "assistant", "content": ""}]} for p in prompts]


def _sample(client: Any, model: str, prompt: list[dict[str, str]]) -> tuple[str, str]:
    r = client.chat.completions.create(model=model, messages=prompt, max_tokens=32, temperature=0.0)
    return prompt[-1]["content"], (r.choices[0].message.content or "").strip()
