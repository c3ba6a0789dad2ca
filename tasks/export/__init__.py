"""Export: merge the adapter into the 16-bit base, check the result, write manifests.

Two artifacts leave this stage, each with a ``manifest.json`` beside its files:

* ``adapter/`` — the PEFT adapter as trained (``kind: adapter``), plus the tokenizer;
* ``merged/`` — base + adapter merged into plain weights (``kind: merged``), with the
  tokenizer, chat template and a ``generation_config.json`` whose ``eos_token_id``
  lists every token that ends an assistant turn. This is what gets deployed.

Two checks fail the stage (no artifact that fails them is handed on):

* **parity** — the merged model's logits equal the base + adapter (unmerged, PEFT
  computing ``W x + B A x``) on probe prompts: ``max |Δlogit| <= parity_atol`` over
  every position and vocabulary entry. Both sides are computed in the export dtype on
  the export device from the *16-bit* (on CPU: float32) base. After QLoRA the adapter
  was trained against a 4-bit base, but what we merge into and serve is the 16-bit
  base, so that is the reference; the 4-bit vs 16-bit gap is measured by evaluation.
* **stop** — greedy generation from probe prompts ends on an EOS token within the
  evaluation's token budget, using the *saved* generation config: merges that lose
  the end-of-turn token are a known failure in the field.

Both checks run on one load of the merged folder as saved (:func:`probe_merged`: probe
logits and greedy generations), which is freed before base + adapter load for the
parity reference.

The merge is Unsloth's merged 16-bit save for an Unsloth-trained adapter exported in
bfloat16/float16, and PEFT's ``merge_and_unload`` otherwise (any backend's adapter, any
dtype; see :func:`merge_method`). It is written to ``merged.staging/`` and renamed to
``merged/`` only once both checks passed and its manifest is written: ``slothflow
serve`` treats any model folder as servable, so a merge that failed a check is moved to
``merged.rejected/`` (kept for inspection) and never sits under the servable name.

The manifest's ``kind`` and ``serving.vllm_args`` are a contract with the serving
stage: keep them stable.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.core.artifacts import (
    MANIFEST,
    ManifestInfo,
    vllm_args,
    vllm_max_lora_rank,
    write_manifest,
)
from tasks.core.config import ConfigError, ExportConfig
from tasks.core.hardware import HardwareDecision
from tasks.core.models import (
    chat_template_sha256,
    hub_load_revision,
    load_tokenizer,
)
from tasks.core.orchestration import stage_task
from tasks.core.refs import (
    BaseModelRef,
    DataRef,
    ExportRef,
    RunContext,
    TrainRef,
    record_ref,
    sha256_json,
)
from tasks.core.tracking import NullTracker, Tracker
from tasks.export.checks import (
    check_parity,
    check_stop,
    parity_tolerance,
    probe_merged,
    probe_prompts,
    stop_token_ids,
)
from tasks.export.errors import ExportError, StopCheckError
from tasks.export.merge import merge_method, merge_peft, merge_unsloth

log = logging.getLogger(__name__)


#: Where the merge is written, and where a merge that failed a check is moved.
MERGED, STAGING, REJECTED = "merged", "merged.staging", "merged.rejected"


# --------------------------------------------------------------------------- model work


def _base_revision(base: BaseModelRef) -> str | None:
    return hub_load_revision(base)


def base_generation_config(base: BaseModelRef) -> Any:
    """The base's ``GenerationConfig`` at its pinned revision (its configured EOS ids and
    sampling defaults); an empty one when the base has none."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(base.name_or_path, revision=_base_revision(base))
    except OSError:
        return GenerationConfig()


def _write_generation_config(base_gen: Any, dst: Path, tokenizer: Any, eos_ids: list[int]) -> None:
    """The base's generation config (sampling defaults kept) with every stop id."""
    gen = copy.deepcopy(base_gen)
    gen.eos_token_id = eos_ids if len(eos_ids) > 1 else eos_ids[0]
    gen.bos_token_id = (
        tokenizer.bos_token_id if tokenizer.bos_token_id is not None else gen.bos_token_id
    )
    gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    gen.save_pretrained(dst)


def _save_tokenizer(tokenizer: Any, dst: Path) -> None:
    tokenizer.save_pretrained(dst)
    # transformers writes chat_template.jinja itself; make sure it is there whatever the
    # version, because vLLM and TGI read the template from the artifact.
    if tokenizer.chat_template and not (dst / "chat_template.jinja").exists():
        (dst / "chat_template.jinja").write_text(tokenizer.chat_template, encoding="utf-8")


def _max_model_len(path: Path) -> int:
    cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    return int(cfg.get("max_position_embeddings") or 2048)


# --------------------------------------------------------------------------- the stage


def check_export_config(cfg: ExportConfig) -> None:
    """Refuse, before any work, an export this config cannot finish."""
    if cfg.publish:
        if not cfg.hub_repo:
            raise ConfigError("export.publish needs export.hub_repo (org/name)")
        if cfg.publish_kind == "merged" and not cfg.merge:
            raise ConfigError(
                "export.publish_kind=merged but export.merge is false: nothing merged to "
                "publish; set export.publish_kind=adapter or export.merge=true"
            )


def check_chat_template(tokenizer: Any, base: BaseModelRef) -> str:
    """The tokenizer's chat template hash; raises when it is not the one the base stage
    recorded (as training does): an artifact must carry the template it was trained on."""
    got = chat_template_sha256(tokenizer.chat_template)
    if got != base.chat_template_sha256:
        raise ExportError(
            f"chat template mismatch: the tokenizer's template hashes to {got[:12]}, but the "
            f"base stage recorded {base.chat_template_sha256[:12]} for {base.name_or_path}; "
            "the model was trained with a different template than the one it would be "
            "exported with. Re-run the base and train stages"
        )
    return got


def _reject(staging: Path, rejected: Path) -> None:
    """Move a merge that failed a check out of the way, kept for inspection."""
    if not staging.exists():
        return
    shutil.rmtree(rejected, ignore_errors=True)
    staging.rename(rejected)
    log.error("the rejected merge is kept at %s (not servable under that name)", rejected)


@dataclass(frozen=True)
class Prepared:
    """What the phases of :func:`export` share, read before anything is written."""

    tokenizer: Any  # the trained adapter's tokenizer
    base_revision: str | None
    base_gen: Any  # the base's GenerationConfig (its EOS ids and sampling defaults)
    eos_ids: list[int]
    info: ManifestInfo  # the lineage both manifests carry
    prompts: list[str]  # the probe prompts of the parity and stop checks


@dataclass(frozen=True)
class Merged:
    """What the merge phase leaves: the checked merge and its check results."""

    path: Path | None  # out_dir/merged; None when export.merge is false
    parity_max_abs_diff: float | None  # None when nothing was merged
    stop_fraction: float
    method: str  # the merge method, "none" when nothing was merged


NOT_MERGED = Merged(path=None, parity_max_abs_diff=None, stop_fraction=1.0, method="none")


def prepare_export(
    cfg: ExportConfig, train: TrainRef, data: DataRef, *, run_id: str, code_version: str
) -> Prepared:
    """Every check and read that can refuse the export before anything is written: the
    config, the chat template, the stop ids, the probe prompts."""
    check_export_config(cfg)
    tokenizer = load_tokenizer(train.tokenizer_path)
    template_hash = check_chat_template(tokenizer, train.base)
    base_gen = base_generation_config(train.base)  # read once: EOS ids here, then written
    eos_ids = stop_token_ids(tokenizer, base_gen.eos_token_id)
    info = ManifestInfo(
        base=train.base,
        chat_template_sha256=template_hash,
        data_fingerprint=train.data_fingerprint,
        config_hash=train.config_hash,
        code_version=code_version,
        run_id=run_id,
        dtype=cfg.dtype,
        eos_token_ids=eos_ids,
    )
    return Prepared(
        tokenizer=tokenizer,
        base_revision=_base_revision(train.base),
        base_gen=base_gen,
        eos_ids=eos_ids,
        info=info,
        prompts=probe_prompts(tokenizer, data.validation_path, cfg.probe_prompts),
    )


def write_adapter(train: TrainRef, tokenizer: Any, out_dir: Path) -> tuple[Path, int]:
    """``out_dir/adapter``: the trained adapter and its tokenizer. Returns the folder and
    the LoRA rank, refused here when vLLM could not serve it."""
    # The adapter artifact: a copy, so the run's train folder can be cleaned up
    # without breaking what was registered.
    adapter_dir = out_dir / "adapter"
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    shutil.copytree(train.adapter_path, adapter_dir, ignore=shutil.ignore_patterns("checkpoint-*"))
    _save_tokenizer(tokenizer, adapter_dir)
    lora_rank = int(json.loads((adapter_dir / "adapter_config.json").read_text())["r"])
    vllm_max_lora_rank(lora_rank)  # refuse an unservable rank before the merge
    return adapter_dir, lora_rank


def merge_and_check(
    cfg: ExportConfig,
    train: TrainRef,
    prep: Prepared,
    out_dir: Path,
    hw: HardwareDecision,
    metrics: dict[str, float],
    *,
    served_model_name: str,
    max_new_tokens: int,
    max_seq_length: int,
) -> Merged:
    """Merge into ``merged.staging``, check it, write its manifest, then rename it to
    ``merged``. A merge that fails any of it is moved to ``merged.rejected`` and the
    error raised. Adds the merge's numbers to ``metrics`` (both manifests carry them)."""
    final, staging = out_dir / MERGED, out_dir / STAGING
    method, why = merge_method(train.backend, cfg.dtype)
    log.info(
        "export: %s merge (train.backend=%s, export.dtype=%s, device %s): %s",
        method,
        train.backend,
        cfg.dtype,
        hw.device,
        why,
    )
    t0 = time.monotonic()
    try:
        if method == "unsloth":
            merge_unsloth(train, cfg.dtype, max_seq_length, staging)
        else:
            merge_peft(train, cfg.dtype, hw.device, staging)
        _save_tokenizer(prep.tokenizer, staging)
        _write_generation_config(prep.base_gen, staging, prep.tokenizer, prep.eos_ids)
        metrics["export.merge_seconds"] = time.monotonic() - t0
        diff, stop_fraction = _check_merge(staging, cfg, train, prep, hw.device, max_new_tokens)
        metrics["export.parity_max_abs_diff"] = diff
        metrics["export.stop_fraction"] = stop_fraction
        serving = {
            "model": str(final),
            "served_model_name": served_model_name,
            "vllm_args": vllm_args("merged", served_model_name, _max_model_len(staging), cfg.dtype),
        }
        write_manifest(staging, "merged", prep.info, metrics, serving, artifact_path=final)
    except Exception:
        _reject(staging, out_dir / REJECTED)
        raise
    # Only a checked merge with its manifest ever appears under the servable name.
    staging.rename(final)
    return Merged(path=final, parity_max_abs_diff=diff, stop_fraction=stop_fraction, method=method)


def _check_merge(
    staging: Path,
    cfg: ExportConfig,
    train: TrainRef,
    prep: Prepared,
    device: str,
    max_new_tokens: int,
) -> tuple[float, float]:
    """The parity and stop checks on the merge as saved: (max |Δlogit|, share of probe
    prompts that stopped). Raises on a failure (a stop failure only warns under
    ``export.stop_check: warn``)."""
    # One load of the merge, with the generation config it will be served with.
    probe = probe_merged(str(staging), prep.prompts, max_new_tokens, cfg.dtype, device)
    diff = check_parity(
        probe,
        train.base.name_or_path,
        train.adapter_path,
        cfg.dtype,
        device,
        parity_tolerance(cfg),
        prep.base_revision,
    )
    try:
        stop_fraction = check_stop(probe)
    except StopCheckError as exc:
        if cfg.stop_check == "fail":
            raise
        log.warning("%s (export.stop_check=warn: going on)", exc)
        stop_fraction = exc.fraction
    return diff, stop_fraction


def write_adapter_manifest(
    adapter_dir: Path,
    lora_rank: int,
    train: TrainRef,
    prep: Prepared,
    metrics: dict[str, float],
    *,
    dtype: str,
    served_model_name: str,
    max_seq_length: int,
) -> None:
    """``adapter/manifest.json``: vLLM serves the adapter on the base, with the base's
    context length when its config is on this disk, else the training length."""
    base = Path(train.base.name_or_path)
    max_len = _max_model_len(base) if (base / "config.json").exists() else max_seq_length
    serving = {
        "model": train.base.name_or_path,
        "served_model_name": served_model_name,
        "vllm_args": vllm_args(
            "adapter",
            served_model_name,
            max_len,
            dtype,
            adapter_dir,
            lora_rank,
            prep.base_revision,
        ),
    }
    write_manifest(adapter_dir, "adapter", prep.info, metrics, serving)


def export_ref(
    cfg: ExportConfig,
    train: TrainRef,
    prep: Prepared,
    out_dir: Path,
    adapter_dir: Path,
    merged: Merged,
    metrics: dict[str, float],
    served_model_name: str,
) -> ExportRef:
    return ExportRef(
        stage="export",
        path=str(out_dir),
        adapter_path=str(adapter_dir),
        merged_path=str(merged.path) if merged.path else None,
        base=train.base,
        data_fingerprint=train.data_fingerprint,
        config_hash=train.config_hash,
        dtype=cfg.dtype,
        eos_token_ids=prep.eos_ids,
        served_model_name=served_model_name,
        parity_max_abs_diff=merged.parity_max_abs_diff,
        parity_atol=parity_tolerance(cfg),
        stop_fraction=merged.stop_fraction,
        metrics=metrics,
    )


def track_export(tracker: Tracker, cfg: ExportConfig, ref: ExportRef, merged: Merged) -> None:
    """The stage's params, metrics and manifests on its MLflow run."""
    tracker.log_params(
        {
            "export.dtype": cfg.dtype,
            "export.parity_atol": ref.parity_atol,
            "export.eos_ids": ref.eos_token_ids,
            "export.merge_method": merged.method,
        }
    )
    tracker.log_metrics({k: v for k, v in ref.metrics.items() if k.startswith("export.")})
    tracker.log_artifact(Path(ref.adapter_path) / MANIFEST, "adapter")
    if merged.path:
        tracker.log_artifact(merged.path / MANIFEST, "merged")


def publish_export(cfg: ExportConfig, ref: ExportRef, tracker: Tracker) -> None:
    """Push the artifact ``export.publish_kind`` names, when ``export.publish``."""
    if not cfg.publish:
        return
    from tasks.export.publish import publish

    url = publish(published_artifact(ref, cfg.publish_kind), cfg)
    tracker.set_tags({"slothflow.hub_repo": url})


def export(
    cfg: ExportConfig,
    train: TrainRef,
    data: DataRef,
    out_dir: Path,
    hw: HardwareDecision,
    *,
    served_model_name: str,
    max_new_tokens: int,
    max_seq_length: int,
    run_id: str,
    code_version: str,
    tracker: Tracker | None = None,
) -> ExportRef:
    """Write ``out_dir/adapter`` and (when ``export.merge``) ``out_dir/merged``, check
    parity and stopping, write the manifests. Raises :class:`ExportError` on a bad merge
    (the merge is then left in ``out_dir/merged.rejected``, never in ``merged``).

    ``served_model_name`` is the name the manifests serve under (the registered
    model's), ``max_new_tokens`` the stop check's budget (evaluation's), and
    ``max_seq_length`` the training length: Unsloth's merge loads with it, and the
    adapter's vLLM context falls back to it when the base's config is not on this disk.
    """
    tracker = tracker or NullTracker()
    out_dir = Path(out_dir)
    prep = prepare_export(cfg, train, data, run_id=run_id, code_version=code_version)
    metrics: dict[str, float] = dict(train.metrics)
    adapter_dir, lora_rank = write_adapter(train, prep.tokenizer, out_dir)
    # An earlier attempt's merge (checked or rejected) is not this export's.
    for name in (MERGED, STAGING, REJECTED):
        shutil.rmtree(out_dir / name, ignore_errors=True)
    merged = NOT_MERGED
    if cfg.merge:
        merged = merge_and_check(
            cfg,
            train,
            prep,
            out_dir,
            hw,
            metrics,
            served_model_name=served_model_name,
            max_new_tokens=max_new_tokens,
            max_seq_length=max_seq_length,
        )
    write_adapter_manifest(
        adapter_dir,
        lora_rank,
        train,
        prep,
        metrics,
        dtype=cfg.dtype,
        served_model_name=served_model_name,
        max_seq_length=max_seq_length,
    )
    ref = export_ref(cfg, train, prep, out_dir, adapter_dir, merged, metrics, served_model_name)
    track_export(tracker, cfg, ref, merged)
    publish_export(cfg, ref, tracker)
    return ref


def published_artifact(ref: ExportRef, kind: str) -> Path:
    """The folder ``export.publish_kind`` names."""
    if kind == "adapter":
        return Path(ref.adapter_path)
    if ref.merged_path is None:
        raise ConfigError("export.publish_kind=merged but this export has no merged model")
    return Path(ref.merged_path)


def export_inputs_hash(
    cfg: ExportConfig,
    train: TrainRef,
    data: DataRef,
    *,
    served_model_name: str,
    max_new_tokens: int,
) -> str:
    # The reuse key: keep its keys and values, or every finished export is redone.
    return sha256_json(
        {
            "export": cfg.model_dump(mode="json"),
            "max_new_tokens": max_new_tokens,
            "served": served_model_name,
            "train": train.model_dump(mode="json"),
            "validation": data.fingerprint,
        }
    )


def _cache_key(a: dict[str, Any]) -> str:
    return export_inputs_hash(
        a["cfg"],
        a["train"],
        a["data"],
        served_model_name=a["served_model_name"],
        max_new_tokens=a["max_new_tokens"],
    )


@stage_task(name="export", cache_key=_cache_key, retries=0)
def export_task(
    ctx: RunContext,
    cfg: ExportConfig,
    train: TrainRef,
    data: DataRef,
    *,
    served_model_name: str,
    max_new_tokens: int,
    max_seq_length: int,
) -> ExportRef:
    """Prefect task: merge + checks + manifests under ``<run>/export``; Cached when a
    finished export has the same inputs hash.

    ``max_seq_length`` is not in the cache key: the training length is in the run's
    config hash, which ``train`` carries."""
    from tasks.core.run import stage

    out = ctx.stage_dir("export")
    hw = HardwareDecision.from_params(ctx.hardware)
    with stage(ctx, "export") as tracker:
        ref = export(
            cfg,
            train,
            data,
            out,
            hw,
            served_model_name=served_model_name,
            max_new_tokens=max_new_tokens,
            max_seq_length=max_seq_length,
            run_id=ctx.run_id,
            code_version=ctx.code_version,
            tracker=tracker,
        )
    record_ref(out, ref)
    return ref
