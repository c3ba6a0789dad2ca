"""The data stage: :func:`clean` does the work; :func:`clean_task` wraps it for Prefect.

Three streaming passes, so memory holds per-row *metadata* (ids, lengths, MinHash
signatures), never the rows themselves:

1. read -> normalise -> validate -> scrub PII -> exact dedup -> token-length filter,
   survivors spooled to a temporary JSONL file in ``out_dir`` (:mod:`tasks.data.spool`);
2. near-duplicates over the spool, rows taken in order of preference (the previous
   manifest's first, then the cleanest by :func:`~tasks.data.rows.dirtiness`, then the
   earliest), so each cluster keeps its most preferred member (:mod:`tasks.data.split`);
3. survivors split by a salted hash of their id and written out (:mod:`tasks.data.split`).

Every input row ends in exactly one place: a split or ``rejected.jsonl`` (reason,
source, line). ``report.json`` checks that identity before the stage returns
(:mod:`tasks.data.report`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tasks.core.config import DataConfig
from tasks.core.orchestration import retry_transient, stage_task
from tasks.core.refs import DataRef, RunContext, record_ref, sha256_file, sha256_json
from tasks.core.tracking import NullTracker, Tracker
from tasks.data.fingerprint import of_hashes
from tasks.data.layout import (
    FAILED_SUFFIX,
    MANIFEST,
    REJECTED,
    REPORT_JSON,
    REPORT_MD,
    SPOOL,
    STAGING_SUFFIX,
    TRAIN,
    VALIDATION,
    DataError,
    check_replaceable,
    load_manifest,
    publish,
)
from tasks.data.quarantine import Quarantine
from tasks.data.read import ProgressFn, Source, SourceError, resolve_all, source_sha256
from tasks.data.report import Passes, build_report, log_report, write_reports
from tasks.data.split import near_dup_pass, split_of, write_pass
from tasks.data.spool import read_pass
from tasks.data.tokenizer import (
    TokenizerSpec,
    load_tokenizer,
    tokenizer_identity,
    tokenizer_location,
)

log = logging.getLogger(__name__)

#: Bumped when the cleaning rules change what a given input produces (part of the
#: stage's inputs hash, so old completions are not reused across rule changes).
CLEAN_VERSION = 2


def inputs_hash(
    cfg: DataConfig,
    tokenizer: TokenizerSpec,
    previous_manifest: str | Path | None = None,
    sources: list[Source] | None = None,
    hashes: list[str] | None = None,
) -> str:
    """What the stage's output depends on: its config, every source's content, the
    tokenizer, the previous manifest and the cleaning rules' version. ``sources``:
    ``cfg.sources`` already resolved (:func:`resolve_all`), else they are resolved here;
    ``hashes``: their content hashes, already computed."""
    if sources is None:
        sources = resolve_all(cfg.sources)
    manifest = None
    if previous_manifest is not None:
        p = Path(previous_manifest)
        p = p / MANIFEST if p.is_dir() else p
        manifest = sha256_file(p) if p.exists() else str(p)
    return sha256_json(
        {
            "version": CLEAN_VERSION,
            "config": cfg.model_dump(mode="json"),
            "sources": hashes if hashes is not None else [source_sha256(s) for s in sources],
            "tokenizer": tokenizer_identity(tokenizer),
            "previous_manifest": manifest,
        }
    )


def check_output(folder: Path) -> None:
    """Raise :class:`DataError` with one clear line unless ``folder`` can feed training:
    a finished clean, or a ``train.jsonl`` and ``validation.jsonl`` with rows. Cheap (no
    file is read past its first row), so ``slothflow train --data`` runs it first."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder")
    if folder.name.endswith(STAGING_SUFFIX):
        raise DataError(f"{folder} is a data clean's staging folder: that clean did not finish")
    names = {p.name for p in folder.iterdir()}
    if not names:
        raise DataError(
            f"{folder} is empty: no {TRAIN} or {VALIDATION} "
            f"(`slothflow data clean INPUT --out {folder}` writes them)"
        )
    if REPORT_JSON in names:
        try:
            report = json.loads((folder / REPORT_JSON).read_text(encoding="utf-8"))
            kept, val = report["kept_records"], report["splits"]["validation"]
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{folder / REPORT_JSON} is unreadable ({exc})") from None
        if not kept or not val:
            raise DataError(
                f"{folder} is the output of a data clean that failed ({kept} rows kept, "
                f"{val} in validation; see {folder / REPORT_MD})"
            )
    elif names & {REJECTED, MANIFEST, SPOOL}:
        raise DataError(
            f"{folder} is incomplete: a data clean started there and did not finish (no "
            f"{REPORT_JSON}); run it again"
        )
    for name in (TRAIN, VALIDATION):
        if name not in names:
            raise DataError(f"{folder}: missing {name} (chat rows, as the data stage writes)")
        with open(folder / name, "rb") as f:
            if not any(line.strip() for line in f):
                raise DataError(f"{folder}: {name} has no rows")


def _clean_into(
    out_dir: Path,
    cfg: DataConfig,
    sources: list[Source],
    tok: Any,
    location: tuple[str, str | None] | None,
    previous: set[str],
    previous_manifest: Path | None,
    progress: ProgressFn | None,
    t_start: float,
) -> tuple[dict[str, Any], dict[str, int]]:
    """The three passes and the reports, written to ``out_dir`` (the staging folder).
    Returns the report and the rows per split."""
    timings: dict[str, float] = {}
    quarantine = Quarantine(out_dir / REJECTED, cfg.pii_scrub)
    spool_path = out_dir / SPOOL
    try:
        st = read_pass(cfg, sources, tok, previous, quarantine, spool_path, progress)
        timings["read_normalise_filter_s"] = time.perf_counter() - t_start
        t = time.perf_counter()
        keep, index, boiler = near_dup_pass(cfg, st, quarantine, spool_path)
        timings["near_dup_s"] = time.perf_counter() - t
        t = time.perf_counter()
        counts, kept_lengths, digests = write_pass(cfg, st, keep, spool_path, out_dir)
        timings["split_write_s"] = time.perf_counter() - t
    finally:
        quarantine.close()
        spool_path.unlink(missing_ok=True)

    passes = Passes(st, quarantine, keep, index, boiler, counts, kept_lengths, digests)
    timings["total_s"] = time.perf_counter() - t_start
    report = build_report(cfg, sources, passes, tok, location, previous, previous_manifest, timings)
    write_reports(out_dir, report, kept_lengths)
    return report, counts


def _unusable(
    report: dict[str, Any], counts: dict[str, int], cfg: DataConfig, failed: Path
) -> DataError | None:
    """Why the cleaned data cannot feed training, or ``None`` when it can."""
    kept = counts["train"] + counts["validation"]
    if kept == 0:
        top = ", ".join(f"{k}={v}" for k, v in Counter(report["rejected"]).most_common(3))
        return DataError(
            f"no rows left after cleaning: all {report['input_records']} input rows were "
            f"rejected ({top}); see {failed / REJECTED}"
        )
    if counts["validation"] == 0:
        return DataError(
            f"the validation split is empty: {kept} rows kept and none hashed into validation "
            f"(data.val_fraction={cfg.val_fraction}); add rows or raise data.val_fraction "
            f"(reports in {failed})"
        )
    return None


def _load_length_filter(
    cfg: DataConfig, tokenizer: TokenizerSpec
) -> tuple[Any, tuple[str, str | None] | None]:
    """The loaded tokenizer and its location; warns when the length filter is skipped."""
    tok = load_tokenizer(tokenizer)
    if tok is None:
        log.warning(
            "no tokenizer given: the token-length filter (min_tokens=%d, max_tokens=%d) is "
            "SKIPPED; lengths in the report are whitespace-separated words",
            cfg.min_tokens,
            cfg.max_tokens,
        )
    return tok, tokenizer_location(tokenizer)


def clean(
    cfg: DataConfig,
    out_dir: Path,
    tokenizer: TokenizerSpec = None,
    previous_manifest: Path | None = None,
    tracker: Tracker = NullTracker(),
    progress: ProgressFn | None = None,
    sources: list[Source] | None = None,
) -> DataRef:
    """Read ``cfg.sources``, clean them and write the splits and reports to ``out_dir``.

    ``tokenizer`` is the length filter's tokenizer: the base stage's reference (its
    tokenizer at the pinned revision, as training loads it), a folder or hub id, or
    ``None`` to skip the filter. ``sources``: ``cfg.sources`` already resolved
    (:func:`resolve_all`, as the task does once for the inputs hash and the clean), else
    they are resolved here.

    Everything is written to ``<out_dir>.staging`` and renamed to ``out_dir`` at the
    end, so ``out_dir`` is either the folder as it was or a finished clean, never part
    of one. ``out_dir`` may hold nothing but an earlier clean's output: it is replaced
    as a whole.

    Raises :class:`DataError` when no rows are left or the validation split is empty
    (the reports are then in ``<out_dir>.failed``, ``out_dir`` is left as it was), and
    :class:`SourceError` for an unreadable source.
    """
    out_dir = Path(os.path.abspath(out_dir))  # "." has a name, and a parent to stage in
    staging = out_dir.with_name(out_dir.name + STAGING_SUFFIX)
    failed = out_dir.with_name(out_dir.name + FAILED_SUFFIX)
    check_replaceable(out_dir)
    t_start = time.perf_counter()
    if sources is None:
        sources = resolve_all(cfg.sources)
    tok, location = _load_length_filter(cfg, tokenizer)
    previous = load_manifest(previous_manifest) if previous_manifest is not None else set()
    # An earlier attempt's staging (a crash) or failed output is not this clean's.
    for d in (staging, failed):
        if d.exists():
            shutil.rmtree(d)
    staging.mkdir(parents=True)
    try:
        report, counts = _clean_into(
            staging, cfg, sources, tok, location, previous, previous_manifest, progress, t_start
        )
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    error = _unusable(report, counts, cfg, failed)
    dest = failed if error is not None else out_dir
    publish(staging, dest)
    log_report(tracker, cfg, report, dest)
    if error is not None:
        raise error
    kept = counts["train"] + counts["validation"]
    log.info(
        "data: %d in, %d kept (train %d, validation %d), %d rejected",
        report["input_records"],
        kept,
        counts["train"],
        counts["validation"],
        report["input_records"] - kept,
    )
    return DataRef(
        stage="data",
        path=str(out_dir),
        train_path=str(out_dir / TRAIN),
        validation_path=str(out_dir / VALIDATION),
        fingerprint=report["fingerprint"],
        train_rows=counts["train"],
        validation_rows=counts["validation"],
        report_path=str(out_dir / REPORT_JSON),
        new_rows=report["new_records"],
    )


# --------------------------------------------------------------------------- Prefect


@stage_task(
    name="data",
    cache_key=lambda a: inputs_hash(a["cfg"], a["tokenizer"], a["previous_manifest"]),
    retries=2,
    retry_delay_seconds=[10, 60],
    retry_condition_fn=retry_transient,  # remote sources: network, object stores
)
def clean_task(
    ctx: RunContext,
    cfg: DataConfig,
    tokenizer: TokenizerSpec,
    previous_manifest: str | None = None,
) -> DataRef:
    """The data stage of a pipeline run. Prefect skips it (Cached) when its inputs hash
    (every source's content, the config, the tokenizer, the previous manifest) has a
    finished result. ``tokenizer`` is the base stage's reference in the pipeline (see
    :func:`clean`)."""
    from tasks.core.run import stage

    with stage(ctx, "data") as tracker:
        stage_dir = ctx.stage_dir("data")
        sources = resolve_all(cfg.sources)
        ref = clean(
            cfg,
            stage_dir,
            tokenizer,
            Path(previous_manifest) if previous_manifest else None,
            tracker,
            sources=sources,
        )
        hashes = [source_sha256(s) for s in sources]
        ref = ref.model_copy(update={"source_fingerprint": of_hashes(hashes)})
        tracker.log_params(
            {"data.inputs_hash": inputs_hash(cfg, tokenizer, previous_manifest, sources, hashes)}
        )
        tracker.set_tags({"slothflow.source_fingerprint": ref.source_fingerprint or ""})
        record_ref(stage_dir, ref)
        return ref


__all__ = [
    "DataError",
    "Source",
    "SourceError",
    "TokenizerSpec",
    "check_output",
    "clean",
    "clean_task",
    "inputs_hash",
    "load_manifest",
    "load_tokenizer",
    "split_of",
    "tokenizer_identity",
]
