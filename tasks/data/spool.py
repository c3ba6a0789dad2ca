"""Pass 1: read -> normalise -> validate -> scrub PII -> exact dedup -> token-length
filter, survivors spooled to a JSONL file in the staging folder. Memory holds a few
bytes of metadata per spooled row, never the rows themselves."""

from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from tasks.core.config import DataConfig
from tasks.data import dedup
from tasks.data.quarantine import Quarantine
from tasks.data.read import ProgressFn, RawRecord, Source, read
from tasks.data.rows import (
    Message,
    Reject,
    canonical,
    dirtiness,
    prompt_and_answer,
    row_id,
    scrub_messages,
    to_messages,
)
from tasks.data.tokenizer import token_lengths

TOKENIZE_BATCH = 1024


@dataclass
class Spooled:
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


class _ReadPass:
    """The state of pass 1 while it runs (see :func:`read_pass`)."""

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer: Any,
        previous: set[str],
        quarantine: Quarantine,
        spool: IO[bytes],
    ) -> None:
        self.cfg, self.tokenizer, self.previous = cfg, tokenizer, previous
        self.quarantine, self.spool = quarantine, spool
        self.st = Spooled()
        # Row id -> its kept copy: a spool index, _WAITING (in ``pending``, ``waiting[rid]``)
        # or _FILTERED (removed by the length filter, which its copies would fail too).
        self.seen: dict[str, int] = {}
        self.waiting: dict[str, _Pending] = {}
        self.pending: list[_Pending] = []
        self.offset = 0

    def flush(self) -> None:
        """Length-filter the pending rows and spool the survivors. Batched: one tokenizer
        call per TOKENIZE_BATCH rows, not one per row."""
        cfg, st = self.cfg, self.st
        lengths = token_lengths(self.tokenizer, [p.msgs for p in self.pending])
        for p, n in zip(self.pending, lengths, strict=True):
            reason = None
            if self.tokenizer is not None and n < cfg.min_tokens:
                reason = "too_few_tokens"
            elif self.tokenizer is not None and n > cfg.max_tokens:
                reason = "too_many_tokens"
            if reason is not None:
                self.seen[p.rid] = _FILTERED
                text = canonical(p.msgs)
                self.quarantine.add(reason, st.names[p.source], p.line, text, f"{n} tokens")
                continue
            self._spool(p, n)
        self.pending.clear()
        self.waiting.clear()

    def _spool(self, p: _Pending, n: int) -> None:
        st = self.st
        self.seen[p.rid] = len(st.lengths)
        line = orjson.dumps({"id": p.rid, "messages": p.msgs}) + b"\n"
        self.spool.write(line)
        st.offsets.append(self.offset)
        self.offset += len(line)
        st.lengths.append(n)
        st.lines_no.append(p.line)
        st.source_no.append(p.source)
        st.dirt.append(min(p.dirt, 0xFFFFFFFF))
        st.in_previous.append(p.rid in self.previous)
        if self.cfg.near_dup:
            keys = dedup.paragraph_keys(prompt_and_answer(p.msgs)[0])
            if len(keys) > 1:  # a one-paragraph prompt has no boilerplate to drop
                st.para_counts.update(keys)

    def keep_cleaner(self, rid: str, si: int, line: int, dirt: int) -> tuple[int, int]:
        """The copy of ``rid`` to quarantine as the duplicate, ``(source, line)``: the
        new one, unless it is cleaner than the kept one, which it then replaces."""
        st = self.st
        k = self.seen[rid]
        if k == _WAITING:
            p = self.waiting[rid]
            if dirt < p.dirt:
                loser = (p.source, p.line)
                p.source, p.line, p.dirt = si, line, dirt
                return loser
        elif k >= 0 and dirt < st.dirt[k]:
            loser = (st.source_no[k], st.lines_no[k])
            st.source_no[k], st.lines_no[k], st.dirt[k] = si, line, dirt
            return loser
        return si, line

    def take(self, rec: RawRecord) -> None:
        """One record read from a source: quarantined, counted as a duplicate or queued
        for the length filter."""
        st, quarantine = self.st, self.quarantine
        if rec.reason is not None:
            quarantine.add(
                rec.reason,
                rec.source,
                rec.line,
                rec.text,
                rec.detail,
                truncated=rec.truncated,
            )
            return
        fixes: Counter[str] = Counter()
        try:
            msgs = to_messages(rec.value, fixes)
        except Reject as r:
            st.norm.update(fixes)
            quarantine.add_record(rec, r.reason, r.detail)
            return
        st.norm.update(fixes)
        if self.cfg.pii_scrub:
            msgs = scrub_messages(msgs, st.pii)
        rid = row_id(msgs)
        si = st.source_index(rec.source)
        dirt = dirtiness(msgs, fixes)
        if rid in self.seen:
            lsi, lline = self.keep_cleaner(rid, si, rec.line, dirt)
            text = canonical(msgs)
            quarantine.add("exact_duplicate", st.names[lsi], lline, text, duplicate_of=rid)
            return
        self.seen[rid] = _WAITING
        p = _Pending(si, rec.line, rid, msgs, dirt)
        self.waiting[rid] = p
        self.pending.append(p)
        if len(self.pending) >= TOKENIZE_BATCH:
            self.flush()


def read_pass(
    cfg: DataConfig,
    sources: list[Source],
    tokenizer: Any,
    previous: set[str],
    quarantine: Quarantine,
    spool_path: Path,
    progress: ProgressFn | None,
) -> Spooled:
    """Pass 1: read -> normalise -> validate -> scrub -> exact dedup -> length filter.

    Of exact duplicates (the same row after normalisation) the cleanest copy is the kept
    one (:func:`~tasks.data.rows.dirtiness`, the earliest of equals): the copies' text is
    the same, but the quarantine then names the sloppier copies' source and line."""
    with open(spool_path, "wb") as spool:
        rp = _ReadPass(cfg, tokenizer, previous, quarantine, spool)
        for src in sources:
            for rec in read(src, cfg.max_line_bytes, progress):
                rp.st.input_records += 1
                rp.st.per_source[src.name] += 1
                rp.take(rec)
        rp.flush()
    return rp.st


def spool_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """``(byte offset, line)`` of every spooled row. A spooled line is byte for byte the
    output line (``{"id": ..., "messages": ...}``), so writing the splits copies bytes."""
    offset = 0
    with open(path, "rb") as f:
        for line in f:
            yield offset, line
            offset += len(line)


def spool_id(line: bytes) -> str:
    # orjson keeps insertion order: every spooled line starts with {"id":"<32 hex>"
    return line[7:39].decode("ascii")
