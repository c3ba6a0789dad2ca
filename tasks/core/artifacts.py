"""The artifact contract: what one stage writes and another reads, in one place.

* ``manifest.json`` beside every exported model folder (export writes it; the
  registry, evaluation of a champion, publishing and serving read it). Its ``kind``
  and ``serving.vllm_args`` are a contract with whoever serves: keep them stable.
* The held-out split (the data stage's ``validation.jsonl``) and the id each row goes
  by: the row's ``id``, else its line number in the file. Export probes, evaluation
  and the serving smoke test all read it through :func:`heldout_rows`, so a row here
  and its offline result there pair up by construction, not by convention.
* ``generations.jsonl``, evaluation's per-item answers, which serving compares with
  what the live server says.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from tasks.core.config import ConfigError
from tasks.core.refs import BaseModelRef, ResolvedModel, sha256_file, write_json_atomic

MANIFEST = "manifest.json"
MANIFEST_SCHEMA = 1
KINDS = ("merged", "adapter")

#: The ``--max-lora-rank`` values vLLM accepts (its argument parser refuses others).
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)

#: What the evaluation stage writes beside its results: one JSON line per held-out
#: item, ``{"id", "answer", "<model label>": generation, ...}``.
GENERATIONS_FILE = "generations.jsonl"


class ArtifactError(RuntimeError):
    """An artifact breaks the contract (unservable rank, unreadable manifest)."""


# --------------------------------------------------------------------------- manifests


def vllm_max_lora_rank(r: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds an adapter of rank ``r``."""
    for allowed in VLLM_LORA_RANKS:
        if r <= allowed:
            return allowed
    raise ArtifactError(
        f"LoRA rank {r} is above the largest --max-lora-rank vLLM accepts "
        f"({VLLM_LORA_RANKS[-1]}): the adapter artifact could not be served; train with "
        "a smaller train.lora.r"
    )


def vllm_args(
    kind: str,
    served_model_name: str,
    max_model_len: int,
    dtype: str,
    adapter_dir: Path | None = None,
    lora_rank: int | None = None,
    base_revision: str | None = None,
) -> list[str]:
    """CLI flags vLLM needs for this artifact (``--model`` is added by whoever serves:
    the artifact folder for ``merged``, ``serving.model`` (the base) for ``adapter``).

    ``base_revision`` is the Hub commit of an adapter's base (None for a local base):
    the adapter only matches the revision it was trained on, and vLLM would otherwise
    load the branch head. vLLM's tokenizer revision follows ``--revision``."""
    args = ["--dtype", dtype, "--max-model-len", str(max_model_len), "--generation-config", "auto"]
    if kind == "merged":
        return [*args, "--served-model-name", served_model_name]
    assert adapter_dir is not None and lora_rank is not None
    if base_revision:
        args += ["--revision", base_revision]
    # vLLM's default --max-lora-rank is 16; a larger adapter is refused without it.
    return [
        *args,
        "--enable-lora",
        "--max-lora-rank",
        str(vllm_max_lora_rank(lora_rank)),
        "--lora-modules",
        f"{served_model_name}={adapter_dir}",
    ]


def relocate_manifest(manifest: dict[str, Any], new_dir: Path) -> dict[str, Any]:
    """The manifest with paths inside the artifact rewritten to ``new_dir`` (after the
    registry downloaded it elsewhere)."""
    old = manifest.get("artifact_path")
    out = dict(manifest)
    out["artifact_path"] = str(new_dir)
    serving = dict(out.get("serving", {}))
    if old:
        serving["vllm_args"] = [a.replace(old, str(new_dir)) for a in serving.get("vllm_args", [])]
        if serving.get("model") == old:
            serving["model"] = str(new_dir)
    out["serving"] = serving
    return out


def read_manifest(folder: Path) -> dict[str, Any]:
    """``folder/manifest.json`` of a slothflow export; a folder without one is not an
    export (``FileNotFoundError``)."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"no {MANIFEST} in {folder}: not a slothflow export")
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def servable_manifest(folder: Path) -> dict[str, Any]:
    """The manifest as serving reads it: any model folder is servable, so a folder
    without a manifest counts as a bare merged model; a manifest that is not JSON or
    names an unknown ``kind`` is an :class:`ArtifactError`."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        return {"kind": "merged"}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("kind", "merged") not in KINDS:
        raise ArtifactError(f"{path}: 'kind' must be 'merged' or 'adapter'")
    return manifest


def _file_hashes(folder: Path) -> dict[str, str]:
    return {
        p.name: sha256_file(p)
        for p in sorted(folder.iterdir())
        if p.is_file() and p.suffix in (".safetensors", ".json", ".jinja") and p.name != MANIFEST
    }


@dataclass(frozen=True)
class ManifestInfo:
    """The lineage every manifest of one export shares."""

    base: BaseModelRef
    chat_template_sha256: str
    data_fingerprint: str
    config_hash: str
    code_version: str
    run_id: str
    dtype: str
    eos_token_ids: list[int]


def write_manifest(
    folder: Path,
    kind: str,
    info: ManifestInfo,
    metrics: dict[str, float],
    serving: dict[str, Any],
    artifact_path: Path | None = None,
) -> dict[str, Any]:
    """Write ``folder/manifest.json``. ``artifact_path``: where the folder will live
    once renamed into place (default: where it is)."""
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "kind": kind,
        "artifact_path": str(artifact_path or folder),
        "base_model": {
            "id": info.base.name_or_path,
            "revision": info.base.revision,
            "license": info.base.license,
        },
        "chat_template_sha256": info.chat_template_sha256,
        "data_fingerprint": info.data_fingerprint,
        "config_hash": info.config_hash,
        "code_version": info.code_version,
        "run_id": info.run_id,
        "dtype": info.dtype,
        "eos_token_ids": info.eos_token_ids,
        "metrics": metrics,
        "serving": serving,
        "files": _file_hashes(folder),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json_atomic(folder / MANIFEST, manifest)
    return manifest


# --------------------------------------------------------------------------- warm start


class InitAdapter(BaseModel):
    """A registered version's adapter that a training continues (``train.init_adapter``)
    instead of a fresh LoRA: its folder on this machine, its registry name, and its
    manifest's file hashes, which name it in the train stage's cache key (starting from
    another version's weights is another training)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str  # the version's adapter/ folder (adapter_model.safetensors, manifest.json)
    label: str  # NAME/VERSION
    files: dict[str, str]  # file name -> sha256, as its manifest lists them


def init_adapter_of(version: ResolvedModel) -> InitAdapter:
    """The adapter of a registered version (the champion) as a training's starting point.
    A version with merged weights only has no adapter to continue: refused."""
    label = f"{version.name}/{version.number}" if version.name else version.label
    if version.adapter_path is None:
        raise ConfigError(
            f"train.init_adapter=champion: {label} has merged weights only, no adapter to "
            "start from; set train.init_adapter=none"
        )
    manifest = read_manifest(version.adapter_path)
    return InitAdapter(
        path=str(version.adapter_path), label=label, files=dict(manifest.get("files") or {})
    )


# --------------------------------------------------------------------------- the held-out split


def heldout_rows(
    source: Sequence[Mapping[str, Any]] | Path | str,
) -> list[tuple[str, dict[str, Any]]]:
    """Held-out rows with the id every stage gives each: the row's ``id``, else its line
    number in the file (blank lines counted; its index in a list)."""
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
