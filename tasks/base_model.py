"""Stage ``base``: resolve the base model to something ``from_pretrained`` loads.

Three sources, one code path afterwards:

- ``embedded:tiny-llama``: built on the spot by :mod:`tasks.core.embedded` (no download);
- a local folder: loaded as it is, its revision a content hash;
- a hub id (``org/name``): the real ``from_pretrained(repo_id, revision=commit)``;
  offline (``HF_HUB_OFFLINE=1``) it reads the Hugging Face cache layout
  (``HF_HOME/hub/models--org--name/snapshots/<commit>``).

Weights load from safetensors only and ``trust_remote_code`` is never on: a model
that needs its own Python code, or ships only pickles, is refused here rather than
executed. The chat template is the tokenizer's own or ``model.chat_template``; a
tokenizer with neither is a configuration error (the trainer needs one to render
chat rows and to find the answer tokens for the assistant-only loss).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tasks.core import embedded
from tasks.core.config import (
    EMBEDDED_MODEL,
    EMBEDDED_SHAPES,
    REPO_ROOT,
    ConfigError,
    ModelConfig,
    is_embedded,
)
from tasks.core.home import Home
from tasks.core.models import (
    LOAD_KWARGS,
    template_sha256,
    template_text,
)
from tasks.core.orchestration import retry_transient, stage_task
from tasks.core.refs import BaseModelRef, RunContext, record_ref, sha256_json
from tasks.core.revision import is_hub_id, resolve_revision
from tasks.core.tracking import NullTracker, Tracker

log = logging.getLogger(__name__)

STAGE = "base"


def _hub_snapshot(repo_id: str, commit: str) -> Path | None:
    from huggingface_hub.constants import HF_HUB_CACHE

    snap = Path(HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--")) / "snapshots" / commit
    return snap if snap.is_dir() else None


def _check_loadable_folder(folder: Path, field: str = "model.name_or_path") -> None:
    """Refuse folders we must not or cannot load: pickled weights only, or custom code."""
    if not any(folder.glob("*.safetensors")):
        raise ConfigError(
            f"{field}: {folder} has no *.safetensors weights; slothflow loads safetensors "
            "only (pickled .bin weights can run code when loaded). Convert the weights first."
        )
    config = folder / "config.json"
    if config.exists():
        blob = json.loads(config.read_text(encoding="utf-8"))
        if "auto_map" in blob:
            raise ConfigError(
                f"{field}: {folder} declares custom model code (config.json auto_map); "
                "slothflow never enables trust_remote_code. Use a model that transformers "
                "supports natively."
            )


def _read_template_file(path_str: str) -> str:
    p = Path(path_str)
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, REPO_ROOT / p]
    for c in candidates:
        if c.is_file():
            return c.read_text(encoding="utf-8")
    raise ConfigError(f"model.chat_template: file not found: {path_str}")


def _license(folder: Path | None, name_or_path: str) -> str | None:
    if is_embedded(name_or_path):
        return "Apache-2.0"
    if folder is None:
        return None
    readme = folder / "README.md"
    if readme.is_file():
        # Model cards carry the licence in their YAML front matter.
        m = re.search(r"^---\n(.*?)\n---", readme.read_text(encoding="utf-8"), re.S)
        if m:
            lic = re.search(r"^license:\s*(\S+)", m.group(1), re.M)
            if lic:
                return lic.group(1).strip("'\"")
    return None


def _save_tokenizer_with_template(
    tokenizer: Any, template: str, models_dir: Path, key: str
) -> Path:
    """A copy of the tokenizer that carries the configured template, keyed by content, so
    the data stage's length filter and the trainer both load the very same one."""
    final = models_dir / f"tokenizer-{key[:16]}"
    if (final / "tokenizer_config.json").exists():
        return final
    models_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=models_dir, prefix=".tok-"))
    try:
        tokenizer.chat_template = template
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "tokenizer_config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def prepare_base(cfg: ModelConfig, home: Home, tracker: Tracker = NullTracker()) -> BaseModelRef:
    """Resolve ``cfg.name_or_path`` to a loadable base: location, revision, chat template."""
    from transformers import AutoTokenizer

    name = cfg.name_or_path
    folder: Path | None
    if is_embedded(name):
        shape = None if name == EMBEDDED_MODEL else name
        folder = embedded.ensure_built(cfg.embedded, home.models, shape)
        name_or_path = str(folder)
        revision = resolve_revision(name_or_path)
        load_rev = None
    elif Path(name).is_dir():
        folder = Path(name).resolve()
        name_or_path = str(folder)
        _check_loadable_folder(folder)
        revision = resolve_revision(name_or_path)
        load_rev = None
    elif is_hub_id(name):
        name_or_path = name
        revision = resolve_revision(name, cfg.revision)
        load_rev = revision
        folder = _hub_snapshot(name, revision)
        if folder is not None:
            _check_loadable_folder(folder)
    else:
        raise ConfigError(
            f"model.name_or_path={name!r} is neither {EMBEDDED_MODEL!r}, an existing folder, "
            "nor a hub id (org/name)"
        )

    tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=load_rev, **LOAD_KWARGS)
    tokenizer_path = name_or_path
    if cfg.chat_template is not None:
        template = _read_template_file(cfg.chat_template)
        key = sha256_json({"base": name_or_path, "revision": revision, "template": template})
        tokenizer_path = str(_save_tokenizer_with_template(tokenizer, template, home.models, key))
    else:
        own = template_text(tokenizer.chat_template)
        if not own:
            raise ConfigError(
                f"the tokenizer of {name} has no chat template; set model.chat_template to a "
                "Jinja template file (with {% generation %} markers for the assistant-only loss)"
            )
        template = own

    ref = BaseModelRef(
        stage=STAGE,
        path=str(folder) if folder is not None else name_or_path,
        name_or_path=name_or_path,
        revision=revision,
        tokenizer_path=tokenizer_path,
        chat_template_sha256=template_sha256(template),
        license=_license(folder, name),
    )
    tracker.log_params(
        {
            "base.name_or_path": name,
            "base.revision": revision,
            "base.chat_template_sha256": ref.chat_template_sha256,
            "base.license": str(ref.license),
        }
    )
    tracker.log_text(template, "chat_template.jinja")
    log.info("base model %s @ %s", name, revision[:19])
    return ref


def check_base(cfg: ModelConfig) -> None:
    """The checks of :func:`prepare_base` that need no model loaded, in well under a
    second: the name is the embedded model, a loadable folder or a hub id this machine
    can resolve (offline: in the local cache), and a configured chat template exists.
    Run before the first stage, so a typo fails at once, not after minutes of retries."""
    name = cfg.name_or_path
    if is_embedded(name):
        pass
    elif name.startswith("embedded:"):
        raise ConfigError(
            f"model.name_or_path={name!r}: no such built-in model; one of "
            + ", ".join([EMBEDDED_MODEL, *EMBEDDED_SHAPES])
        )
    elif Path(name).is_dir():
        _check_loadable_folder(Path(name).resolve())
    elif is_hub_id(name):
        revision = resolve_revision(name, cfg.revision)
        folder = _hub_snapshot(name, revision)
        if folder is not None:
            _check_loadable_folder(folder)
    elif Path(name).expanduser().is_absolute() or name.startswith((".", "~")):
        raise ConfigError(f"model.name_or_path: folder {name} does not exist")
    else:
        raise ConfigError(
            f"model.name_or_path={name!r} is neither {EMBEDDED_MODEL!r}, an existing folder, "
            "nor a hub id (org/name)"
        )
    if cfg.chat_template is not None:
        _read_template_file(cfg.chat_template)


def base_inputs_hash(cfg: ModelConfig) -> str:
    """What the base stage's result depends on: the model config, what the name resolves
    to now (a local folder's content hash, a hub branch's commit) and the content of the
    configured chat-template file. So a resumed run notices an edited folder or template
    instead of reusing a stale reference. The embedded model is built from the config
    alone (its cache is keyed by the sample's hash), so the config stands for it."""
    name = cfg.name_or_path
    revision = None if is_embedded(name) else resolve_revision(name, cfg.revision)
    template = None
    if cfg.chat_template is not None:
        text = _read_template_file(cfg.chat_template)
        template = template_sha256(text)
    return sha256_json(
        {"model": cfg.model_dump(mode="json"), "revision": revision, "chat_template": template}
    )


def prepare_base_in_run(ctx: RunContext, cfg: ModelConfig) -> BaseModelRef:
    """``prepare_base`` inside a run: tracked as stage ``base``; its reference is recorded
    in the run's folder (what a worker on another stage reads). Reuse across runs is
    Prefect's (:func:`prepare_base_task`'s cache key), so a resumed run records the very
    same base it started with."""
    from tasks.core import run as run_mod
    from tasks.core.home import resolve_home

    with run_mod.stage(ctx, STAGE) as tracker:
        ref = prepare_base(cfg, resolve_home(), tracker)
    record_ref(ctx.stage_dir(STAGE), ref)
    return ref


@stage_task(
    name="base",
    cache_key=lambda a: base_inputs_hash(a["cfg"]),
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=retry_transient,
)
def prepare_base_task(ctx: RunContext, cfg: ModelConfig) -> BaseModelRef:
    """Prefect task of stage ``base``. Retries cover a flaky Hub when online; a missing
    folder or an id not in the offline cache is a configuration error and fails the same
    way on every try, so it is not retried (and :func:`check_base` catches it before the
    run starts)."""
    return prepare_base_in_run(ctx, cfg)
