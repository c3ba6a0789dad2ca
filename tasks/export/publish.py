"""Publish an exported artifact to a private Hugging Face Hub repo (optional, off by default).

The token is read from ``export.hub_token`` (an environment variable or a Prefect
Secret block) at the moment of the push and handed straight to ``HfApi``; it is never
logged, stored or returned. The model card (``README.md``) is written from the
artifact's manifest.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tasks.core.artifacts import read_manifest
from tasks.core.config import ConfigError, ExportConfig

log = logging.getLogger(__name__)


def model_card(manifest: dict[str, Any], repo_id: str) -> str:
    """A model card (YAML front matter + markdown) built from the manifest."""
    base = manifest["base_model"]
    metrics = manifest.get("metrics", {})
    lines = [
        "---",
        f"license: {(base.get('license') or 'other').splitlines()[0][:64]}",
        f"base_model: {base['id']}" if "/" in str(base["id"]) else "base_model: null",
        "library_name: " + ("peft" if manifest["kind"] == "adapter" else "transformers"),
        "tags: [slothflow, " + ("lora" if manifest["kind"] == "adapter" else "merged") + "]",
        "---",
        "",
        f"# {repo_id}",
        "",
        f"A **{manifest['kind']}** model exported by slothflow.",
        "",
        "| lineage | value |",
        "| --- | --- |",
        f"| base model | `{base['id']}` |",
        f"| base revision | `{base['revision']}` |",
        f"| data fingerprint | `{manifest['data_fingerprint']}` |",
        f"| config hash | `{manifest['config_hash']}` |",
        f"| code version | `{manifest['code_version']}` |",
        f"| chat template sha256 | `{manifest['chat_template_sha256']}` |",
        f"| EOS token ids | `{manifest['eos_token_ids']}` |",
        "",
    ]
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items())]
        lines.append("")
    serving = manifest.get("serving", {})
    lines += [
        "## Serving with vLLM",
        "",
        "```",
        "vllm serve <this repo> " + " ".join(serving.get("vllm_args", [])),
        "```",
        "",
    ]
    return "\n".join(lines)


def publish(folder: Path, cfg: ExportConfig) -> str:
    """Push ``folder`` (an export artifact) to the private repo ``cfg.hub_repo``; returns
    the repo URL. The Hub is the only network boundary here (tests replace ``HfApi``)."""
    if not cfg.hub_repo:
        raise ConfigError("export.hub_repo is required to publish")
    from huggingface_hub import HfApi

    token = cfg.hub_token.resolve(required=True)
    manifest = read_manifest(folder)
    api = HfApi(token=token)
    # private=True on create only: an existing repo keeps its visibility (we never flip
    # a repo someone made public on purpose), so pushing into one that is public is
    # refused: exported weights go to private repos only.
    api.create_repo(cfg.hub_repo, private=True, exist_ok=True, repo_type="model")
    if api.repo_info(cfg.hub_repo, repo_type="model").private is not True:
        raise ConfigError(
            f"refusing to publish to {cfg.hub_repo}: the repo exists and is public; "
            "export.hub_repo must name a private repo (or one that does not exist yet)"
        )
    (folder / "README.md").write_text(model_card(manifest, cfg.hub_repo), encoding="utf-8")
    api.upload_folder(
        repo_id=cfg.hub_repo,
        folder_path=str(folder),
        repo_type="model",
        commit_message=f"slothflow {manifest['kind']} export, run {manifest['run_id']}",
    )
    url = f"https://huggingface.co/{cfg.hub_repo}"
    log.info("published the %s artifact to %s", manifest["kind"], url)
    return url
