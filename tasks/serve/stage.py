"""The serving stage: serve a model, prove it, hand back its reference and summary."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tasks.core.artifacts import GENERATIONS_FILE, heldout_rows, offline_answers, split_row
from tasks.core.config import ConfigError, DeployConfig
from tasks.core.home import Home, resolve_home
from tasks.core.interrupt import signals_as_interrupt
from tasks.core.refs import DeployRef, EvalRef, write_json_atomic
from tasks.core.tracking import NullTracker, Tracker
from tasks.serve.checks import prove
from tasks.serve.errors import ServeError
from tasks.serve.model import Resolver, resolve_model
from tasks.serve.process import (
    Server,
    ServerState,
    log_tail,
    mark_ready,
    server_dir,
    start_server,
    stop_server,
)

log = logging.getLogger(__name__)

STAGE = "serve"


def offline_answers_of(evaluation: EvalRef) -> dict[str, str]:
    """The per-item answers of what gets served, from the evaluation stage's reference:
    its folder ``path`` and its ``candidate`` label."""
    return offline_answers(Path(evaluation.path) / GENERATIONS_FILE, evaluation.candidate)


def with_overrides(
    cfg: DeployConfig, host: str | None = None, port: int | None = None
) -> DeployConfig:
    """``cfg`` with a command line's host/port, validated like the recipe's own."""
    update = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    if not update:
        return cfg
    try:
        return DeployConfig.model_validate({**cfg.model_dump(), **update})
    except ValueError as exc:
        raise ConfigError(f"deploy override {update}: {exc}") from None


def deploy(
    cfg: DeployConfig,
    model: str | os.PathLike[str],
    *,
    home: Home | None = None,
    tracker: Tracker | None = None,
    heldout: Sequence[Mapping[str, Any]] | Path | str | None = None,
    expected_score: float | None = None,
    offline: Mapping[str, str] | None = None,
    host: str | None = None,
    port: int | None = None,
    resolver: Resolver | None = None,
    run_id: str | None = None,
    api_key: tuple[str, str] | None = None,
    endpoint_port: int | None = None,
) -> DeployRef:
    """Serve ``model`` and prove it before traffic: health, warm-up, smoke, load + SLOs.

    ``heldout`` are chat rows whose last turn is the reference answer (the data
    stage's validation split, a list or a JSONL path). ``offline`` maps a row's id
    (see ``tasks.core.artifacts.heldout_rows``) to the offline evaluation's answer for it (see
    ``tasks.core.artifacts.offline_answers``): the smoke test then asks the first ``smoke.rows`` rows
    that have one and compares item by item. Else ``expected_score``, the offline
    exact match as one figure, is compared with the mean. Without rows the smoke test
    checks text and EOS only. ``resolver`` resolves ``NAME@alias`` (see :func:`registry_resolver`).
    Returns a :class:`DeployRef`; the server keeps running. Any failure stops it.
    """
    home = home or resolve_home()
    tracker = tracker or NullTracker()
    cfg = with_overrides(cfg, host=host, port=port)
    # A signal becomes an exception here, so the failure paths below stop the server.
    with signals_as_interrupt():
        resolved = resolve_model(model, resolver)
        rows, offline_list = held_out_with_answers(cfg.smoke.rows, heldout, offline)
        # Serving settings may change when a failed run is resumed (another port).
        tracker.log_attempt_params(
            {
                "serve.model": resolved.spec,
                "serve.model_path": str(resolved.path),
                "serve.version": resolved.label,
                "serve.kind": resolved.kind,
                "serve.host": cfg.host,
                # behind the endpoint: its port (what clients use), and the version's own
                "serve.port": endpoint_port or cfg.port,
                **({"serve.backend_port": cfg.port} if endpoint_port else {}),
            }
        )
        t0 = time.perf_counter()
        try:
            server = start_server(
                cfg, resolved, home, run_id=run_id, api_key=api_key, endpoint_port=endpoint_port
            )
        except ServeError as exc:
            tracker.log_text(str(exc), "serve/start-failure.txt")
            raise
        metrics = {"startup_s": time.perf_counter() - t0}
        log.info("vLLM healthy after %.1fs", metrics["startup_s"])
        state, sample = _prove_or_stop(
            server, cfg, home, tracker, resolved.spec, rows, expected_score, offline_list, metrics
        )
    ref = _deploy_ref(home, state, metrics, sample)
    write_json_atomic(server_dir(home, state.port) / "deploy.json", ref.model_dump(mode="json"))
    tracker.set_tags({"slothflow.serve.endpoint": ref.endpoint})
    return ref


def held_out_with_answers(
    n: int,
    heldout: Sequence[Mapping[str, Any]] | Path | str | None,
    offline: Mapping[str, str] | None,
) -> tuple[list[dict[str, Any]], list[str] | None]:
    """The first ``n`` held-out rows (those with an offline answer when ``offline`` is
    given) and the offline answers to them, in the same order: what the smoke test and
    the canary's probe ask. Malformed rows fail here, before a server starts."""
    pairs = heldout_rows(heldout) if heldout is not None else []
    offline_list: list[str] | None = None
    if offline is not None and pairs:
        pairs = [(i, r) for i, r in pairs if i in offline]
        if not pairs:
            raise ConfigError(
                "none of the held-out rows has an offline result: were they evaluated?"
            )
        offline_list = [offline[i] for i, _ in pairs[:n]]
    rows = [r for _, r in pairs[:n]]
    try:
        for row in rows:
            split_row(row)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"held-out rows for the smoke test: {exc}") from None
    return rows, offline_list


def _prove_or_stop(
    server: Server,
    cfg: DeployConfig,
    home: Home,
    tracker: Tracker,
    spec: str,
    rows: list[dict[str, Any]],
    expected_score: float | None,
    offline: list[str] | None,
    metrics: dict[str, float],
) -> tuple[ServerState, tuple[str, str]]:
    """:func:`prove` the started server and mark it ready, or stop it. Returns the
    ready state and a (prompt, answer) sample."""
    state = server.state
    try:
        sample = prove(server, cfg, rows, expected_score, tracker, metrics, offline, home=home)
        return mark_ready(state, home), sample
    except BaseException as exc:
        tracker.log_text(log_tail(state.log_path, 200), "serve/server-log-tail.txt")
        stop_server(state, home, cfg.stop_timeout_s)
        if isinstance(exc, Exception) and not isinstance(exc, ServeError):
            # e.g. the openai client's APIError: name the server's side of it too
            raise ServeError(
                f"serving {spec} failed: {type(exc).__name__}: {exc}. "
                f"Last lines of {state.log_path}:\n{log_tail(state.log_path)}"
            ) from exc
        raise


def _deploy_ref(
    home: Home, state: ServerState, metrics: dict[str, float], sample: tuple[str, str]
) -> DeployRef:
    return DeployRef(
        stage=STAGE,
        path=str(server_dir(home, state.port)),
        endpoint=state.base_url,
        served_model_name=state.served_model_name,
        host=state.host,
        port=state.port,
        pid=state.pid,
        model_spec=state.model_spec,
        model_path=state.model_path,
        version=state.version,
        api_key_source=state.api_key_source,
        log_path=state.log_path,
        startup_s=metrics["startup_s"],
        metrics=metrics,
        sample_prompt=sample[0],
        sample_answer=sample[1],
    )


def serving_summary(ref: DeployRef) -> dict[str, str]:
    """What the end of ``slothflow run`` prints: a sample answer, the endpoint, how to stop.

    Keys: ``endpoint``, ``model``, ``sample_prompt``, ``sample_answer``, ``api_key``
    (where the key lives, never the key), ``try`` (a curl line), ``stop``.
    """
    key_hint = _key_hint(ref.api_key_source)
    return {
        "endpoint": ref.endpoint,
        "model": ref.served_model_name,
        "sample_prompt": ref.sample_prompt,
        "sample_answer": ref.sample_answer,
        "api_key": key_hint,
        "try": (
            f'curl -s {ref.endpoint}/chat/completions -H "Authorization: Bearer $KEY" '
            f'-H \'Content-Type: application/json\' -d \'{{"model": "{ref.served_model_name}", '
            '"messages": [{"role": "user", "content": "Hello"}]}\''
        ),
        "stop": f"slothflow serve stop --port {ref.port}",
    }


def summary_lines(ref: DeployRef) -> list[str]:
    """:func:`serving_summary` as plain lines for a terminal (no markup, never wrapped)."""
    s = serving_summary(ref)
    m = ref.metrics
    lines = [
        f"serving {ref.model_spec} ({ref.version}) as {s['model']!r}, pid {ref.pid}",
        f"  endpoint: {s['endpoint']}",
        f"  sample:   {s['sample_prompt']!r} -> {s['sample_answer']!r}",
    ]
    if "load_p99_latency_s" in m:
        lines.append(
            f"  load:     p50 {m['load_p50_latency_s']:.3f}s, p99 {m['load_p99_latency_s']:.3f}s, "
            f"{m['load_tokens_per_s']:.0f} tokens/s at concurrency "
            f"{m['load_concurrency']:.0f}, errors {m['load_error_rate']:.1%}"
        )
    return [
        *lines,
        f"  api key:  {s['api_key']}",
        f"  try:      {s['try']}",
        f"  stop:     {s['stop']}",
    ]


def _key_hint(source: str) -> str:
    kind, _, where = source.partition(":")
    if kind == "file":
        return f"KEY=$(cat {where})"
    if kind == "env":
        return f"KEY=${where}"
    return f"the Prefect Secret block {where!r}"
