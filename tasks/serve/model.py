"""What to serve: a local folder or a registry spec, resolved and checked servable."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from tasks.core.artifacts import ArtifactError, servable_manifest
from tasks.core.config import ConfigError
from tasks.core.refs import ResolvedModel
from tasks.core.tracking.registry import is_spec, resolve
from tasks.serve.errors import ModelNotFoundError

# A resolver turns a registry spec into the model on this machine.
Resolver = Callable[[str], ResolvedModel]


def registry_resolver(tracking_uri: str, cache_dir: Path) -> Resolver:
    """Resolve ``NAME@alias`` / ``NAME/version`` through the model registry (MLflow);
    downloads from a remote store go to ``cache_dir`` (see the registry's ``cache_dir``)."""

    def resolve_spec(spec: str) -> ResolvedModel:
        return resolve(spec, tracking_uri, cache_dir)

    return resolve_spec


def has_flag(args: Sequence[str], flag: str) -> bool:
    """Whether ``args`` set ``flag`` (``--flag value`` or ``--flag=value``)."""
    return any(a == flag or a.startswith(flag + "=") for a in args)


def resolve_model(spec: str | os.PathLike[str], resolver: Resolver | None = None) -> ResolvedModel:
    """A local folder as it is; ``NAME@alias`` / ``NAME/version`` through ``resolver``."""
    text = str(spec)
    folder = Path(text).expanduser()
    if folder.is_dir():
        folder = folder.resolve()
        try:
            manifest = servable_manifest(folder)
        except ArtifactError as exc:
            raise ModelNotFoundError(str(exc)) from None
        label = str(manifest.get("version") or f"local:{folder.name}")
        model = ResolvedModel(text, folder, manifest, label)
    elif is_spec(text) and resolver is not None:
        try:
            got = resolver(text)
        except (ConfigError, LookupError, FileNotFoundError) as exc:
            raise ModelNotFoundError(f"model {text!r}: {exc}") from None
        model = dataclasses.replace(got, spec=text, path=Path(got.path).resolve())
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
        if not has_flag(model.vllm_args, "--enable-lora"):
            raise ModelNotFoundError(f"{p}: an adapter's serving.vllm_args need --enable-lora")
        base = model.base_model
        if base is None:
            raise ModelNotFoundError(f"{p}: an adapter's manifest needs serving.model (the base)")
        if not Path(base, "config.json").exists():
            # Nothing downloads at run time: the base must be a folder on this machine.
            raise ModelNotFoundError(f"{p}: base model {base} is not a model folder here")
        return
    if has_flag(model.vllm_args, "--model"):
        return  # the manifest names the weights itself
    if not (p / "config.json").exists():
        raise ModelNotFoundError(f"{p} is not a model folder (no config.json)")
    if not any(p.glob("*.safetensors")):
        # Pickled weights (*.bin) can run code on load; the pipeline serves safetensors only.
        raise ModelNotFoundError(f"{p} has no *.safetensors weights (safetensors only)")
