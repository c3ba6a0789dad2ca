"""The data stage: :func:`clean` does the work; :func:`clean_task` wraps it for Prefect.

Three streaming passes, so memory holds per-row *metadata* (ids, lengths, MinHash
signatures), never the rows themselves:

1. read -> normalise -> validate -> scrub PII -> exact dedup -> token-length filter,
   survivors spooled to a temporary JSONL file in ``out_dir``;
2. near-duplicates over the spool, rows taken in order of preference (the previous
   manifest's first, then the cleanest by :func:`~tasks.data.rows.dirtiness`, then the
   earliest), so each cluster keeps its most preferred member;
3. survivors split by a salted hash of their id and written out.

Every input row ends in exactly one place: a split or ``rejected.jsonl`` (reason,
source, line). ``report.json`` checks that identity before the stage returns.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import orjson

from tasks.core.config import DataConfig
from tasks.core.models import LOAD_KWARGS, base_tokenizer_revision, load_base_tokenizer
from tasks.core.orchestration import retry_transient, stage_task
from tasks.core.refs import (
    MARKER,
    BaseModelRef,
    DataRef,
    RunContext,
    data_fingerprint,
    load_done,
    mark_done,
    sha256_file,
    sha256_json,
    write_json_atomic,
)
from tasks.core.revision import tokenizer_revision
from tasks.core.tokens import chat_token_lengths, counted_text, has_chat_template
from tasks.core.tracking import NullTracker, Tracker
from tasks.data import dedup
from tasks.data.read import (
    ProgressFn,
    RawRecord,
    Source,
    SourceError,
    clip,
    read,
    resolve_all,
    source_sha256,
)
from tasks.data.rows import (
    REASONS,
    Message,
    Reject,
    canonical,
    content_text,
    dirtiness,
    prompt_and_answer,
    row_id,
    scrub,
    scrub_messages,
    to_messages,
)

log = logging.getLogger(__name__)

#: Bumped when the cleaning rules change what a given input produces (part of the
#: stage's inputs hash, so old completions are not reused across rule changes).
CLEAN_VERSION = 2
TOKENIZE_BATCH = 1024
#: Longest text kept for a quarantined row whose JSON parsed (line-based rows are
#: already bounded by max_line_bytes).
MAX_REJECTED_TEXT = 100_000

TRAIN = "train.jsonl"
VALIDATION = "validation.jsonl"
REJECTED = "rejected.jsonl"
MANIFEST = "manifest.jsonl"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
HISTOGRAM = "token_lengths.png"
_SPOOL = ".spool.jsonl"
#: A clean is written to ``<out>.staging`` next to its output folder and renamed into
#: place when it is done; one whose data is unusable goes to ``<out>.failed`` instead.
STAGING_SUFFIX = ".staging"
FAILED_SUFFIX = ".failed"
#: Every name a clean writes to its folder, plus the pipeline stage's completion marker.
OUTPUT_NAMES = frozenset(
    {TRAIN, VALIDATION, REJECTED, MANIFEST, REPORT_JSON, REPORT_MD, HISTOGRAM, _SPOOL, MARKER}
)


class DataError(ValueError):
    """The cleaned data cannot feed training (no rows left, empty validation split)."""


# --------------------------------------------------------------------------- helpers


def split_of(rid: str, salt: str, val_fraction: float) -> str:
    """``"validation"`` or ``"train"`` from a salted hash of the row id alone, so adding or
    removing other rows never moves a row to the other split."""
    h = hashlib.sha256(f"{salt}\0{rid}".encode()).digest()
    return "validation" if int.from_bytes(h[:8], "big") / 2**64 < val_fraction else "train"


def load_manifest(path: Path) -> set[str]:
    """Row ids accepted by an earlier run (its ``manifest.jsonl``, or its output folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    if not path.exists():
        raise SourceError(f"previous manifest not found: {path}")
    ids: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                ids.add(json.loads(line)["id"])
    return ids


#: The length filter's tokenizer: the base stage's (the pipeline), a folder or hub id as
#: given (``slothflow data clean --tokenizer``), or none (the filter is skipped).
TokenizerSpec = BaseModelRef | str | None


def _tokenizer_location(tokenizer: TokenizerSpec) -> tuple[str, str | None] | None:
    """``(path or hub id, hub revision)`` of the tokenizer; the revision is the base's
    pinned commit for its own hub tokenizer, ``None`` for a name given as it is."""
    if tokenizer is None:
        return None
    if isinstance(tokenizer, BaseModelRef):
        return tokenizer.tokenizer_path, base_tokenizer_revision(tokenizer)
    return tokenizer, None


def load_tokenizer(tokenizer: TokenizerSpec) -> Any:
    """The base stage's tokenizer exactly as training loads it (pinned revision), or a
    folder / hub id given by name."""
    if tokenizer is None:
        return None
    if isinstance(tokenizer, BaseModelRef):
        return load_base_tokenizer(tokenizer)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer, **LOAD_KWARGS)


def tokenizer_identity(tokenizer: TokenizerSpec) -> str | None:
    """Content hash of a local tokenizer folder's files; a hub id with the commit it is
    pinned to (``org/name@<commit>``), else the name as given."""
    loc = _tokenizer_location(tokenizer)
    if loc is None:
        return None
    path, revision = loc
    p = Path(path)
    if p.is_dir():
        return tokenizer_revision(p)
    return f"{path}@{revision}" if revision else path


def inputs_hash(
    cfg: DataConfig,
    tokenizer: TokenizerSpec,
    previous_manifest: str | Path | None = None,
    sources: list[Source] | None = None,
) -> str:
    """What the stage's output depends on: its config, every source's content, the
    tokenizer, the previous manifest and the cleaning rules' version. ``sources``:
    ``cfg.sources`` already resolved (:func:`resolve_all`), else they are resolved here."""
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
            "sources": [source_sha256(s) for s in sources],
            "tokenizer": tokenizer_identity(tokenizer),
            "previous_manifest": manifest,
        }
    )


_PARTIAL_TAIL = re.compile(r"\S*\Z")


class _Quarantine:
    """``rejected.jsonl`` writer. Scrubs the text it writes when PII scrubbing is on, so
    the quarantine never keeps what scrubbing removed from the clean data."""

    def __init__(self, path: Path, pii: bool) -> None:
        # backslashreplace: a lone surrogate from a JSON escape must not crash the writer
        self.f: IO[str] = open(path, "w", encoding="utf-8", errors="backslashreplace")  # noqa: SIM115
        self.pii = pii
        self.counts: Counter[str] = Counter()
        self.pii_counts: Counter[str] = Counter()  # PII found in rejected rows

    def add(
        self,
        reason: str,
        source: str,
        line: int,
        text: str = "",
        detail: str = "",
        duplicate_of: str | None = None,
        truncated: bool = False,
    ) -> None:
        """``truncated``: ``text`` was cut off (:func:`~tasks.data.read.clip`); a whole
        text is written as it is (scrubbed)."""
        self.counts[reason] += 1
        if self.pii:
            text = scrub(text, self.pii_counts)
            detail = scrub(detail, self.pii_counts)
            if truncated:
                # A cut-off text may end inside an address or number the patterns no
                # longer recognise ("jane.doe@exa"): drop its last, partial token.
                text = _PARTIAL_TAIL.sub("", text)
        row: dict[str, Any] = {"reason": reason, "source": source, "line": line, "text": text}
        if detail:
            row["detail"] = detail
        if duplicate_of:
            row["duplicate_of"] = duplicate_of
        self.f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def add_record(self, rec: RawRecord, reason: str, detail: str) -> None:
        try:
            whole = json.dumps(rec.value, ensure_ascii=False, default=str)
        except (ValueError, RecursionError):
            whole = repr(rec.value)
        text, truncated = clip(whole, MAX_REJECTED_TEXT)
        self.add(reason, rec.source, rec.line, text, detail, truncated=truncated)

    def close(self) -> None:
        self.f.close()


def _token_lengths(tokenizer: Any, msgs_batch: list[list[Message]]) -> list[int]:
    if tokenizer is None:
        return [len(content_text(m).split()) for m in msgs_batch]
    return chat_token_lengths(tokenizer, msgs_batch)


def _spool_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """``(byte offset, line)`` of every spooled row. A spooled line is byte for byte the
    output line (``{"id": ..., "messages": ...}``), so writing the splits copies bytes."""
    offset = 0
    with open(path, "rb") as f:
        for line in f:
            yield offset, line
            offset += len(line)


def _spool_id(line: bytes) -> str:
    # orjson keeps insertion order: every spooled line starts with {"id":"<32 hex>"
    return line[7:39].decode("ascii")


# --------------------------------------------------------------------------- the stage


@dataclass
class _Spooled:
    """What pass 1 leaves for the later passes: per spooled row, a few bytes in compact
    arrays (never a Python object per row), plus the counters for the report."""

    input_records: int = 0
    per_source: Counter[str] = field(default_factory=Counter)
    names: list[str] = field(default_factory=list)  # source names as rejected.jsonl shows them
    source_no: array[int] = field(default_factory=lambda: array("H"))
    lines_no: array[int] = field(default_factory=lambda: array("q"))
    lengths: array[int] = field(default_factory=lambda: array("i"))
    offsets: array[int] = field(default_factory=lambda: array("q"))  # in the spool
    dirt: array[int] = field(default_factory=lambda: array("I"))  # rows.dirtiness
    in_previous: bytearray = field(default_factory=bytearray)
    para_counts: Counter[int] = field(default_factory=Counter)
    norm: Counter[str] = field(default_factory=Counter)
    pii: Counter[str] = field(default_factory=Counter)
    _name_no: dict[str, int] = field(default_factory=dict)

    def source_index(self, name: str) -> int:
        if name not in self._name_no:
            self._name_no[name] = len(self.names)
            self.names.append(name)
        return self._name_no[name]


_WAITING, _FILTERED = -1, -2


@dataclass(slots=True)
class _Pending:
    """A row waiting for the length filter (one tokenizer call per batch)."""

    source: int
    line: int
    rid: str
    msgs: list[Message]
    dirt: int


def _read_pass(
    cfg: DataConfig,
    sources: list[Source],
    tokenizer: Any,
    previous: set[str],
    quarantine: _Quarantine,
    spool_path: Path,
    progress: ProgressFn | None,
) -> _Spooled:
    """Pass 1: read -> normalise -> validate -> scrub -> exact dedup -> length filter.

    Of exact duplicates (the same row after normalisation) the cleanest copy is the kept
    one (:func:`~tasks.data.rows.dirtiness`, the earliest of equals): the copies' text is
    the same, but the quarantine then names the sloppier copies' source and line."""
    st = _Spooled()
    # Row id -> its kept copy: a spool index, _WAITING (in ``pending``, ``waiting[rid]``)
    # or _FILTERED (removed by the length filter, which its copies would fail too).
    seen: dict[str, int] = {}
    waiting: dict[str, _Pending] = {}
    pending: list[_Pending] = []
    offset = 0
    with open(spool_path, "wb") as spool:

        def flush() -> None:
            nonlocal offset
            # Batched: one tokenizer call per TOKENIZE_BATCH rows, not one per row.
            lengths = _token_lengths(tokenizer, [p.msgs for p in pending])
            for p, n in zip(pending, lengths, strict=True):
                reason = None
                if tokenizer is not None and n < cfg.min_tokens:
                    reason = "too_few_tokens"
                elif tokenizer is not None and n > cfg.max_tokens:
                    reason = "too_many_tokens"
                if reason is not None:
                    seen[p.rid] = _FILTERED
                    text = canonical(p.msgs)
                    quarantine.add(reason, st.names[p.source], p.line, text, f"{n} tokens")
                    continue
                seen[p.rid] = len(st.lengths)
                line = orjson.dumps({"id": p.rid, "messages": p.msgs}) + b"\n"
                spool.write(line)
                st.offsets.append(offset)
                offset += len(line)
                st.lengths.append(n)
                st.lines_no.append(p.line)
                st.source_no.append(p.source)
                st.dirt.append(min(p.dirt, 0xFFFFFFFF))
                st.in_previous.append(p.rid in previous)
                msgs = p.msgs
                if cfg.near_dup:
                    keys = dedup.paragraph_keys(prompt_and_answer(msgs)[0])
                    if len(keys) > 1:  # a one-paragraph prompt has no boilerplate to drop
                        st.para_counts.update(keys)
            pending.clear()
            waiting.clear()

        def keep_cleaner(rid: str, si: int, line: int, dirt: int) -> tuple[int, int]:
            """The copy of ``rid`` to quarantine as the duplicate, ``(source, line)``: the
            new one, unless it is cleaner than the kept one, which it then replaces."""
            k = seen[rid]
            if k == _WAITING:
                p = waiting[rid]
                if dirt < p.dirt:
                    loser = (p.source, p.line)
                    p.source, p.line, p.dirt = si, line, dirt
                    return loser
            elif k >= 0 and dirt < st.dirt[k]:
                loser = (st.source_no[k], st.lines_no[k])
                st.source_no[k], st.lines_no[k], st.dirt[k] = si, line, dirt
                return loser
            return si, line

        for src in sources:
            for rec in read(src, cfg.max_line_bytes, progress):
                st.input_records += 1
                st.per_source[src.name] += 1
                if rec.reason is not None:
                    quarantine.add(
                        rec.reason,
                        rec.source,
                        rec.line,
                        rec.text,
                        rec.detail,
                        truncated=rec.truncated,
                    )
                    continue
                fixes: Counter[str] = Counter()
                try:
                    msgs = to_messages(rec.value, fixes)
                except Reject as r:
                    st.norm.update(fixes)
                    quarantine.add_record(rec, r.reason, r.detail)
                    continue
                st.norm.update(fixes)
                if cfg.pii_scrub:
                    msgs = scrub_messages(msgs, st.pii)
                rid = row_id(msgs)
                si = st.source_index(rec.source)
                dirt = dirtiness(msgs, fixes)
                if rid in seen:
                    lsi, lline = keep_cleaner(rid, si, rec.line, dirt)
                    text = canonical(msgs)
                    quarantine.add("exact_duplicate", st.names[lsi], lline, text, duplicate_of=rid)
                    continue
                seen[rid] = _WAITING
                p = _Pending(si, rec.line, rid, msgs, dirt)
                waiting[rid] = p
                pending.append(p)
                if len(pending) >= TOKENIZE_BATCH:
                    flush()
        flush()
    return st


def _near_dup_pass(
    cfg: DataConfig, st: _Spooled, quarantine: _Quarantine, spool_path: Path
) -> tuple[np.ndarray, dedup.NearDupIndex | None, set[int]]:
    """Pass 2: which spooled rows survive near-dedup. The index keeps the first row
    inserted of each cluster, so rows go in by preference: those of the previous manifest
    first (a later arrival never evicts them), then the cleanest
    (:func:`~tasks.data.rows.dirtiness`), then the earliest."""
    n = len(st.lengths)
    keep = np.ones(n, dtype=bool)
    if not cfg.near_dup or not n:
        return keep, None, set()
    boiler = dedup.boilerplate(st.para_counts, n, cfg.near_dup_boilerplate_fraction)
    index = dedup.NearDupIndex(cfg.near_dup_threshold, cfg.near_dup_num_perm, cfg.near_dup_bands, n)
    prev = np.frombuffer(bytes(st.in_previous), dtype=np.uint8)
    order = np.lexsort((np.arange(n), np.asarray(st.dirt, dtype=np.int64), 1 - prev))
    kept_ids: list[str] = []
    kept_rows: list[int] = []  # the spool row of each kept one, to re-read it
    with open(spool_path, "rb") as spool, open(spool_path, "rb") as reread:

        def shingles_of(k: int) -> list[str]:
            reread.seek(st.offsets[kept_rows[k]])
            msgs = orjson.loads(reread.readline())["messages"]
            return dedup.shingles(prompt_and_answer(msgs)[0], boiler, cfg.near_dup_ngram)

        for i in order.tolist():
            # In file order when nothing is preferred: the seeks stay inside the buffer.
            spool.seek(st.offsets[i])
            row = orjson.loads(spool.readline())
            prompt, answer = prompt_and_answer(row["messages"])
            tokens = dedup.shingles(prompt, boiler, cfg.near_dup_ngram)
            if not tokens:
                continue
            hit = index.add(tokens, dedup.answer_key(answer), shingles_of)
            if hit is None:
                kept_ids.append(row["id"])
                kept_rows.append(i)
            else:
                keep[i] = False
                quarantine.add(
                    "near_duplicate",
                    st.names[st.source_no[i]],
                    st.lines_no[i],
                    canonical(row["messages"]),
                    duplicate_of=kept_ids[hit],
                )
    return keep, index, boiler


def _write_pass(
    cfg: DataConfig, st: _Spooled, keep: np.ndarray, spool_path: Path, out_dir: Path
) -> tuple[dict[str, int], list[int], dict[str, str]]:
    """Pass 3: split the survivors by hash and copy their spooled lines out. Returns the
    rows per split, the kept rows' lengths and each split file's sha256, hashed as it is
    written (the very bytes of the file, so no second read of it)."""
    counts = {"train": 0, "validation": 0}
    digests = {"train": hashlib.sha256(), "validation": hashlib.sha256()}
    kept_lengths: list[int] = []
    with (
        open(out_dir / TRAIN, "wb") as ftrain,
        open(out_dir / VALIDATION, "wb") as fval,
        open(out_dir / MANIFEST, "wb") as fman,
    ):
        for i, (_, line) in enumerate(_spool_lines(spool_path)):
            if not keep[i]:
                continue
            rid = _spool_id(line)
            split = split_of(rid, cfg.split_salt, cfg.val_fraction)
            counts[split] += 1
            kept_lengths.append(st.lengths[i])
            (fval if split == "validation" else ftrain).write(line)
            digests[split].update(line)
            fman.write(b'{"id":"%s","split":"%s"}\n' % (rid.encode(), split.encode()))
    return counts, kept_lengths, {k: h.hexdigest() for k, h in digests.items()}


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
    _check_replaceable(out_dir)
    t_start = time.perf_counter()
    if sources is None:
        sources = resolve_all(cfg.sources)
    tok = load_tokenizer(tokenizer)
    location = _tokenizer_location(tokenizer)
    if tok is None:
        log.warning(
            "no tokenizer given: the token-length filter (min_tokens=%d, max_tokens=%d) is "
            "SKIPPED; lengths in the report are whitespace-separated words",
            cfg.min_tokens,
            cfg.max_tokens,
        )
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
    kept = counts["train"] + counts["validation"]
    error = None
    if kept == 0:
        top = ", ".join(f"{k}={v}" for k, v in Counter(report["rejected"]).most_common(3))
        error = DataError(
            f"no rows left after cleaning: all {report['input_records']} input rows were "
            f"rejected ({top}); see {failed / REJECTED}"
        )
    elif counts["validation"] == 0:
        error = DataError(
            f"the validation split is empty: {kept} rows kept and none hashed into validation "
            f"(data.val_fraction={cfg.val_fraction}); add rows or raise data.val_fraction "
            f"(reports in {failed})"
        )
    dest = failed if error is not None else out_dir
    _publish(staging, dest)
    _log(tracker, cfg, report, dest)
    if error is not None:
        raise error
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
    )


def _check_replaceable(out_dir: Path) -> None:
    """Refuse an output folder that holds anything a clean does not write (the inputs, a
    user's files): it is replaced as a whole."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise DataError(f"output folder {out_dir} is a file")
    tmp = tuple(f".{n}." for n in (REPORT_JSON, MARKER))  # write_json_atomic's temp files
    foreign = sorted(
        p.name
        for p in out_dir.iterdir()
        if p.name not in OUTPUT_NAMES and not (p.name.startswith(tmp) and p.name.endswith(".tmp"))
    )
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise DataError(
            f"output folder {out_dir} holds files a data clean does not write ({shown}); it "
            "is replaced as a whole: give a new or empty folder"
        )


def _publish(staging: Path, dest: Path) -> None:
    """Rename the finished ``staging`` folder to ``dest``. A reader of ``dest`` sees the
    folder it replaces or the new one, never a part of either."""
    old = dest.with_name(f".{dest.name}.replaced")
    if old.exists():
        shutil.rmtree(old)
    if dest.exists():
        dest.rename(old)
    staging.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


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
    elif names & {REJECTED, MANIFEST, _SPOOL}:
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
    quarantine = _Quarantine(out_dir / REJECTED, cfg.pii_scrub)
    spool_path = out_dir / _SPOOL
    try:
        st = _read_pass(cfg, sources, tok, previous, quarantine, spool_path, progress)
        timings["read_normalise_filter_s"] = time.perf_counter() - t_start
        t = time.perf_counter()
        keep, index, boiler = _near_dup_pass(cfg, st, quarantine, spool_path)
        timings["near_dup_s"] = time.perf_counter() - t
        t = time.perf_counter()
        counts, kept_lengths, digests = _write_pass(cfg, st, keep, spool_path, out_dir)
        timings["split_write_s"] = time.perf_counter() - t
    finally:
        quarantine.close()
        spool_path.unlink(missing_ok=True)

    kept = counts["train"] + counts["validation"]
    rejected = dict(sorted(quarantine.counts.items()))
    train_sha, val_sha = digests["train"], digests["validation"]
    prev = np.frombuffer(bytes(st.in_previous), dtype=np.uint8).astype(bool)
    timings["total_s"] = time.perf_counter() - t_start
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
            "in_rejected": dict(quarantine.pii_counts),
        },
        "length_filter": {
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
        },
        "lengths": _summary(kept_lengths),
        "near_dup": {
            "enabled": cfg.near_dup,
            "library": "rensa",
            "threshold": cfg.near_dup_threshold,
            "num_perm": cfg.near_dup_num_perm,
            "bands": cfg.near_dup_bands,
            "ngram": cfg.near_dup_ngram,
            "boilerplate_paragraphs": len(boiler),
            "near_duplicates": rejected.get("near_duplicate", 0),
            "conflicting_answers": index.conflicts if index is not None else 0,
        },
        "previous_manifest": {
            "path": str(previous_manifest) if previous_manifest is not None else None,
            "rows": len(previous),
            "kept": int((prev & keep).sum()),
            "evicted_as_near_duplicate": int((prev & ~keep).sum()),
        },
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "config": cfg.model_dump(mode="json"),
    }
    if not report["identity_holds"]:  # a bug, never a data problem: fail loudly
        raise AssertionError(f"row accounting broken: {report}")
    write_json_atomic(out_dir / REPORT_JSON, report)
    _histogram(kept_lengths, report["length_filter"]["unit"], out_dir / HISTOGRAM)
    (out_dir / REPORT_MD).write_text(render_markdown(report), encoding="utf-8")
    return report, counts


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
    lf = r["length_filter"]
    nd = r["near_dup"]
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
    pii = r["pii"]
    lines += [
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
        "",
        "## Length filter",
        "",
    ]
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
    lines += [
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
        "",
        "## Timings (s)",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in r["timings_s"].items()]
    return "\n".join(lines) + "\n"


def _log(tracker: Tracker, cfg: DataConfig, report: dict[str, Any], out_dir: Path) -> None:
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


# --------------------------------------------------------------------------- Prefect


@stage_task(
    name="data",
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
    """The data stage of a pipeline run: reuses a finished result for identical inputs.
    ``tokenizer`` is the base stage's reference in the pipeline (see :func:`clean`)."""
    from tasks.core.run import stage

    with stage(ctx, "data") as tracker:
        stage_dir = ctx.stage_dir("data")
        sources = resolve_all(cfg.sources)  # once: for the inputs hash and the clean
        ihash = inputs_hash(cfg, tokenizer, previous_manifest, sources)
        done = load_done(stage_dir, ihash, DataRef)
        if done is not None:
            log.info("data: inputs unchanged; reusing %s", done.path)
            tracker.set_tags({"slothflow.reused": "true"})
            return done
        ref = clean(
            cfg,
            stage_dir,
            tokenizer,
            Path(previous_manifest) if previous_manifest else None,
            tracker,
            sources=sources,
        )
        tracker.log_params({"data.inputs_hash": ihash})
        mark_done(stage_dir, ihash, ref)
        return ref


__all__ = [
    "DataError",
    "Source",
    "check_output",
    "clean",
    "clean_task",
    "inputs_hash",
    "load_manifest",
    "split_of",
]
