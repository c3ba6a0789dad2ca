"""The clean's reports: ``report.json`` (every count, checked against the input), the
length histogram, ``report.md`` for people, and what the stage logs to the tracker."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.core.config import DataConfig
from tasks.core.refs import data_fingerprint, write_json_atomic
from tasks.core.tokens import counted_text, has_chat_template
from tasks.core.tracking import Tracker
from tasks.data import dedup
from tasks.data.layout import HISTOGRAM, REJECTED, REPORT_JSON, REPORT_MD, TRAIN, VALIDATION
from tasks.data.quarantine import Quarantine
from tasks.data.read import Source
from tasks.data.rows import REASONS
from tasks.data.spool import Spooled


@dataclass
class Passes:
    """What the three passes found, for the report."""

    st: Spooled
    quarantine: Quarantine
    keep: np.ndarray
    index: dedup.NearDupIndex | None
    boiler: set[int]
    counts: dict[str, int]
    kept_lengths: list[int]
    digests: dict[str, str]


def build_report(
    cfg: DataConfig,
    sources: list[Source],
    passes: Passes,
    tok: Any,
    location: tuple[str, str | None] | None,
    previous: set[str],
    previous_manifest: Path | None,
    timings: dict[str, float],
) -> dict[str, Any]:
    """``report.json``'s content. Raises ``AssertionError`` when the rows do not add up
    (input = kept + rejected): a bug, never a data problem."""
    st, counts = passes.st, passes.counts
    kept = counts["train"] + counts["validation"]
    rejected = dict(sorted(passes.quarantine.counts.items()))
    train_sha, val_sha = passes.digests["train"], passes.digests["validation"]
    prev = np.frombuffer(bytes(st.in_previous), dtype=np.uint8).astype(bool)
    report: dict[str, Any] = {
        "input_records": st.input_records,
        "kept_records": kept,
        "rejected": rejected,
        "identity_holds": st.input_records == kept + sum(rejected.values()),
        "fingerprint": data_fingerprint(train_sha, val_sha),
        "splits": {
            "train": counts["train"],
            "validation": counts["validation"],
            "train_sha256": train_sha,
            "validation_sha256": val_sha,
            "salt": cfg.split_salt,
            "val_fraction": cfg.val_fraction,
        },
        "sources": [
            {
                "source": s.name,
                "resolved": s.url,
                "format": s.format,
                "records": st.per_source[s.name],
            }
            for s in sources
        ],
        "normalisation": dict(sorted(st.norm.items())),
        "pii": {
            "enabled": cfg.pii_scrub,
            "emails": st.pii["emails"],
            "phones": st.pii["phones"],
            "in_rejected": dict(passes.quarantine.pii_counts),
        },
        "length_filter": _length_filter(cfg, tok, location),
        "lengths": _summary(passes.kept_lengths),
        "near_dup": _near_dup(cfg, passes, rejected),
        "previous_manifest": {
            "path": str(previous_manifest) if previous_manifest is not None else None,
            "rows": len(previous),
            "kept": int((prev & passes.keep).sum()),
            "evicted_as_near_duplicate": int((prev & ~passes.keep).sum()),
        },
        # what a retrain adds: kept rows the previous run's manifest did not hold
        "new_records": kept - int((prev & passes.keep).sum()),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "config": cfg.model_dump(mode="json"),
    }
    if not report["identity_holds"]:  # a bug, never a data problem: fail loudly
        raise AssertionError(f"row accounting broken: {report}")
    return report


def _length_filter(
    cfg: DataConfig, tok: Any, location: tuple[str, str | None] | None
) -> dict[str, Any]:
    return {
        "applied": tok is not None,
        "tokenizer": location[0] if location else None,
        "tokenizer_revision": location[1] if location else None,
        "unit": "tokens" if tok is not None else "words",
        "counted_text": counted_text(tok)
        if tok is not None
        else "whitespace-separated words of every turn's content",
        "chat_template": tok is not None and has_chat_template(tok),
        "min_tokens": cfg.min_tokens,
        "max_tokens": cfg.max_tokens,
        "note": None
        if tok is not None
        else "skipped: no tokenizer given, so no row was filtered by length",
    }


def _near_dup(cfg: DataConfig, passes: Passes, rejected: dict[str, int]) -> dict[str, Any]:
    return {
        "enabled": cfg.near_dup,
        "library": "rensa",
        "threshold": cfg.near_dup_threshold,
        "num_perm": cfg.near_dup_num_perm,
        "bands": cfg.near_dup_bands,
        "ngram": cfg.near_dup_ngram,
        "boilerplate_paragraphs": len(passes.boiler),
        "near_duplicates": rejected.get("near_duplicate", 0),
        "conflicting_answers": passes.index.conflicts if passes.index is not None else 0,
    }


def write_reports(out_dir: Path, report: dict[str, Any], kept_lengths: list[int]) -> None:
    """``report.json``, the length histogram and ``report.md`` into ``out_dir``."""
    write_json_atomic(out_dir / REPORT_JSON, report)
    _histogram(kept_lengths, report["length_filter"]["unit"], out_dir / HISTOGRAM)
    (out_dir / REPORT_MD).write_text(render_markdown(report), encoding="utf-8")


def _summary(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    a = np.asarray(values)
    return {
        "min": int(a.min()),
        "p50": float(np.percentile(a, 50)),
        "p95": float(np.percentile(a, 95)),
        "max": int(a.max()),
        "mean": round(float(a.mean()), 2),
    }


def _histogram(values: list[int], unit: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.hist(values or [0], bins=50, color="#3b7dd8")
    ax.set_xlabel(f"length of a kept row ({unit})")
    ax.set_ylabel("rows")
    ax.set_title(f"Lengths of {len(values)} kept rows")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def render_markdown(r: dict[str, Any]) -> str:
    """The human-readable report (report.md)."""
    lines = _md_summary(r) + _md_pii(r) + _md_length_filter(r) + _md_dedup_and_timings(r)
    return "\n".join(lines) + "\n"


def _md_summary(r: dict[str, Any]) -> list[str]:
    """The counts, the rejected rows by reason, the sources and the normalisation."""
    lines = [
        "# Data cleaning report",
        "",
        f"- input records: **{r['input_records']}**",
        f"- kept: **{r['kept_records']}** (train {r['splits']['train']}, "
        f"validation {r['splits']['validation']})",
        f"- rejected: **{sum(r['rejected'].values())}** (see `rejected.jsonl`: reason, source, "
        "line and text of every one)",
        f"- identity input = kept + rejected: {'holds' if r['identity_holds'] else 'BROKEN'}",
        f"- fingerprint: `{r['fingerprint']}`",
        "",
        "## Rejected rows by reason",
        "",
        "| reason | rows | meaning |",
        "| --- | ---: | --- |",
    ]
    lines += [f"| {k} | {v} | {REASONS.get(k, '')} |" for k, v in r["rejected"].items()]
    lines += ["", "## Sources", "", "| source | format | records |", "| --- | --- | ---: |"]
    lines += [f"| {s['source']} | {s['format']} | {s['records']} |" for s in r["sources"]]
    lines += ["", "## Normalisation (strings changed, by kind)", ""]
    lines += [f"- {k}: {v}" for k, v in r["normalisation"].items()] or ["- nothing to change"]
    return lines


def _md_pii(r: dict[str, Any]) -> list[str]:
    pii = r["pii"]
    return [
        "",
        "## PII scrubbing",
        "",
        f"- enabled: {pii['enabled']}"
        + (
            f"; replaced {pii['emails']} e-mail addresses and {pii['phones']} phone numbers "
            f"in valid rows (before deduplication), {pii['in_rejected']} in rejected rows"
            if pii["enabled"]
            else ""
        ),
    ]


def _md_length_filter(r: dict[str, Any]) -> list[str]:
    lf = r["length_filter"]
    lines = ["", "## Length filter", ""]
    if lf["applied"]:
        lines.append(
            f"- tokenizer `{lf['tokenizer']}`"
            + (f" @ `{lf['tokenizer_revision']}`" if lf.get("tokenizer_revision") else "")
            + f", kept rows with {lf['min_tokens']}..{lf['max_tokens']} "
            f"tokens; counted: {lf['counted_text']}"
        )
    else:
        lines.append(f"- **{lf['note']}**")
    if r["lengths"]:
        s = r["lengths"]
        lines.append(
            f"- kept-row lengths ({lf['unit']}): min {s['min']}, median {s['p50']:g}, "
            f"p95 {s['p95']:g}, max {s['max']}, mean {s['mean']}"
        )
    return lines


def _md_dedup_and_timings(r: dict[str, Any]) -> list[str]:
    nd = r["near_dup"]
    lines = [
        "",
        f"![length histogram]({HISTOGRAM})",
        "",
        "## Near-duplicates",
        "",
        f"- enabled: {nd['enabled']} ({nd['library']} MinHash, {nd['num_perm']} permutations, "
        f"{nd['bands']} bands, word {nd['ngram']}-grams of the prompt, Jaccard >= "
        f"{nd['threshold']}, same answer required)",
        f"- boilerplate paragraphs left out of the shingles: {nd['boilerplate_paragraphs']}",
        f"- near-duplicates removed: {nd['near_duplicates']}",
        f"- rows with a near-identical prompt but a different answer (kept, check them): "
        f"{nd['conflicting_answers']}",
        "",
        "## Previous manifest",
        "",
        f"- {r['previous_manifest']['path'] or 'none'}: {r['previous_manifest']['rows']} rows, "
        f"{r['previous_manifest']['kept']} kept",
        f"- new rows (kept, not in the previous manifest): {r['new_records']}",
        "",
        "## Timings (s)",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in r["timings_s"].items()]
    return lines


def log_report(tracker: Tracker, cfg: DataConfig, report: dict[str, Any], out_dir: Path) -> None:
    """The stage's params, metrics, fingerprint tag, report artifacts and dataset inputs."""
    from tasks.core.tracking import flatten_params

    tracker.log_params(flatten_params({"data": cfg.model_dump(mode="json")}))
    metrics: dict[str, float] = {
        "data.input_records": report["input_records"],
        "data.kept_records": report["kept_records"],
        "data.train_rows": report["splits"]["train"],
        "data.validation_rows": report["splits"]["validation"],
        "data.pii_emails": report["pii"]["emails"],
        "data.pii_phones": report["pii"]["phones"],
        "data.near_dup_conflicts": report["near_dup"]["conflicting_answers"],
    }
    metrics.update({f"data.rejected.{k}": v for k, v in report["rejected"].items()})
    tracker.log_metrics(metrics)
    tracker.set_tags({"slothflow.data_fingerprint": report["fingerprint"]})
    for name in (REPORT_JSON, REPORT_MD, HISTOGRAM, REJECTED):
        tracker.log_artifact(out_dir / name, "data")
    tracker.log_input(
        "train",
        str(out_dir / TRAIN),
        report["splits"]["train_sha256"],
        "training",
        report["splits"]["train"],
    )
    tracker.log_input(
        "validation",
        str(out_dir / VALIDATION),
        report["splits"]["validation_sha256"],
        "validation",
        report["splits"]["validation"],
    )
