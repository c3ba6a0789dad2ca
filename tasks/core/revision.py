"""What exactly is the base model: its revision, for hub ids and local folders alike.

- Hub id (``org/name``): the resolved commit sha. Offline (``HF_HUB_OFFLINE=1``) it is
  read from the local Hugging Face cache (``refs/<branch>`` or the snapshot folder);
  online it is asked from the Hub. A branch or tag is never recorded as-is: ``main``
  moves, a commit does not.
- Local folder: ``sha256:<hex>`` over the files that determine the model's behaviour:
  weights (``*.safetensors``), the tokenizer files, ``config.json``,
  ``generation_config.json`` and a chat template file. Each file contributes its
  relative path and content, in sorted path order; other files (READMEs, logs) do not
  count, so copying a model folder keeps its revision.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

from tasks.core.config import ConfigError, is_embedded

log = logging.getLogger(__name__)

#: The files that make up a tokenizer (its vocabulary, merges, settings, chat template).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
REVISION_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def is_hub_id(name_or_path: str) -> bool:
    return (
        not is_embedded(name_or_path)
        and not Path(name_or_path).exists()
        and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name_or_path) is not None
    )


def local_revision(folder: Path) -> str:
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and (p.name in REVISION_FILES or p.suffix == ".safetensors")
    )
    if not any(p.suffix == ".safetensors" for p in files):
        raise ConfigError(
            f"{folder}: no *.safetensors weights (slothflow loads safetensors only, never pickles)"
        )
    return files_revision(folder, files)


def files_revision(folder: Path, files: list[Path]) -> str:
    """``sha256:<hex>`` over each file's path relative to ``folder`` and its content."""
    h = hashlib.sha256()
    for p in sorted(files):
        h.update(p.relative_to(folder).as_posix().encode() + b"\0")
        with open(p, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        h.update(b"\0")
    return "sha256:" + h.hexdigest()


def tokenizer_revision(folder: Path) -> str:
    """Content hash of a tokenizer folder: the :data:`TOKENIZER_FILES` it holds (what
    ``AutoTokenizer.from_pretrained`` reads), hashed as :func:`local_revision` does."""
    return files_revision(
        folder, [p for p in folder.iterdir() if p.is_file() and p.name in TOKENIZER_FILES]
    )


def _hub_cache_dir() -> Path:
    from huggingface_hub.constants import HF_HUB_CACHE

    return Path(HF_HUB_CACHE)


def _cached_commit(repo_id: str, revision: str) -> str | None:
    repo_dir = _hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    if _COMMIT.match(revision):
        return revision if (repo_dir / "snapshots" / revision).is_dir() else None
    ref = repo_dir / "refs" / revision
    if ref.is_file():
        commit = ref.read_text().strip()
        return commit if _COMMIT.match(commit) else None
    return None


def hub_revision(repo_id: str, revision: str | None) -> str:
    """The commit ``revision`` (default ``main``) of ``repo_id`` points at."""
    rev = revision or "main"
    from huggingface_hub.constants import HF_HUB_OFFLINE

    if HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE") == "1":
        commit = _cached_commit(repo_id, rev)
        if commit is None:
            raise ConfigError(
                f"model {repo_id}@{rev} is not in the local Hugging Face cache "
                f"({_hub_cache_dir()}) and HF_HUB_OFFLINE is set"
            )
        return commit
    from huggingface_hub import HfApi

    try:
        sha = HfApi().model_info(repo_id, revision=rev).sha
    except Exception as exc:
        cached = _cached_commit(repo_id, rev)
        if cached:
            # A branch may have moved on the Hub since it was cached: say so, loudly.
            log.warning(
                "could not ask the Hub for %s@%s (%s); using the cached commit %s",
                repo_id,
                rev,
                type(exc).__name__,
                cached[:12],
            )
            return cached
        raise ConfigError(
            f"cannot resolve {repo_id}@{rev} on the Hugging Face Hub ({type(exc).__name__}); "
            "check the id, the network, or HF_TOKEN for gated models"
        ) from None
    if not sha:
        raise ConfigError(f"Hub returned no commit for {repo_id}@{rev}")
    return sha


def resolve_revision(name_or_path: str, revision: str | None = None) -> str:
    """Revision of a base model: hub commit or local content hash (module docstring)."""
    path = Path(name_or_path)
    if path.is_dir():
        return local_revision(path)
    if is_hub_id(name_or_path):
        return hub_revision(name_or_path, revision)
    raise ConfigError(
        f"model.name_or_path={name_or_path!r} is neither a local folder nor a hub id (org/name)"
    )
