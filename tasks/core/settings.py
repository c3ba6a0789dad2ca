"""The operator's settings: what a deployed run takes from the worker, never from its form.

Anyone who reaches the Prefect UI or API can post a run's parameters, so a deployed run's
parameters are a :class:`~tasks.core.config.PipelineForm`: the recipe without commands,
hosts, ports, credentials or the tracking server. The worker fills those in from its own
environment (:class:`WorkerSettings`, ``SLOTHFLOW_*`` and ``MLFLOW_TRACKING_URI``), and
checks every path or URL the form names (data sources, a local base model, a chat template)
against the roots and URL prefixes it allows (``SLOTHFLOW_ALLOWED_SOURCES``).

The worker's environment is the operator's: the work-pool templates in ``infra/`` declare
no ``env`` or ``command`` job variable, so a flow run cannot override these either.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tasks.core.config import (
    REPO_ROOT,
    ConfigError,
    DeployConfig,
    PipelineConfig,
    PipelineForm,
    SecretRef,
    build_config,
    is_embedded,
)
from tasks.core.home import Home

#: The environment variables a worker reads, with what each sets.
ENV = {
    "SLOTHFLOW_VLLM_COMMAND": "deploy.vllm_command (a shell-quoted command line)",
    "SLOTHFLOW_VLLM_EXTRA_ARGS": "deploy.extra_args (shell-quoted flags)",
    "SLOTHFLOW_NGINX_COMMAND": "deploy.nginx_command (the stable endpoint's nginx)",
    "SLOTHFLOW_BENCH_COMMAND": "deploy.bench_command (vLLM's `vllm bench serve`, shell-quoted)",
    "SLOTHFLOW_SERVE_HOST": "deploy.host",
    "SLOTHFLOW_SERVE_PORT": "deploy.port",
    "SLOTHFLOW_SERVE_API_KEY": "deploy.api_key: env:NAME or prefect-block:NAME (never the key)",
    "SLOTHFLOW_HUB_TOKEN": "export.hub_token: env:NAME or prefect-block:NAME",
    "SLOTHFLOW_ALLOWED_SOURCES": "comma-separated local roots and URL prefixes a form may read",
    "MLFLOW_TRACKING_URI": "tracking.tracking_uri (must be a server for worker-run deployments)",
}


class WorkerSettings(BaseModel):
    """A worker's own settings, read from its environment by :func:`from_env`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vllm_command: list[str] | None = None
    vllm_extra_args: list[str] = Field(default_factory=list)
    nginx_command: list[str] | None = None
    bench_command: list[str] | None = None
    serve_host: str | None = None
    serve_port: int | None = None
    serve_api_key: SecretRef | None = None
    hub_token: SecretRef | None = None
    #: Absolute local roots and URL prefixes (``s3://bucket/prefix/``); default: the
    #: repository's ``data/`` folder, the sample data and nothing else.
    allowed_sources: tuple[str, ...] = (str(REPO_ROOT / "data"),)
    #: Where stages hand their outputs to workers on other hosts (tasks/core/storage.py):
    #: an fsspec URL or a folder every worker mounts; None: the workers share the home.
    run_storage: str | None = None


def _secret_ref(name: str, spec: str) -> SecretRef:
    kind, sep, where = spec.partition(":")
    if not sep or kind not in ("env", "prefect-block"):
        raise ConfigError(f"{name}={spec!r}: must be env:NAME or prefect-block:NAME")
    try:
        return SecretRef(**{"env" if kind == "env" else "prefect_block": where})
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def from_env(environ: Mapping[str, str] | None = None) -> WorkerSettings:
    """The settings of this worker; a malformed variable is a ``ConfigError`` naming it."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    if cmd := env.get("SLOTHFLOW_VLLM_COMMAND", "").strip():
        values["vllm_command"] = shlex.split(cmd)
    if extra := env.get("SLOTHFLOW_VLLM_EXTRA_ARGS", "").strip():
        values["vllm_extra_args"] = shlex.split(extra)
    if nginx := env.get("SLOTHFLOW_NGINX_COMMAND", "").strip():
        values["nginx_command"] = shlex.split(nginx)
    if bench := env.get("SLOTHFLOW_BENCH_COMMAND", "").strip():
        values["bench_command"] = shlex.split(bench)
    if host := env.get("SLOTHFLOW_SERVE_HOST", "").strip():
        values["serve_host"] = host
    if port := env.get("SLOTHFLOW_SERVE_PORT", "").strip():
        if not port.isdigit():
            raise ConfigError(f"SLOTHFLOW_SERVE_PORT={port!r}: not a port number")
        values["serve_port"] = int(port)
    if key := env.get("SLOTHFLOW_SERVE_API_KEY", "").strip():
        values["serve_api_key"] = _secret_ref("SLOTHFLOW_SERVE_API_KEY", key)
    if token := env.get("SLOTHFLOW_HUB_TOKEN", "").strip():
        values["hub_token"] = _secret_ref("SLOTHFLOW_HUB_TOKEN", token)
    if allowed := env.get("SLOTHFLOW_ALLOWED_SOURCES", "").strip():
        entries = tuple(a.strip() for a in allowed.split(",") if a.strip())
        for a in entries:
            if "://" not in a and not Path(a).is_absolute():
                raise ConfigError(
                    f"SLOTHFLOW_ALLOWED_SOURCES: {a!r} is neither an absolute folder nor a URL "
                    "prefix (s3://bucket/prefix/)"
                )
        values["allowed_sources"] = entries
    if storage := env.get("SLOTHFLOW_RUN_STORAGE", "").strip():
        if "://" not in storage and not Path(storage).is_absolute():
            raise ConfigError(
                f"SLOTHFLOW_RUN_STORAGE={storage!r}: neither an fsspec URL (s3://bucket/prefix) "
                "nor an absolute folder"
            )
        values["run_storage"] = storage
    return WorkerSettings(**values)


def form_of(config: PipelineConfig | PipelineForm) -> PipelineForm:
    """The form part of a config: what a deployed run's parameters carry."""
    return PipelineForm.model_validate(_only_form_fields(PipelineForm, config.model_dump()))


def _only_form_fields(model: type[BaseModel], data: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        if name not in data:
            continue
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel) and isinstance(data[name], dict):
            out[name] = _only_form_fields(sub, data[name])
        else:
            out[name] = data[name]
    return out


def complete(form: PipelineForm, settings: WorkerSettings) -> PipelineConfig:
    """The full config of a deployed run: ``form`` checked against the worker's allowlist,
    plus the worker's commands, hosts, ports and secret references."""
    check_paths(form, settings.allowed_sources)
    raw = form.model_dump(mode="json")
    defaults = DeployConfig()
    raw["deploy"].update(
        vllm_command=settings.vllm_command or defaults.vllm_command,
        extra_args=settings.vllm_extra_args,
        nginx_command=settings.nginx_command or defaults.nginx_command,
        bench_command=settings.bench_command or defaults.bench_command,
        host=settings.serve_host or defaults.host,
        port=settings.serve_port or defaults.port,
        api_key=settings.serve_api_key.model_dump() if settings.serve_api_key else None,
    )
    if settings.hub_token is not None:
        raw["export"]["hub_token"] = settings.hub_token.model_dump()
    # tracking.tracking_uri stays unset: MLFLOW_TRACKING_URI of the worker decides.
    return build_config(raw, source="run parameters")


def check_paths(form: PipelineForm, allowed: tuple[str, ...]) -> None:
    """Refuse any path or URL in ``form`` outside ``allowed``; the error names the field."""
    named = [(f"data.sources[{i}]", s) for i, s in enumerate(form.data.sources)]
    if form.model.chat_template is not None:
        named.append(("model.chat_template", form.model.chat_template))
    base = form.model.name_or_path
    if not is_embedded(base) and (base.startswith(("/", ".", "~")) or "://" in base):
        named.append(("model.name_or_path", base))  # a hub id (org/name) is not a path
    for field, value in named:
        if not is_allowed(value, allowed):
            raise ConfigError(
                f"{field}: {value!r} is outside what this worker reads "
                f"(SLOTHFLOW_ALLOWED_SOURCES: {', '.join(allowed) or 'nothing'})"
            )


def local_candidates(name: str) -> list[Path]:
    """Where a local source name is looked for, in order: the working directory, then the
    repository (so the shipped sample works from any folder). The data stage reads the
    first that exists; the allowlist checks every one."""
    p = Path(name).expanduser()
    return [p] if p.is_absolute() else [Path.cwd() / p, REPO_ROOT / p]


def is_allowed(value: str, allowed: tuple[str, ...]) -> bool:
    if "::" in value:
        return False  # fsspec chains (filecache::..., simplecache::...) hide the real target
    if value.startswith("file://"):
        value = value.removeprefix("file://")
    if "://" in value:
        return any("://" in a and value.startswith(a) for a in allowed)
    roots = [Path(a).resolve() for a in allowed if "://" not in a]
    # What the data stage would read: the first candidate that exists. resolve(): symlinks
    # and '..' cannot climb out of a root.
    candidates = local_candidates(value)
    target = next((c for c in candidates if c.exists()), candidates[-1]).resolve()
    return any(target.is_relative_to(r) for r in roots)


def require_shared_tracking(config: PipelineConfig, home: Home, why: str) -> None:
    """A run whose stages run on workers records to one tracking server: a SQLite file or a
    local folder exists on one host only, and workers elsewhere would each write their own."""
    from tasks.core.tracking import redact_uri, resolve_tracking_uri

    uri = resolve_tracking_uri(config.tracking, home)
    scheme = uri.split("://", 1)[0] if "://" in uri else "file"
    if scheme in ("sqlite", "file"):
        raise ConfigError(
            f"tracking URI {redact_uri(uri)} is a local store, but {why}: stages on other "
            "workers could not record to it. Point MLFLOW_TRACKING_URI on every worker at an "
            "MLflow server (http://...) or a database."
        )
