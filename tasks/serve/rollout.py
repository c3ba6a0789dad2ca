"""A rollout: a new version behind the stable endpoint, proven on its own port first.

1. Under the endpoint's lock (two rollouts to one endpoint never interleave), the new
   version's vLLM server starts on a free loopback port with the endpoint's API key and
   passes the serving checks there (:func:`~tasks.serve.stage.deploy`: health, warm-up,
   smoke test against the offline answers, load test with SLOs). Nothing has changed
   for clients yet; a failure stops the new server and leaves the old one serving.
2. Over a serving version, the canary (:mod:`tasks.serve.canary`): a share of the
   traffic at each of ``deploy.canary.steps``, judged on both servers' ``/metrics`` and
   a quality probe through the endpoint. A step that fails routes everything back to
   the serving version at once and stops the new one.
3. The endpoint switches to it: nginx starts (the first version) or reloads with all
   traffic to it (later ones); :func:`~tasks.serve.endpoint.route` returns once
   answers come from the new configuration.
4. The versions it replaced drain (their in-flight requests finish: vLLM's own
   ``vllm:num_requests_running``/``waiting`` gauges reach 0) and stop.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tasks.core.config import ConfigError, DeployConfig
from tasks.core.home import Home, resolve_home
from tasks.core.orchestration import stage_task
from tasks.core.refs import DeployRef, EvalRef, RunContext, load_ref, write_json_atomic
from tasks.core.tracking import TAG_RUN_ID, NullTracker, Tracker
from tasks.core.tracking import registry as reg
from tasks.core.tracking.registry import cache_dir
from tasks.serve.canary import CanaryInputs, run_canary
from tasks.serve.command import resolve_command
from tasks.serve.endpoint import (
    KEY_FILE,
    Backend,
    EndpointState,
    endpoint_dir,
    endpoint_lock,
    endpoints,
    read_endpoint,
    resolve_nginx,
    route,
    start_endpoint,
    stop_endpoint,
)
from tasks.serve.errors import PortBusyError, ServeError
from tasks.serve.model import Resolver, registry_resolver
from tasks.serve.process import (
    ServerState,
    free_port,
    new_api_key,
    port_in_use,
    read_state,
    server_dir,
    servers,
    stop_server,
)
from tasks.serve.stage import (
    STAGE,
    deploy,
    held_out_with_answers,
    offline_answers_of,
    with_overrides,
)

log = logging.getLogger(__name__)

#: Backends bind loopback only: clients reach them through the endpoint.
BACKEND_HOST = "127.0.0.1"


def check_endpoint_plan(cfg: DeployConfig, home: Home) -> None:
    """What :func:`rollout` would refuse, checked before a run trains for minutes: nginx
    exists, and ``deploy.port`` is free or this home's endpoint (which the new version
    then replaces, unless ``deploy.replace`` is false)."""
    resolve_command(cfg.vllm_command)
    resolve_nginx(cfg.nginx_command)
    current = read_endpoint(home, cfg.port)
    if current is not None:
        if not cfg.replace:
            raise PortBusyError(
                f"deploy.port {cfg.port} already serves {_versions(current)}; with "
                "deploy.replace=false a rollout over it is refused (stop it with "
                f"`slothflow serve stop --port {cfg.port}`)"
            )
        return
    if port_in_use(cfg.host, cfg.port):
        raise PortBusyError(
            f"deploy.port {cfg.port} on {cfg.host} is already in use by another program; "
            "choose another with --set deploy.port=N (or stop that program)"
        )


def rollout(
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
) -> DeployRef:
    """Serve ``model`` behind the stable endpoint on ``deploy.port`` (see the module
    docstring). Returns the new version's reference, its ``endpoint`` the stable URL."""
    home = home or resolve_home()
    tracker = tracker or NullTracker()
    cfg = with_overrides(cfg, host=host, port=port)
    resolve_nginx(cfg.nginx_command)  # before a server starts
    with endpoint_lock(home, cfg.port):
        current = read_endpoint(home, cfg.port)
        if current is None or not cfg.replace:
            check_endpoint_plan(cfg, home)
        backend_port = free_port(BACKEND_HOST)
        t0 = time.perf_counter()
        key = _endpoint_key(cfg, home, current)
        ref = deploy(
            cfg,
            model,
            home=home,
            tracker=tracker,
            heldout=heldout,
            expected_score=expected_score,
            offline=offline,
            host=BACKEND_HOST,
            port=backend_port,
            resolver=resolver,
            run_id=run_id,
            api_key=key,
            endpoint_port=cfg.port,
        )
        new = Backend(
            port=backend_port, version=_short(ref.version), model_spec=ref.model_spec, weight=100
        )
        canary_steps: list[dict[str, Any]] = []
        try:
            if current is not None and current.serving and cfg.canary.enabled:
                _check_same_name(cfg, current, ref)
                canary_steps = _canary(
                    home, cfg, current, new, ref, key[0], tracker, heldout, offline
                )
            state = _switch(home, cfg, current, ref, new)
        except BaseException as exc:
            # A reload may already route to the new version (a canary step, or a signal
            # while waiting for the switch to take): traffic goes back to the old one
            # first, then the new one stops; after a failed check once the requests it
            # still carries are done (a Ctrl-C does not wait for them).
            if current is not None:
                _restore(home, cfg, current)
                if isinstance(exc, Exception):
                    drain(backend_port, cfg.stop_timeout_s)
            _stop_backend(home, backend_port, cfg.stop_timeout_s)
            raise
        replaced = [b for b in (current.backends if current else []) if b.port != backend_port]
        for b in replaced:
            drain(b.port, cfg.stop_timeout_s * 3)
            _stop_backend(home, b.port, cfg.stop_timeout_s)
        switch_s = time.perf_counter() - t0 - ref.metrics.get("startup_s", 0.0)
        rollout_metrics = {
            "rollout_replaced_versions": float(len(replaced)),
            "rollout_canary_steps": float(len(canary_steps)),
        }
        tracker.log_metrics(rollout_metrics)
        tracker.set_tags(
            {
                "slothflow.serve.endpoint": state.base_url,
                "slothflow.serve.backend_port": str(backend_port),
                "slothflow.serve.replaced": ", ".join(b.version for b in replaced) or "-",
            }
        )
        log.info(
            "%s serves %s (replaced: %s; checks and switch %.1fs)",
            state.base_url,
            new.version,
            ", ".join(b.version for b in replaced) or "nothing",
            switch_s,
        )
    served = ref.model_copy(
        update={
            "endpoint": state.base_url,
            "host": state.host,
            "port": state.port,
            "backend_port": backend_port,
            "api_key_source": state.api_key_source,
            "metrics": {**ref.metrics, **rollout_metrics},
        }
    )
    write_json_atomic(Path(ref.path) / "deploy.json", served.model_dump(mode="json"))
    return served


def _switch(
    home: Home,
    cfg: DeployConfig,
    current: EndpointState | None,
    ref: DeployRef,
    new: Backend,
) -> EndpointState:
    """All traffic to ``new``: a new endpoint, or the current one re-routed."""
    if current is None:
        return start_endpoint(
            home,
            cfg.nginx_command,
            cfg.host,
            cfg.port,
            ref.served_model_name,
            ref.api_key_source,
            [new],
        )
    _check_same_name(cfg, current, ref)
    return route(home, cfg.nginx_command, read_endpoint(home, cfg.port) or current, [new])


def _check_same_name(cfg: DeployConfig, current: EndpointState, ref: DeployRef) -> None:
    if current.served_model_name != ref.served_model_name:
        raise ServeError(
            f"deploy.port {cfg.port} serves the model name {current.served_model_name!r} and "
            f"{ref.model_spec} would answer as {ref.served_model_name!r}: clients keep one "
            "name across versions. Serve it on another deploy.port, or stop the endpoint first"
        )


def _canary(
    home: Home,
    cfg: DeployConfig,
    current: EndpointState,
    new: Backend,
    ref: DeployRef,
    key: str,
    tracker: Tracker,
    heldout: Sequence[Mapping[str, Any]] | Path | str | None,
    offline: Mapping[str, str] | None,
) -> list[dict[str, Any]]:
    """The canary steps of ``new`` beside the serving version(s) (module docstring)."""
    from openai import OpenAI

    rows: list[dict[str, Any]] = []
    answers: list[str] | None = None
    if heldout is not None and offline is not None and cfg.canary.probe_rows:
        rows, answers = held_out_with_answers(cfg.canary.probe_rows, heldout, offline)
    else:
        log.info("canary: no offline answers to compare with; the quality probe is skipped")
    state = current

    def route_to(backends: list[Backend]) -> EndpointState:
        nonlocal state
        state = route(home, cfg.nginx_command, state, backends)
        return state

    inputs = CanaryInputs(
        home=home,
        cfg=cfg,
        state=current,
        new=new,
        api_key=key,
        served_model_name=ref.served_model_name,
        tokenizer=ref.model_path,
        client=OpenAI(base_url=current.base_url, api_key=key, max_retries=0, timeout=60),
        rows=rows,
        offline=answers,
        out_dir=endpoint_dir(home, cfg.port) / "canary",
    )
    log.info(
        "canary of %s beside %s: steps %s%% of %.0fs each",
        new.version,
        _versions(current),
        "/".join(map(str, cfg.canary.steps)),
        cfg.canary.window_s,
    )
    return run_canary(inputs, route_to, tracker)


def _restore(home: Home, cfg: DeployConfig, before: EndpointState) -> None:
    """Route the endpoint as it was before this rollout, if it changed (best effort: a
    failure here is logged, the rollout's own error is what gets raised)."""
    now = read_endpoint(home, before.port)
    if now is None or now.backends == before.backends:
        return
    try:
        route(home, cfg.nginx_command, now, before.backends)
        log.warning("the endpoint on port %d routes to %s again", before.port, _versions(before))
    except Exception:
        log.exception("could not route the endpoint on port %d back", before.port)


def _endpoint_key(cfg: DeployConfig, home: Home, current: EndpointState | None) -> tuple[str, str]:
    """The key every version behind the endpoint takes: the configured one, else the
    endpoint's own file (created with its first version)."""
    if cfg.api_key is not None:
        value, source = cfg.api_key.resolve_with_source(required=True)
        assert value is not None  # required=True raises instead
        return value, source
    d = endpoint_dir(home, cfg.port)
    path = d / KEY_FILE
    if current is not None and path.exists():
        return path.read_text(encoding="utf-8").strip(), f"file:{path}"
    d.mkdir(parents=True, exist_ok=True)
    return new_api_key(d)


def _short(version: str) -> str:
    """``NAME/3 (champion)`` -> ``NAME/3``: the version a response header names."""
    return version.split(" (", 1)[0]


def _versions(state: EndpointState) -> str:
    return ", ".join(f"{b.model_spec} ({b.version})" for b in state.serving) or "nothing"


# --------------------------------------------------------------------------- registered versions


def check_release_spec(spec: str) -> None:
    """A rollout takes a registered version, never a path: a run form or a webhook may
    not name files on the worker to serve."""
    if not reg.is_spec(spec):
        raise ConfigError(
            f"model {spec!r}: a rollout takes a registered version, NAME/VERSION or "
            "NAME@alias (e.g. slothflow-embedded/3), not a path"
        )


def resolve_version(spec: str, tracking_uri: str) -> tuple[str, int]:
    """``NAME/VERSION`` or ``NAME@alias`` -> (name, version number)."""
    check_release_spec(spec)
    name, alias, version = reg.parse_spec(spec)
    if version is not None:
        return name, version
    aliases = reg.model_aliases(reg.client(tracking_uri), name)
    if aliases is None:
        raise ConfigError(f"{spec}: no registered model {name!r}")
    if alias not in aliases:
        raise ConfigError(
            f"{spec}: {name} has no alias {alias!r} (aliases: "
            + (", ".join(f"{a}={v}" for a, v in sorted(aliases.items())) or "none")
            + ")"
        )
    return name, aliases[alias]


def _offline_of(home: Home, tags: Mapping[str, str]) -> tuple[str | None, dict[str, str] | None]:
    """The held-out rows and offline answers of the run that registered a version, when
    that run's folder is in this home: the rollout's smoke test then compares the served
    answers with them item by item, as the run's own serve stage did."""
    run_id = tags.get(TAG_RUN_ID)
    if not run_id:
        return None, None
    run_dir = home.run_dir(run_id)
    heldout = run_dir / "data" / "validation.jsonl"
    try:
        evaluation = load_ref(run_dir / "evaluate", EvalRef)
    except (FileNotFoundError, ValueError):
        return None, None
    if not heldout.exists():
        return None, None
    return str(heldout), offline_answers_of(evaluation)


def release(
    cfg: DeployConfig,
    spec: str,
    tracking_uri: str,
    *,
    home: Home | None = None,
    tracker: Tracker | None = None,
    heldout: str | None = None,
    offline: Mapping[str, str] | None = None,
    run_id: str | None = None,
) -> DeployRef:
    """A registered version whose gate passed, rolled out behind the endpoint, then made
    ``champion`` (the old champion becomes ``previous``, ``challenger`` is cleared). The
    aliases move only once it serves: a failed rollout raises before. The pipeline's
    serve stage, ``slothflow models promote``/``rollback`` and the ``rollout``
    deployment all release through here."""
    home = home or resolve_home()
    tracker = tracker or NullTracker()
    name, version = resolve_version(spec, tracking_uri)
    client = reg.client(tracking_uri)
    try:
        tags = reg.version_tags(client, name, version)
    except Exception as exc:  # MLflow's not-found, named for a person
        raise ConfigError(f"{name}/{version}: no such registered version ({exc})") from None
    if tags.get("gate") != "passed":
        raise ConfigError(
            f"{name}/{version} did not pass its gate (tag gate={tags.get('gate', 'missing')!r}): "
            "only gated versions are rolled out"
        )
    if heldout is None:
        heldout, offline = _offline_of(home, tags)
    ref = rollout(
        cfg,
        f"{name}/{version}",
        home=home,
        tracker=tracker,
        heldout=heldout,
        offline=offline,
        resolver=registry_resolver(tracking_uri, cache_dir(home, tracking_uri)),
        run_id=run_id,
    )
    reg.promote(name, version, tracking_uri)
    aliases = reg.model_aliases(client, name) or {}
    tracker.set_tags({"slothflow.serve.champion": f"{name}/{version}"})
    log.info(
        "%s/%d serves behind %s and is the champion; previous: %s",
        name,
        version,
        ref.endpoint,
        aliases.get(reg.PREVIOUS, "none"),
    )
    served = ref.model_copy(update={"aliases": aliases})
    write_json_atomic(Path(ref.path) / "deploy.json", served.model_dump(mode="json"))
    return served


@stage_task(name="rollout", retries=0)
def release_task(cfg: DeployConfig, model: str, tracking_uri: str) -> dict[str, Any]:
    """The ``rollout`` deployment's one task: :func:`release`. Not retried: a version
    that fails its checks will again, and a half-done rollout has already been undone."""
    ref = release(cfg, model, tracking_uri, home=resolve_home())
    return {
        "model": ref.model_spec,
        "endpoint": ref.endpoint,
        "backend_port": ref.backend_port,
        "aliases": ref.aliases,
    }


# --------------------------------------------------------------------------- drain, stop


def _gauge(text: str, name: str) -> float:
    """Sum of a Prometheus gauge's samples (all label sets) in a /metrics page."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (len(line) == len(name) or line[len(name)] in " {"):
            try:
                total += float(line.rsplit(" ", 1)[1])
            except (IndexError, ValueError):
                continue
    return total


def in_flight(port: int, timeout_s: float = 2.0) -> float | None:
    """Requests a backend is running or holding (vLLM's gauges), None if it is gone."""
    try:
        with urllib.request.urlopen(
            f"http://{BACKEND_HOST}:{port}/metrics", timeout=timeout_s
        ) as r:
            text = r.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError, TimeoutError):
        return None
    return _gauge(text, "vllm:num_requests_running") + _gauge(text, "vllm:num_requests_waiting")


def drain(port: int, timeout_s: float) -> None:
    """Wait until the backend on ``port`` holds no request (nginx sends it no new ones
    after the switch), at most ``timeout_s``: then it stops anyway."""
    deadline = time.monotonic() + timeout_s
    quiet = 0
    while time.monotonic() < deadline:
        n = in_flight(port)
        if n is None:
            return
        quiet = quiet + 1 if n == 0 else 0
        if quiet >= 2:  # two reads in a row: a request between them would show
            return
        time.sleep(0.5)
    log.warning(
        "the version on port %d still had requests after %.0fs; stopping it", port, timeout_s
    )


def _stop_backend(home: Home, port: int, timeout_s: float) -> None:
    state = read_state(server_dir(home, port) / "state.json")
    if state is not None:
        stop_server(state, home, timeout_s)


def stop_serving(
    home: Home, port: int | None = None, timeout_s: float = 20.0
) -> tuple[list[EndpointState], list[ServerState]]:
    """Stop the endpoint on ``port`` and every version behind it (all endpoints and
    servers of this home when ``port`` is None; a plain server's port stops that one).
    The endpoint first, so no request is routed to a stopping server."""
    stopped_endpoints = []
    for ep in endpoints(home):
        if port is None or ep.port == port:
            stop_endpoint(home, ep, timeout_s)
            stopped_endpoints.append(ep)
    ports = {ep.port for ep in stopped_endpoints}
    stopped = []
    for s in servers(home):
        if port is None or s.port == port or s.endpoint_port in ports or s.endpoint_port == port:
            stop_server(s, home, timeout_s)
            stopped.append(s)
    return stopped_endpoints, stopped


@stage_task(name=STAGE, retries=0)
def deploy_task(
    ctx: RunContext,
    cfg: DeployConfig,
    model: str,
    *,
    heldout_path: str | None,
    evaluation: EvalRef | None,
) -> DeployRef | None:
    """The pipeline's last stage. No retries: a model that answers badly or misses its
    SLOs will do so again, and a busy port needs a person.

    ``model`` is a folder or a registry spec (``NAME/VERSION``). ``evaluation`` (the
    evaluation stage's reference) supplies the offline per-item answers of the
    candidate on ``heldout_path``; the smoke test compares the served answers with
    them row by row (:func:`judge_smoke`). It is rolled out behind the stable endpoint
    on ``deploy.port`` (:func:`rollout`), replacing the version served there."""
    if not cfg.enabled:
        log.info("deploy.enabled is false; not serving")
        return None
    from tasks.core.run import stage

    home = resolve_home()
    uri = (ctx.tracking or {}).get("tracking_uri")
    offline = offline_answers_of(evaluation) if evaluation is not None and heldout_path else None
    with stage(ctx, STAGE) as tracker:
        if uri and reg.is_spec(model):
            # a registered version: served, then champion
            return release(
                cfg,
                model,
                uri,
                home=home,
                tracker=tracker,
                heldout=heldout_path,
                offline=offline,
                run_id=ctx.run_id,
            )
        return rollout(
            cfg,
            model,
            home=home,
            tracker=tracker,
            heldout=heldout_path,
            offline=offline,
            resolver=registry_resolver(uri, cache_dir(home, uri)) if uri else None,
            run_id=ctx.run_id,
        )
